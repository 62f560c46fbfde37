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

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

from ._checks import (
    check_int,
    check_positive,
    check_reduction,
    check_same_dtype,
    check_wrt,
)
from .backend import as_array, float_array, resolve


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


# ---------------------------------------------------------------------------------------------
# Softmax cross-entropy along the last axis: the core of every InfoNCE form.
# ---------------------------------------------------------------------------------------------


class XentCache(NamedTuple):
    probs: Any  # softmax of the logits, same shape as the logits
    labels: Any  # integer target index per row, shape logits.shape[:-1]


def xent_forward(logits, labels, xp, *, overwrite=False):
    """Per-row cross-entropy ``-log softmax(logits)[label]`` along the last axis.

    ``lse = m + log(sum(exp(logits - m)))`` with ``m`` the row maximum, so that tiny
    temperatures and large norms never overflow. One array the size of the logits is made
    (none with ``overwrite=True``, which reuses ``logits`` itself: the caller's own buffer);
    the shift, the exponential and the normalisation then run in place on it.
    """
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
    dlogits = xp.multiply(cache.probs, dlosses[..., None], out=cache.probs if overwrite else None)
    idx = cache.labels[..., None]
    picked = xp.take_along_axis(dlogits, idx, axis=-1)
    xp.put_along_axis(dlogits, idx, picked - dlosses[..., None], axis=-1)
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
        Target class of each row, in ``[0, M)``.
    reduction : {"mean", "sum"}
    wrt : tuple of str, optional
        Which gradients to compute; default ``("logits",)``. ``()`` computes none.
    backend : {None, "numpy", "numba", "cupy"}

    Returns
    -------
    LossOutput
        ``loss`` (0-d array) and ``grads["logits"]`` of shape (N, M).

    Raises
    ------
    TypeError
        Integer logits or non-integer labels.
    ValueError
        Wrong shapes, labels out of range, unknown reduction.

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
    if m < 1:
        raise ValueError("logits: expected at least one class (M >= 1)")
    labels = _check_labels(labels, m, n, xp)
    losses, cache = xent_forward(logits, labels, xp)
    loss, scale = _reduce(losses, reduction, xp)
    grads = {}
    if "logits" in wrt:
        dlosses = xp.full((n,), scale, dtype=logits.dtype)
        grads["logits"] = xent_backward(dlosses, cache, xp)
    return LossOutput(loss, grads)


# ---------------------------------------------------------------------------------------------
# The margin contrastive loss (Hadsell, Chopra, LeCun 2006). y = 0: similar, y = 1: dissimilar.
# ---------------------------------------------------------------------------------------------


class ContrastiveCache(NamedTuple):
    diff: Any  # x1 - x2, (N, D)
    dist: Any  # ||x1 - x2||, (N,)
    y: Any  # 0 similar / 1 dissimilar, (N,) in the float dtype
    margin: float


def contrastive_forward(x1, x2, y, margin, xp):
    diff = x1 - x2  # (N, D)
    dist = xp.sqrt((diff * diff).sum(axis=1))  # (N,)
    hinge = xp.maximum(margin - dist, 0)  # (N,)
    losses = 0.5 * (1 - y) * dist**2 + 0.5 * y * hinge**2  # (N,)
    return losses, ContrastiveCache(diff, dist, y, margin)


def contrastive_backward(dlosses, cache: ContrastiveCache, xp):
    """``dx1 = [(1 - y) - y * max(0, m - d) / d] * (x1 - x2) * dloss``; ``dx2 = -dx1``.

    A dissimilar pair at ``d = 0`` has no direction to be pushed in: its gradient is 0.
    """
    diff, dist, y, margin = cache
    hinge = xp.maximum(margin - dist, 0)  # (N,)
    safe = xp.where(dist > 0, dist, 1)  # (N,) avoids 0/0; masked below
    push = xp.where(dist > 0, hinge / safe, 0)  # (N,)
    coef = ((1 - y) - y * push) * dlosses  # (N,)
    dx1 = coef[:, None] * diff  # (N, D)
    return dx1, -dx1


