"""Three CPC losses: the paper's, jefflai108's ``CDCK2`` and facebookresearch's ``CPC_audio``.

They differ in the direction of the softmax, in where the negatives come from, in the scoring
function and in the reduction:

- **The paper** (:func:`refmoco.cpc_loss`): every ``t`` with ``t + s < T``; score
  ``z . (W_s c)``; softmax over the candidate future encodings (the other sequences of the batch
  at the same time); the mean over all ``(s, t, b)``.
- **CDCK2**: one sampled ``t`` per batch; score ``z . (W_s c + b_s)``; softmax over the batch's
  **contexts** for a fixed encoding (the transpose); the mean over ``(s, b)``.
- **CPC_audio**: the first ``T - S`` steps for every ``s``; score ``mean_d(z * (W_s c))`` (a dot
  product divided by ``D``); softmax over the positive and ``M`` given negatives shared by every
  ``s``; the mean over ``(b, t)`` for each step, **summed** over ``s``.

References
----------
- van den Oord, Li, Vinyals. Representation Learning with Contrastive Predictive Coding.
  arXiv:1807.03748.
- jefflai108/Contrastive-Predictive-Coding-PyTorch, ``src/model/model.py`` (``CDCK2.forward``).
- facebookresearch/CPC_audio, ``cpc/criterion/criterion.py`` (``CPCUnsupersivedCriterion``,
  ``PredictionNetwork``) and ``cpc/train.py`` (``totLoss = allLosses.sum()``).
"""

from __future__ import annotations

import numpy as np

from .._checks import check_int, check_same_dtype, check_wrt
from ..backend import float_array
from ..losses import LossOutput, cpc_loss, xent_backward, xent_forward


def paper_loss(z, c, W, *, reduction="mean", wrt=None):
    """The paper's loss: :func:`refmoco.cpc_loss` (softmax over candidate future encodings, the
    other sequences of the batch at the same time as negatives, every valid ``(s, t, b)``)."""
    return cpc_loss(z, c, W, reduction=reduction, wrt=wrt)


def _arrays(named: dict) -> tuple[dict, np.dtype]:
    arrays = {n: float_array(a, n) for n, a in named.items() if a is not None}
    return arrays, check_same_dtype(arrays)


