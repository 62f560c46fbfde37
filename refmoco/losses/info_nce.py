"""InfoNCE (MoCo's loss) with a shared queue, per-query or in-batch negatives."""

from __future__ import annotations

from typing import Any, NamedTuple

from .._checks import check_reduction, check_same_dtype, check_temperature, check_wrt
from ..backend import float_array, resolve
from .softmax import LossOutput, _reduce, xent_backward, xent_forward

# Shared-queue mode: the queue is read in blocks of this many bytes of logits, (rows, N). 2 MiB
# (2048 keys for N = 256 in float32) keeps a block in the L2/L3 cache between the product that
# writes it and the elementwise passes and product that read it; tests make it small.
QUEUE_BLOCK_BYTES = 2 * 1024 * 1024


class QueueStats(NamedTuple):
    """What the shared-queue mode keeps per query for the backward pass."""

    l_pos: Any  # (N,), s_i0 = q_i . k_i / T
    lse: Any  # (N,), log sum_j exp(s_ij), over the positive and the K negatives
    mean_neg: Any  # (N, C), sum_{j >= 1} softmax(s_i)_j n_j, or None if not needed


class InfoNCECache(NamedTuple):
    mode: str  # "queue", "per_query" or "in_batch"
    q: Any  # (N, C)
    k: Any  # (N, C)
    negatives: Any  # (K, C), (N, M, C) or None
    xent: Any  # XentCache of the (N, 1+M) or (N, N) logits; None in the queue mode
    temperature: float
    queue: Any = None  # QueueStats in the queue mode
    block_rows: int | None = None  # queue rows per block (queue mode)


