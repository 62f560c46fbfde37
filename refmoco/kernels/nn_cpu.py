r"""Numba CPU kernels for the encoder layers: what ``backend="numba"`` runs in ``refmoco.nn``.

Profiling the MoCo training step with the small CNN showed that the matrix products are not what
costs: NumPy's strided copies are. The im2col gather (a six-axis transpose of a window view),
the col2im scatter (nine strided in-place additions) and batch norm's per-channel reductions over
three of four axes took about two thirds of the step. Here each of them is one Numba pass over
contiguous channel vectors:

- :func:`im2col` / :func:`col2im`: the convolution's gather and scatter, which
  :func:`refmoco.nn.functional.conv2d_forward` and ``conv2d_backward`` call on this backend
  (the products stay NumPy's BLAS), split over the images of the batch for large batches (each
  image's rows and pixels belong to one thread: no races).
- :func:`batch_norm_forward` / :func:`batch_norm_backward`: the statistics and the normalisation
  on the array seen as ``(rows, channels)`` (an NCHW array with channels-last memory, as the
  convolutions produce, is that without a copy), two passes each. The per-channel sums are taken
  in float64 whatever the data's dtype (scalar accumulators; the arrays stay float32), so the
  statistics are at least as accurate as NumPy's pairwise float32 sums.

They return the same caches as the NumPy functions (with ``backend="numba"``), so that the
backward of a pass runs on the backend its forward ran on. ``tests/test_nn_kernels.py`` checks
every output and gradient against the NumPy reference.

The kernels compute in float32 or float64. Any other dtype (float16, longdouble, integers), and
arrays of several dtypes at once (float32 activations with float64 batch-norm parameters), run
the reference code instead, so that ``backend="numba"`` returns what the reference returns,
result dtypes included (:func:`_fits`).
"""

from __future__ import annotations

import numpy as np

from ..backend import KERNEL_DTYPES
from ..nn import functional as F
from ..nn.functional import BatchNormCache, ReLUCache, update_running_stats
from ._jit import jit, run_parts


def _fits(*arrays):
    """Whether the kernels compute what the reference does for ``arrays``: NumPy arrays of one
    dtype, float32 or float64 (native byte order). Otherwise the reference runs (its own result
    dtypes, promotion and errors)."""
    dtype = getattr(arrays[0], "dtype", None)
    return dtype in KERNEL_DTYPES and all(
        isinstance(a, np.ndarray) and a.dtype == dtype for a in arrays)

# -- convolution ----------------------------------------------------------------------------------

PARALLEL_MIN = 1 << 19  # copied elements per thread below which one thread is faster
ELEMENTWISE_MIN = 1 << 18  # the same for the elementwise passes (as the momentum update's)


@jit
def _im2col(x, cols, kh, kw, s, p, ho, wo):
    """``cols[n, i, j, a, e, c] = x[n, s i + a - p, s j + e - p, c]`` (0 outside the image);
    ``x`` is (N, H, W, C), channels last."""
    n_img, h, w, ch = x.shape
    for n in range(n_img):
        for i in range(ho):
            for j in range(wo):
                for a in range(kh):
                    r = s * i + a - p
                    for e in range(kw):
                        col = s * j + e - p
                        if 0 <= r < h and 0 <= col < w:
                            for c in range(ch):
                                cols[n, i, j, a, e, c] = x[n, r, col, c]
                        else:
                            for c in range(ch):
                                cols[n, i, j, a, e, c] = 0


@jit
def _col2im(dcols, dx, s, p):
    """``dx[n, r, col, c] += dcols[n, i, j, a, e, c]`` for every window pixel inside the image."""
    n_img, ho, wo, kh, kw, ch = dcols.shape
    h, w = dx.shape[1], dx.shape[2]
    for n in range(n_img):
        for r in range(h):
            for col in range(w):
                for c in range(ch):
                    dx[n, r, col, c] = 0
        for i in range(ho):
            for j in range(wo):
                for a in range(kh):
                    r = s * i + a - p
                    if r < 0 or r >= h:
                        continue
                    for e in range(kw):
                        col = s * j + e - p
                        if 0 <= col < w:
                            for c in range(ch):
                                dx[n, r, col, c] += dcols[n, i, j, a, e, c]