def contrastive_loss(x1, x2, y, *, margin=1.0, reduction="mean", wrt=None, backend=None):
    r"""The margin contrastive loss of Hadsell, Chopra and LeCun (2006).

    Parameters
    ----------
    x1, x2 : ndarray of shape (N, D)
        The two embeddings of each pair.
    y : ndarray of shape (N,), 0/1 or bool
        **0 = similar pair, 1 = dissimilar pair** (the paper's convention; TensorFlow Addons and
        Caffe use the opposite polarity).
    margin : float
        The radius ``m > 0`` inside which dissimilar pairs are pushed apart.
    reduction : {"mean", "sum"}
    wrt : tuple of str, optional
        Subset of ``("x1", "x2")``.
    backend : {None, "numpy", "numba", "cupy"}

    Returns
    -------
    LossOutput
        ``loss`` and ``grads["x1"]``, ``grads["x2"]`` of shape (N, D).

    Raises
    ------
    TypeError
        Integer embeddings, mixed dtypes.
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


# ---------------------------------------------------------------------------------------------
# InfoNCE: a (1 + K)-way softmax classification of the positive key among negatives.
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# CPC (van den Oord et al. 2018): predict z[t + s] from c[t] with one bilinear map per step.
# ---------------------------------------------------------------------------------------------


def cpc_loss(z, c, W, *, reduction="mean", wrt=None, backend=None):
    r"""Contrastive Predictive Coding's InfoNCE loss, negatives from the other sequences.

    Parameters
    ----------
    z : ndarray of shape (B, T, D)
        Encodings of every time step.
    c : ndarray of shape (B, T, H)
        Context vectors (the autoregressive model's outputs).
    W : ndarray of shape (S, D, H)
        One bilinear map per prediction step ``s = 1..S``; requires ``S < T``.
    reduction : {"mean", "sum"}
        Mean or sum over all valid ``(s, t, b)`` terms.
    wrt : tuple of str, optional
        Subset of ``("z", "c", "W")``.
    backend : {None, "numpy", "numba", "cupy"}

    Returns
    -------
    LossOutput

    Notes
    -----
    For each step :math:`s` and time :math:`t` with :math:`t + s < T`, the query of sequence
    :math:`b` scores every sequence :math:`b'` of the batch at the same future time,

    .. math:: f_{s,t}(b, b') = z_{b', t+s} \cdot (W_s\, c_{b,t}), \qquad
              \ell_{s,t,b} = \log\sum_{b'} e^{f_{s,t}(b, b')} - f_{s,t}(b, b).

    With :math:`g = \mathrm{softmax}(f) - I` (times the reduction's scale) and
    :math:`p_{b,t} = W_s c_{b,t}`: :math:`\partial p_{b,t} = \sum_{b'} g_{bb'} z_{b',t+s}`,
    :math:`\partial z_{b',t+s} \mathrel{+}= \sum_b g_{bb'} p_{b,t}`,
    :math:`\partial W_s = \sum_{b,t} \partial p_{b,t}\, c_{b,t}^\top`,
    :math:`\partial c_{b,t} \mathrel{+}= W_s^\top \partial p_{b,t}`.

    Examples
    --------
    >>> import numpy as np, refmoco
    >>> rng = np.random.default_rng(0)
    >>> z, c, W = rng.normal(size=(4, 6, 3)), rng.normal(size=(4, 6, 5)), rng.normal(size=(2, 3, 5))
    >>> out = refmoco.cpc_loss(z, c, W)
    >>> sorted(out.grads)
    ['W', 'c', 'z']
    """
    be = resolve(backend, z, c, W)
    xp = be.xp
    z = float_array(z, "z", ndim=3)
    c = float_array(c, "c", ndim=3)
    W = float_array(W, "W", ndim=3)
    dtype = check_same_dtype({"z": z, "c": c, "W": W})
    b, t, d = z.shape
    if c.shape[:2] != (b, t):
        raise ValueError(f"c: expected shape ({b}, {t}, H), got {tuple(c.shape)}")
    s_max = W.shape[0]
    if W.shape[1:] != (d, c.shape[2]):
        raise ValueError(f"W: expected shape (S, {d}, {c.shape[2]}), got {tuple(W.shape)}")
    if not 1 <= s_max < t:
        raise ValueError(f"W: expected 1 <= S < T = {t} prediction steps, got S = {s_max}")
    check_reduction(reduction)
    wrt = check_wrt(wrt, ("z", "c", "W"))

    count = b * sum(t - s for s in range(1, s_max + 1))
    scale = dtype.type(1.0 / count if reduction == "mean" else 1.0)
    total = dtype.type(0)
    grads = {name: xp.zeros_like(a) for name, a in (("z", z), ("c", c), ("W", W)) if name in wrt}
    labels = xp.broadcast_to(xp.arange(b), (t, b))
    for s in range(1, s_max + 1):
        ctx = c[:, : t - s]  # (B, T-s, H)
        future = z[:, s:]  # (B, T-s, D)
        pred = ctx @ W[s - 1].T  # (B, T-s, D): W_s c_{b,t}
        scores = xp.einsum("btd,ctd->tbc", pred, future)  # (T-s, B, B)
        losses, xent = xent_forward(scores, labels[: t - s], xp)  # (T-s, B)
        total = total + losses.sum(dtype=dtype)
        if not wrt:
            continue
        dscores = xent_backward(xp.full(losses.shape, scale, dtype=dtype), xent, xp)
        if "z" in wrt:
            grads["z"][:, s:] += xp.einsum("tbc,btd->ctd", dscores, pred)  # (B, T-s, D)
        if "c" in wrt or "W" in wrt:
            dpred = xp.einsum("tbc,ctd->btd", dscores, future)  # (B, T-s, D)
            if "W" in wrt:
                grads["W"][s - 1] = xp.einsum("btd,bth->dh", dpred, ctx)  # (D, H)
            if "c" in wrt:
                grads["c"][:, : t - s] += dpred @ W[s - 1]  # (B, T-s, H)
    return LossOutput(xp.asarray(total * scale), grads)


def mi_lower_bound(loss, num_candidates):
    r"""The InfoNCE lower bound on mutual information, :math:`I \ge \log N - L`.

    Parameters
    ----------
    loss : float or 0-d array
        A mean InfoNCE loss (in nats).
    num_candidates : int
        Candidates per query: the positive plus the negatives (``K + 1`` for MoCo, the batch
        size for in-batch negatives and CPC).

    Returns
    -------
    float or array
        ``log(num_candidates) - loss``, of the type of ``loss``. The bound can never exceed
        ``log(num_candidates)``.

    Examples
    --------
    >>> import math, refmoco
    >>> refmoco.mi_lower_bound(0.5, 64) == math.log(64) - 0.5
    True
    """
    n = check_int(num_candidates, "num_candidates", minimum=1)
    if isinstance(loss, (int, float)):
        return math.log(n) - float(loss)
    loss = float_array(loss, "loss")
    return loss.dtype.type(math.log(n)) - loss


# ---------------------------------------------------------------------------------------------
# L2 normalisation with its backward.
# ---------------------------------------------------------------------------------------------


def l2_normalize(x, *, axis=-1, eps=1e-12) -> tuple[Any, Callable[[Any], Any]]:
    r"""``y = x / max(||x||, eps)`` along ``axis``, and the function that backpropagates it.

    Parameters
    ----------
    x : ndarray
    axis : int
    eps : float
        Norms below ``eps`` are replaced by ``eps`` (as ``torch.nn.functional.normalize``).

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``
    backward : callable
        ``backward(dy) -> dx``.

    Notes
    -----
    The norm is computed as :math:`a \sqrt{\sum (x/a)^2}` with :math:`a = \max|x|`, so that it
    neither overflows nor underflows. Where :math:`\lVert x\rVert > \epsilon`,

    .. math:: \frac{\partial L}{\partial x} = \frac{g - y\,(y\cdot g)}{\lVert x\rVert},

    and where the norm is clamped, :math:`\partial L/\partial x = g / \epsilon`.

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
    a = xp.abs(x).max(axis=axis, keepdims=True)  # the largest entry along the axis
    safe_a = xp.where(a > 0, a, 1)
    norm = a * xp.sqrt(((x / safe_a) ** 2).sum(axis=axis, keepdims=True))  # ||x||
    clamped = norm <= eps
    denom = xp.where(clamped, x.dtype.type(eps), norm)
    y = x / denom

    def backward(dy):
        dy = float_array(dy, "dy")
        if dy.shape != y.shape:
            raise ValueError(f"dy: expected shape {tuple(y.shape)}, got {tuple(dy.shape)}")
        radial = (y * dy).sum(axis=axis, keepdims=True)
        return xp.where(clamped, dy, dy - y * radial) / denom

    return y, backward
