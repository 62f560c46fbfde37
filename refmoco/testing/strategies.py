"""Hypothesis strategies for contrastive-learning inputs: small shapes, bounded values.

This module imports hypothesis (``pip install hypothesis``); ``import refmoco.testing`` does not.
Every size argument takes an int (fixed), a ``(low, high)`` pair (drawn, so that hypothesis can
shrink it), or a strategy. Values are finite and bounded; unit rows are L2-normalised in float64
and then cast, so that they are unit length to the dtype's precision.

Examples
--------
>>> from hypothesis import given, settings
>>> from refmoco.testing.strategies import unit_embeddings
>>> @settings(max_examples=5, database=None)
... @given(unit_embeddings(n=3, dim=4))
... def test_unit_rows(x):
...     assert x.shape == (3, 4)
>>> test_unit_rows()
"""

from __future__ import annotations

import random

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

__all__ = [
    "cpc_sequences",
    "embeddings",
    "enqueue_batches",
    "find_failure",
    "info_nce_inputs",
    "labelled_batches",
    "momentum_inputs",
    "moco_step_scenarios",
    "queue_scenarios",
    "queues",
    "sizes",
    "unit_embeddings",
]


def sizes(spec) -> st.SearchStrategy:
    """An int, a ``(low, high)`` pair or a strategy, as a strategy of ints."""
    if isinstance(spec, st.SearchStrategy):
        return spec
    if isinstance(spec, tuple):
        return st.integers(*spec)
    return st.just(int(spec))


def _floats(dtype, bound: float) -> st.SearchStrategy:
    width = 32 if np.dtype(dtype) == np.float32 else 64
    return st.floats(-bound, bound, allow_nan=False, allow_infinity=False, width=width)


def _unit(a: np.ndarray, dtype) -> np.ndarray:
    """Rows scaled to unit length; rows too short to have a direction become ``e_0``."""
    a = np.array(a, dtype=np.float64)
    norms = np.linalg.norm(a, axis=-1, keepdims=True)
    fallback = np.zeros(a.shape[-1])
    fallback[0] = 1.0
    a = np.where(norms > 1e-3, a, fallback)
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(dtype)


@st.composite
def embeddings(draw, n=(1, 6), dim=(1, 8), *, dtype="float64", bound=2.0, unit=False):
    """An ndarray of shape (n, dim) of finite values in ``[-bound, bound]``.

    Parameters
    ----------
    n, dim : int, (int, int) or strategy
    dtype : {"float32", "float64"}
    bound : float
    unit : bool
        L2-normalise each row (see :func:`unit_embeddings`).
    """
    shape = (draw(sizes(n)), draw(sizes(dim)))
    x = draw(hnp.arrays(np.dtype(dtype), shape, elements=_floats(dtype, bound)))
    return _unit(x, dtype) if unit else x


def unit_embeddings(n=(1, 6), dim=(1, 8), *, dtype="float64"):
    """An ndarray of shape (n, dim) whose rows are L2-normalised (MoCo's ``q``, ``k``, queue)."""
    return embeddings(n, dim, dtype=dtype, unit=True)


def queues(size=(1, 12), dim=(1, 6), *, dtype="float64"):
    """A queue's contents: unit rows of shape (size, dim), one key per row."""
    return unit_embeddings(size, dim, dtype=dtype)


@st.composite
def enqueue_batches(draw, dim, *, calls=(1, 5), batch=(0, 6), dtype="float64", unit=True):
    """A list of batches to enqueue one after the other, each of shape (b, dim).

    ``batch`` gives each call's batch size (``b`` may be 0 by default); ``dim`` must be an int
    (the queue's dimension).
    """
    return [draw(embeddings(batch, dim, dtype=dtype, unit=unit))
            for _ in range(draw(sizes(calls)))]


@st.composite
def labelled_batches(draw, n=(2, 8), dim=(1, 6), num_classes=(1, 3), *, dtype="float64",
                     bound=2.0):
    """``(x, labels)``: embeddings (n, dim) and int64 class labels (n,) in ``[0, classes)``."""
    x = draw(embeddings(n, dim, dtype=dtype, bound=bound))
    classes = draw(sizes(num_classes))
    labels = draw(hnp.arrays(np.int64, (len(x),), elements=st.integers(0, classes - 1)))
    return x, labels


