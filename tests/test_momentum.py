import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import arrays

from refmoco import cosine_momentum, momentum_update


@given(st.data(), st.floats(0.0, 1.0), st.sampled_from([np.float32, np.float64]))
def test_momentum_update_matches_the_formula_in_place(data, m, dtype):
    shape = data.draw(st.sampled_from([(3,), (2, 4), (1, 2, 3)]))
    target = data.draw(arrays(shape)).astype(dtype)
    source = data.draw(arrays(shape)).astype(dtype)
    expected = (m * target.astype(np.float64) + (1 - m) * source.astype(np.float64))
    buffer = target
    out = momentum_update(target, source, m)
    assert out is buffer and target.dtype == dtype
    tol = 4 * np.finfo(dtype).eps * 2  # two roundings of terms bounded by 2
    np.testing.assert_allclose(target, expected, rtol=0, atol=tol)


def test_momentum_one_keeps_and_zero_copies(rng):
    t, s = rng.normal(size=5), rng.normal(size=5)
    keep = t.copy()
    momentum_update(t, s, 1.0)
    np.testing.assert_array_equal(t, keep)
    momentum_update(t, s, 0.0)
    np.testing.assert_array_equal(t, s)


def test_structures_lists_tuples_and_dicts(rng):
    target = {"a": rng.normal(size=3), "b": [rng.normal(size=2), rng.normal(size=(2, 2))]}
    source = {"a": np.ones(3), "b": (np.ones(2), np.ones((2, 2)))}
    momentum_update(target, source, 0.5)
    assert np.all(target["b"][1] != 0)
    momentum_update(target, source, 0.0)
    for leaf in (target["a"], target["b"][0], target["b"][1]):
        np.testing.assert_array_equal(leaf, 1.0)


@pytest.mark.parametrize("source, m, words", [
    ({"a": np.ones(3)}, 0.5, "source"),  # missing key
    ({"a": np.ones(3), "b": np.ones(3)}, 0.5, r"source\['b'\]"),  # shape of the second leaf
    ({"a": np.ones(3), "b": np.ones(2)}, 1.5, "momentum"),
    ({"a": np.ones(3), "b": np.ones(2, dtype=int)}, 0.5, "source"),
])
def test_rejected_updates_write_nothing(source, m, words):
    target = {"a": np.zeros(3), "b": np.zeros(2)}
    with pytest.raises((ValueError, TypeError), match=words):
        momentum_update(target, source, m)
    assert not target["a"].any() and not target["b"].any()


def test_read_only_or_non_array_targets_are_rejected():
    ro = np.zeros(3)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        momentum_update(ro, np.ones(3), 0.5)
    with pytest.raises(TypeError, match="target"):
        momentum_update([0.0, 0.0], [1.0, 1.0], 0.5)


def test_torch_tensors_are_updated_in_place():
    torch = pytest.importorskip("torch")
    t = torch.zeros(4)
    momentum_update(t, torch.ones(4), 0.75)
    assert torch.allclose(t, torch.full((4,), 0.25))


@given(st.integers(1, 10_000), st.data(), st.floats(0, 1), st.floats(0, 1))
def test_cosine_momentum(total, data, base, final):
    step = data.draw(st.integers(0, total))
    m = cosine_momentum(step, total, base, final)
    assert m == pytest.approx(final - (final - base) * (math.cos(math.pi * step / total) + 1) / 2)
    assert cosine_momentum(0, total, base, final) == pytest.approx(base)
    assert cosine_momentum(total, total, base, final) == pytest.approx(final)
    assert min(base, final) - 1e-12 <= m <= max(base, final) + 1e-12


def test_cosine_momentum_bad_input():
    with pytest.raises(ValueError, match="step"):
        cosine_momentum(11, 10)
    with pytest.raises(ValueError, match="total_steps"):
        cosine_momentum(0, 0)
    with pytest.raises(ValueError, match="base"):
        cosine_momentum(0, 10, base=1.5)