def im2col(x_nhwc, kh, kw, s, p, ho, wo):
    """The (N, Ho, Wo, kh, kw, C) windows of a channels-last input, split over its images."""
    if not _fits(x_nhwc):
        return F._im2col(x_nhwc, kh, kw, s, p, ho, wo)
    x_nhwc = np.ascontiguousarray(x_nhwc)  # a view when x is channels-last
    n, c = x_nhwc.shape[0], x_nhwc.shape[3]
    cols = np.empty((n, ho, wo, kh, kw, c), x_nhwc.dtype)
    run_parts(_im2col, (x_nhwc, cols), (kh, kw, s, p, ho, wo), work=cols.size,
              min_work=PARALLEL_MIN)  # parts: groups of images
    return cols


def col2im(dcols, h, w, s, p):
    """The (N, H, W, C) input gradient from the windows' gradients, split over the images."""
    if not _fits(dcols):
        return F._col2im(dcols, h, w, s, p)
    dx = np.empty((dcols.shape[0], h, w, dcols.shape[5]), dcols.dtype)
    run_parts(_col2im, (dcols, dx), (s, p), work=dcols.size, min_work=PARALLEL_MIN)
    return dx


# -- batch norm -------------------------------------------------------------------------------------


@jit
def _column_mean_var(x):
    """Per-column mean and biased variance of a (rows, C) array, summed in float64 (two passes)."""
    m, ch = x.shape
    total = np.zeros(ch, np.float64)
    for r in range(m):
        for c in range(ch):
            total[c] += x[r, c]
    mean = total / m
    sq = np.zeros(ch, np.float64)
    for r in range(m):
        for c in range(ch):
            d = x[r, c] - mean[c]
            sq[c] += d * d
    return mean, sq / m


@jit
def _normalize(x, x_hat, y, mean, inv_std, gamma, beta):
    """``x_hat = (x - mean) inv_std``, ``y = gamma x_hat + beta``, row by row (one pass)."""
    m, ch = x.shape
    for r in range(m):
        for c in range(ch):
            h = (x[r, c] - mean[c]) * inv_std[c]
            x_hat[r, c] = h
            y[r, c] = gamma[c] * h + beta[c]


@jit
def _column_sums(dy, x_hat):
    """``(sum dy * x_hat, sum dy)`` per column, in float64: dgamma and dbeta."""
    m, ch = dy.shape
    dgamma = np.zeros(ch, np.float64)
    dbeta = np.zeros(ch, np.float64)
    for r in range(m):
        for c in range(ch):
            dgamma[c] += dy[r, c] * x_hat[r, c]
            dbeta[c] += dy[r, c]
    return dgamma, dbeta


@jit
def _bn_input_grad(dy, x_hat, dx, scale, mean_dy, mean_dy_xhat):
    """``dx = scale (dy - mean(dy) - x_hat mean(dy x_hat))`` with ``scale = gamma inv_std``."""
    m, ch = dy.shape
    for r in range(m):
        for c in range(ch):
            dx[r, c] = scale[c] * (dy[r, c] - mean_dy[c] - x_hat[r, c] * mean_dy_xhat[c])


def batch_norm_forward(x, gamma, beta, running_mean, running_var, *, train, momentum=0.1,
                       eps=1e-5):
    """As :func:`refmoco.nn.functional.batch_norm_forward`; the arguments were checked there.
    Mixed or other dtypes: the reference (its result dtype), with a cache for this backend."""
    if not _fits(x, gamma, beta, running_mean, running_var):
        y, cache = F.batch_norm_forward(x, gamma, beta, running_mean, running_var, train=train,
                                        momentum=momentum, eps=eps, backend="numpy")
        return y, cache._replace(backend="numba")
    dtype = x.dtype
    x2 = F.channel_rows(x)
    m = x2.shape[0]
    if train:
        mean64, var64 = _column_mean_var(x2)
        mean, var = mean64.astype(dtype), var64.astype(dtype)
        update_running_stats(running_mean, running_var, mean, var, m, momentum)
    else:
        mean, var = running_mean, running_var
    inv_std = (1 / np.sqrt(var + eps)).astype(dtype, copy=False)  # (C,)
    x_hat = np.empty_like(x2)
    y = np.empty_like(x2)
    run_parts(_normalize, (x2, x_hat, y), (mean, inv_std, gamma, beta), work=x2.size,
              min_work=ELEMENTWISE_MIN)  # parts: groups of rows
    view = (1, -1) + (1,) * (x.ndim - 2)
    cache = BatchNormCache(F.from_channel_rows(x_hat, x.shape), inv_std.reshape(view),
                           gamma.reshape(view), train, "numba")
    return F.from_channel_rows(y, x.shape), cache


