"""CPC's InfoNCE loss and the mutual-information bound."""

from __future__ import annotations

import math

import numpy as np

from .._checks import check_int, check_reduction, check_same_dtype, check_wrt
from ..backend import float_array, resolve
from .softmax import LossOutput, xent_backward, xent_forward


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
        ``loss`` and ``grads["z"]``, ``grads["c"]``, ``grads["W"]``. An empty batch (B = 0)
        has no terms: loss 0 for either reduction (as the other losses), and zero gradients (W's
        of W's shape).

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
    scale = dtype.type(1.0 if reduction == "sum" else 1.0 / count if count else 0.0)
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
        ``log(num_candidates) - loss``. A Python float (or int) ``loss`` gives a Python float,
        as ``math.log(n) - loss`` would. An array ``loss`` (what the losses return: a 0-d array)
        gives an array of its array type, shape and float dtype: a 0-d NumPy array for a 0-d
        NumPy array, a CuPy array for a CuPy array, float32 for float32; a NumPy scalar gives a
        NumPy scalar of its float dtype. The bound can never exceed ``log(num_candidates)``.

    Raises
    ------
    TypeError
        An integer or boolean array ``loss`` (or a bool), a ``num_candidates`` that is not an
        integer.
    ValueError
        ``num_candidates < 1``.

    Examples
    --------
    >>> import math, numpy as np, refmoco
    >>> refmoco.mi_lower_bound(0.5, 64) == math.log(64) - 0.5
    True
    >>> bound = refmoco.mi_lower_bound(np.array(0.5, dtype=np.float32), 64)
    >>> type(bound).__name__, bound.shape, bound.dtype
    ('ndarray', (), dtype('float32'))
    """
    n = check_int(num_candidates, "num_candidates", minimum=1)
    if isinstance(loss, (int, float)) and not isinstance(loss, (bool, np.generic)):
        return math.log(n) - float(loss)
    if isinstance(loss, np.generic) and not isinstance(loss, np.bool_):  # scalar in, scalar out
        return mi_lower_bound(np.asarray(loss), n)[()]
    xp = resolve(None, loss).xp
    loss = float_array(loss, "loss")
    # an array, not the scalar that NumPy makes of a 0-d result
    return xp.asarray(loss.dtype.type(math.log(n)) - loss)