def _queue_rows(n, dtype, block_rows):
    if block_rows is not None:
        return max(1, int(block_rows))
    return max(1, QUEUE_BLOCK_BYTES // max(1, n * dtype.itemsize))


def _queue_forward(q, k, queue, temperature, xp, *, with_mean_neg=True, block_rows=None):
    r"""Per-query losses against a shared queue, without materialising the (N, 1+K) logits.

    With :math:`s_{i0} = q_i \cdot k_i / T` and :math:`s_{ij} = q_i \cdot n_j / T`, the loss is
    :math:`\ell_i = \mathrm{lse}_i - s_{i0}`, :math:`\mathrm{lse}_i = m_i + \log\sum_j
    e^{s_{ij} - m_i}` with :math:`m_i` the row maximum (so nothing overflows).

    Why blocks: the (N, K) logits of a MoCo queue are 64 MiB, and every elementwise pass over
    them (max, shift, exp, sum) would go to main memory. Instead the queue is read in blocks
    of ``rows`` keys; ``matmul(..., out=)`` writes each block's logits into one preallocated
    tile (no (N, 1+K) array, no concatenation), laid out (rows, N), query i in column i (the
    layout in which BLAS writes ``n_j . q_i`` fastest); the tile stays in cache through the
    elementwise passes and the product for the gradient, and three per-query sums are updated
    block by block (the online log-sum-exp):

    - :math:`m_i`, the maximum so far, starts at :math:`s_{i0}`;
    - :math:`z_i = \sum_j e^{s_{ij} - m_i}` (so far) starts at 1, the positive's term;
    - :math:`a_i = \sum_{j \ge 1} e^{s_{ij} - m_i} n_j` (for the gradient of q) starts at 0.

    A block whose maximum exceeds :math:`m_i` multiplies :math:`z_i` and :math:`a_i` by
    :math:`e^{m_\text{old} - m_\text{new}} \le 1` before adding its own terms, so that all
    terms share the final :math:`m_i`. At the end :math:`a_i / z_i = \sum_{j \ge 1}
    \mathrm{softmax}(s_i)_j n_j` (``mean_neg``). ``with_mean_neg=False`` skips :math:`a_i`
    (its product with the block is half the work) when the gradient of q is not wanted.
    The logits are computed as ``n_j . (q_i / T)``: 1/T is applied once to q, not to K x N
    logits.
    """
    n, c = q.shape
    dtype = q.dtype
    inv_t = dtype.type(1.0 / temperature)
    qt = xp.ascontiguousarray((q * inv_t).T)  # (C, N): q_i / T in column i
    l_pos = (q * k).sum(axis=1) * inv_t  # (N,), s_i0
    m = l_pos.copy()  # (N,), running maximum
    z = xp.ones(n, dtype=dtype)  # (N,), running sum of exp(s_ij - m_i)
    a = xp.zeros((n, c), dtype=dtype) if with_mean_neg else None  # (N, C), sum exp(..) n_j
    rows = _queue_rows(n, dtype, block_rows)
    tile = xp.empty((min(rows, queue.shape[0]), n), dtype=dtype)  # one block of logits
    block_max = xp.empty(n, dtype=dtype)
    block_sum = xp.empty(n, dtype=dtype)
    part = xp.empty((n, c), dtype=dtype) if with_mean_neg else None
    for j0 in range(0, queue.shape[0], rows):
        block = queue[j0 : j0 + rows]  # (b, C): keys n_j of this block
        s = tile[: block.shape[0]]  # (b, N)
        xp.matmul(block, qt, out=s)  # s[j, i] = s_ij = q_i . n_j / T
        xp.max(s, axis=0, out=block_max)  # (N,)
        new_m = xp.maximum(m, block_max)  # (N,)
        alpha = xp.exp(m - new_m)  # (N,), rescales the sums so far; 1 if m is unchanged
        m = new_m
        xp.subtract(s, m, out=s)  # every entry <= 0
        xp.exp(s, out=s)  # e^{s_ij - m_i}
        xp.sum(s, axis=0, out=block_sum)
        z = z * alpha + block_sum
        if with_mean_neg:
            xp.matmul(s.T, block, out=part)  # (N, C): sum over the block of e^{s_ij - m_i} n_j
            a *= alpha[:, None]
            a += part
    log_z = xp.log(z)  # (N,)
    losses = (m - l_pos) + log_z  # (N,), lse_i - s_i0; exactly log(z_i) while m_i = s_i0
    mean_neg = None if a is None else a / z[:, None]
    return losses, QueueStats(l_pos, m + log_z, mean_neg)


def _queue_negatives_grad(g, cache: InfoNCECache, xp):
    r"""``dL/dn_j = sum_i g_i softmax(s_i)_j q_i`` (``g_i`` = dloss_i / T): a second pass over
    the blocks, recomputing each block's logits now that every :math:`\mathrm{lse}_i` is known."""
    q, queue, lse = cache.q, cache.negatives, cache.queue.lse
    n = q.shape[0]
    inv_t = q.dtype.type(1.0 / cache.temperature)
    qt = xp.ascontiguousarray((q * inv_t).T)  # (C, N), as in the forward pass
    rows = _queue_rows(n, q.dtype, cache.block_rows)
    tile = xp.empty((min(rows, queue.shape[0]), n), dtype=q.dtype)
    dqueue = xp.empty(queue.shape, dtype=q.dtype)  # (K, C)
    for j0 in range(0, queue.shape[0], rows):
        block = queue[j0 : j0 + rows]
        s = tile[: block.shape[0]]  # (b, N)
        xp.matmul(block, qt, out=s)  # s_ij
        xp.subtract(s, lse, out=s)
        xp.exp(s, out=s)  # softmax(s_i)_j
        s *= g  # dL/ds_ij for j >= 1 (the onehot is at j = 0, not in the queue)
        xp.matmul(s, q, out=dqueue[j0 : j0 + block.shape[0]])  # (b, C)
    return dqueue


def info_nce_forward(q, k, negatives, temperature, xp, *, wrt=None, block_rows=None):
    """Per-query InfoNCE losses and the cache of :func:`info_nce_backward`.

    Shared queue: blockwise, see :func:`_queue_forward`; ``wrt`` without ``"q"`` skips the
    part only the gradient of q needs, and ``block_rows`` sets the queue rows per block
    (default: ``QUEUE_BLOCK_BYTES`` of logits). Per-query and in-batch negatives: the logits are
    built into one preallocated array (no concatenation of ``[l_pos, l_neg]``), the positive
    in column 0, and go through :func:`xent_forward`."""
    n = q.shape[0]
    inv_t = q.dtype.type(1.0 / temperature)
    if negatives is not None and negatives.ndim == 2:
        losses, stats = _queue_forward(q, k, negatives, temperature, xp,
                                       with_mean_neg=wrt is None or "q" in wrt,
                                       block_rows=block_rows)
        return losses, InfoNCECache("queue", q, k, negatives, None, temperature, stats,
                                    block_rows)
    if negatives is None:  # in-batch (end-to-end): the positive of row i is column i
        mode = "in_batch"
        logits = (q @ k.T) * inv_t  # (N, N)
        labels = xp.arange(n)
    else:
        mode = "per_query"
        num_neg = negatives.shape[-2]
        logits = xp.empty((n, 1 + num_neg), dtype=q.dtype)  # (N, 1+M)
        logits[:, 0] = (q * k).sum(axis=1)  # l_pos: (N,)
        logits[:, 1:] = xp.matmul(negatives, q[:, :, None])[:, :, 0]  # l_neg: (N, M)
        logits *= inv_t
        labels = xp.zeros(n, dtype=xp.int64)
    losses, xent = xent_forward(logits, labels, xp, overwrite=True)  # logits: our own buffer
    return losses, InfoNCECache(mode, q, k, negatives, xent, temperature)


def info_nce_backward(dlosses, cache: InfoNCECache, wrt, xp):
    """Gradients of the per-query losses; only the ones named in ``wrt`` are computed."""
    q, k, negatives = cache.q, cache.k, cache.negatives
    inv_t = q.dtype.type(1.0 / cache.temperature)
    grads = {}
    if cache.mode == "queue":
        # dl_i/ds_ij = softmax(s_i)_j - [j = 0]; through s = (q . key) / T, times 1/T
        stats = cache.queue
        g = dlosses * inv_t  # (N,)
        dpos = g * (xp.exp(stats.l_pos - stats.lse) - 1)  # (N,): g_i (softmax(s_i)_0 - 1)
        if "q" in wrt:
            if stats.mean_neg is None:
                raise ValueError("the forward pass ran without wrt containing 'q'")
            grads["q"] = dpos[:, None] * k + g[:, None] * stats.mean_neg  # (N, C)
        if "k" in wrt:
            grads["k"] = dpos[:, None] * q  # (N, C)
        if "negatives" in wrt:
            grads["negatives"] = _queue_negatives_grad(g, cache, xp)  # (K, C)
        return grads
    dlogits = xent_backward(dlosses, cache.xent, xp, overwrite=True)  # (N, 1+M) or (N, N)
    dlogits *= inv_t  # through the division by T
    if cache.mode == "in_batch":
        if "q" in wrt:
            grads["q"] = dlogits @ k  # (N, C)
        if "k" in wrt:
            grads["k"] = dlogits.T @ q  # (N, C)
        return grads
    dpos = dlogits[:, :1]  # (N, 1)
    dneg = dlogits[:, 1:]  # (N, M)
    if "q" in wrt:
        grads["q"] = dpos * k + xp.matmul(dneg[:, None, :], negatives)[:, 0, :]  # (N, C)
    if "k" in wrt:
        grads["k"] = dpos * q  # (N, C)
    if "negatives" in wrt:
        grads["negatives"] = dneg[:, :, None] * q[:, None, :]  # (N, M, C)
    return grads


def info_nce_loss(q, k, negatives=None, *, temperature=0.07, reduction="mean", wrt=None,
                  backend=None):
    r"""InfoNCE, the loss of MoCo, with its three sources of negatives.

    Parameters
    ----------
    q : ndarray of shape (N, C)
        Queries (pass L2-normalised rows, as MoCo does: nothing is normalised here).
    k : ndarray of shape (N, C)
        Row ``i`` is the positive key of query ``i``.
    negatives : None or ndarray of shape (K, C) or (N, M, C)
        ``(K, C)``: shared by every query (MoCo's queue). ``(N, M, C)``: query ``i``'s own ``M``
        negatives (memory-bank samples). ``None``: in-batch negatives, the other rows of ``k``
        (the end-to-end mechanism).
    temperature : float
        ``T > 0``; MoCo v1 uses 0.07, MoCo v2 0.2. A real number (a Python or NumPy int or
        float, or a 0-d array): a string or a bool is a ``TypeError``.
    reduction : {"mean", "sum"}
    wrt : tuple of str, optional
        Subset of ``("q", "k", "negatives")``; by default all arrays given. MoCo needs only
        ``("q",)``: the keys and the queue carry no gradient.
    backend : {None, "numpy", "numba", "cupy"}

    Returns
    -------
    LossOutput
        ``loss`` and the gradients named in ``wrt``. An empty batch (N = 0) has loss 0 for
        either reduction, in every mode, and gradients of the arguments' shapes (those of a
        shared queue all zeros).

    Raises
    ------
    TypeError
        Integer inputs, mixed dtypes, mixed NumPy/CuPy arrays, a temperature that is not a
        real number.
    ValueError
        Mismatched shapes, temperature <= 0, unknown reduction or ``wrt`` names.

    Notes
    -----
    With a shared queue, the logits of query :math:`i` are
    :math:`s_i = [q_i \cdot k_i, q_i \cdot n_1, \dots, q_i \cdot n_K] / T`, the target is index 0,
    and :math:`\ell_i = \log\sum_j e^{s_{ij}} - s_{i0}`. With :math:`g_i = (\mathrm{softmax}(s_i)
    - e_0) / T`:

    .. math:: \frac{\partial \ell_i}{\partial q_i} = g_{i0} k_i + \sum_j g_{ij} n_j, \qquad
              \frac{\partial \ell_i}{\partial k_i} = g_{i0} q_i, \qquad
              \frac{\partial L}{\partial n_j} = \sum_i g_{ij} q_i

    In-batch: :math:`s = q k^\top / T`, target :math:`i`; :math:`\partial L/\partial q = G k`,
    :math:`\partial L/\partial k = G^\top q`.

    The shared queue is read in blocks that stay in cache, with a running maximum per query
    (an online log-sum-exp), so the (N, 1+K) logits are never stored; the gradient of the
    queue recomputes each block's logits in a second pass (``_queue_forward``).

    Examples
    --------
    >>> import numpy as np, refmoco
    >>> q = np.ones((4, 8)) / np.sqrt(8)          # collapsed embeddings:
    >>> out = refmoco.info_nce_loss(q, q, q[:1].repeat(16, axis=0), temperature=0.1)
    >>> bool(np.isclose(float(out.loss), np.log(17)))   # the loss is log(K + 1)
    True
    """
    be = resolve(backend, q, k, negatives)
    xp = be.xp
    q = float_array(q, "q", ndim=2)
    k = float_array(k, "k", ndim=2)
    if negatives is not None:
        negatives = float_array(negatives, "negatives")
    check_same_dtype({"q": q, "k": k, "negatives": negatives})
    n, c = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k: expected the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if negatives is not None:
        if negatives.ndim == 2 and negatives.shape[1] != c:
            raise ValueError(f"negatives: expected shape (K, {c}), got {tuple(negatives.shape)}")
        if negatives.ndim == 3 and (negatives.shape[0] != n or negatives.shape[2] != c):
            raise ValueError(
                f"negatives: expected shape ({n}, M, {c}), got {tuple(negatives.shape)}"
            )
        if negatives.ndim not in (2, 3):
            raise ValueError(
                f"negatives: expected shape (K, C) or (N, M, C), got {tuple(negatives.shape)}"
            )
    temperature = check_temperature(temperature, q.dtype)  # 1/T finite in the dtype too
    check_reduction(reduction)
    names = ("q", "k") if negatives is None else ("q", "k", "negatives")
    wrt = check_wrt(wrt, names)
    if be.kernels is not None and negatives is not None and negatives.ndim == 2:
        # fused kernel for a shared queue: forward and backward in one pass over queue blocks
        losses, grads = be.kernels.info_nce_queue(q, k, negatives, temperature, reduction, wrt)
        return LossOutput(_reduce(losses, reduction, xp)[0], grads)
    losses, cache = info_nce_forward(q, k, negatives, temperature, xp, wrt=wrt)
    loss, scale = _reduce(losses, reduction, xp)
    grads = {}
    if wrt:
        dlosses = xp.full((n,), scale, dtype=q.dtype)
        grads = info_nce_backward(dlosses, cache, wrt, xp)
    return LossOutput(loss, grads)