def batch_norm_backward(dy, cache, out=None):
    """As :func:`refmoco.nn.functional.batch_norm_backward` (``out`` too).

    In evaluation ``dx = (dy gamma) inv_std``, the reference's products in its order (bitwise
    equal), without reading ``x_hat``: a NaN or infinite input does not reach ``dx``."""
    x_hat, inv_std, g, train, _ = cache
    if not _fits(dy, x_hat, inv_std, g):
        return F.batch_norm_backward(dy, cache._replace(backend="numpy"), out)
    dtype = dy.dtype
    dy2, x_hat2 = F.channel_rows(dy), F.channel_rows(x_hat)
    m = dy2.shape[0]
    dgamma64, dbeta64 = _column_sums(dy2, x_hat2)
    if train:  # the statistics depend on x
        scale = (g * inv_std).reshape(-1)  # gamma / sqrt(var + eps), (C,)
        mean_dy, mean_dy_xhat = (dbeta64 / m).astype(dtype), (dgamma64 / m).astype(dtype)
        dx = np.empty_like(dy2)
        run_parts(_bn_input_grad, (dy2, x_hat2, dx), (scale, mean_dy, mean_dy_xhat),
                  work=dy2.size, min_work=ELEMENTWISE_MIN)
    else:  # constants: dx = gamma inv_std dy
        dx = dy2 * g.reshape(-1)
        dx *= inv_std.reshape(-1)
    if out is None:
        return F.from_channel_rows(dx, dy.shape), dgamma64.astype(dtype), dbeta64.astype(dtype)
    dgamma, dbeta = out
    dgamma[...], dbeta[...] = dgamma64, dbeta64  # rounded to their dtype, as astype does
    return F.from_channel_rows(dx, dy.shape), dgamma, dbeta


# -- ReLU -----------------------------------------------------------------------------------------


@jit
def _relu(x, y):
    """``y = max(x, 0)`` (NaN stays NaN, as ``np.maximum``)."""
    for i in range(x.size):
        v = x[i]
        y[i] = 0 if v <= 0 else v


@jit
def _relu_grad(dy, y, dx):
    """``dx = dy * (y > 0)``, the reference's product (NaN in ``dy`` survives a 0 in the
    mask), the mask read from the forward's output."""
    for i in range(dy.size):
        dx[i] = dy[i] * (y[i] > 0)


def relu_forward(x):
    """As :func:`refmoco.nn.functional.relu_forward`, in one pass."""
    if not _fits(x):
        y, cache = F.relu_forward(x, backend="numpy")
        return y, cache._replace(backend="numba")
    flat, back = F.flat_memory(x)
    y = np.empty_like(flat)
    run_parts(_relu, (flat, y), work=flat.size, min_work=ELEMENTWISE_MIN)
    y = back(y)
    return y, ReLUCache(y, "numba")


def relu_backward(dy, cache):
    """As :func:`refmoco.nn.functional.relu_backward`."""
    y = cache.y
    order = F.memory_order(y)
    if not _fits(dy, y) or order is None or order != F.memory_order(dy):  # NumPy's product
        return dy * cache.mask
    flat_dy, back = F.flat_memory(dy)
    flat_y, _ = F.flat_memory(y)
    dx = np.empty_like(flat_dy)
    run_parts(_relu_grad, (flat_dy, flat_y, dx), work=dx.size, min_work=ELEMENTWISE_MIN)
    return back(dx)
