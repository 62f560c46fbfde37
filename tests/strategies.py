"""Hypothesis strategies shared by the test modules: small shapes, bounded values."""

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

FLOAT = st.floats(-2.0, 2.0, allow_nan=False, allow_infinity=False, width=64)


def arrays(shape, elements=FLOAT, dtype=np.float64):
    return hnp.arrays(dtype, shape, elements=elements)


def unit_rows(a):
    """Rows scaled to unit length (rows of zeros become a fixed unit vector)."""
    a = np.array(a, dtype=np.float64)
    norms = np.linalg.norm(a, axis=-1, keepdims=True)
    a = np.where(norms > 1e-3, a, 1.0)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


@st.composite
def info_nce_inputs(draw, mode=None, unit=True):
    """(q, k, negatives, temperature) for one of the three negatives modes."""
    mode = draw(st.sampled_from(["queue", "per_query", "in_batch"])) if mode is None else mode
    n = draw(st.integers(1, 5))
    c = draw(st.integers(1, 6))
    q = draw(arrays((n, c)))
    k = draw(arrays((n, c)))
    if mode == "queue":
        negatives = draw(arrays((draw(st.integers(1, 7)), c)))
    elif mode == "per_query":
        negatives = draw(arrays((n, draw(st.integers(1, 5)), c)))
    else:
        negatives = None
    if unit:
        q, k = unit_rows(q), unit_rows(k)
        negatives = None if negatives is None else unit_rows(negatives)
    temperature = draw(st.floats(0.1, 2.0))
    return q, k, negatives, temperature


@st.composite
def cpc_inputs(draw):
    b = draw(st.integers(1, 4))
    t = draw(st.integers(2, 5))
    d = draw(st.integers(1, 3))
    h = draw(st.integers(1, 3))
    s = draw(st.integers(1, t - 1))
    elems = st.floats(-1.0, 1.0, allow_nan=False, width=64)
    return (draw(arrays((b, t, d), elems)), draw(arrays((b, t, h), elems)),
            draw(arrays((s, d, h), elems)))