@st.composite
def cpc_sequences(draw, batch=(1, 4), time=(2, 6), dim=(1, 4), context=(1, 4), steps=(1, 3), *,
                  dtype="float64", bound=1.0):
    """``(z, c, W)`` for :func:`refmoco.cpc_loss`: (B, T, D), (B, T, H) and (S, D, H), S < T."""
    b, t, d, h = draw(sizes(batch)), draw(sizes(time)), draw(sizes(dim)), draw(sizes(context))
    s = min(draw(sizes(steps)), t - 1)
    elems = _floats(dtype, bound)
    dt = np.dtype(dtype)
    return (draw(hnp.arrays(dt, (b, t, d), elements=elems)),
            draw(hnp.arrays(dt, (b, t, h), elements=elems)),
            draw(hnp.arrays(dt, (s, d, h), elements=elems)))


@st.composite
def info_nce_inputs(draw, mode="queue", n=(1, 5), dim=(1, 6), num_negatives=(1, 8), *,
                    dtype="float64", unit=True):
    """A dict ``{"q", "k", "negatives"}`` for :func:`refmoco.info_nce_loss`.

    ``mode``: ``"queue"`` (negatives (K, C)), ``"per_query"`` ((N, M, C)) or ``"in_batch"``
    (``negatives`` is None).
    """
    rows, c = draw(sizes(n)), draw(sizes(dim))
    q = draw(embeddings(rows, c, dtype=dtype, unit=unit))
    k = draw(embeddings(rows, c, dtype=dtype, unit=unit))
    negatives = None
    if mode == "queue":
        negatives = draw(embeddings(num_negatives, c, dtype=dtype, unit=unit))
    elif mode == "per_query":
        m = draw(sizes(num_negatives))
        negatives = draw(embeddings(rows * m, c, dtype=dtype, unit=unit)).reshape(rows, m, c)
    elif mode != "in_batch":
        raise ValueError(f"mode: expected 'queue', 'per_query' or 'in_batch', got {mode!r}")
    return {"q": q, "k": k, "negatives": negatives}


@st.composite
def momentum_inputs(draw, *, dtype="float64", num_params=(1, 3)):
    """``{"target", "source", "m"}``: two dicts of arrays of matching shapes (parameters by
    name) and a momentum in [0, 1]."""
    target, source = {}, {}
    for i in range(draw(sizes(num_params))):
        shape = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
        name = f"layer{i}.weight"
        target[name] = draw(hnp.arrays(np.dtype(dtype), shape, elements=_floats(dtype, 2.0)))
        source[name] = draw(hnp.arrays(np.dtype(dtype), shape, elements=_floats(dtype, 2.0)))
    return {"target": target, "source": source, "m": draw(st.floats(0.0, 1.0))}


@st.composite
def queue_scenarios(draw, semantics="refmoco", *, dtype="float64"):
    """``{"initial": (K, C) unit rows, "batches": [(b, C), ...]}`` to replay on two queues.

    ``semantics="moco"`` draws one batch size that divides ``K`` for all calls (official MoCo
    asserts ``K % N == 0`` and assumes a constant ``N``); ``"lightly"`` batch sizes of at least
    1; ``"refmoco"`` any size from 0 to ``2 K``.
    """
    initial = draw(queues(dtype=dtype))
    size, dim = initial.shape
    if semantics == "moco":
        batch = st.just(draw(st.sampled_from([b for b in range(1, size + 1) if size % b == 0])))
    else:
        batch = st.integers(0 if semantics == "refmoco" else 1, 2 * size)
    return {"initial": initial, "batches": draw(enqueue_batches(dim, batch=batch, dtype=dtype))}


@st.composite
def moco_step_scenarios(draw, *, dtype="float64", calls=(1, 3)):
    """``{"initial": (K, C), "q": [(N, C), ...], "k": [(N, C), ...]}``, unit rows, ``N | K``."""
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    steps = draw(sizes(calls))
    return {"initial": draw(unit_embeddings(n * draw(st.integers(1, 3)), c, dtype=dtype)),
            "q": [draw(unit_embeddings(n, c, dtype=dtype)) for _ in range(steps)],
            "k": [draw(unit_embeddings(n, c, dtype=dtype)) for _ in range(steps)]}


def find_failure(strategy, fails, *, max_examples=50, seed=0):
    """The smallest example of ``strategy`` for which ``fails(example)`` is true, or None.

    Runs hypothesis' ``find`` with a fixed seed, no example database, no deadline and at most
    ``max_examples`` generated examples (shrinking a failure may call ``fails`` more often).
    """
    from hypothesis import HealthCheck, Phase, find, settings
    from hypothesis.errors import NoSuchExample

    config = settings(max_examples=max_examples, database=None, deadline=None,
                      phases=[Phase.generate, Phase.shrink],
                      suppress_health_check=list(HealthCheck))
    try:
        return find(strategy, fails, settings=config, random=random.Random(seed))
    except NoSuchExample:
        return None
