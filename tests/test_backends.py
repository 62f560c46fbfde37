"""Backend equivalence inside one run: the same inputs through backend="numpy" (the reference)
and backend="numba" (refmoco.kernels.cpu), and on a GPU through backend="cupy".

InfoNCE results are compared with the float64 reference on the same inputs (float32 ones widened
exactly), within the rounding bound of ``naive.info_nce_rounding_bound`` for the dtype computed
in plus that of the float64 reference itself; the bound weighs each term by its softmax weight,
so it stays below the gradient at any temperature. Tolerances are never chosen per test."""

import math
import os
import subprocess
import sys
import threading

import naive
import numpy as np
import pytest
from gpu import require_cupy
from hypothesis import given
from hypothesis import strategies as st
from strategies import FLOAT, arrays, info_nce_inputs, unit_rows

import refmoco
from refmoco.testing import assert_close

pytest.importorskip("numba")
cpu = pytest.importorskip("refmoco.kernels.cpu")

DTYPE = st.sampled_from([np.float64, np.float32])
REDUCTION = st.sampled_from(["mean", "sum"])


def wrt_subsets(names):
    return st.one_of(st.none(), st.lists(st.sampled_from(names), unique=True).map(tuple))


def assert_within(actual, expected, bound, name):
    """``|actual - expected| <= bound`` entry by entry (NaN anywhere fails)."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"{name}: shape {a.shape} != {e.shape}"
    bound = np.broadcast_to(np.asarray(bound, np.float64), a.shape)
    err = np.abs(a - e)
    bad = ~(err <= bound)
    if bad.any():
        with np.errstate(divide="ignore", invalid="ignore"):
            where = np.unravel_index(int(np.argmax(np.where(bad, err / bound, -1))), a.shape)
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.size} entries beyond the rounding bound; worst at "
            f"{tuple(map(int, where))}: {a[where]!r} vs {e[where]!r}, bound {bound[where]!r}")


def assert_within_rounding(loss, grads, q, k, negatives, t, reduction, wrt=None):
    """``loss`` (None: not checked) and ``grads``, host arrays computed in ``q.dtype``, against the
    float64 reference on the same inputs: dtypes and names exact, values within the rounding
    bound of ``q.dtype`` plus the reference's own (float64) one."""
    dtype = q.dtype
    wide = [None if a is None else a.astype(np.float64) for a in (q, k, negatives)]
    ref = refmoco.info_nce_loss(*wide, temperature=t, reduction=reduction, wrt=wrt,
                                backend="numpy")
    loss_bound, bounds = naive.info_nce_rounding_bound(q, k, negatives, t, reduction, dtype)
    loss_bound64, bounds64 = naive.info_nce_rounding_bound(q, k, negatives, t, reduction,
                                                           np.float64)
    if loss is not None:
        assert np.asarray(loss).dtype == dtype
        assert_within(loss, ref.loss, loss_bound + loss_bound64, "loss")
    assert set(grads) == set(ref.grads)
    for name, g in grads.items():
        assert g.shape == ref.grads[name].shape and g.dtype == dtype, name
        assert_within(g, ref.grads[name], bounds[name] + bounds64[name], name)


# -- InfoNCE -------------------------------------------------------------------------------------


def info_nce_case(inputs, reduction, dtype, wrt):
    """``(q, k, negatives, t, args)``: drawn inputs in ``dtype`` and the loss's keywords (no
    gradient of negatives that an in-batch call does not have)."""
    q, k, negatives, t = inputs
    q, k = q.astype(dtype), k.astype(dtype)
    negatives = None if negatives is None else negatives.astype(dtype)
    if negatives is None and wrt is not None:
        wrt = tuple(w for w in wrt if w != "negatives")
    return q, k, negatives, t, dict(temperature=t, reduction=reduction, wrt=wrt)


@given(info_nce_inputs(unit=False), REDUCTION, DTYPE, wrt_subsets(["q", "k", "negatives"]))
def test_info_nce_numba_matches_numpy(inputs, reduction, dtype, wrt):
    """Both backends, in the inputs' dtype, within rounding of the float64 result."""
    q, k, negatives, t, args = info_nce_case(inputs, reduction, dtype, wrt)
    for backend in ("numpy", "numba"):
        out = refmoco.info_nce_loss(q, k, negatives, backend=backend, **args)
        assert out.loss.shape == (), backend
        assert_within_rounding(out.loss, out.grads, q, k, negatives, t, reduction, args["wrt"])


