"""The margin contrastive loss of Hadsell, Chopra and LeCun (2006)."""

from __future__ import annotations

from typing import Any, NamedTuple

from .._checks import (
    check_positive,
    check_reduction,
    check_same_device,
    check_same_dtype,
    check_wrt,
)
from ..backend import as_array, float_array, resolve
from .normalize import l2_norm
from .softmax import LossOutput, _reduce


class ContrastiveCache(NamedTuple):
    diff: Any  # x1 - x2, (N, D)
    dist: Any  # ||x1 - x2||, (N,)
    y: Any  # 0 similar / 1 dissimilar, (N,) in the float dtype
    margin: float


def contrastive_forward(x1, x2, y, margin, xp):
    diff = x1 - x2  # (N, D)
    dist = l2_norm(diff, 1, xp)[:, 0]  # (N,) scaled: d**2 may overflow where d does not
    hinge = xp.maximum(margin - dist, 0)  # (N,)
    # each pair has one of the two terms (y is 0 or 1): d**2 of a far dissimilar pair, which
    # may overflow, is never formed, nor multiplied by 1 - y = 0
    losses = 0.5 * xp.where(y == 0, dist, hinge) ** 2  # (N,)
    return losses, ContrastiveCache(diff, dist, y, margin)


def contrastive_backward(dlosses, cache: ContrastiveCache, xp):
    """``dx1 = [(1 - y) (x1 - x2) - y max(0, m - d) (x1 - x2) / d] * dloss``; ``dx2 = -dx1``.

    A dissimilar pair at ``d = 0`` has no direction to be pushed in: its gradient is 0. The unit
    vector ``(x1 - x2) / d`` is formed before the hinge multiplies it, so a tiny ``d`` gives a
    push of size ``m``, not ``inf * 0``.
    """
    diff, dist, y, margin = cache
    hinge = xp.maximum(margin - dist, 0)  # (N,)
    safe = xp.where(dist > 0, dist, 1)[:, None]  # (N, 1) avoids 0/0; diff is 0 there
    pull = ((1 - y) * dlosses)[:, None] * diff  # (N, D) similar pairs
    push = (y * hinge * dlosses)[:, None] * (diff / safe)  # (N, D) dissimilar pairs
    dx1 = pull - push
    return dx1, -dx1


def contrastive_loss(x1, x2, y, *, margin=1.0, reduction="mean", wrt=None, backend=None):
    r"""The margin contrastive loss of Hadsell, Chopra and LeCun (2006).

    Parameters
    ----------
    x1, x2 : ndarray of shape (N, D)
        The two embeddings of each pair.
    y : ndarray of shape (N,), 0/1 or bool
        **0 = similar pair, 1 = dissimilar pair** (the paper's convention; TensorFlow Addons and
        Caffe use the opposite polarity). It lives where ``x1`` and ``x2`` do: with CuPy
        embeddings, a CuPy (or CUDA tensor) ``y``; a host ``y`` (a NumPy array or a list) with
        them is a ``TypeError``, as any mix of NumPy and CuPy arrays.
    margin : float
        The radius ``m > 0`` inside which dissimilar pairs are pushed apart.
    reduction : {"mean", "sum"}
    wrt : tuple of str, optional
        Subset of ``("x1", "x2")``.
    backend : {None, "numpy", "numba", "cupy"}

    Returns
    -------
    LossOutput
        ``loss`` and ``grads["x1"]``, ``grads["x2"]`` of shape (N, D). An empty batch (N = 0)
        has loss 0 for either reduction.

    Raises
    ------
    TypeError
        Integer embeddings, mixed dtypes, mixed NumPy and CuPy arrays (``y`` included), a
        margin that is not a real number (a string, a bool).
    ValueError
        Mismatched shapes, labels other than 0/1, margin <= 0.

    Notes
    -----
    With :math:`d_i = \lVert x_{1,i} - x_{2,i} \rVert_2`,

    .. math:: \ell_i = \tfrac12 (1 - y_i)\, d_i^2 + \tfrac12 y_i \max(0, m - d_i)^2

    .. math:: \frac{\partial \ell_i}{\partial x_{1,i}} = \Big[(1 - y_i)
              - y_i \frac{\max(0, m - d_i)}{d_i}\Big](x_{1,i} - x_{2,i}),
              \qquad \frac{\partial \ell_i}{\partial x_{2,i}} = -\frac{\partial \ell_i}{\partial x_{1,i}}

    Examples
    --------
    >>> import numpy as np, refmoco
    >>> x1 = np.array([[0.0, 0.0], [0.0, 0.0]]); x2 = np.array([[3.0, 4.0], [0.3, 0.4]])
    >>> float(refmoco.contrastive_loss(x1, x2, np.array([0, 1]), reduction="sum").loss)
    12.625
    """
    be = resolve(backend, x1, x2)
    xp = be.xp
    x1 = float_array(x1, "x1", ndim=2)
    x2 = float_array(x2, "x2", ndim=2)
    dtype = check_same_dtype({"x1": x1, "x2": x2})
    if x1.shape != x2.shape:
        raise ValueError(f"x2: expected the shape of x1 {tuple(x1.shape)}, got {tuple(x2.shape)}")
    check_same_device(y, "y", be.name == "cupy", "x1, x2")
    y = as_array(y, "y")
    if y.shape != (x1.shape[0],):
        raise ValueError(f"y: expected shape ({x1.shape[0]},), got {tuple(y.shape)}")
    if y.dtype.kind not in "biuf" or bool(((y != 0) & (y != 1)).any()):
        raise ValueError("y: expected 0 (similar) / 1 (dissimilar) labels or booleans")
    margin = check_positive(margin, "margin")
    check_reduction(reduction)
    wrt = check_wrt(wrt, ("x1", "x2"))
    losses, cache = contrastive_forward(x1, x2, y.astype(dtype), dtype.type(margin), xp)
    loss, scale = _reduce(losses, reduction, xp)
    grads = {}
    if wrt:
        dlosses = xp.full(losses.shape, scale, dtype=dtype)
        dx1, dx2 = contrastive_backward(dlosses, cache, xp)
        grads = {name: g for name, g in (("x1", dx1), ("x2", dx2)) if name in wrt}
    return LossOutput(loss, grads)
