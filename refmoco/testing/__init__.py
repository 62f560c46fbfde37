"""Tools for testing gradients and implementations against refmoco.

``check_grad`` compares hand-written (or autograd) gradients with central finite differences in
float64; ``assert_close`` compares arrays with tolerances that follow their dtype. The
``compare_*`` helpers check a PyTorch, JAX or NumPy implementation (a loss, a loss and its
autograd gradients, a queue, a momentum update, a whole MoCo step) against refmoco over inputs
drawn by hypothesis, and report the smallest input that differs; ``like`` hands refmoco's results
back as the caller's array type. The hypothesis strategies are in
:mod:`refmoco.testing.strategies` (importing that module imports hypothesis; this one does not).
"""

from .compare import (
    ComparisonReport,
    Difference,
    compare_loss,
    compare_loss_and_grad,
    compare_moco_step,
    compare_momentum,
    compare_queue,
    like,
    to_framework,
)
from .gradcheck import GradCheck, assert_close, check_grad, default_tolerance

__all__ = [
    "ComparisonReport",
    "Difference",
    "GradCheck",
    "assert_close",
    "check_grad",
    "compare_loss",
    "compare_loss_and_grad",
    "compare_moco_step",
    "compare_momentum",
    "compare_queue",
    "default_tolerance",
    "like",
    "to_framework",
]
