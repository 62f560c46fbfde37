r"""Forward/backward pairs of the encoder layers, as free functions on arrays.

Each op is a pair ``y, cache = op_forward(x, ...)`` and ``dx, d<param>... = op_backward(dy,
cache)``; the cache is a small ``NamedTuple`` of the arrays the backward needs (no closures, no
state). Gradients come back in forward-argument order. All arrays keep their dtype: float32 in,
float32 out.

Layouts follow PyTorch: a linear map's weight is (out, in), a convolution takes NCHW input and a
(out, in, kh, kw) weight, batch norm reduces over every axis but the channel axis 1.

Every op runs on NumPy or CuPy arrays: the array module ``xp`` comes from the arrays
(:func:`refmoco.backend.namespace_of`), so on the GPU the same reference code runs as cuBLAS
matrix products and CuPy elementwise kernels, and every result stays on the device.

The convolution and batch norm take ``backend=``: ``None`` (the arrays' module), ``"numpy"``,
``"cupy"`` (the name is checked against the arrays) or ``"numba"``: the same op with its strided
copies and reductions as Numba kernels (:mod:`refmoco.kernels.nn_cpu`), which compute in float32
or float64 (other dtypes, and batch norm's arrays in several dtypes, run the reference code). On ``"cupy"`` the
convolution's im2col gather and col2im scatter are Numba CUDA kernels
(:mod:`refmoco.kernels.cuda`, one launch each instead of one strided copy per kernel offset);
everything else there is the reference code. Their caches record the backend, so the backward
runs where its forward ran.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from refmoco.backend import check_available, is_cupy_array, namespace_of

# ------------------------------------------------------------------------------------ linear


class LinearCache(NamedTuple):
    x: np.ndarray  # (N, in)
    w: np.ndarray  # (out, in)


def linear_forward(x, w, b=None):
    r"""``y = x W^T + b``.

    Parameters
    ----------
    x : ndarray of shape (N, in)
    w : ndarray of shape (out, in)
    b : ndarray of shape (out,) or None

    Returns
    -------
    y : ndarray of shape (N, out)
    cache : LinearCache

    Notes
    -----
    .. math:: y = x W^\top + b,\quad \partial x = \partial y\, W,\quad
              \partial W = \partial y^\top x,\quad \partial b = \textstyle\sum_n \partial y_n
    """
    y = x @ w.T  # (N, out)
    if b is not None:
        y += b
    return y, LinearCache(x, w)


def linear_backward(dy, cache, out=None, input_grad=True):
    """Gradients ``(dx, dw, db)`` of :func:`linear_forward`; ``db`` has shape (out,).

    ``out``: optional ``(dw, db)``, arrays of their shapes and dtype to compute the parameter
    gradients into (and return); ``db`` may be None. ``dx`` is None without ``input_grad``.
    """
    x, w = cache
    dw_out, db_out = (None, None) if out is None else out
    dx = dy @ w if input_grad else None  # (N, in)
    dw = namespace_of(dy).matmul(dy.T, x, out=dw_out)  # (out, in)
    db = dy.sum(axis=0, out=db_out)  # (out,)
    return dx, dw, db


def _into(out, a):
    """``a`` copied into ``out`` (and returned), or as a C-contiguous array when ``out`` is
    None (a copy only if it is not contiguous)."""
    if out is None:
        return namespace_of(a).ascontiguousarray(a)
    out[...] = a
    return out


# ------------------------------------------------------------------------------------ conv2d


class Conv2dCache(NamedTuple):
    cols: np.ndarray  # (N*Ho*Wo, kh*kw*C) the im2col matrix, channels last
    w_mat: np.ndarray  # (O, kh*kw*C) the weight as the forward's matrix, columns ordered (a, e, c)
    w_shape: tuple  # (O, C, kh, kw)
    x_shape: tuple  # (N, C, H, W)
    stride: int
    padding: int
    backend: str = "numpy"  # where the forward ran; the backward runs there too


def _check_backend(backend, x):
    """The backend that runs an op on ``x``: ``None`` is the arrays' own ("numpy" or "cupy");
    a named backend must fit the arrays (``"cupy"`` takes CuPy arrays, the others NumPy arrays)."""
    if backend not in (None, "numpy", "numba", "cupy"):
        raise ValueError(f"backend: expected None, 'numpy', 'numba' or 'cupy' for the encoder "
                         f"layers, got {backend!r}")
    gpu = is_cupy_array(x)
    if backend is None:
        return "cupy" if gpu else "numpy"
    if backend == "numba":
        check_available("numba")  # says what to install
    if (backend == "cupy") != gpu:
        raise TypeError(f"x: backend={backend!r} runs on {'CuPy' if backend == 'cupy' else 'NumPy'}"
                        f" arrays, got {type(x).__module__.split('.')[0]}.{type(x).__name__}")
    return backend


def _im2col(x_nhwc, kh, kw, s, p, Ho, Wo):
    """The reference's im2col gather: the (N, Ho, Wo, kh, kw, C) windows of a channels-last
    (N, H, W, C) input, zero-padded by ``p`` (a strided window view of a padded copy)."""
    N, H, W, C = x_nhwc.shape
    x_pad = np.zeros((N, H + 2 * p, W + 2 * p, C), x_nhwc.dtype)  # zero border
    x_pad[:, p : p + H, p : p + W, :] = x_nhwc
    win = sliding_window_view(x_pad, (kh, kw), axis=(1, 2))[:, ::s, ::s]  # (N, Ho, Wo, C, kh, kw)
    return win.transpose(0, 1, 2, 4, 5, 3)


def _col2im(dcols, H, W, s, p):
    """The reference's col2im scatter: ``dcols`` (N, Ho, Wo, kh, kw, C) added back to the pixels
    its entries came from, one kernel offset (a, e) at a time in that order, into a zero-padded
    (N, H + 2p, W + 2p, C) array; returns the (N, H, W, C) interior (a view)."""
    N, Ho, Wo, kh, kw, C = dcols.shape
    dx_pad = namespace_of(dcols).zeros((N, H + 2 * p, W + 2 * p, C), dtype=dcols.dtype)
    for a in range(kh):
        for e in range(kw):
            dx_pad[:, a : a + s * Ho : s, e : e + s * Wo : s, :] += dcols[:, :, :, a, e, :]
    return dx_pad[:, p : p + H, p : p + W, :]


def _gather_scatter(backend):
    """``(im2col, col2im)`` as ``backend`` runs them: the reference's window view and strided
    additions (``"numpy"``), Numba kernels (``"numba"``), Numba CUDA kernels (``"cupy"``). All
    take and return the same arrays, so the rest of the convolution is one code."""
    if backend == "numba":
        from refmoco.kernels import nn_cpu

        return nn_cpu.im2col, nn_cpu.col2im
    if backend == "cupy":
        from refmoco.kernels import cuda

        return cuda.im2col, cuda.col2im
    return _im2col, _col2im


def conv2d_forward(x, w, b=None, *, stride=1, padding=0, backend=None):
    r"""2-d cross-correlation (PyTorch's ``conv2d``) by im2col and one matrix product.

    Parameters
    ----------
    x : ndarray of shape (N, C, H, W)
    w : ndarray of shape (O, C, kh, kw)
    b : ndarray of shape (O,) or None
    stride, padding : int
        Zero padding of ``padding`` pixels on every side, then windows every ``stride`` pixels.
    backend : {None, "numpy", "cupy", "numba"}
        ``None``: the arrays' backend (``"numpy"`` or ``"cupy"``). ``"numba"`` gathers the
        windows with a Numba kernel, ``"cupy"`` with a Numba CUDA kernel (same result).

    Returns
    -------
    y : ndarray of shape (N, O, Ho, Wo)
        ``Ho = (H + 2 padding - kh) // stride + 1``, likewise ``Wo``. Its memory is channels-last
        (a transposed view of an (N, Ho, Wo, O) array, like PyTorch's ``channels_last``), so that
        the next convolution gathers its windows from contiguous channel vectors.
    cache : Conv2dCache

    Raises
    ------
    ValueError
        When the kernel is larger than the padded input (no window), on every backend.

    Notes
    -----
    With :math:`\tilde x` the zero-padded input,

    .. math:: y_{n,o,i,j} = b_o + \sum_{c,a,e} W_{o,c,a,e}\,
              \tilde x_{n,c,\,s i + a,\,s j + e}.

    The windows of :math:`\tilde x` are gathered as the rows of a matrix ``cols`` (im2col, one row
    per output pixel, ordered (a, e, c)), so the forward is one product ``cols @ W_mat.T``. The
    backward is ``dW_mat = dY_mat^T cols`` and ``dcols = dY_mat W_mat``, whose entries are added
    back to the pixels they came from (col2im), one kernel offset (a, e) at a time.
    """
    backend = _check_backend(backend, x)
    im2col, _ = _gather_scatter(backend)
    N, C, H, W = x.shape
    O, _, kh, kw = w.shape
    s, p = stride, padding
    if kh > H + 2 * p or kw > W + 2 * p:  # no window: NumPy's window view would refuse it
        raise ValueError(f"w: a {kh}x{kw} kernel does not fit a {H}x{W} input padded by {p}")
    Ho, Wo = (H + 2 * p - kh) // s + 1, (W + 2 * p - kw) // s + 1
    cols = im2col(x.transpose(0, 2, 3, 1), kh, kw, s, p, Ho, Wo)  # (N, Ho, Wo, kh, kw, C)
    cols = cols.reshape(N * Ho * Wo, kh * kw * C)  # one row per output pixel, ordered (a, e, c)
    w_mat = w.transpose(0, 2, 3, 1).reshape(O, kh * kw * C)  # (O, kh*kw*C)
    y = cols @ w_mat.T  # (N*Ho*Wo, O)
    if b is not None:
        y += b
    y = y.reshape(N, Ho, Wo, O).transpose(0, 3, 1, 2)  # (N, O, Ho, Wo), channels-last memory
    return y, Conv2dCache(cols, w_mat, w.shape, x.shape, s, p, backend)


def conv2d_backward(dy, cache, out=None, input_grad=True):
    """Gradients ``(dx, dw, db)`` of :func:`conv2d_forward`; ``db`` has shape (O,).

    ``dx`` has channels-last memory, as the forward's output; it is None without
    ``input_grad`` (no ``dcols`` product, no col2im). ``out``: optional ``(dw, db)``, arrays of
    their shapes and dtype to write the parameter gradients into (and return); ``db`` may be
    None.
    """
    _, col2im = _gather_scatter(cache.backend)
    cols, w_mat, (O, _, kh, kw), (N, C, H, W), s, p, _ = cache
    dw_out, db_out = (None, None) if out is None else out
    Ho, Wo = dy.shape[2], dy.shape[3]
    dy_mat = dy.transpose(0, 2, 3, 1).reshape(N * Ho * Wo, O)  # (N*Ho*Wo, O)
    dw = (dy_mat.T @ cols).reshape(O, kh, kw, C).transpose(0, 3, 1, 2)  # (O, C, kh, kw)
    db = dy_mat.sum(axis=0, out=db_out)  # (O,)
    if not input_grad:
        return None, _into(dw_out, dw), db
    dcols = (dy_mat @ w_mat).reshape(N, Ho, Wo, kh, kw, C)
    dx = col2im(dcols, H, W, s, p).transpose(0, 3, 1, 2)  # (N, C, H, W)
    return dx, _into(dw_out, dw), db


# ------------------------------------------------------------------------------------ relu


class ReLUCache(NamedTuple):
    y: np.ndarray  # the output max(x, 0): the gradient passes where y > 0, exactly where x > 0
    backend: str = "numpy"  # where the forward ran; the backward runs there too

    @property
    def mask(self):
        """``x > 0``, computed as ``y > 0``: the same (``y = x`` where ``x > 0``, else 0;
        NaN fails both)."""
        return self.y > 0


def relu_forward(x, *, backend=None):
    r"""``y = max(x, 0)``; the gradient passes where :math:`x > 0` (PyTorch's convention at 0).

    The cache keeps ``y`` itself, not a mask: :math:`y > 0` exactly where :math:`x > 0`, so a
    forward whose backward never comes (MoCo's key encoder) is one operation, not two.
    ``backend="numba"`` computes ``y`` with a Numba kernel (same values)."""
    backend = _check_backend(backend, x)
    if backend == "numba":
        from refmoco.kernels import nn_cpu

        return nn_cpu.relu_forward(x)
    y = namespace_of(x).maximum(x, 0)
    return y, ReLUCache(y, backend)


def relu_backward(dy, cache):
    """Gradient ``dx = dy * (x > 0)`` of :func:`relu_forward`, as ``dy * (y > 0)``.

    A product with the mask rather than ``np.where`` (several times slower on random masks);
    the two differ only for non-finite ``dy`` at inactive units.
    """
    if cache.backend == "numba":
        from refmoco.kernels import nn_cpu

        return nn_cpu.relu_backward(dy, cache)
    if cache.backend == "cupy":
        from refmoco.kernels import cuda

        # one launch for two CuPy ones: worth it only where a launch costs what CuPy's does
        if cuda.LAUNCHER == "cupy" and cuda.relu_backward_fits(dy, cache.y):
            return cuda.relu_backward(dy, cache.y)
    return dy * cache.mask


# ------------------------------------------------------------------------------------ batch norm


class BatchNormCache(NamedTuple):
    x_hat: np.ndarray  # (x - mean) / sqrt(var + eps), same shape as x
    inv_std: np.ndarray  # 1 / sqrt(var + eps), broadcastable to x
    gamma: np.ndarray  # weight, broadcastable to x
    train: bool  # batch statistics (True) or running statistics (False)
    backend: str = "numpy"  # where the forward ran; the backward runs there too


def _channel_view(a, ndim):
    """A (C,) vector as (1, C, 1, ...) to broadcast against an ``ndim``-d NC... array."""
    return a.reshape((1, -1) + (1,) * (ndim - 2))


def channel_rows(x):
    """``x`` (N, C, ...) as a C-contiguous (rows, C) array, what the batch-norm and ReLU
    kernels (Numba CPU and CUDA) work on: a view when its memory is channels-last (as the
    convolutions make it) or when it is 2-d, else a copy."""
    channels_last = x.transpose(0, *range(2, x.ndim), 1)  # (N, ..., C): axis 1 moved last
    return namespace_of(x).ascontiguousarray(channels_last).reshape(-1, x.shape[1])


def from_channel_rows(rows, shape):
    """A (rows, C) result as an (N, C, ...) array of ``shape`` with channels-last memory: the
    inverse of :func:`channel_rows`."""
    n, ch, *spatial = shape
    y = rows.reshape(n, *spatial, ch)  # (N, ..., C)
    return y.transpose(0, y.ndim - 1, *range(1, y.ndim - 1))  # (N, C, ...): the last axis to 1


def memory_order(a):
    """``"C"`` for C-contiguous memory, ``"last"`` for channels-last memory (an (N, ..., C)
    array seen as (N, C, ...), as the convolutions make them), else None."""
    if a.flags.c_contiguous:
        return "C"
    if a.ndim > 2 and a.transpose(0, *range(2, a.ndim), 1).flags.c_contiguous:
        return "last"
    return None


def flat_memory(a):
    """``a``'s memory as a 1-d array (a view when :func:`memory_order` names it, else a C-ordered
    copy) and the function that gives a 1-d result laid out as that memory back ``a``'s shape
    and memory order: what the elementwise kernels (Numba CPU and CUDA) run over."""
    if memory_order(a) == "last":
        rows = channel_rows(a)  # (rows, C), a view
        return rows.reshape(-1), lambda r: from_channel_rows(r.reshape(rows.shape), a.shape)
    return namespace_of(a).ascontiguousarray(a).reshape(-1), lambda r: r.reshape(a.shape)


def update_running_stats(running_mean, running_var, mean, var, m, momentum):
    """In place, PyTorch's update from a batch of ``m`` values per channel: the running variance
    tracks the unbiased variance ``var * m / (m - 1)``."""
    running_mean *= 1 - momentum
    running_mean += momentum * mean
    running_var *= 1 - momentum
    running_var += momentum * var * (m / (m - 1))


def batch_norm_forward(x, gamma, beta, running_mean, running_var, *, train, momentum=0.1, eps=1e-5,
                       backend=None, num_batches_tracked=None):
    r"""Batch normalisation over every axis but axis 1, as ``torch.nn.BatchNorm{1,2}d``.

    Parameters
    ----------
    x : ndarray of shape (N, C) or (N, C, L) or (N, C, H, W)
    gamma, beta : ndarray of shape (C,)
        The affine ``weight`` and ``bias``.
    running_mean, running_var : ndarray of shape (C,)
        Updated in place when ``train`` is true.
    train : bool
        Normalise with the batch statistics and update the running ones (True), or normalise with
        the running statistics (False).
    momentum, eps : float
    backend : {None, "numpy", "cupy", "numba"}
        ``None``: the arrays' module (NumPy or CuPy). ``"numba"`` computes the statistics
        (summed in float64) and the normalisation with Numba kernels; ``"cupy"`` (and ``None``
        with CuPy arrays) with one Numba CUDA kernel, when the arrays share a float32 or float64
        dtype (else the reference's CuPy code runs).
    num_batches_tracked : 0-d integer ndarray, optional
        PyTorch's batch counter, where the running statistics live: counted (``+= 1``, in
        place) in training. The CUDA kernel counts it in its launch.

    Returns
    -------
    y : ndarray, same shape as ``x``
    cache : BatchNormCache

    Raises
    ------
    ValueError
        In training, when a channel has a single value (its unbiased variance is undefined).

    Notes
    -----
    With :math:`m` values per channel, :math:`\mu` and :math:`\sigma^2` their mean and biased
    variance (train) or the running statistics (eval),

    .. math:: \hat x = (x - \mu)/\sqrt{\sigma^2 + \epsilon},\qquad y = \gamma \hat x + \beta.

    Training also updates :math:`\bar\mu \leftarrow (1-\rho)\bar\mu + \rho\mu` and
    :math:`\bar\sigma^2 \leftarrow (1-\rho)\bar\sigma^2 + \rho\,\sigma^2 m/(m-1)` (unbiased).
    """
    backend = _check_backend(backend, x)
    axes = (0,) + tuple(range(2, x.ndim))
    if train and x.size // x.shape[1] < 2:
        raise ValueError(
            f"x: batch norm in training needs more than 1 value per channel, got shape {x.shape}"
        )
    if backend == "numba":
        from refmoco.kernels import nn_cpu

        y, cache = nn_cpu.batch_norm_forward(x, gamma, beta, running_mean, running_var,
                                             train=train, momentum=momentum, eps=eps)
        _count(num_batches_tracked, train)
        return y, cache
    if backend == "cupy":
        from refmoco.kernels import cuda

        # empty batches (eval) and other dtypes: the reference below (no zero-size launches)
        if x.size and cuda.fits(x, gamma, beta, running_mean, running_var):
            return cuda.batch_norm_forward(x, gamma, beta, running_mean, running_var,
                                           train=train, momentum=momentum, eps=eps,
                                           num_batches_tracked=num_batches_tracked)
    if train:
        mean = x.mean(axis=axes)  # (C,)
        var = x.var(axis=axes)  # (C,) biased
        update_running_stats(running_mean, running_var, mean, var, x.size // x.shape[1], momentum)
        _count(num_batches_tracked, train)
    else:
        mean, var = running_mean, running_var
    inv_std = _channel_view(1 / namespace_of(x).sqrt(var + eps), x.ndim)  # (1, C, 1, ...)
    x_hat = (x - _channel_view(mean, x.ndim)) * inv_std
    g = _channel_view(gamma, x.ndim)
    y = g * x_hat + _channel_view(beta, x.ndim)
    return y, BatchNormCache(x_hat, inv_std, g, train, backend)


def _count(num_batches_tracked, train) -> None:
    """One more batch on the counter (the caller's 0-d array, in place), in training."""
    if train and num_batches_tracked is not None:
        num_batches_tracked += 1


def batch_norm_backward(dy, cache, out=None):
    r"""Gradients ``(dx, dgamma, dbeta)`` of :func:`batch_norm_forward`.

    ``out``: optional ``(dgamma, dbeta)``, arrays of shape (C,) and ``dy``'s dtype to compute
    the parameter gradients into (and return).

    Notes
    -----
    .. math:: \partial\gamma = \textstyle\sum \partial y\,\hat x,\qquad
              \partial\beta = \textstyle\sum \partial y,\qquad
              \partial\hat x = \gamma\,\partial y

    In training the statistics depend on :math:`x`:

    .. math:: \partial x = \frac{1}{\sqrt{\sigma^2+\epsilon}}\Big(\partial\hat x
              - \overline{\partial\hat x} - \hat x\,\overline{\partial\hat x\,\hat x}\Big),

    the bars being means over the :math:`m` values of each channel. In evaluation they are
    constants: :math:`\partial x = \partial\hat x/\sqrt{\sigma^2+\epsilon}`.
    """
    if cache.backend == "numba":
        from refmoco.kernels import nn_cpu

        return nn_cpu.batch_norm_backward(dy, cache, out)
    if cache.backend == "cupy":
        from refmoco.kernels import cuda

        if dy.size and cuda.fits(dy, cache.x_hat, cache.inv_std, cache.gamma):  # as forward
            return cuda.batch_norm_backward(dy, cache, out)
    x_hat, inv_std, g, train, _ = cache
    dgamma_out, dbeta_out = (None, None) if out is None else out
    axes = (0,) + tuple(range(2, dy.ndim))
    dgamma = (dy * x_hat).sum(axis=axes, out=dgamma_out)  # (C,)
    dbeta = dy.sum(axis=axes, out=dbeta_out)  # (C,)
    dx_hat = dy * g
    if not train:
        return dx_hat * inv_std, dgamma, dbeta
    mean_dx_hat = dx_hat.mean(axis=axes, keepdims=True)  # (1, C, 1, ...)
    mean_dx_hat_x_hat = (dx_hat * x_hat).mean(axis=axes, keepdims=True)  # (1, C, 1, ...)
    dx = inv_std * (dx_hat - mean_dx_hat - x_hat * mean_dx_hat_x_hat)
    return dx, dgamma, dbeta


# ------------------------------------------------------------------------------------ pooling


def global_avg_pool_forward(x):
    r"""``y[n, c] = mean over (h, w) of x[n, c, h, w]``: (N, C, H, W) -> (N, C).

    The backward spreads :math:`\partial y_{n,c}/(HW)` over the :math:`H W` pixels; the cache is
    the input shape.
    """
    return x.mean(axis=(2, 3)), x.shape


def global_avg_pool_backward(dy, x_shape):
    """Gradient ``dx`` (N, C, H, W) of :func:`global_avg_pool_forward`, with channels-last
    memory, as the convolutions' outputs before it (so that the ReLU and batch norm kernels
    read it as (rows, C) rows, without a copy)."""
    N, C, H, W = x_shape
    xp = namespace_of(dy)
    dx = xp.empty((N, H, W, C), dtype=dy.dtype).transpose(0, 3, 1, 2)  # (N, C, H, W) view
    xp.divide(dy[:, :, None, None], H * W, out=dx)  # dy / (H W), the same at every pixel
    return dx
