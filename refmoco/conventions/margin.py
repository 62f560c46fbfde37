"""The margin contrastive loss with the opposite label polarity: **1 = similar**, as in
TensorFlow Addons (``tfa.losses.contrastive_loss``) and Caffe (``ContrastiveLossLayer``).

Hadsell et al. (2006) and :func:`refmoco.contrastive_loss` use 0 = similar. The forms:

- TensorFlow Addons takes the **distances** ``y_pred`` (not the embeddings) and computes
  ``y * d**2 + (1 - y) * max(margin - d, 0)**2`` per pair, with no 1/2; the ``ContrastiveLoss``
  class averages over the batch. It is twice ``refmoco.contrastive_loss`` with ``y`` flipped.
- Caffe computes ``sum(y d**2 + (1 - y) max(margin - d, 0)**2) / (2 N)``: exactly
  ``refmoco.contrastive_loss(a, b, 1 - y)``. Its backward, though, divides by ``d + 1e-4``
  instead of ``d`` for dissimilar pairs, and ``legacy_version`` uses ``max(margin - d**2, 0)``.

References
----------
- Hadsell, Chopra, LeCun. Dimensionality Reduction by Learning an Invariant Mapping. CVPR 2006.
- TensorFlow Addons, ``tensorflow_addons/losses/contrastive.py``.
- Caffe, ``src/caffe/layers/contrastive_loss_layer.cpp``.
"""

from __future__ import annotations

import numpy as np

from .._checks import check_positive, check_same_dtype, check_wrt
from ..backend import as_array, float_array, to_numpy
from ..losses import LossOutput


def _similar(y, n: int) -> np.ndarray:
    y = to_numpy(as_array(y, "y"))
    if y.shape != (n,):
        raise ValueError(f"y: expected shape ({n},), got {y.shape}")
    return y


def tfa_contrastive_loss(y_true, y_pred, *, margin=1.0, reduction="mean", wrt=None):
    r"""``tfa.losses.ContrastiveLoss(margin)(y_true, y_pred)`` (``reduction="none"``: the
    function ``tfa.losses.contrastive_loss``).

    Parameters
    ----------
    y_true : ndarray of shape (N,)
        **1 = similar pair, 0 = dissimilar**; cast to the distances' dtype, as tfa does.
    y_pred : ndarray of shape (N,)
        The pairs' distances (tfa never sees the embeddings).
    margin : float
    reduction : {"mean", "sum", "none"}
        ``"mean"`` is Keras' ``SUM_OVER_BATCH_SIZE``; ``"none"`` returns the (N,) terms and no
        gradient.
    wrt : tuple of str, optional
        ``("y_pred",)`` or ``()``.

    Returns
    -------
    LossOutput

    Notes
    -----
    .. math:: \ell_i = y_i d_i^2 + (1 - y_i) \max(m - d_i, 0)^2, \qquad
              \frac{\partial \ell_i}{\partial d_i} = 2 y_i d_i - 2 (1 - y_i) \max(m - d_i, 0)

    Examples
    --------
    >>> import numpy as np
    >>> from refmoco.conventions.margin import tfa_contrastive_loss
    >>> float(tfa_contrastive_loss(np.array([1, 0]), np.array([0.5, 0.25])).loss)
    0.40625
    """
    d = float_array(y_pred, "y_pred", ndim=1)
    y = _similar(y_true, len(d)).astype(d.dtype)
    m = d.dtype.type(check_positive(margin, "margin"))
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    hinge = np.maximum(m - d, 0)  # (N,)
    terms = y * d**2 + (1 - y) * hinge**2  # (N,)
    if reduction == "none":
        return LossOutput(terms, {})
    scale = d.dtype.type(1.0 / len(d) if reduction == "mean" else 1.0)
    grads = {}
    if "y_pred" in check_wrt(wrt, ("y_pred",)):
        grads["y_pred"] = scale * (2 * y * d - 2 * (1 - y) * hinge)
    return LossOutput(np.asarray(terms.sum() * scale), grads)


def caffe_contrastive_loss(a, b, y, *, margin=1.0, legacy_version=False, wrt=None):
    r"""Caffe's ``ContrastiveLoss`` layer: forward and **its** backward.

    Parameters
    ----------
    a, b : ndarray of shape (N, C)
        The two bottoms.
    y : ndarray of shape (N,)
        The third bottom: **non-zero = similar** (``static_cast<int>(y)``), 0 = dissimilar.
    margin : float
    legacy_version : bool
        Use ``max(margin - d**2, 0)`` for dissimilar pairs (Caffe's old form).
    wrt : tuple of str, optional
        Subset of ``("a", "b")``.

    Returns
    -------
    LossOutput
        The loss and the gradients Caffe's ``Backward_cpu`` writes.

    Notes
    -----
    .. math:: L = \frac{1}{2N} \sum_i \big[y_i d_i^2 + (1 - y_i) \max(m - d_i, 0)^2\big]

    Caffe's gradient for a dissimilar pair inside the margin is
    :math:`-\frac{m - d_i}{d_i + 10^{-4}} (a_i - b_i) / N`, not the exact
    :math:`-\frac{m - d_i}{d_i} (a_i - b_i) / N`: the two differ by a relative :math:`10^{-4}/d_i`.
    With ``legacy_version`` it is :math:`-(a_i - b_i)/N` where :math:`m - d_i^2 > 0`.

    Examples
    --------
    >>> import numpy as np
    >>> from refmoco.conventions.margin import caffe_contrastive_loss
    >>> a = np.zeros((2, 2)); b = np.array([[3.0, 4.0], [0.3, 0.4]])
    >>> float(caffe_contrastive_loss(a, b, np.array([1, 0])).loss)   # similar, then dissimilar
    6.3125
    """
    a = float_array(a, "a", ndim=2)
    b = float_array(b, "b", ndim=2)
    dtype = check_same_dtype({"a": a, "b": b})
    if a.shape != b.shape:
        raise ValueError(f"b: expected the shape of a {a.shape}, got {b.shape}")
    n = len(a)
    similar = _similar(y, n).astype(np.int64) != 0  # static_cast<int>
    m = dtype.type(check_positive(margin, "margin"))
    diff = a - b  # (N, C): diff_
    dist_sq = (diff * diff).sum(axis=1)  # (N,): dist_sq_
    dist = np.sqrt(dist_sq)
    mdist = (m - dist_sq) if legacy_version else (m - dist)  # (N,)
    dissimilar = (mdist if legacy_version else np.maximum(mdist, 0) ** 2)
    dissimilar = np.maximum(dissimilar, 0)
    loss = np.where(similar, dist_sq, dissimilar).sum() / dtype.type(n) / dtype.type(2)
    alpha = dtype.type(1.0 / n)
    beta = -alpha if legacy_version else -alpha * mdist / (dist + dtype.type(1e-4))  # (N,)
    coef = np.where(similar, alpha, np.where(mdist > 0, beta, 0))  # (N,)
    da = coef[:, None] * diff  # (N, C)
    grads = {"a": da, "b": -da}
    return LossOutput(np.asarray(loss), {w: grads[w] for w in check_wrt(wrt, ("a", "b"))})