@st.composite
def queue_problems(draw):
    """A shared queue split into blocks of ``rows`` (1 row: every key its own block)."""
    n, c, size = draw(st.integers(1, 6)), draw(st.integers(1, 5)), draw(st.integers(0, 40))
    q, k = draw(arrays((n, c))), draw(arrays((n, c)))
    queue = draw(arrays((size, c)))
    t = draw(st.sampled_from([0.05, 0.2, 1.0]))
    return q, k, queue, t, draw(st.integers(1, 9))


@given(queue_problems(), REDUCTION, DTYPE)
def test_fused_kernel_is_exact_for_any_block_size(problem, reduction, dtype):
    """The online softmax over blocks (rescaling whenever a maximum grows) equals the
    one-shot softmax of the reference, for blocks of any size and the last block partial."""
    q, k, queue, t, rows = problem
    q, k, queue = q.astype(dtype), k.astype(dtype), queue.astype(dtype)
    losses, grads = cpu.info_nce_queue(q, k, queue, t, reduction, ("q", "k", "negatives"),
                                       block_rows=rows)
    assert losses.shape == (len(q),) and losses.dtype == dtype
    assert_within_rounding(losses.sum(dtype=dtype), {}, q, k, queue, t, "sum", wrt=())
    assert_within_rounding(None, grads, q, k, queue, t, reduction)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_kernel_on_a_moco_sized_problem(dtype):
    """Unit vectors, T = 0.07 and a queue several blocks long, the shapes MoCo uses."""
    rng = np.random.default_rng(0)
    q, k, queue = (unit_rows(rng.standard_normal(s)).astype(dtype)
                   for s in ((64, 32), (64, 32), (5000, 32)))
    for reduction in ("mean", "sum"):
        out = refmoco.info_nce_loss(q, k, queue, reduction=reduction, backend="numba")
        assert_within_rounding(*out, q, k, queue, 0.07, reduction)


@pytest.mark.parametrize("n, size, t", [(1, 600_000, 1.0), (8, 600_000, 100.0),
                                         (1, 2_000_000, 0.2)])
def test_long_queues_and_few_queries_keep_float32_accuracy(n, size, t):
    """A sum of 10^5 to 10^6 exponentials per query, in float32, against the float64 result:
    summed in chunks, blocks and the whole queue, the kernel stays within a few dozen ulps (one
    chain of K additions lost up to 2e-4 of the loss and 6e-3 of dq here)."""
    rng = np.random.default_rng(8)
    q, k, queue = (unit_rows(rng.standard_normal(s)) for s in ((n, 2), (n, 2), (size, 2)))
    exact = refmoco.info_nce_loss(q, k, queue, temperature=t, wrt=("q",))  # float64
    f32 = [a.astype(np.float32) for a in (q, k, queue)]
    out = refmoco.info_nce_loss(*f32, temperature=t, wrt=("q",), backend="numba")
    eps = np.finfo(np.float32).eps
    assert abs(float(out.loss) - float(exact.loss)) <= 16 * eps * abs(float(exact.loss))
    scale = np.abs(exact.grads["q"]).max()
    assert np.abs(out.grads["q"] - exact.grads["q"]).max() <= 64 * eps * scale


