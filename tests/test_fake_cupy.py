"""The CuPy stand-in (``fake_cupy.py``) refuses what CuPy refuses: it is what the device tests
run on without a GPU, so a stand-in looser than CuPy would let device bugs through."""

import sys

import numpy as np
import pytest
from fake_cupy import CUPY_API, FakeCupy, FakeDeviceArray


@pytest.fixture
def cp(monkeypatch):
    fake = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    return fake


def test_functions_cupy_lacks_are_refused(cp):
    x = cp.asarray(np.arange(6.0))
    assert "insert" not in CUPY_API["cupy"] and hasattr(np, "insert")  # NumPy has it, CuPy not
    with pytest.raises(AttributeError, match="has no cupy.insert"):
        cp.insert(x, 0, 1.0)
    with pytest.raises(AttributeError, match="has no ndarray.resize"):
        x.resize(3)
    np.testing.assert_array_equal(cp.asnumpy(cp.cumsum(x)), np.cumsum(np.arange(6.0)))


def test_keywords_cupy_lacks_are_refused(cp):
    x = cp.asarray(np.arange(6.0).reshape(2, 3))
    with pytest.raises(TypeError, match="takes no keyword \\['where'\\]"):
        x.sum(axis=1, where=x > 1)  # NumPy's sum takes where=; CuPy's does not
    with pytest.raises(TypeError, match="takes no keyword \\['where'\\]"):
        cp.sum(x, where=x > 1)
    np.testing.assert_array_equal(cp.asnumpy(x.sum(axis=1, keepdims=True)), [[3.0], [12.0]])


def test_keywords_of_cython_methods_are_read_without_their_c_types(cp):
    """CuPy's Cython signatures carry C types (``sort(self, int axis=-1, kind=None)``) and
    bracketed optional outputs (``divmod(x1, x2[, out1, out2], / [, out=(None, None)], ...)``);
    the record keeps the names alone, so the stand-in takes what CuPy takes."""
    import json
    import pathlib

    v14 = json.loads((pathlib.Path(__file__).with_name("cupy_api_14.json")).read_text())
    assert v14["ndarray"]["sort"] == ["axis", "kind"]
    assert CUPY_API["ndarray"]["sort"] == ["axis"]  # CuPy 13's sort takes no kind=
    assert CUPY_API["cupy"]["divmod"] == ["casting", "dtype", "out"]
    x = cp.asarray(np.array([[3.0, 1.0], [2.0, 0.0]]))
    x.sort(axis=0)
    out = cp.empty((2, 2))
    x.dot(x, out=out)
    np.testing.assert_array_equal(cp.asnumpy(out), np.array([[4.0, 0.0], [9.0, 1.0]]))


def test_only_what_cupy_13_and_14_both_have_is_allowed(cp):
    """``put_along_axis`` is CuPy 14's, not 13's; the stand-in refuses it (refmoco used it until
    an audit found that every softmax backward would fail on CuPy 13)."""
    x = cp.asarray(np.zeros((2, 3)))
    with pytest.raises(AttributeError, match="has no cupy.put_along_axis"):
        cp.put_along_axis(x, cp.asarray(np.zeros((2, 1), np.int64)), 1.0, axis=1)
    assert "take_along_axis" in CUPY_API["cupy"]


def test_flags_are_cupys(cp):
    x = cp.asarray(np.ones((2, 3)))
    assert x.flags.c_contiguous and not x.T.flags.c_contiguous and x.T.flags.f_contiguous
    with pytest.raises(AttributeError):
        getattr(x.flags, "writeable")  # noqa: B009  NumPy's flag; CuPy arrays have none


def test_host_arrays_in_device_operations_are_refused(cp):
    x = cp.asarray(np.ones(3))
    with pytest.raises(TypeError, match="host array"):
        x + np.ones(3)
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(x)
    with pytest.raises(TypeError, match="host array"):
        x[...] = np.zeros(3)


def test_integer_indices_out_of_range_wrap_around_as_on_cupy(cp):
    x = cp.asarray(np.arange(5.0))
    # NumPy raises IndexError; CuPy reads x[5 % 5] and x[-6 % 5]
    np.testing.assert_array_equal(cp.asnumpy(x[np.array([5, -6, 2])]), [0.0, 4.0, 2.0])
    x[cp.asarray(np.array([7]))] = cp.asarray(np.array([9.0]))
    np.testing.assert_array_equal(cp.asnumpy(x), [0.0, 1.0, 9.0, 3.0, 4.0])


def test_indices_after_an_ellipsis_index_their_own_axis(cp):
    """Entry k of an index with ``...`` or ``None`` is not axis k: nothing is wrapped there (with
    axis 0's length, index 2 of axis 1 would have read column 0)."""
    a = np.arange(6.0).reshape(2, 3)
    x = cp.asarray(a)
    np.testing.assert_array_equal(cp.asnumpy(x[..., np.array([0, 2])]), a[..., [0, 2]])
    np.testing.assert_array_equal(cp.asnumpy(x[None, :, np.array([2])]), a[None, :, [2]])


def test_writes_through_repeated_indices_are_refused(cp):
    x = cp.asarray(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="repeated indices"):
        x[np.array([1, 1])] = cp.asarray(np.ones((2, 2)))
    with pytest.raises(ValueError, match="repeated indices"):  # 5 wraps to 1
        x[np.array([1, 5])] = cp.asarray(np.ones((2, 2)))
    np.testing.assert_array_equal(cp.asnumpy(x), np.zeros((4, 2)))  # unchanged
    x[np.array([0, 1]), np.array([1, 1])] = cp.asarray(np.array([2.0, 3.0]))  # distinct pairs
    np.testing.assert_array_equal(cp.asnumpy(x)[:2], [[0.0, 2.0], [0.0, 3.0]])


def test_reductions_return_device_scalars(cp):
    total = cp.asarray(np.arange(4.0)).sum()
    assert isinstance(total, FakeDeviceArray) and total.ndim == 0
    assert float(total) == 6.0


def test_the_recorded_api_matches_an_installed_cupy():
    """Where CuPy is installed (it imports without a GPU), every name the stand-in allows exists
    in it: a stale ``cupy_api_*.json`` cannot allow what the installed CuPy lacks."""
    cupy = pytest.importorskip("cupy")
    missing = [f"cupy.{n}" for n in CUPY_API["cupy"] if not hasattr(cupy, n)]
    missing += [f"ndarray.{n}" for n in CUPY_API["ndarray"] if not hasattr(cupy.ndarray, n)]
    assert not missing, f"CuPy {cupy.__version__} lacks {missing[:10]}"
