"""Contrastive losses with hand-written gradients.

Each public loss returns ``LossOutput(loss, grads)``. Inside, each is a forward/backward pair:
``*_forward`` returns per-example losses and a small cache, ``*_backward`` turns the gradient of
the per-example losses into gradients of the arguments. The derivations, in the order the code
computes them, are in ``docs/derivations.md``.

References
----------
- Hadsell, Chopra, LeCun. Dimensionality Reduction by Learning an Invariant Mapping. CVPR 2006.
- He et al. Momentum Contrast for Unsupervised Visual Representation Learning. arXiv:1911.05722.
- van den Oord, Li, Vinyals. Representation Learning with Contrastive Predictive Coding.
  arXiv:1807.03748.
- Wu et al. Unsupervised Feature Learning via Non-Parametric Instance Discrimination. CVPR 2018.
"""

from .contrastive import (
    ContrastiveCache,
    contrastive_backward,
    contrastive_forward,
    contrastive_loss,
)
from .cpc import cpc_loss, mi_lower_bound
from .info_nce import InfoNCECache, info_nce_backward, info_nce_forward, info_nce_loss
from .normalize import l2_normalize
from .softmax import LossOutput, XentCache, softmax_cross_entropy, xent_backward, xent_forward

__all__ = [
    "ContrastiveCache",
    "InfoNCECache",
    "LossOutput",
    "XentCache",
    "contrastive_backward",
    "contrastive_forward",
    "contrastive_loss",
    "cpc_loss",
    "info_nce_backward",
    "info_nce_forward",
    "info_nce_loss",
    "l2_normalize",
    "mi_lower_bound",
    "softmax_cross_entropy",
    "xent_backward",
    "xent_forward",
]