def test_a_positive_far_above_its_negatives_keeps_its_small_loss():
    """The loss is (m - l_pos) + log(sum), not (m + log(sum)) - l_pos: when the positive is the
    maximum the first form is exact, the second cancels to 0 (float32: 3.06e-6 became 0.0)."""
    q = k = np.array([[1.0, 0.0]], np.float32)
    queue = np.tile(np.array([0.85, np.sqrt(1 - 0.85**2)], np.float32), (10, 1))
    exact = np.log1p(10 * np.exp((queue[0, 0].astype(np.float64) - 1.0) / 0.01))  # 3.06e-6
    for backend in ("numpy", "numba"):
        out = refmoco.info_nce_loss(q, k, queue, temperature=0.01, backend=backend)
        # the sum 1 + 3.06e-6 is rounded in float32: within an ulp of 1 of the exact loss
        assert abs(float(out.loss) - exact) <= np.finfo(np.float32).eps, backend


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tiny_temperature_and_large_norms_stay_finite(dtype):
    """Logits up to 1.2e6 (float32 spacing 0.125 there), each row's two largest 9e3 or more
    apart: the softmax is one-hot, and its weights, not the logits' size, set the error (a bound
    taking every weight as 1 allowed 281 times dq itself in float32)."""
    rng = np.random.default_rng(1)
    q, k, queue = (rng.standard_normal(s).astype(dtype) * 30 for s in ((4, 8), (4, 8), (50, 8)))
    losses, grads = cpu.info_nce_queue(q, k, queue, 0.01, "mean", ("q",), block_rows=7)
    assert np.isfinite(losses).all() and np.isfinite(grads["q"]).all()
    assert_within_rounding(losses.mean(dtype=dtype), grads, q, k, queue, 0.01, "mean", ("q",))


def test_nan_propagates_like_the_reference():
    q, k, queue = np.ones((2, 3)), np.ones((2, 3)), np.ones((4, 3))
    queue[2, 1] = np.nan
    ref = refmoco.info_nce_loss(q, k, queue)
    out = refmoco.info_nce_loss(q, k, queue, backend="numba")
    assert np.isnan(float(ref.loss)) and np.isnan(float(out.loss))


@pytest.mark.parametrize("dtype, ulps", [(np.float32, 1.0), (np.float64, 2.0)])
def test_vectorised_exp_is_within_an_ulp_or_two_of_exact(dtype, ulps):
    exp = cpu.exp32 if dtype == np.float32 else cpu.exp64
    tiny = np.finfo(dtype).tiny
    rng = np.random.default_rng(2)
    x = np.concatenate([-rng.exponential(5.0, 4000), -rng.uniform(0, 0.4, 1000),
                        np.log([tiny * 1.01]), [0.0, -0.0, -1e-30, -np.log(2) / 2]]).astype(dtype)
    got = np.array([exp(v) for v in x], dtype=np.float64)
    exact = np.exp(x.astype(np.longdouble))
    normal = exact >= tiny
    rel = np.abs(got[normal] - exact[normal]) / exact[normal]
    assert float(rel.max()) <= ulps * np.finfo(dtype).eps
    assert np.all(got[~normal] <= tiny)  # below the normal range: 0 (NumPy: a subnormal)
    below = [np.log(tiny) * 1.0001, -1e4, -np.inf]
    assert [exp(dtype(v)) for v in below] == [0.0, 0.0, 0.0]
    assert math.isnan(exp(dtype(np.nan)))


def test_numba_rejects_dtypes_it_cannot_compute_naming_them():
    x = np.ones((2, 3), np.longdouble)
    if np.finfo(np.longdouble).eps == np.finfo(np.float64).eps:
        pytest.skip("longdouble is float64 on this platform")
    with pytest.raises(TypeError, match="longdouble|float128"):
        refmoco.info_nce_loss(x, x, x, backend="numba")


# -- the momentum update -------------------------------------------------------------------------


def with_layout(a, layout):
    """A fresh copy of ``a`` stored C-ordered, F-ordered, or as a non-contiguous view."""
    if layout == "F":
        return np.array(a, order="F", copy=True)
    if layout == "strided" and a.ndim:
        return np.repeat(a, 2, axis=-1)[..., ::2]
    return a.copy()


@st.composite
def momentum_problems(draw):
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple))
    dtype = draw(st.sampled_from([np.float64, np.float32, np.float16]))
    source_dtype = draw(st.sampled_from([dtype, np.float64]))
    target = draw(arrays(shape, FLOAT)).astype(dtype)
    source = draw(arrays(shape, FLOAT)).astype(source_dtype)
    layout = draw(st.sampled_from(["C", "F", "strided"]))
    return target, layout, source, draw(st.floats(0.0, 1.0))