def cdck2_loss(z, c, W, b, t, *, wrt=None):
    r"""jefflai108's ``CDCK2`` loss at the sampled time step ``t``.

    Parameters
    ----------
    z : ndarray of shape (B, T, D)
        Encodings (``z = encoder(x).transpose(1, 2)``).
    c : ndarray of shape (B, T, H)
        GRU outputs; only ``c[:, t]`` is used (``c_t = output[:, t_samples]``).
    W : ndarray of shape (S, D, H)
        ``Wk[s - 1].weight`` for ``s = 1..S`` (``S = timestep``).
    b : ndarray of shape (S, D)
        ``Wk[s - 1].bias`` (``nn.Linear`` has a bias there).
    t : int
        ``t_samples``, with ``t + S < T``.
    wrt : tuple of str, optional
        Subset of ``("z", "c", "W", "b")``.

    Returns
    -------
    LossOutput

    Notes
    -----
    For each step :math:`s`, ``total = encode_samples[s] @ pred[s].T``, that is
    :math:`A^{(s)}_{ij} = z_{i,t+s} \cdot (W_s c_{j,t} + b_s)` (row: an encoding, column: a
    prediction), and ``nn.LogSoftmax()`` with the implicit dimension 1 normalises each row over
    the **predictions** (contexts):

    .. math:: L = -\frac{1}{BS} \sum_{s=1}^{S} \sum_{i} \log \operatorname{softmax}_j
              (A^{(s)}_{ij})\big|_{j=i}

    The paper (and :func:`refmoco.cpc_loss`) normalises over the encodings for a fixed context:
    the transpose.

    Examples
    --------
    >>> import numpy as np
    >>> from refmoco.conventions.cpc import cdck2_loss
    >>> z = np.zeros((2, 3, 1)); c = np.zeros((2, 3, 1))
    >>> out = cdck2_loss(z, c, np.zeros((1, 1, 1)), np.zeros((1, 1)), t=0)
    >>> bool(np.isclose(float(out.loss), np.log(2)))    # all scores equal: log B
    True
    """
    arrays, dtype = _arrays({"z": z, "c": c, "W": W, "b": b})
    z, c, W, b = arrays["z"], arrays["c"], arrays["W"], arrays["b"]
    wrt = check_wrt(wrt, ("z", "c", "W", "b"))
    batch, steps_t, d = z.shape
    s_max = W.shape[0]
    if c.ndim != 3 or c.shape[:2] != (batch, steps_t) or W.shape != (s_max, d, c.shape[2]):
        raise ValueError(f"c, W: expected ({batch}, {steps_t}, H) and (S, {d}, H), "
                         f"got {c.shape} and {W.shape}")
    if b.shape != (s_max, d):
        raise ValueError(f"b: expected shape ({s_max}, {d}), got {b.shape}")
    t = check_int(t, "t", minimum=0)
    if t + s_max >= steps_t:
        raise ValueError(f"t: expected t + S < T = {steps_t}, got t = {t}, S = {s_max}")
    scale = dtype.type(1.0 / (batch * s_max))
    labels = np.arange(batch)
    ct = c[:, t]  # (B, H)
    total = dtype.type(0)
    grads = {n: np.zeros_like(arrays[n]) for n in wrt}
    for s in range(1, s_max + 1):
        pred = ct @ W[s - 1].T + b[s - 1]  # (B, D): Wk(c_t)
        scores = z[:, t + s] @ pred.T  # (B, B): row i an encoding, column j a prediction
        losses, cache = xent_forward(scores, labels, np)  # softmax along columns (dim 1)
        total = total + losses.sum()
        dscores = xent_backward(np.full(batch, scale, dtype=dtype), cache, np)  # (B, B)
        dpred = dscores.T @ z[:, t + s]  # (B, D)
        if "z" in wrt:
            grads["z"][:, t + s] += dscores @ pred
        if "W" in wrt:
            grads["W"][s - 1] = dpred.T @ ct
        if "b" in wrt:
            grads["b"][s - 1] = dpred.sum(axis=0)
        if "c" in wrt:
            grads["c"][:, t] += dpred @ W[s - 1]
    return LossOutput(np.asarray(total * scale), grads)


def cpc_audio_negative_indices(batch, seq, window, num_negatives, rng):
    r"""``sampleClean``'s indices of the negatives, drawn with a NumPy generator.

    Parameters
    ----------
    batch, seq : int
        ``B`` and ``T`` of ``encodedData`` (B, T, D).
    window : int
        ``T - S``.
    num_negatives : int
        ``negativeSamplingExt``.
    rng : numpy.random.Generator

    Returns
    -------
    batch_idx, seq_idx : ndarray of int of shape (B, M, T - S)
        ``negatives = z[batch_idx, seq_idx]`` has shape (B, M, T - S, D). As in ``CPC_audio``,
        the sequence is uniform over ``B``, and the time is ``(t + u) % T`` with ``u`` uniform
        in ``[1, T)`` (never the query's own time ``t``, but possibly its positive ``t + s``).
    """
    n = num_negatives * window * batch
    batch_idx = rng.integers(0, batch, size=n)
    seq_idx = rng.integers(1, seq, size=n)
    base = np.broadcast_to(np.arange(window), (batch, num_negatives, window)).reshape(-1)
    seq_idx = (seq_idx + base) % seq
    shape = (batch, num_negatives, window)
    return batch_idx.reshape(shape), seq_idx.reshape(shape)


