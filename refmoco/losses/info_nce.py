"""InfoNCE (MoCo's loss) with a shared queue, per-query or in-batch negatives."""

from __future__ import annotations

from typing import Any, NamedTuple

from .._checks import check_positive, check_reduction, check_same_dtype, check_wrt
from ..backend import float_array, resolve
from .softmax import LossOutput, XentCache, _reduce, xent_backward, xent_forward


class InfoNCECache(NamedTuple):
    mode: str  # "queue", "per_query" or "in_batch"
    q: Any  # (N, C)
    k: Any  # (N, C)
    negatives: Any  # (K, C), (N, M, C) or None
    xent: XentCache
    temperature: float


def info_nce_forward(q, k, negatives, temperature, xp):
    """Per-query InfoNCE losses. The logits are built into one preallocated array (no
    concatenation of ``[l_pos, l_neg]``), the positive in column 0."""
    n = q.shape[0]
    inv_t = q.dtype.type(1.0 / temperature)
    if negatives is None:  # in-batch (end-to-end): the positive of row i is column i
        mode = "in_batch"
        logits = (q @ k.T) * inv_t  # (N, N)
        labels = xp.arange(n)
    else:
        mode = "queue" if negatives.ndim == 2 else "per_query"
        num_neg = negatives.shape[-2]
        logits = xp.empty((n, 1 + num_neg), dtype=q.dtype)  # (N, 1+K)
        logits[:, 0] = (q * k).sum(axis=1)  # l_pos: (N,)
        if mode == "queue":
            logits[:, 1:] = q @ negatives.T  # l_neg: (N, K)
        else:
            logits[:, 1:] = xp.matmul(negatives, q[:, :, None])[:, :, 0]  # l_neg: (N, M)
        logits *= inv_t
        labels = xp.zeros(n, dtype=xp.int64)
    losses, xent = xent_forward(logits, labels, xp, overwrite=True)  # logits: our own buffer
    return losses, InfoNCECache(mode, q, k, negatives, xent, temperature)


def info_nce_backward(dlosses, cache: InfoNCECache, wrt, xp):
    """Gradients of the per-query losses; only the ones named in ``wrt`` are computed."""
    q, k, negatives = cache.q, cache.k, cache.negatives
    dlogits = xent_backward(dlosses, cache.xent, xp, overwrite=True)  # (N, 1+K) or (N, N)
    dlogits *= q.dtype.type(1.0 / cache.temperature)  # through the division by T
    grads = {}
    if cache.mode == "in_batch":
        if "q" in wrt:
            grads["q"] = dlogits @ k  # (N, C)
        if "k" in wrt:
            grads["k"] = dlogits.T @ q  # (N, C)
        return grads
    dpos = dlogits[:, :1]  # (N, 1)
    dneg = dlogits[:, 1:]  # (N, K) or (N, M)
    if "q" in wrt:
        if cache.mode == "queue":
            grads["q"] = dpos * k + dneg @ negatives  # (N, C)
        else:
            grads["q"] = dpos * k + xp.matmul(dneg[:, None, :], negatives)[:, 0, :]  # (N, C)
    if "k" in wrt:
        grads["k"] = dpos * q  # (N, C)
    if "negatives" in wrt:
        if cache.mode == "queue":
            grads["negatives"] = dneg.T @ q  # (K, C)
        else:
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
        ``T > 0``; MoCo v1 uses 0.07, MoCo v2 0.2.
    reduction : {"mean", "sum"}
    wrt : tuple of str, optional
        Subset of ``("q", "k", "negatives")``; by default all arrays given. MoCo needs only
        ``("q",)``: the keys and the queue carry no gradient.
    backend : {None, "numpy", "numba", "cupy"}

    Returns
    -------
    LossOutput
        ``loss`` and the gradients named in ``wrt``.

    Raises
    ------
    TypeError
        Integer inputs, mixed dtypes, mixed NumPy/CuPy arrays.
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
    temperature = check_positive(temperature, "temperature")
    check_reduction(reduction)
    names = ("q", "k") if negatives is None else ("q", "k", "negatives")
    wrt = check_wrt(wrt, names)
    if be.kernels is not None and negatives is not None and negatives.ndim == 2:
        # fused kernel for a shared queue: forward and backward in one pass over queue blocks
        losses, grads = be.kernels.info_nce_queue(q, k, negatives, temperature, reduction, wrt)
        return LossOutput(_reduce(losses, reduction, xp)[0], grads)
    losses, cache = info_nce_forward(q, k, negatives, temperature, xp)
    loss, scale = _reduce(losses, reduction, xp)
    grads = {}
    if wrt:
        dlosses = xp.full((n,), scale, dtype=q.dtype)
        grads = info_nce_backward(dlosses, cache, wrt, xp)
    return LossOutput(loss, grads)