@given(momentum_problems())
def test_momentum_update_numba_is_bitwise_the_reference(problem):
    """Same operations in the same order: not close, equal (dtypes, layouts, float16)."""
    target, layout, source, m = problem
    ref, out = with_layout(target, layout), with_layout(target, layout)
    assert refmoco.momentum_update(ref, source, m, backend="numpy") is ref
    assert refmoco.momentum_update(out, source, m, backend="numba") is out
    assert out.dtype == ref.dtype and out.shape == ref.shape
    np.testing.assert_array_equal(out, ref)


def test_momentum_update_in_longdouble_is_the_reference_on_numba():
    """Numba has no longdouble: backend="numba" runs the reference update for it."""
    rng = np.random.default_rng(5)
    target, source = (rng.standard_normal(7).astype(np.longdouble) for _ in range(2))
    ref, out = target.copy(), target.copy()
    refmoco.momentum_update(ref, source, 0.3, backend="numpy")
    refmoco.momentum_update(out, source, 0.3, backend="numba")
    assert out.dtype == np.longdouble
    np.testing.assert_array_equal(out, ref)


def test_momentum_update_structures_and_the_parallel_kernel():
    rng = np.random.default_rng(3)
    big = cpu.PARALLEL_MIN + 17
    target = {"w": rng.standard_normal((big,)).astype(np.float32),
              "b": [rng.standard_normal((3, 4)), rng.standard_normal(5).astype(np.float32)]}
    source = {"w": rng.standard_normal((big,)).astype(np.float32),
              "b": [rng.standard_normal((3, 4)), rng.standard_normal(5).astype(np.float32)]}
    ref = {"w": target["w"].copy(), "b": [a.copy() for a in target["b"]]}
    refmoco.momentum_update(ref, source, 0.99, backend="numpy")
    refmoco.momentum_update(target, source, 0.99, backend="numba")
    np.testing.assert_array_equal(target["w"], ref["w"])
    for a, b in zip(target["b"], ref["b"]):
        np.testing.assert_array_equal(a, b)


# -- the SGD kernel ------------------------------------------------------------------------------


@given(st.data(), DTYPE, st.integers(1, 3))
def test_sgd_kernel_is_bitwise_refmoco_optim(data, dtype, steps):
    from refmoco.optim import SGD

    momentum = data.draw(st.sampled_from([0.0, 0.9]))
    nesterov = momentum > 0 and data.draw(st.booleans())
    dampening = 0.0 if nesterov else data.draw(st.sampled_from([0.0, 0.3]))
    weight_decay = data.draw(st.sampled_from([0.0, 1e-4, 0.5]))
    lr = data.draw(st.floats(1e-3, 1.0))
    size = data.draw(st.integers(1, 40))
    p0 = data.draw(arrays((size,))).astype(dtype)
    opt = SGD(lr, momentum=momentum, weight_decay=weight_decay, dampening=dampening,
              nesterov=nesterov)
    p_ref, p, buf = p0.copy(), p0.copy(), np.zeros_like(p0)
    for step in range(steps):
        g = data.draw(arrays((size,))).astype(dtype)
        opt.step(p_ref, g)
        cpu.sgd_step(p, g, buf if momentum else None, lr, momentum, dampening, weight_decay,
                     nesterov, first_step=step == 0)
    np.testing.assert_array_equal(p, p_ref)
    if momentum:
        np.testing.assert_array_equal(buf, opt.momentum_buffer)


