"""Every public function on every backend, in one run: the same inputs through ``"numpy"`` (the
reference), ``"numba"`` and, on a GPU, ``"cupy"``; the results must agree in value, dtype and
shape. Functions without a dedicated kernel run the reference code on the other backends (on
CuPy with ``xp = cupy``), so this is what proves that they accept the backend at all."""

import numpy as np
import pytest
from gpu import require_cupy

import refmoco
from refmoco import MemoryBank, Queue
from refmoco.testing import assert_close

pytest.importorskip("numba")

TOL = {np.float64: 1e-12, np.float32: 1e-5}


def unit(rng, *shape, dtype):
    x = rng.standard_normal(shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(dtype)


def losses(rng, dtype):
    """``name -> (function, arrays, keywords)`` for every public loss and its modes."""
    n, c = 6, 5
    q, k = unit(rng, n, c, dtype=dtype), unit(rng, n, c, dtype=dtype)
    return {
        "info_nce queue": (refmoco.info_nce_loss, (q, k, unit(rng, 9, c, dtype=dtype)),
                           {"temperature": 0.1}),
        "info_nce per-query": (refmoco.info_nce_loss, (q, k, unit(rng, n, 4, c, dtype=dtype)),
                               {"temperature": 0.2, "reduction": "sum"}),
        "info_nce in-batch": (refmoco.info_nce_loss, (q, k), {"temperature": 0.5}),
        "softmax_cross_entropy": (refmoco.softmax_cross_entropy,
                                  (rng.standard_normal((n, 7)).astype(dtype),
                                   rng.integers(0, 7, n)), {}),
        "contrastive": (refmoco.contrastive_loss,
                        (rng.standard_normal((n, c)).astype(dtype),
                         rng.standard_normal((n, c)).astype(dtype), np.arange(n) % 2),
                        {"margin": 2.0}),
        "cpc": (refmoco.cpc_loss, (rng.standard_normal((3, 5, 4)).astype(dtype),
                                   rng.standard_normal((3, 5, 6)).astype(dtype),
                                   0.3 * rng.standard_normal((2, 4, 6)).astype(dtype)), {}),
    }


def backends():
    return ["numba", pytest.param("cupy", marks=pytest.mark.gpu)]


@pytest.fixture(autouse=True)
def _gpu_gate(request):
    """A ``cupy`` case skips (or fails under REFMOCO_REQUIRE_GPU=1) before it builds anything."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "cupy":
        require_cupy()


def move(a, backend):
    if backend == "cupy" and isinstance(a, np.ndarray):
        return require_cupy().asarray(a)
    return a


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", list(losses(np.random.default_rng(0), np.float64)))
def test_every_loss_agrees_with_the_reference(name, dtype, backend):
    fn, arrays, kwargs = losses(np.random.default_rng(1), dtype)[name]
    ref = fn(*arrays, **kwargs, backend="numpy")
    out = fn(*(move(a, backend) for a in arrays), **kwargs, backend=backend)
    assert set(out.grads) == set(ref.grads)
    assert_close(refmoco.to_numpy(out.loss), ref.loss, rtol=TOL[dtype], name="loss")
    for key, g in ref.grads.items():
        got = out.grads[key]
        assert type(got) is type(out.loss) or backend != "cupy", key  # stays on the device
        assert_close(refmoco.to_numpy(got), g, rtol=TOL[dtype], name=f"grad {key}")


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_l2_normalize_and_its_backward(dtype, backend):
    rng = np.random.default_rng(2)
    x, dy = rng.standard_normal((4, 3)).astype(dtype), rng.standard_normal((4, 3)).astype(dtype)
    y_ref, back_ref = refmoco.l2_normalize(x)
    y, back = refmoco.l2_normalize(move(x, backend))
    assert_close(refmoco.to_numpy(y), y_ref, rtol=TOL[dtype])
    assert_close(refmoco.to_numpy(back(move(dy, backend))), back_ref(dy), rtol=TOL[dtype])


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_queue_and_memory_bank(dtype, backend):
    """The same seed gives the same rows on every backend; enqueue, update and sample agree."""
    rng = np.random.default_rng(3)
    ref_q, q = Queue(7, 3, dtype=dtype, seed=1), Queue(7, 3, dtype=dtype, seed=1, backend=backend)
    ref_b = MemoryBank(9, 3, dtype=dtype, seed=2)
    bank = MemoryBank(9, 3, dtype=dtype, seed=2, backend=backend)
    for size in (2, 5, 9):  # wraps around, then a batch larger than the queue
        keys = unit(rng, size, 3, dtype=np.dtype(dtype).type)
        ids = np.arange(size) + 100
        ref_q.enqueue(keys, ids=ids)
        q.enqueue(move(keys, backend), ids=ids)
        np.testing.assert_array_equal(refmoco.to_numpy(q.keys), ref_q.keys)
        np.testing.assert_array_equal(refmoco.to_numpy(q.ordered()), ref_q.ordered())
        np.testing.assert_array_equal(q.ids, ref_q.ids)
        assert q.ptr == ref_q.ptr
    rows = np.array([0, 4, 8])
    feats = unit(rng, 3, 3, dtype=np.dtype(dtype).type)
    ref_b.update(rows, feats)
    bank.update(rows, move(feats, backend))
    assert_close(refmoco.to_numpy(bank.bank), ref_b.bank, rtol=TOL[np.dtype(dtype).type])
    np.testing.assert_array_equal(refmoco.to_numpy(bank.sample(rows, 4)), ref_b.sample(rows, 4))


@pytest.mark.parametrize("backend", backends())
def test_momentum_update_on_structures(backend):
    rng = np.random.default_rng(4)
    target = {"w": rng.standard_normal((3, 2)), "b": [rng.standard_normal(4).astype(np.float32)]}
    source = {"w": rng.standard_normal((3, 2)), "b": [rng.standard_normal(4).astype(np.float32)]}
    ref = {"w": target["w"].copy(), "b": [target["b"][0].copy()]}
    refmoco.momentum_update(ref, source, 0.9)
    moved_t = {"w": move(target["w"], backend), "b": [move(target["b"][0], backend)]}
    moved_s = {"w": move(source["w"], backend), "b": [move(source["b"][0], backend)]}
    refmoco.momentum_update(moved_t, moved_s, 0.9, backend=backend)
    np.testing.assert_array_equal(refmoco.to_numpy(moved_t["w"]), ref["w"])
    np.testing.assert_array_equal(refmoco.to_numpy(moved_t["b"][0]), ref["b"][0])
    assert moved_t["b"][0].dtype == np.float32


@pytest.mark.parametrize("backend", backends())
def test_momentum_update_overlap_and_float16(backend):
    """A source overlapping its target is read before anything is written; float16 is computed
    in float32 (the reference's results are checked in tests/test_momentum.py)."""
    buffer = np.arange(1.0, 9.0)
    ref = buffer.copy()
    refmoco.momentum_update(ref[1:], ref[:-1], 0.25)
    moved = move(buffer, backend)
    refmoco.momentum_update(moved[1:], moved[:-1], 0.25, backend=backend)
    np.testing.assert_array_equal(refmoco.to_numpy(moved), ref)
    half = np.array([1.205, -3.7, 60000.0], np.float16)
    ref, moved = half.copy(), move(half, backend)
    refmoco.momentum_update(ref, half[::-1].copy(), 0.9)
    refmoco.momentum_update(moved, move(half[::-1].copy(), backend), 0.9, backend=backend)
    assert moved.dtype == np.float16
    np.testing.assert_array_equal(refmoco.to_numpy(moved), ref)
