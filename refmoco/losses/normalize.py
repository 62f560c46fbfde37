"""L2 normalisation with its backward."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._checks import check_positive, check_same_device, check_same_dtype
from ..backend import KERNEL_DTYPES, float_array, resolve


def l2_norm(x, axis, xp):
    """``||x||`` along ``axis`` (kept as a length-1 axis), computed as ``a * ||x / a||`` with
    ``a = max |x|``: squaring neither overflows for huge entries nor underflows for tiny ones.
    An empty axis has norm 0."""
    if x.size == 0:  # no entries to take a maximum of
        return xp.zeros_like(x.sum(axis=axis, keepdims=True))
    a = xp.abs(x).max(axis=axis, keepdims=True)  # the largest entry along the axis
    safe_a = xp.where(a > 0, a, 1)
    return a * xp.sqrt(((x / safe_a) ** 2).sum(axis=axis, keepdims=True))


def l2_normalize(x, *, axis=-1, eps=1e-12) -> tuple[Any, Callable[[Any], Any]]:
    r"""``y = x / max(||x||, eps)`` along ``axis``, and the function that backpropagates it.

    Parameters
    ----------
    x : ndarray
    axis : int
    eps : float
        Norms below ``eps`` are replaced by ``eps`` (as ``torch.nn.functional.normalize``). A
        real number: a string or a bool is a ``TypeError``.

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``
    backward : callable
        ``backward(dy) -> dx``. ``dy`` has the dtype of ``x`` (else a ``TypeError``) and lives
        where ``x`` does: a host ``dy`` for a CuPy ``x``
        (or a CuPy ``dy`` for a host ``x``) is a ``TypeError``, as any mix of NumPy and CuPy
        arrays.

    Notes
    -----
    The norm is computed as :math:`a \sqrt{\sum (x/a)^2}` with :math:`a = \max|x|`, so that it
    neither overflows nor underflows. Where :math:`\lVert x\rVert > \epsilon`,

    .. math:: \frac{\partial L}{\partial x} = \frac{g - y\,(y\cdot g)}{\lVert x\rVert},

    and where the norm is clamped (:math:`\lVert x\rVert < \epsilon`), :math:`\partial L/\partial x = g / \epsilon`.

    Examples
    --------
    >>> import numpy as np, refmoco
    >>> y, backward = refmoco.l2_normalize(np.array([[3.0, 4.0]]))
    >>> y
    array([[0.6, 0.8]])
    >>> backward(np.array([[0.6, 0.8]]))  # moving along y does not change y
    array([[0., 0.]])
    """
    be = resolve(None, x)
    xp = be.xp
    x = float_array(x, "x")
    eps = check_positive(eps, "eps")
    # on the GPU, the rows of a 2-d array (the features) take one CUDA kernel each way
    rows = (be.name == "cupy" and x.ndim == 2 and axis in (1, -1) and x.size > 0
            and x.dtype in KERNEL_DTYPES)
    if rows:
        y, denom, clamped = be.kernels.l2_normalize_rows(x, eps)  # per row, as below
    else:
        norm = l2_norm(x, axis, xp)  # ||x||, keepdims
        clamped = norm < eps  # torch's clamp_min passes the gradient through at norm == eps
        denom = xp.where(clamped, x.dtype.type(eps), norm)
        y = x / denom

    def backward(dy):
        check_same_device(dy, "dy", be.name == "cupy", "x")
        dy = float_array(dy, "dy")
        check_same_dtype({"x": x, "dy": dy})
        if dy.shape != y.shape:
            raise ValueError(f"dy: expected shape {tuple(y.shape)}, got {tuple(dy.shape)}")
        if rows:
            return be.kernels.l2_normalize_rows_backward(y, dy, denom, clamped)
        radial = (y * dy).sum(axis=axis, keepdims=True)
        return xp.where(clamped, dy, dy - y * radial) / denom

    return y, backward