def test_sgd_kernel_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    p0 = rng.standard_normal(1000)
    tp = torch.tensor(p0, requires_grad=True)
    opt = torch.optim.SGD([tp], lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
    p, buf = p0.copy(), np.zeros_like(p0)
    for step in range(4):
        g = rng.standard_normal(1000)
        tp.grad = torch.tensor(g)
        opt.step()
        cpu.sgd_step(p, g, buf, 0.1, 0.9, 0.0, 1e-3, True, first_step=step == 0)
    assert_close(p, tp.detach().numpy(), rtol=1e-12)  # float64, the same steps


# -- errors: the same exception type on every backend ---------------------------------------------


def _r(*shape):
    return np.random.default_rng(5).standard_normal(shape)


BAD_CALLS = [  # (call, error, what the message must start with or say: the argument's name)
    (lambda b: refmoco.info_nce_loss(_r(3, 4), _r(2, 4), _r(5, 4), backend=b), ValueError,
     "^k: "),
    (lambda b: refmoco.info_nce_loss(_r(3, 4), _r(3, 4), _r(5, 3), backend=b), ValueError,
     "^negatives: "),
    (lambda b: refmoco.info_nce_loss(_r(3, 4), _r(3, 4), _r(5, 4), temperature=0, backend=b),
     ValueError, "^temperature: "),
    (lambda b: refmoco.info_nce_loss(_r(3, 4), _r(3, 4), _r(5, 4), reduction="max", backend=b),
     ValueError, "^reduction: "),
    (lambda b: refmoco.info_nce_loss(_r(3, 4), _r(3, 4), _r(5, 4), wrt=("x",), backend=b),
     ValueError, "^wrt: "),
    (lambda b: refmoco.info_nce_loss(np.ones((3, 4), int), _r(3, 4), _r(5, 4), backend=b),
     TypeError, "^q: "),
    (lambda b: refmoco.info_nce_loss(_r(3, 4), _r(3, 4), _r(5, 4).astype(np.float32),
                                     backend=b), TypeError, "dtype.*negatives: float32"),
    (lambda b: refmoco.momentum_update(_r(3), _r(3), 1.5, backend=b), ValueError, "^momentum: "),
    (lambda b: refmoco.momentum_update(_r(3), _r(4), 0.5, backend=b), ValueError, "^source: "),
    (lambda b: refmoco.momentum_update(np.ones(3, int), _r(3), 0.5, backend=b), TypeError,
     "^target: "),
    (lambda b: refmoco.momentum_update({"a": _r(3)}, {"b": _r(3)}, 0.5, backend=b), ValueError,
     "^source: .*keys"),
    (lambda b: refmoco.momentum_update([_r(3)], [_r(3), _r(3)], 0.5, backend=b), ValueError,
     "^source: .*length"),
    (lambda b: refmoco.momentum_update([1.0, 2.0], [1.0, 2.0], 0.5, backend=b), TypeError,
     r"^target\[0\]: "),
]


@pytest.mark.parametrize("call, error, words", BAD_CALLS)
def test_bad_input_raises_the_same_error_on_every_backend(call, error, words):
    for backend in ("numpy", "numba"):
        with pytest.raises(error, match=words):
            call(backend)


def test_read_only_target_is_rejected_and_unchanged_on_numba():
    target = np.zeros(4)
    target.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        refmoco.momentum_update(target, np.ones(4), 0.5, backend="numba")
    assert not target.any()


def test_parallel_kernels_from_several_threads_at_once():
    """Kernels split over refmoco's thread pool, called from several Python threads at once
    (Numba's workqueue layer would abort here: refmoco never starts a Numba threading layer).
    Each thread's result is checked against the NumPy reference."""
    n = cpu.PARALLEL_MIN * 4 + 3  # several parts, the last one ragged
    rng = np.random.default_rng(0)
    sources = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
    results, errors = {}, []

    def work(i):
        try:
            t = np.ones(n, np.float32)
            for _ in range(20):
                refmoco.momentum_update(t, sources[i], 0.5, backend="numba")
            results[i] = t
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    for i, s in enumerate(sources):
        ref = np.ones(n, np.float32)
        for _ in range(20):
            refmoco.momentum_update(ref, s, 0.5)
        np.testing.assert_array_equal(results[i], ref)  # bitwise: same operations, same order


def test_run_parts_cuts_every_array_alike_and_reraises():
    from refmoco.kernels._jit import num_threads, run_parts

    seen = []

    def kernel(a, empty, k):
        seen.append((int(a[0]), len(a), len(empty), k))
        if (a == -1).any():
            raise ValueError("boom")

    a = np.arange(1000)
    run_parts(kernel, (a, np.empty(0)), (7,), work=1000, min_work=1)
    starts = sorted(seen)
    assert len(starts) == min(num_threads(), 1000)
    assert [start for start, *_ in starts] == sorted({start for start, *_ in starts})
    assert sum(length for _, length, _, _ in starts) == 1000  # every row in exactly one part
    assert all(empty == 0 and k == 7 for _, _, empty, k in starts)  # empty arrays passed whole
    seen.clear()
    run_parts(kernel, (a, np.empty(0)), (7,), work=1000, min_work=10**6)  # too little work
    assert seen == [(0, 1000, 0, 7)]
    b = a.copy()
    b[-1] = -1  # in the last part: a pool thread's when there are several
    with pytest.raises(ValueError, match="boom"):
        run_parts(kernel, (b, np.empty(0)), (0,), work=1000, min_work=1)


def test_kernels_and_bench_import_neither_numba_nor_torch():
    code = ("import sys, refmoco.kernels, refmoco.bench; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'numba', 'cupy', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_bench_models_moco_resnet18():
    from refmoco.bench import resnet18_shapes

    shapes = resnet18_shapes()
    assert len(shapes) == 62
    assert sum(math.prod(s) for s in shapes) == 11_242_176


# -- a real GPU: CuPy (skipped without one; REFMOCO_REQUIRE_GPU=1 makes the skip a failure) -------


@pytest.fixture(scope="module")
def cupy():
    return require_cupy()


@pytest.mark.gpu
@given(info_nce_inputs(unit=False), REDUCTION, DTYPE, wrt_subsets(["q", "k", "negatives"]))
def test_info_nce_cupy_matches_numpy(cupy, inputs, reduction, dtype, wrt):
    q, k, negatives, t, args = info_nce_case(inputs, reduction, dtype, wrt)
    dev = [None if a is None else cupy.asarray(a) for a in (q, k, negatives)]
    out = refmoco.info_nce_loss(*dev, **args)
    assert isinstance(out.loss, cupy.ndarray) and out.loss.shape == ()
    assert all(isinstance(g, cupy.ndarray) for g in out.grads.values())
    assert_within_rounding(cupy.asnumpy(out.loss),
                           {name: cupy.asnumpy(g) for name, g in out.grads.items()},
                           q, k, negatives, t, reduction, args["wrt"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_info_nce_cupy_on_a_moco_sized_problem(cupy, dtype):
    rng = np.random.default_rng(0)
    q, k, queue = (unit_rows(rng.standard_normal(s)).astype(dtype)
                   for s in ((256, 128), (256, 128), (16384, 128)))
    out = refmoco.info_nce_loss(cupy.asarray(q), cupy.asarray(k), cupy.asarray(queue))
    assert_within_rounding(cupy.asnumpy(out.loss),
                           {name: cupy.asnumpy(g) for name, g in out.grads.items()},
                           q, k, queue, 0.07, "mean")


@pytest.mark.gpu
@given(momentum_problems())
def test_momentum_update_cupy_matches_numpy(cupy, problem):
    target, _, source, m = problem
    ref = target.copy()
    refmoco.momentum_update(ref, source, m)
    dev = cupy.asarray(target)
    refmoco.momentum_update(dev, cupy.asarray(source), m)
    assert dev.dtype == ref.dtype
    np.testing.assert_array_equal(cupy.asnumpy(dev), ref)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_split_kernels_work_in_a_forked_child():
    """A process forked after the pool has started (a data-loader worker) gets a fresh pool:
    the inherited one has no threads and would hang."""
    import multiprocessing

    n = cpu.PARALLEL_MIN * 4
    t, s = np.zeros(n, np.float32), np.ones(n, np.float32)
    refmoco.momentum_update(t, s, 0.5, backend="numba")  # the parent's pool is running
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        total = pool.apply_async(_child_update, (n,)).get(timeout=60)
    assert total == pytest.approx(0.5 * n)


def _child_update(n):
    t, s = np.zeros(n, np.float32), np.ones(n, np.float32)
    refmoco.momentum_update(t, s, 0.5, backend="numba")
    return float(t.sum(dtype=np.float64))


def test_bench_runs_without_numba_and_says_so():
    """`refmoco bench` on an install without Numba (the demo extra): the NumPy and PyTorch cases
    run, and each group notes what to install for the Numba ones."""
    code = """if True:
        import sys
        sys.modules["numba"] = None
        from refmoco.bench import main
        sys.exit(main(["--quick", "--repeats", "1", "--inherit-env", "--only", "info-nce",
                       "--only", "momentum", "--only", "step"]))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "refmoco numpy" in out.stdout and "refmoco numba " not in out.stdout
    assert out.stdout.count("pip install 'refmoco[numba]'") == 5  # 2 InfoNCE, momentum, 2 steps
