"""Softmax cross-entropy along the last axis: the core of every InfoNCE form, and the
``LossOutput`` every loss returns."""

from __future__ import annotations

from typing import Any, NamedTuple

from .._checks import check_reduction, check_same_device, check_wrt
from ..backend import as_array, float_array, resolve


class LossOutput(NamedTuple):
    """A loss and its gradients: ``loss`` is a 0-d array, ``grads`` maps argument name to
    the gradient of ``loss`` with respect to that argument (same shape and dtype)."""

    loss: Any
    grads: dict


def _reduce(per_example, reduction: str, xp):
    """The reduced loss as a 0-d array and the gradient scale of each term (1/n or 1)."""
    n = per_example.size
    total = per_example.sum(dtype=per_example.dtype)
    if reduction == "mean":
        scale = 1.0 / n if n else 0.0
        return xp.asarray(total * per_example.dtype.type(scale)), scale
    return xp.asarray(total), 1.0


class XentCache(NamedTuple):
    probs: Any  # softmax of the logits, same shape as the logits
    labels: Any  # integer target index per row, shape logits.shape[:-1]


def xent_forward(logits, labels, xp, *, overwrite=False):
    """Per-row cross-entropy ``-log softmax(logits)[label]`` along the last axis.

    ``lse = m + log(sum(exp(logits - m)))`` with ``m`` the row maximum, so that tiny
    temperatures and large norms never overflow. One array the size of the logits is made
    (none with ``overwrite=True``, which reuses ``logits`` itself: the caller's own buffer);
    the shift, the exponential and the normalisation then run in place on it.

    Empty logits (no rows: an empty batch, in which a row may have no columns either, as the
    (0, 0) logits of in-batch negatives) give empty losses; rows without columns are a
    ``ValueError`` (their labels cannot be in ``[0, 0)``).
    """
    if logits.size == 0:  # nothing to reduce; a maximum over no columns has no identity
        if labels.size:
            raise ValueError("logits: expected at least one class (M >= 1) for the labels")
        probs = logits if overwrite else logits.copy()
        return xp.zeros(logits.shape[:-1], dtype=logits.dtype), XentCache(probs, labels)
    m = logits.max(axis=-1, keepdims=True)  # (..., 1)
    target = xp.take_along_axis(logits, labels[..., None], axis=-1) - m  # (..., 1)
    probs = xp.subtract(logits, m, out=logits if overwrite else None)  # (..., M), every entry <= 0
    xp.exp(probs, out=probs)  # (..., M), the largest entry of each row is 1
    sumexp = probs.sum(axis=-1, keepdims=True)  # (..., 1), in [1, M]
    losses = (xp.log(sumexp) - target)[..., 0]  # (...,)
    probs /= sumexp  # (..., M): softmax(logits)
    return losses, XentCache(probs, labels)


def xent_backward(dlosses, cache: XentCache, xp, *, overwrite=False):
    """``dlogits = dloss * (softmax(logits) - onehot(label))``; ``overwrite=True`` writes it
    into the cache's softmax (which is then gone)."""
    if cache.probs.size == 0:  # an empty batch: no row to pick a label from
        return cache.probs if overwrite else cache.probs.copy()
    dlogits = xp.multiply(cache.probs, dlosses[..., None], out=cache.probs if overwrite else None)
    # minus dloss at each row's label, in place whatever the strides: one entry per row, so no
    # two writes meet (CuPy 13 has no put_along_axis)
    lead = dlogits.shape[:-1]  # the axes of the losses
    rows = tuple(xp.arange(n).reshape((n,) + (1,) * (len(lead) - 1 - i)) for i, n in enumerate(lead))
    dlogits[rows + (cache.labels,)] -= dlosses
    return dlogits


def _check_labels(labels, num_classes: int, n: int, xp):
    labels = as_array(labels, "labels")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels: expected an integer array, got dtype {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"labels: expected shape ({n},), got {tuple(labels.shape)}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels: expected integers in [0, {num_classes}), got values outside")
    return labels.astype(xp.int64, copy=False)


def softmax_cross_entropy(logits, labels, *, reduction="mean", wrt=None, backend=None):
    r"""Softmax cross-entropy of integer labels.

    Parameters
    ----------
    logits : ndarray of shape (N, M)
    labels : ndarray of int of shape (N,)
        Target class of each row, in ``[0, M)``. Where ``logits`` is: a CuPy ``logits`` takes
        CuPy (or CUDA tensor) labels; host labels (a NumPy array or a list) with it are a
        ``TypeError``, as any mix of NumPy and CuPy arrays (nothing is copied behind your back).
    reduction : {"mean", "sum"}
    wrt : tuple of str, optional
        Which gradients to compute; default ``("logits",)``. ``()`` computes none.
    backend : {None, "numpy", "numba", "cupy"}

    Returns
    -------
    LossOutput
        ``loss`` (0-d array) and ``grads["logits"]`` of shape (N, M). An empty batch (N = 0,
        any M, M = 0 included) has loss 0 for either reduction and an empty gradient.

    Raises
    ------
    TypeError
        Integer logits or non-integer labels; labels on the host with logits on the GPU or the
        other way round.
    ValueError
        Wrong shapes, labels out of range, no classes (M = 0) for N > 0 rows, unknown reduction.

    Notes
    -----
    .. math:: \ell_i = \log \sum_j e^{x_{ij}} - x_{i y_i}, \qquad
              \frac{\partial \ell_i}{\partial x_{ij}} = \mathrm{softmax}(x_i)_j - [j = y_i]

    Examples
    --------
    >>> import numpy as np, refmoco
    >>> out = refmoco.softmax_cross_entropy(np.zeros((2, 4)), np.array([0, 3]))
    >>> round(float(out.loss), 6) == round(float(np.log(4)), 6)
    True
    """
    be = resolve(backend, logits)
    xp = be.xp
    logits = float_array(logits, "logits", ndim=2)
    check_reduction(reduction)
    wrt = check_wrt(wrt, ("logits",))
    n, m = logits.shape
    if m < 1 and n > 0:
        raise ValueError("logits: expected at least one class (M >= 1), got shape "
                         f"{tuple(logits.shape)}: labels must lie in [0, M)")
    check_same_device(labels, "labels", be.name == "cupy", "logits")
    labels = _check_labels(labels, m, n, xp)
    losses, cache = xent_forward(logits, labels, xp)
    loss, scale = _reduce(losses, reduction, xp)
    grads = {}
    if "logits" in wrt:
        dlosses = xp.full((n,), scale, dtype=logits.dtype)
        grads["logits"] = xent_backward(dlosses, cache, xp)
    return LossOutput(loss, grads)
