r"""Numba CPU kernels: what ``backend="numba"`` runs on NumPy arrays.

- :func:`info_nce_queue`: InfoNCE with a shared queue, forward and backward in one pass over the
  queue. The queue is read in blocks; each block's logits (a tile that stays in the L2 cache) are
  folded into a running maximum and sum per query (the online softmax), and the gradient of the
  queries is accumulated block by block, rescaled whenever a maximum grows. The ``(N, 1 + K)``
  logits are never materialised. The matrix products are NumPy's BLAS; the elementwise work
  (scaling, maxima, exponentials, sums) is one Numba kernel per block.
- :func:`momentum_update`: ``target = m * target + (1 - m) * source`` in one fused pass.
- :func:`sgd_step`: one ``torch.optim.SGD`` step on flat buffers in one fused pass.

The two elementwise passes run on all cores through :func:`refmoco.kernels._jit.run_parts`
(contiguous parts of the flat buffers, one per thread).

Each computes what the NumPy reference computes, in the same order where that order is exact
(the momentum update and the SGD step are bitwise equal to it); the loss and its gradients differ
only by the rounding of sums taken in another order.

The exponential is written out (:func:`exp32`, :func:`exp64`): Numba calls the C library's
``exp`` one element at a time, while this polynomial vectorises. Its steps are fused
multiply-adds (one IEEE rounding each: deterministic without ``fastmath``); its error is about
one ulp at most in float32 and float64 (1.010 ulp at worst over every float32 input), and results
below the normal range are 0 (``tests/test_backends.py`` checks it against ``np.exp``).

Accuracy of the sums: a block's exponentials are summed in chunks of ``CHUNK`` rows, the chunks
into the block's sum and the blocks into the query's, and 1/T is applied to ``q`` before the
product, as the reference applies it; the loss is ``(m - l_pos) + log s``, exact when the
positive is the largest logit.
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import KERNEL_DTYPES
from . import check_sgd_buffers
from ._jit import bits_to_float, fma, jit, run_parts

# -- exp(x) for x <= 0 (softmax weights): Cody-Waite range reduction and a polynomial -------------
# x = n ln2 + r with |r| <= ln2 / 2; exp(x) = 2^n exp(r); 2^n is built from its bits.

_F = np.float32
_LOG2E_32, _SHIFT_32 = _F(1.4426950408889634), _F(1.5 * 2**23)  # adding _SHIFT rounds to an integer
_LN2_HI_32, _LN2_LO_32 = _F(0.693359375), _F(-2.12194440e-4)
_P32 = tuple(_F(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                             1.6666665459e-1, 5.0000001201e-1))  # Cephes expf
_TINY_32 = _F(np.log(np.finfo(np.float32).tiny))  # below it the result is not normal: 0


@jit
def exp32(x):
    """``exp(x)`` of a float32 ``x <= 0``, vectorisable; 0 below the normal range, NaN for NaN."""
    n = fma(x, _LOG2E_32, _SHIFT_32) - _SHIFT_32  # round(x / ln2), as a float
    r = fma(n, -_LN2_LO_32, fma(n, -_LN2_HI_32, x))  # |r| <= ln2 / 2
    p = fma(_P32[0], r, _P32[1])  # Horner's scheme, one rounding per step
    p = fma(p, r, _P32[2])
    p = fma(p, r, _P32[3])
    p = fma(p, r, _P32[4])
    p = fma(p, r, _P32[5])
    p = fma(p, r * r, r) + _F(1.0)  # exp(r)
    two_n = bits_to_float(np.int32((np.int32(n) + 127) << 23))  # 2^n
    return _F(0.0) if x < _TINY_32 else p * two_n


_LOG2E_64, _SHIFT_64 = 1.4426950408889634, 1.5 * 2.0**52
_LN2_HI_64, _LN2_LO_64 = 6.93147180369123816490e-01, 1.90821492927058770002e-10  # fdlibm
_P64 = tuple(1.0 / math.factorial(i) for i in range(13, 1, -1))  # Taylor, 1/13! .. 1/2!
_TINY_64 = float(np.log(np.finfo(np.float64).tiny))


@jit
def exp64(x):
    """``exp(x)`` of a float64 ``x <= 0``, vectorisable; 0 below the normal range, NaN for NaN."""
    n = fma(x, _LOG2E_64, _SHIFT_64) - _SHIFT_64
    r = fma(n, -_LN2_LO_64, fma(n, -_LN2_HI_64, x))
    p = _P64[0]
    for c in _P64[1:]:
        p = fma(p, r, c)
    p = fma(p, r * r, r) + 1.0
    two_n = bits_to_float((np.int64(n) + 1023) << 52)
    return 0.0 if x < _TINY_64 else p * two_n


# -- InfoNCE with a shared queue ----------------------------------------------------------------

# One block of logits, (rows, N). 2 MiB (2048 keys for N = 256 in float32) fits the L3 cache and
# keeps the number of BLAS calls, each a synchronisation of BLAS's threads, low: smaller tiles
# were no faster (within noise) in our measurements, and up to 6x slower on a busy machine
# (docs/benchmarks.md).
TILE_BYTES = 2 * 1024 * 1024
MAX_BLOCK_ROWS = 16384  # few queries (N = 1: 524288 rows) would make one block of the whole queue


CHUNK = 64  # rows summed on their own before joining their block's sum (see _fold_block)


@jit
def _fold_block(st, m, s, alpha, block_sum, chunk_sum, exp):
    """Fold one block of logits into each query's running max ``m`` and sum ``s``.

    ``st`` (b, N) holds ``n_j . q_i / T`` (block row j, query i); it is overwritten with
    ``exp(st - m_new)``. ``alpha`` receives ``exp(m_old - m_new)``, the factor by which
    everything accumulated so far must be rescaled. The block's terms are summed in chunks of
    ``CHUNK`` rows, the chunks into the block's sum, the blocks into ``s``: chains of at most
    ``CHUNK``, ``b / CHUNK`` and K / b additions instead of one chain of K, which in float32
    lost up to 1e-4 of the sum for queues of 10^5 keys and more.
    """
    b, n = st.shape
    for i in range(n):
        alpha[i] = m[i]  # alpha holds the new maximum until it is known
    full = b - b % 4
    for j in range(0, full, 4):  # four rows per sweep: a quarter of the loads/stores of alpha
        for i in range(n):
            v = max(max(st[j, i], st[j + 1, i]), max(st[j + 2, i], st[j + 3, i]))
            alpha[i] = v if v > alpha[i] else alpha[i]
    for j in range(full, b):
        for i in range(n):
            v = st[j, i]
            alpha[i] = v if v > alpha[i] else alpha[i]
    for i in range(n):
        new_m = alpha[i]
        alpha[i] = exp(m[i] - new_m)
        s[i] *= alpha[i]
        m[i] = new_m
        block_sum[i] = 0
    for j0 in range(0, b, CHUNK):
        for i in range(n):
            chunk_sum[i] = 0
        for j in range(j0, min(j0 + CHUNK, b)):
            for i in range(n):
                e = exp(st[j, i] - m[i])
                st[j, i] = e
                chunk_sum[i] += e
        for i in range(n):
            block_sum[i] += chunk_sum[i]
    for i in range(n):
        s[i] += block_sum[i]


@jit
def _rescale_add(acc, alpha, part):
    """``acc = alpha[:, None] * acc + part``."""
    n, c = acc.shape
    for i in range(n):
        for j in range(c):
            acc[i, j] = acc[i, j] * alpha[i] + part[i, j]


@jit
def _softmax_block(st, lse, g, exp):
    """``st = exp(st - lse) * g``: the final softmax of one block of logits, times ``g``."""
    b, n = st.shape
    for j in range(b):
        for i in range(n):
            st[j, i] = exp(st[j, i] - lse[i]) * g


def _exp_for(dtype):
    if dtype == np.float32:
        return exp32
    if dtype == np.float64:
        return exp64
    raise TypeError(f"backend='numba' computes in float32 or float64, got dtype {dtype}")


def info_nce_queue(q, k, queue, temperature, reduction, wrt, *, block_rows=None):
    r"""InfoNCE of queries against their keys and a shared queue, fused forward and backward.

    Parameters
    ----------
    q, k : ndarray of shape (N, C)
    queue : ndarray of shape (K, C)
    temperature : float
    reduction : {"mean", "sum"}
    wrt : tuple of str
        Subset of ``("q", "k", "negatives")``.
    block_rows : int, optional
        Queue rows per block; by default as many as fill ``TILE_BYTES`` with logits, at most
        ``MAX_BLOCK_ROWS``.

    Returns
    -------
    losses : ndarray of shape (N,)
        The per-query losses (the caller reduces them).
    grads : dict
        The gradients of the reduced loss named in ``wrt``.

    Notes
    -----
    With :math:`l_{ij} = q_i \cdot n_j / T`, the pass over the queue keeps, per query,
    :math:`m_i = \max(l_{i0}, \max_{j \le J} l_{ij})`, :math:`s_i = e^{l_{i0} - m_i} +
    \sum_{j \le J} e^{l_{ij} - m_i}` and :math:`a_i = \sum_{j \le J} e^{l_{ij} - m_i} n_j`;
    a block that raises :math:`m_i` rescales :math:`s_i` and :math:`a_i` by
    :math:`e^{m_\text{old} - m_\text{new}}`. Then :math:`\ell_i = m_i + \log s_i - l_{i0}` and,
    with :math:`c` the reduction's scale,
    :math:`\partial L / \partial q_i = \frac{c}{T}\big((p_{i0} - 1) k_i + a_i / s_i\big)`.
    The queue's gradient :math:`\frac{c}{T}\sum_i p_{ij} q_i` needs the final :math:`m_i, s_i`:
    it takes a second pass, recomputing each block's logits.
    """
    dtype = q.dtype
    exp = _exp_for(dtype)
    n, c = q.shape
    inv_t = dtype.type(1.0 / temperature)
    qt = np.ascontiguousarray((q * inv_t).T)  # (C, N): q_i / T, as the reference scales it
    l_pos = (q * k).sum(axis=1) * inv_t  # (N,)
    m = l_pos.copy()  # running max, (N,)
    s = np.ones(n, dtype)  # running sum of exp(l - m), (N,): the positive's term is 1
    alpha = np.empty(n, dtype)  # rescaling factor of the current block, (N,)
    block_sum, chunk_sum = np.empty(n, dtype), np.empty(n, dtype)
    rows = block_rows or min(MAX_BLOCK_ROWS, max(1, TILE_BYTES // max(1, n * dtype.itemsize)))
    tile = np.empty(rows * n, dtype)
    want_dq = "q" in wrt
    acc = np.zeros((n, c), dtype) if want_dq else None  # sum_j exp(l_ij - m_i) n_j, (N, C)
    part = np.empty((n, c), dtype) if want_dq else None
    for j0 in range(0, queue.shape[0], rows):
        block = queue[j0 : j0 + rows]  # (b, C)
        st = tile[: len(block) * n].reshape(len(block), n)  # (b, N)
        np.dot(block, qt, out=st)  # n_j . q_i / T
        _fold_block(st, m, s, alpha, block_sum, chunk_sum, exp)
        if want_dq:
            np.dot(st.T, block, out=part)  # (N, C)
            _rescale_add(acc, alpha, part)
    log_s = np.log(s)
    lse = m + log_s  # (N,)
    losses = (m - l_pos) + log_s  # (N,): m - l_pos first, exact when the positive is the max
    grads = {}
    if not wrt:
        return losses, grads
    scale = dtype.type((1.0 / n if n else 0.0) if reduction == "mean" else 1.0)
    g = scale * inv_t  # d loss / d logit of a probability-1 entry, through the division by T
    dpos = (np.exp(l_pos - lse) * scale - scale) * inv_t  # (N,)
    if want_dq:
        grads["q"] = dpos[:, None] * k + acc / s[:, None] * g  # (N, C)
    if "k" in wrt:
        grads["k"] = dpos[:, None] * q  # (N, C)
    if "negatives" in wrt:
        dqueue = np.empty(queue.shape, dtype)  # (K, C)
        for j0 in range(0, queue.shape[0], rows):
            block = queue[j0 : j0 + rows]
            st = tile[: len(block) * n].reshape(len(block), n)
            np.dot(block, qt, out=st)
            _softmax_block(st, lse, g, exp)  # dlogits of the block, (b, N)
            np.dot(st, q, out=dqueue[j0 : j0 + len(block)])  # (b, C)
        grads["negatives"] = dqueue
    return losses, grads


# -- momentum update ----------------------------------------------------------------------------

PARALLEL_MIN = 1 << 18  # elements per thread below which one thread is faster


@jit
def _lerp(t, s, m, w):
    for i in range(t.size):
        t[i] = t[i] * m + w * s[i]


def momentum_update(target, source, m):
    """In place, ``target = m * target + (1 - m) * source`` (the reference's rounding)."""
    dtype = target.dtype
    if dtype not in KERNEL_DTYPES:  # refmoco.momentum_update runs the reference
        raise TypeError(f"target: the momentum kernel computes in float32 or float64, got "
                        f"dtype {dtype}")
    t = target if target.flags.c_contiguous else np.ascontiguousarray(target)
    s = np.ascontiguousarray(source, dtype=dtype)
    run_parts(_lerp, (t.reshape(-1), s.reshape(-1)), (dtype.type(m), dtype.type(1.0 - m)),
              work=t.size, min_work=PARALLEL_MIN)
    if t is not target:
        target[...] = t


# -- SGD ----------------------------------------------------------------------------------------


@jit
def _sgd(p, g, buf, lr, momentum, damp_w, weight_decay, nesterov, first_step):
    for i in range(p.size):
        d = g[i]
        if weight_decay != 0:
            d = d + weight_decay * p[i]  # d_t = g_t + lambda theta
        if momentum != 0:
            b = d if first_step else buf[i] * momentum + damp_w * d  # b_t
            buf[i] = b
            d = d + momentum * b if nesterov else b  # u_t
        p[i] = p[i] - lr * d


def sgd_step(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """One ``torch.optim.SGD`` step on flat, contiguous buffers, in place.

    ``buf`` is the momentum buffer (same shape and dtype as ``p``; ignored, and may be ``None``,
    when ``momentum == 0``); at ``first_step`` it is set to the gradient, as PyTorch does.
    Rounding follows :class:`refmoco.optim.SGD` operation for operation.
    """
    dtype = p.dtype
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"p: the SGD kernel computes in float32 or float64, got dtype {dtype}")
    check_sgd_buffers(p, g, buf, momentum)
    if buf is None:
        buf = np.empty(0, dtype)
    typed = dtype.type
    run_parts(_sgd, (p.reshape(-1), g.reshape(-1), buf.reshape(-1)),
              (typed(lr), typed(momentum), typed(1.0 - dampening), typed(weight_decay),
               bool(nesterov), bool(first_step)), work=p.size, min_work=PARALLEL_MIN)