def cpc_audio_loss(z, c, W, negatives, *, wrt=None):
    r"""``CPC_audio``'s loss, ``CPCUnsupersivedCriterion(...)(c, z, label)`` summed over steps.

    Parameters
    ----------
    z : ndarray of shape (B, T, D)
        ``encodedData``.
    c : ndarray of shape (B, T, H)
        ``cFeature``; only its first ``T - S`` steps are used.
    W : ndarray of shape (S, D, H)
        ``wPrediction.predictors[s - 1].weight`` (``nn.Linear(H, D, bias=False)``).
    negatives : ndarray of shape (B, M, T - S, D)
        ``negExt``: the sampled negatives (:func:`cpc_audio_negative_indices`), the same set for
        every step ``s``.
    wrt : tuple of str, optional
        Subset of ``("z", "c", "W", "negatives")``. ``z`` receives the positives' gradient only
        (``negatives`` is an input here even when it was gathered from ``z``).

    Returns
    -------
    LossOutput
        ``loss`` is ``allLosses.sum()``: the sum over ``s`` of each step's mean cross-entropy.

    Notes
    -----
    With :math:`w = T - S`, for :math:`t < w`, the candidates of step :math:`s` are
    :math:`[z_{b,t+s}, n_{b,1,t}, \dots, n_{b,M,t}]`, scored by the **mean** over features
    (a dot product divided by :math:`D`):

    .. math:: f_{s}(b, t, m) = \tfrac{1}{D} \sum_d (W_s c_{b,t})_d\, x^{(m)}_{b,t,d}, \qquad
              L = \sum_{s=1}^{S} \frac{1}{Bw} \sum_{b,t}
              \Big[\log\sum_m e^{f_s(b,t,m)} - f_s(b,t,0)\Big]

    Examples
    --------
    >>> import numpy as np
    >>> from refmoco.conventions.cpc import cpc_audio_loss
    >>> z, c = np.zeros((2, 4, 3)), np.zeros((2, 4, 5))
    >>> out = cpc_audio_loss(z, c, np.zeros((2, 3, 5)), np.zeros((2, 6, 2, 3)))
    >>> bool(np.isclose(float(out.loss), 2 * np.log(7)))   # 2 steps, 1 + 6 equal candidates
    True
    """
    arrays, dtype = _arrays({"z": z, "c": c, "W": W, "negatives": negatives})
    z, c, W, neg = arrays["z"], arrays["c"], arrays["W"], arrays["negatives"]
    wrt = check_wrt(wrt, ("z", "c", "W", "negatives"))
    batch, seq, d = z.shape
    s_max = W.shape[0]
    window = seq - s_max
    if window < 1 or c.ndim != 3 or c.shape[:2] != (batch, seq) or W.shape[1:] != (d, c.shape[2]):
        raise ValueError(f"c, W: expected ({batch}, {seq}, H) and (S < {seq}, {d}, H), "
                         f"got {c.shape} and {W.shape}")
    if neg.ndim != 4 or neg.shape[0] != batch or neg.shape[2:] != (window, d):
        raise ValueError(f"negatives: expected shape ({batch}, M, {window}, {d}), "
                         f"got {neg.shape}")
    ctx = c[:, :window]  # (B, w, H)
    inv_d = dtype.type(1.0 / d)
    scale = dtype.type(1.0 / (batch * window))
    labels = np.zeros((batch, window), dtype=np.int64)
    total = dtype.type(0)
    grads = {n: np.zeros_like(arrays[n]) for n in wrt}
    for s in range(1, s_max + 1):
        pred = ctx @ W[s - 1].T  # (B, w, D): locC
        cand = np.concatenate([z[:, None, s:s + window], neg], axis=1)  # (B, 1+M, w, D)
        scores = np.einsum("bwd,bmwd->bwm", pred, cand) * inv_d  # (B, w, 1+M)
        losses, cache = xent_forward(scores, labels, np)  # (B, w)
        total = total + losses.sum() * scale  # the mean of step s, summed over s
        dscores = xent_backward(np.full(losses.shape, scale, dtype=dtype), cache, np) * inv_d
        dcand = np.einsum("bwm,bwd->bmwd", dscores, pred)  # (B, 1+M, w, D)
        dpred = np.einsum("bwm,bmwd->bwd", dscores, cand)  # (B, w, D)
        if "z" in wrt:
            grads["z"][:, s:s + window] += dcand[:, 0]
        if "negatives" in wrt:
            grads["negatives"] += dcand[:, 1:]
        if "W" in wrt:
            grads["W"][s - 1] = np.einsum("bwd,bwh->dh", dpred, ctx)
        if "c" in wrt:
            grads["c"][:, :window] += dpred @ W[s - 1]
    return LossOutput(np.asarray(total), grads)
