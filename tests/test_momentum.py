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


def backends():
    """numpy, and numba where it is installed."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return ["numpy"]
    return ["numpy", "numba"]


@pytest.mark.parametrize("backend", backends())
def test_torch_targets_of_any_strides_are_updated_in_place(torch, backend):
    """A transposed (non-contiguous) tensor: the update must land in the tensor itself, not in a
    contiguous copy of it."""
    t0 = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    s = torch.ones(3, 2, dtype=torch.float64)
    t = t0.clone().T
    out = momentum_update(t, s, 0.5, backend=backend)
    assert out is t
    expected = 0.5 * t0.T.numpy() + 0.5 * s.numpy()
    np.testing.assert_array_equal(t.numpy(), expected)  # halves of small integers: exact


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("overlap", ["same", "shifted", "view"])
def test_a_source_sharing_memory_with_its_target_is_read_first(backend, overlap):
    buffer = np.arange(1.0, 9.0)
    if overlap == "same":
        target, source = buffer, buffer
    elif overlap == "shifted":  # target[i] = m buffer[i + 1] + (1 - m) buffer[i]
        target, source = buffer[1:], buffer[:-1]
    else:
        target, source = buffer[:4], buffer[::2]
    t0, s0 = target.copy(), source.copy()  # the values before the call
    momentum_update(target, source, 0.25, backend=backend)
    np.testing.assert_array_equal(target, 0.25 * t0 + 0.75 * s0)  # quarters: exact


@pytest.mark.parametrize("backend", backends())
def test_a_source_that_is_another_leafs_target_is_read_first(backend):
    """``[a, b]`` from ``[b, a]``: the second source is the first target, already written when
    the second leaf's turn comes unless it was read first."""
    a, b = np.array([1.0, 1.0]), np.array([3.0, 3.0])
    momentum_update([a, b], [b, a], 0.5, backend=backend)
    np.testing.assert_array_equal(a, [2.0, 2.0])
    np.testing.assert_array_equal(b, [2.0, 2.0])
    flat = np.arange(6.0)  # views of one buffer, the sources reversed halves of the targets
    momentum_update({"x": flat[:3], "y": flat[3:]}, {"x": flat[3:][::-1], "y": flat[:3][::-1]},
                    0.5, backend=backend)
    np.testing.assert_array_equal(flat, [2.5, 2.5, 2.5, 2.5, 2.5, 2.5])


def test_a_target_whose_elements_overlap_is_refused(torch):
    t = torch.zeros(1, 3).expand(2, 3)  # one row of memory seen twice
    with pytest.raises(ValueError, match="target.*overlap"):
        momentum_update(t, torch.arange(6.0).reshape(2, 3), 0.5)
    assert not t.any()


@pytest.mark.parametrize("backend", backends())
def test_float16_targets_are_computed_in_float32(backend):
    t = np.array([1.205, -3.7, 0.1, 60000.0], np.float16)
    s = np.array([0.0, 2.5, -0.3, 65504.0], np.float16)
    m = 0.9
    m32, w32 = np.float32(m), np.float32(1 - m)  # the documented rule, written out
    want = (t.astype(np.float32) * m32 + w32 * s.astype(np.float32)).astype(np.float16)
    out = t.copy()
    momentum_update(out, s, m, backend=backend)
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, want)
    in_half = t * np.float16(m) + np.float16(1 - m) * s  # what float16 arithmetic would give
    assert in_half[0] != want[0]  # so this input tells the two apart
    rng = np.random.default_rng(0)  # and many more values, over float16's range
    t, s = (rng.standard_normal(20_000).astype(np.float16) * 100 for _ in range(2))
    want = (t.astype(np.float32) * m32 + w32 * s.astype(np.float32)).astype(np.float16)
    momentum_update(t, s, m, backend=backend)
    np.testing.assert_array_equal(t, want)


def test_bfloat16_arrays_and_tensors():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    target = np.zeros(3, np.float32)
    momentum_update(target, np.array([1.0, 2.0, 4.0]).astype(bf16), 0.5)  # a bfloat16 source
    np.testing.assert_array_equal(target, [0.5, 1.0, 2.0])
    target = np.array([1.0, 2.0, 3.0]).astype(bf16)  # a bfloat16 target, in float32
    momentum_update(target, np.array([3.0, 2.0, 1.0]), 0.5)
    assert target.dtype == bf16
    np.testing.assert_array_equal(target.astype(np.float64), [2.0, 2.0, 2.0])


def test_half_tensors(torch):
    t = torch.zeros(3, dtype=torch.float16)
    momentum_update(t, torch.ones(3, dtype=torch.float16), 0.5)
    assert t.dtype == torch.float16 and t.tolist() == [0.5, 0.5, 0.5]
    bf = torch.zeros(3, dtype=torch.bfloat16)  # NumPy cannot share its memory: refused, unchanged
    with pytest.raises(TypeError, match="target.*bfloat16"):
        momentum_update(bf, torch.ones(3), 0.5)
    assert not bf.any()
    t = torch.zeros(3)
    momentum_update(t, torch.ones(3, dtype=torch.bfloat16), 0.5)  # a bfloat16 source is read
    assert t.tolist() == [0.5, 0.5, 0.5]


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
