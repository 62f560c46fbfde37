"""refmoco: a reference implementation of momentum contrast, InfoNCE and CPC.

Readable NumPy code with hand-written gradients that are checked against finite differences
and property-based tests. ``import refmoco`` imports NumPy only: Numba and CuPy are imported
the first time a backend needs them.
"""

from .backend import Backend, BackendUnavailableError, resolve, to_numpy
from .dictionary import MemoryBank, Queue
from .losses import (
    LossOutput,
    contrastive_loss,
    cpc_loss,
    info_nce_loss,
    l2_normalize,
    mi_lower_bound,
    softmax_cross_entropy,
)
from .momentum import cosine_momentum, momentum_update

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "LossOutput",
    "MemoryBank",
    "Queue",
    "contrastive_loss",
    "cosine_momentum",
    "cpc_loss",
    "info_nce_loss",
    "l2_normalize",
    "mi_lower_bound",
    "momentum_update",
    "resolve",
    "softmax_cross_entropy",
    "to_numpy",
]
