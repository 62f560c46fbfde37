"""Tools for testing gradients and implementations against refmoco.

``check_grad`` compares hand-written (or autograd) gradients with central finite differences in
float64; ``assert_close`` compares arrays with tolerances that follow their dtype.
"""

from .gradcheck import GradCheck, assert_close, check_grad, default_tolerance

__all__ = ["GradCheck", "assert_close", "check_grad", "default_tolerance"]
