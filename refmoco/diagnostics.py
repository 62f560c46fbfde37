"""Diagnostics for a contrastive training run: collapse, same-sample negatives, key drift.

- :func:`collapse_check`: an InfoNCE loss that stays at :math:`\\ln(K + 1)` means the model scores
  the positive no better than the negatives (the collapsed or untrained solution); the matching
  :func:`embedding_spread` measures collapse on the embeddings themselves.
- :func:`same_sample_negatives`: how many of a query's negatives in the queue came from the
  query's own sample (via :attr:`refmoco.Queue.ids`), which makes the loss push a sample away
  from itself.
- :func:`key_encoder_drift`: how far the momentum (key) encoder is from the query encoder.

References
----------
- He et al. Momentum Contrast for Unsupervised Visual Representation Learning. arXiv:1911.05722.
- Chen, He. Exploring Simple Siamese Representation Learning. arXiv:2011.10566 (the standard
  deviation of normalised outputs as a collapse monitor).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from ._checks import check_int, check_positive
from .backend import as_array, float_array, to_numpy


class CollapseReport(NamedTuple):
    """``chance`` = ln(num_candidates); ``recent`` = the mean of the last losses; ``ratio`` =
    recent / chance; ``collapsed`` when ``ratio`` is within ``rtol`` of 1 (or above it)."""

    chance: float
    recent: float
    ratio: float
    collapsed: bool
    message: str


def collapse_check(losses, num_candidates, *, window=10, rtol=0.02) -> CollapseReport:
    r"""Is the InfoNCE loss stuck at :math:`\ln(K + 1)`, the loss of uninformative scores?

    Parameters
    ----------
    losses : float or sequence of float
        The loss history (one value per step or epoch), in nats, mean-reduced.
    num_candidates : int
        Candidates per query: ``K + 1`` with a queue of ``K``, the batch size in-batch.
    window : int
        How many of the last losses are averaged.
    rtol : float
        The loss counts as stuck when ``recent >= (1 - rtol) * ln(num_candidates)``.

    Returns
    -------
    CollapseReport

    Notes
    -----
    When every logit of a query is equal (collapsed embeddings: all :math:`q \cdot k` the same),
    the softmax is uniform and :math:`\ell = \ln(K + 1)` exactly, whatever the temperature. A
    loss that starts there and does not move down means the encoder has collapsed or is not
    learning; the InfoNCE bound on mutual information, :math:`\ln(K+1) - \ell`, is then 0.

    Examples
    --------
    >>> import math
    >>> from refmoco.diagnostics import collapse_check
    >>> collapse_check([math.log(4097)] * 20, 4097).collapsed
    True
    >>> collapse_check([8.3, 6.1, 4.0], 4097).collapsed
    False
    """
    n = check_int(num_candidates, "num_candidates", minimum=2)
    window = check_int(window, "window", minimum=1)
    rtol = check_positive(rtol, "rtol")
    history = np.atleast_1d(np.asarray(to_numpy(as_array(losses, "losses")), dtype=np.float64))
    if history.size == 0 or not np.all(np.isfinite(history)):
        raise ValueError("losses: expected at least one finite value")
    chance = math.log(n)
    recent = float(history[-window:].mean())
    ratio = recent / chance
    collapsed = ratio >= 1.0 - rtol
    verdict = ("stuck at chance: collapsed embeddings or no learning" if collapsed
               else f"{chance - recent:.4g} nats below chance")
    message = f"loss {recent:.6g} vs ln({n}) = {chance:.6g} (ratio {ratio:.4f}): {verdict}"
    return CollapseReport(chance, recent, ratio, bool(collapsed), message)


def embedding_spread(z) -> float:
    r"""``sqrt(C) * mean_c std_n(ẑ[n, c])`` of the L2-normalised rows: about 1 when the embeddings
    spread over the sphere, 0 when they have collapsed to one point.

    Parameters
    ----------
    z : ndarray of shape (N, C)

    Examples
    --------
    >>> import numpy as np
    >>> from refmoco.diagnostics import embedding_spread
    >>> embedding_spread(np.ones((8, 4)))
    0.0
    >>> 0.8 < embedding_spread(np.random.default_rng(0).standard_normal((4096, 16))) < 1.2
    True
    """
    z = np.asarray(to_numpy(float_array(z, "z", ndim=2)), dtype=np.float64)
    zn = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    return float(np.sqrt(z.shape[1]) * zn.std(axis=0).mean())


class SameSampleReport(NamedTuple):
    """``counts[i]``: queue rows that came from query ``i``'s sample; ``share``: the fraction of
    all (query, row) pairs that are same-sample; ``queries_affected``: queries with any."""

    counts: np.ndarray
    share: float
    queries_affected: int


def same_sample_negatives(queue_ids, query_ids) -> SameSampleReport:
    """Count the queue rows that came from the same sample as each query.

    Parameters
    ----------
    queue_ids : Queue or ndarray of int of shape (K,)
        A :class:`refmoco.Queue` (its ``ids``) or the ids themselves; -1 marks rows of no
        known sample and never matches.
    query_ids : ndarray of int of shape (N,)
        The sample id of each query.

    Returns
    -------
    SameSampleReport

    Notes
    -----
    With a queue longer than an epoch (``K`` > dataset size), or when the same sample is drawn
    twice in a short time, a query's own sample sits among its negatives: InfoNCE then pushes
    the sample's query away from an earlier key of the **same** sample.

    Examples
    --------
    >>> import numpy as np
    >>> from refmoco import Queue
    >>> from refmoco.diagnostics import same_sample_negatives
    >>> queue = Queue(4, 2)
    >>> queue.enqueue(np.eye(2, dtype=np.float32)[[0, 1, 0]], ids=[7, 8, 7])
    >>> same_sample_negatives(queue, np.array([7, 9])).counts
    array([2, 0])
    """
    ids = getattr(queue_ids, "ids", queue_ids)
    ids = np.asarray(to_numpy(as_array(ids, "queue_ids")))
    query = np.asarray(to_numpy(as_array(query_ids, "query_ids")))
    for name, a in (("queue_ids", ids), ("query_ids", query)):
        if a.ndim != 1 or a.dtype.kind not in "iu":
            raise ValueError(f"{name}: expected a 1-d array of integers, got {a.dtype} {a.shape}")
    matches = (query[:, None] == ids[None, :]) & (ids[None, :] >= 0)  # (N, K)
    counts = matches.sum(axis=1)
    share = float(matches.mean()) if matches.size else 0.0
    return SameSampleReport(counts, share, int((counts > 0).sum()))


class DriftReport(NamedTuple):
    """``relative``: ``||θk - θq|| / ||θq||`` over all parameters; ``per_param``: the same for
    each parameter (by name or position)."""

    relative: float
    per_param: dict


def key_encoder_drift(key_params, query_params) -> DriftReport:
    r"""How far the key (momentum) encoder's parameters are from the query encoder's.

    Parameters
    ----------
    key_params, query_params : mapping or sequence of arrays
        The two encoders' parameters, with the same names (mappings, such as dicts, a
        :class:`~refmoco.nn.FlatParams` or a PyTorch ``state_dict()``: matched by name in any
        order) or the same length (lists, matched by position) and shapes; PyTorch tensors are
        read through DLPack.

    Returns
    -------
    DriftReport

    Raises
    ------
    TypeError
        One argument a mapping and the other not.
    ValueError
        Names (or lengths) that differ, or shapes that differ; the message names
        ``query_params``.

    Notes
    -----
    With momentum :math:`m`, the key encoder is an exponential moving average of the query
    encoder over about :math:`1/(1-m)` steps: a relative drift that stays near 0 means
    :math:`m` is too small (the keys change as fast as the queries: the queue is inconsistent,
    MoCo's Table 1 with :math:`m = 0` fails to train); one that grows without bound means the
    key encoder is not being updated at all (:math:`m = 1`, or the update is never called).

    Examples
    --------
    >>> import numpy as np
    >>> from refmoco.diagnostics import key_encoder_drift
    >>> key_encoder_drift({"w": np.ones(4)}, {"w": 2 * np.ones(4)}).relative
    0.5
    """
    by_name = isinstance(key_params, Mapping)
    if isinstance(query_params, Mapping) != by_name:
        raise TypeError(
            f"query_params: expected {'a mapping' if by_name else 'a sequence'} of arrays, as "
            f"key_params is, got {type(query_params).__name__}"
        )
    if by_name:  # a dict, a FlatParams, a PyTorch state_dict: matched by name, in any order
        names = list(key_params)
        missing = [n for n in names if n not in query_params]
        unexpected = [n for n in query_params if n not in key_params]
        if missing or unexpected:
            raise ValueError(
                f"query_params: expected the names of key_params; missing {missing}, "
                f"unexpected {unexpected}"
            )
    else:
        names = list(range(len(key_params)))
        if len(query_params) != len(names):
            raise ValueError(f"query_params: expected the length of key_params ({len(names)}), "
                             f"got {len(query_params)}")
    num = den = 0.0
    per_param = {}
    for name in names:
        k = np.asarray(to_numpy(float_array(key_params[name], f"key_params[{name!r}]")), float)
        q = np.asarray(to_numpy(float_array(query_params[name], f"query_params[{name!r}]")), float)
        if k.shape != q.shape:
            raise ValueError(f"query_params[{name!r}]: expected shape {k.shape}, got {q.shape}")
        d, n = float(((k - q) ** 2).sum()), float((q**2).sum())
        per_param[name] = math.sqrt(d / n) if n > 0 else math.sqrt(d)
        num, den = num + d, den + n
    return DriftReport(math.sqrt(num / den) if den > 0 else math.sqrt(num), per_param)
