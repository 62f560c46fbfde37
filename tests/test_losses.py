"""The losses against three independent oracles: loop references (tests/naive.py), central
finite differences in float64, and closed forms / invariants."""

import math

import naive
import numpy as np
import pytest
from fake_cupy import assert_same, device_module
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import FLOAT, arrays, cpc_inputs, info_nce_inputs, unit_rows

import refmoco
from refmoco.testing import assert_close, check_grad

REDUCTION = st.sampled_from(["mean", "sum"])
FD = dict(rtol=1e-6)  # central differences in float64 with eps = 1e-6


def assert_within_rounding_of_float64(out, q, k, negatives, temperature):
    """A float32 InfoNCE (mean) against the float64 result on the same inputs, loss and every
    gradient entry within ``naive.info_nce_rounding_bound`` of float32 plus float64."""
    wide = [None if a is None else a.astype(np.float64) for a in (q, k, negatives)]
    expected = refmoco.info_nce_loss(*wide, temperature=temperature)
    bounds = [naive.info_nce_rounding_bound(q, k, negatives, temperature, "mean", dtype)
              for dtype in (np.float32, np.float64)]
    pairs = [("loss", out.loss, expected.loss, bounds[0][0] + bounds[1][0])]
    pairs += [(name, g, expected.grads[name], bounds[0][1][name] + bounds[1][1][name])
              for name, g in out.grads.items()]
    assert set(out.grads) == set(expected.grads)
    for name, actual, exact, bound in pairs:
        assert actual.dtype == np.float32 and actual.shape == exact.shape, name
        err = np.abs(actual.astype(np.float64) - exact)
        assert np.all(err <= bound), (name, float(np.max(err / bound)))


def logit_scale(*arrays_, temperature=1.0):
    """Size of the largest logit: the loss is a difference of terms this large."""
    sizes = [float(np.abs(a).max()) for a in arrays_ if a is not None and a.size]
    return max(1.0, math.prod(sizes) * max(arrays_[0].shape[-1], 1) / temperature)


# -- 1. loop references, float64 -------------------------------------------------------------


@given(info_nce_inputs(unit=False), REDUCTION)
def test_info_nce_matches_loop_reference(inputs, reduction):
    q, k, negatives, t = inputs
    out = refmoco.info_nce_loss(q, k, negatives, temperature=t, reduction=reduction)
    expected = naive.info_nce(q, k, negatives, t, reduction)
    scale = logit_scale(q, k, temperature=t) * (len(q) if reduction == "sum" else 1)
    assert_close(out.loss, np.float64(expected), rtol=1e-12, atol=1e-13 * scale)


@given(st.data(), REDUCTION)
def test_softmax_cross_entropy_matches_loop_reference(data, reduction):
    n, m = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 7))
    logits = data.draw(arrays((n, m), st.floats(-50, 50, width=64)))
    labels = data.draw(arrays((n,), st.integers(0, m - 1), dtype=np.int64))
    out = refmoco.softmax_cross_entropy(logits, labels, reduction=reduction)
    expected = naive.softmax_cross_entropy(logits, labels, reduction)
    assert_close(out.loss, np.float64(expected), rtol=1e-12, atol=1e-13 * 50 * n)


@given(st.data(), REDUCTION, st.floats(0.1, 3.0))
def test_contrastive_matches_loop_reference(data, reduction, margin):
    n, d = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 5))
    x1, x2 = data.draw(arrays((n, d))), data.draw(arrays((n, d)))
    y = data.draw(arrays((n,), st.integers(0, 1), dtype=np.int64))
    out = refmoco.contrastive_loss(x1, x2, y, margin=margin, reduction=reduction)
    expected = naive.contrastive(x1, x2, y, margin, reduction)
    assert_close(out.loss, np.float64(expected), rtol=1e-12, atol=1e-14 * n * d)


@given(cpc_inputs(), REDUCTION)
def test_cpc_matches_loop_reference(inputs, reduction):
    z, c, W = inputs
    out = refmoco.cpc_loss(z, c, W, reduction=reduction)
    expected = naive.cpc(z, c, W, reduction)
    assert_close(out.loss, np.float64(expected), rtol=1e-12, atol=1e-13 * z.size * W.size)


# -- 2. gradients against central finite differences, float64 --------------------------------


@given(info_nce_inputs(), REDUCTION)
def test_info_nce_gradients_match_finite_differences(inputs, reduction):
    q, k, negatives, t = inputs
    args = {"q": q, "k": k, "negatives": negatives, "temperature": t, "reduction": reduction}
    check_grad(refmoco.info_nce_loss, args, **FD)


@given(st.data(), REDUCTION)
def test_softmax_cross_entropy_gradient_matches_finite_differences(data, reduction):
    n, m = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 6))
    logits = data.draw(arrays((n, m), st.floats(-5, 5, width=64)))
    labels = data.draw(arrays((n,), st.integers(0, m - 1), dtype=np.int64))
    args = {"logits": logits, "labels": labels, "reduction": reduction}
    check_grad(refmoco.softmax_cross_entropy, args, **FD)


@given(st.data(), REDUCTION, st.floats(0.2, 3.0))
def test_contrastive_gradients_match_finite_differences(data, reduction, margin):
    n, d = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 4))
    x1, x2 = data.draw(arrays((n, d))), data.draw(arrays((n, d)))
    y = data.draw(arrays((n,), st.integers(0, 1), dtype=np.int64))
    dist = np.linalg.norm(x1 - x2, axis=1)
    # off the kinks, and off d = 0, near which the push's curvature (m / d) makes central
    # differences err as (h / d)^2: at d = 2e-3 already beyond 1e-6 (a drawn case). Smaller
    # distances are checked in closed form (test_contrastive_at_distances_whose_square_...)
    assume(np.all(np.abs(dist - margin) > 1e-3) and np.all(dist > 1e-2))
    args = {"x1": x1, "x2": x2, "y": y, "margin": margin, "reduction": reduction}
    check_grad(refmoco.contrastive_loss, args, **FD)


@given(cpc_inputs(), REDUCTION)
def test_cpc_gradients_match_finite_differences(inputs, reduction):
    z, c, W = inputs
    check_grad(refmoco.cpc_loss, {"z": z, "c": c, "W": W, "reduction": reduction}, **FD)


@pytest.mark.parametrize("mode", ["queue", "per_query", "in_batch"])
def test_info_nce_gradients_elementwise_small_case(mode, rng):
    q, k = unit_rows(rng.normal(size=(3, 4))), unit_rows(rng.normal(size=(3, 4)))
    negatives = {"queue": unit_rows(rng.normal(size=(5, 4))),
                 "per_query": unit_rows(rng.normal(size=(3, 2, 4))), "in_batch": None}[mode]
    args = {"q": q, "k": k, "negatives": negatives, "temperature": 0.2}
    report = check_grad(refmoco.info_nce_loss, args, mode="elementwise", **FD)
    assert set(report.errors) == ({"q", "k"} if negatives is None else {"q", "k", "negatives"})


@given(arrays(st.tuples(st.integers(1, 4), st.integers(1, 5)),
              st.floats(-1e3, 1e3, width=64)))
def test_l2_normalize_backward_matches_finite_differences(x):
    assume(np.all(np.linalg.norm(x, axis=1) > 1e-3))

    def fun(x, cotangent):
        y, backward = refmoco.l2_normalize(x)
        return np.sum(y * cotangent), {"x": backward(cotangent)}

    cotangent = np.random.default_rng(0).normal(size=x.shape)
    # y(x) curves on the scale of ||x||: the difference step follows it (truncation ~ (eps/||x||)^2)
    eps = 1e-6 * float(np.linalg.norm(x, axis=1).min())
    check_grad(fun, {"x": x, "cotangent": cotangent}, wrt=("x",), eps=eps, **FD)


# -- 3. closed forms and invariants ----------------------------------------------------------


@given(st.integers(1, 6), st.integers(1, 8), st.integers(1, 40), st.floats(0.01, 5.0))
def test_collapsed_embeddings_give_log_k_plus_one(n, c, k, t):
    """Every query, key and negative the same unit vector v: all K + 1 logits are 1/T, so every
    softmax weight is p = 1/(K+1) and each query's loss is log(K+1). With the mean's 1/N,
    dL/dq_i = (1/(N T)) (sum_j p x_ij - k_i) = (1/(N T)) (p (K+1) v - v) = 0,
    dL/dk_i = (1/(N T)) (p - 1) q_i = -(K/(K+1)) / (N T) v,
    dL/dn_j = (1/(N T)) sum_i p q_i = v / ((K+1) T)."""
    v = unit_rows(np.ones((1, c)))
    q, negatives = np.repeat(v, n, axis=0), np.repeat(v, k, axis=0)
    out = refmoco.info_nce_loss(q, q, negatives, temperature=t)
    assert_close(out.loss, np.float64(math.log(k + 1)), rtol=1e-12)
    expected = {"q": np.zeros((n, c)), "k": np.repeat(-(k / (k + 1)) / (n * t) * v, n, axis=0),
                "negatives": np.repeat(v / ((k + 1) * t), k, axis=0)}
    _, bounds = naive.info_nce_rounding_bound(q, q, negatives, t, "mean", np.float64)
    assert set(out.grads) == set(expected)
    for name, g in out.grads.items():
        assert np.all(np.abs(g - expected[name]) <= bounds[name]), name


@given(info_nce_inputs(mode="queue"), st.randoms(use_true_random=False))
def test_permuting_the_negatives_changes_nothing(inputs, random):
    q, k, negatives, t = inputs
    tol = 1e-14 * logit_scale(q, k, temperature=t) * len(q)  # terms of this size cancel
    perm = np.array(random.sample(range(len(negatives)), len(negatives)))
    a = refmoco.info_nce_loss(q, k, negatives, temperature=t)
    b = refmoco.info_nce_loss(q, k, negatives[perm], temperature=t)
    assert_close(b.loss, a.loss, atol=tol)
    assert_close(b.grads["q"], a.grads["q"], atol=tol)
    assert_close(b.grads["negatives"], a.grads["negatives"][perm], atol=tol)


@given(st.data(), st.floats(-100, 100))
def test_adding_a_constant_to_every_logit_changes_nothing(data, shift):
    n, m = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 6))
    logits = data.draw(arrays((n, m), st.floats(-5, 5, width=64)))
    labels = data.draw(arrays((n,), st.integers(0, m - 1), dtype=np.int64))
    a = refmoco.softmax_cross_entropy(logits, labels)
    b = refmoco.softmax_cross_entropy(logits + shift, labels)
    assert_close(b.loss, a.loss, rtol=1e-12, atol=1e-13 * (abs(shift) + 5))
    assert_close(b.grads["logits"], a.grads["logits"], rtol=1e-12, atol=1e-13 * (abs(shift) + 5))


@given(info_nce_inputs(mode="in_batch"), REDUCTION)
def test_in_batch_info_nce_and_cross_entropy_of_q_kT_agree_by_the_chain_rule(inputs, reduction):
    """A consistency check, not an oracle: both losses run the same cross-entropy code, so this
    checks only the in-batch wiring (logits q k^T / T, labels i) and the chain rule through
    them; the loop reference and finite differences above are the oracles."""
    q, k, _, t = inputs
    tol = 1e-14 * logit_scale(q, k, temperature=t) * len(q)  # terms of this size cancel
    a = refmoco.info_nce_loss(q, k, temperature=t, reduction=reduction)
    b = refmoco.softmax_cross_entropy(q @ k.T / t, np.arange(len(q)), reduction=reduction)
    assert_close(a.loss, b.loss, atol=tol)
    assert_close(a.grads["q"], b.grads["logits"] @ k / t, atol=tol)
    assert_close(a.grads["k"], b.grads["logits"].T @ q / t, atol=tol)


@given(info_nce_inputs(mode="queue"))
def test_per_query_negatives_that_are_all_the_queue_equal_the_shared_mode(inputs):
    q, k, negatives, t = inputs
    tol = 1e-14 * logit_scale(q, k, temperature=t) * len(q)  # terms of this size cancel
    shared = refmoco.info_nce_loss(q, k, negatives, temperature=t)
    tiled = np.broadcast_to(negatives, (len(q),) + negatives.shape).copy()
    per_query = refmoco.info_nce_loss(q, k, tiled, temperature=t)
    assert_close(per_query.loss, shared.loss, atol=tol)
    assert_close(per_query.grads["q"], shared.grads["q"], atol=tol)
    assert_close(per_query.grads["k"], shared.grads["k"], atol=tol)
    assert_close(per_query.grads["negatives"].sum(axis=0), shared.grads["negatives"], atol=tol)


@given(info_nce_inputs())
def test_sum_reduction_is_n_times_mean(inputs):
    q, k, negatives, t = inputs
    tol = 1e-14 * logit_scale(q, k, temperature=t) * len(q)  # terms of this size cancel
    mean = refmoco.info_nce_loss(q, k, negatives, temperature=t)
    total = refmoco.info_nce_loss(q, k, negatives, temperature=t, reduction="sum")
    assert_close(total.loss, mean.loss * len(q), atol=tol)
    for name in mean.grads:
        assert_close(total.grads[name], mean.grads[name] * len(q), atol=tol)


def test_contrastive_known_values():
    x1 = np.zeros((3, 2))
    x2 = np.array([[3.0, 4.0], [0.3, 0.4], [3.0, 4.0]])
    out = refmoco.contrastive_loss(x1, x2, np.array([0, 1, 1]), margin=1.0, reduction="sum")
    # similar pair at distance 5: 25/2; dissimilar at 0.5 inside the margin: 0.25/2; outside: 0
    assert float(out.loss) == pytest.approx(12.5 + 0.125, rel=1e-15)
    np.testing.assert_allclose(out.grads["x1"][2], 0.0)  # outside the margin: no gradient


def test_contrastive_dissimilar_pair_at_zero_distance_has_zero_gradient():
    x = np.ones((2, 3))
    out = refmoco.contrastive_loss(x, x.copy(), np.array([True, True]), margin=2.0)
    assert float(out.loss) == pytest.approx(2.0)  # (2 - 0)^2 / 2 each, mean
    assert not out.grads["x1"].any() and not out.grads["x2"].any()


@given(st.data(), st.sampled_from([0, 1]), st.sampled_from([np.float32, np.float64]),
       st.floats(0.1, 3.0))
def test_contrastive_at_distances_whose_square_overflows_or_underflows(data, y, dtype, margin):
    """d = 5 * 10**e for every e whose entries are normal numbers: d**2 overflows (d > 1.8e19 in
    float32) or underflows (d < 1e-19) where d does not. Against math.hypot on the same values:
    a far dissimilar pair has loss and gradient 0 (not 0 * inf = nan), a near one is pushed with
    size (m - d) along the unit vector (not a zero gradient from d**2 = 0)."""
    info = np.finfo(dtype)
    exponent = data.draw(st.integers(int(np.log10(info.tiny)) + 1, int(np.log10(info.max)) - 1))
    x1 = (np.array([[3.0, -4.0]]) * 10.0**exponent).astype(dtype)
    x2 = np.zeros_like(x1)
    d = math.hypot(*map(float, x1[0]))
    if y == 0:
        loss, dx1 = 0.5 * d * d, x1.astype(np.float64)
        assume(loss < float(info.max))  # beyond, the loss overflows: inf is the right answer
    else:
        hinge = max(0.0, margin - d)
        loss, dx1 = 0.5 * hinge**2, -hinge * x1.astype(np.float64) / d
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow is right here
        out = refmoco.contrastive_loss(x1, x2, np.array([y]), margin=margin)
    tol = 8 * float(info.eps)
    # a loss below the smallest normal number (d**2 / 2 of a near similar pair) is subnormal:
    # its precision is absolute there, tol * tiny (8 of its steps)
    assert_close(out.loss, np.array(loss, dtype), rtol=tol, atol=tol * float(info.tiny),
                 check_dtype=True)
    assert_close(out.grads["x1"], dx1.astype(dtype), rtol=tol, atol=tol * np.abs(dx1).max())
    assert_close(out.grads["x2"], -out.grads["x1"], rtol=0, atol=0)


@given(st.floats(0.0, 20.0), st.integers(1, 100_000))
def test_mi_lower_bound(loss, n):
    assert refmoco.mi_lower_bound(loss, n) == math.log(n) - loss
    arr = refmoco.mi_lower_bound(np.float32(loss), n)
    assert arr.dtype == np.float32


def test_l2_normalize_known_values_and_zero_rows():
    y, backward = refmoco.l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_array_equal(y, [[0.6, 0.8], [0.0, 0.0]])
    dx = backward(np.array([[1.0, 0.0], [1.0, 2.0]]))
    np.testing.assert_allclose(dx[0], [0.64 / 5, -0.48 / 5], rtol=1e-15)
    np.testing.assert_array_equal(dx[1], [1e12, 2e12])  # clamped norm: dy / eps


def test_l2_normalize_at_a_norm_of_exactly_eps_passes_the_gradient_like_torch():
    """torch's clamp_min(norm, eps) passes the gradient where norm >= eps: at norm == eps the
    backward is that of x / ||x|| (the tangent part of dy), not dy / eps."""
    x = np.array([[6e-13, 8e-13]])  # ||x|| = 1e-12 exactly in float64
    assert math.hypot(*x[0]) == 1e-12
    y, backward = refmoco.l2_normalize(x, eps=1e-12)
    dy = np.array([[1.0, 0.0]])
    np.testing.assert_allclose(backward(dy), (dy - y * (y @ dy.T)) / 1e-12, rtol=1e-15)


def test_l2_normalize_backward_refuses_a_dy_of_another_dtype():
    _, backward = refmoco.l2_normalize(np.ones((2, 3), np.float32))
    with pytest.raises(TypeError, match="dy: float64"):
        backward(np.ones((2, 3)))


@pytest.mark.parametrize("shape, axis", [((3, 0), -1), ((0, 3), -1), ((3, 0), 0), ((0, 3), 0)])
def test_l2_normalize_of_empty_arrays(shape, axis):
    """No rows, or rows of no entries (norm 0): empty results of the input's shape and dtype."""
    x = np.zeros(shape, np.float32)
    y, backward = refmoco.l2_normalize(x, axis=axis)
    dx = backward(np.zeros(shape, np.float32))
    assert y.shape == dx.shape == shape and y.dtype == dx.dtype == np.float32


@given(st.floats(1e-12, 1e30), st.sampled_from([np.float32, np.float64]))  # norm 3x > eps
def test_l2_normalize_neither_overflows_nor_underflows(scale, dtype):
    x = (np.array([[1.0, -2.0, 2.0]]) * scale).astype(dtype)
    assume(np.all(np.isfinite(x)) and np.abs(x).min() > np.finfo(dtype).tiny)
    y, _ = refmoco.l2_normalize(x)
    assert y.dtype == dtype
    assert_close(y, np.array([[1.0, -2.0, 2.0]], dtype=dtype) / 3)


# -- numerics and dtypes --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["queue", "per_query", "in_batch"])
def test_tiny_temperature_and_large_norms_stay_finite_in_float32(mode, rng):
    q = (rng.normal(size=(8, 16)) * 1e3).astype(np.float32)
    k = (rng.normal(size=(8, 16)) * 1e3).astype(np.float32)
    negatives = {"queue": rng.normal(size=(32, 16)) * 1e3,
                 "per_query": rng.normal(size=(8, 4, 16)) * 1e3, "in_batch": None}[mode]
    negatives = None if negatives is None else negatives.astype(np.float32)
    out = refmoco.info_nce_loss(q, k, negatives, temperature=0.01)
    assert out.loss.dtype == np.float32 and np.isfinite(out.loss)
    for name, g in out.grads.items():
        assert g.dtype == np.float32 and np.isfinite(g).all(), name
    # float32 logits near 1e9 carry absolute rounding ~1e9 * eps32 = 1e2, but each row's largest
    # stands far above the rest: the softmax is one-hot, and the loss and gradients stay within
    # a few roundings of the float64 values (measured: 2e-8 to 7e-8 of max|g|, under 0.08 of the
    # bound, which is at most 3e-6 of max|g| here)
    assert_within_rounding_of_float64(out, q, k, negatives, 0.01)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_preserved(dtype, rng):
    q, k = rng.normal(size=(4, 8)).astype(dtype), rng.normal(size=(4, 8)).astype(dtype)
    queue = rng.normal(size=(16, 8)).astype(dtype)
    expected = dtype
    out = refmoco.info_nce_loss(q, k, queue, temperature=0.5)
    assert out.loss.dtype == expected and out.loss.shape == ()
    assert {g.dtype for g in out.grads.values()} == {np.dtype(expected)}
    cl = refmoco.contrastive_loss(q, k, np.array([0, 1, 0, 1]))
    assert cl.loss.dtype == expected and cl.grads["x1"].dtype == expected
    z = rng.normal(size=(2, 4, 3)).astype(dtype)
    W = rng.normal(size=(1, 3, 3)).astype(dtype)
    cpc = refmoco.cpc_loss(z, z, W)
    assert cpc.loss.dtype == expected and cpc.grads["W"].dtype == expected


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_inputs_are_computed_exactly_as_their_float32_values(half, rng):
    """float16/bfloat16 inputs are computed in float32 (API.md): widening is exact, so every loss
    and gradient, float32, equals bit for bit the result for the same values passed as float32."""
    dtype = np.float16 if half == "float16" else pytest.importorskip("ml_dtypes").bfloat16
    x = lambda *shape: rng.normal(size=shape).astype(dtype)  # noqa: E731
    calls = {
        "info_nce queue": (refmoco.info_nce_loss, (x(4, 8), x(4, 8), x(16, 8)), {"temperature": 0.5}),
        "info_nce per-query": (refmoco.info_nce_loss, (x(4, 8), x(4, 8), x(4, 3, 8)), {}),
        "info_nce in-batch": (refmoco.info_nce_loss, (x(4, 8), x(4, 8)), {"temperature": 0.2}),
        "contrastive": (refmoco.contrastive_loss, (x(4, 8), x(4, 8), np.array([0, 1, 0, 1])), {}),
        "cpc": (refmoco.cpc_loss, (x(2, 4, 3), x(2, 4, 5), x(2, 3, 5)), {}),
        "softmax_cross_entropy": (refmoco.softmax_cross_entropy, (x(4, 5), np.array([4, 0, 2, 2])),
                                  {}),
    }
    for case, (fn, args, kwargs) in calls.items():
        out = fn(*args, **kwargs)
        wide = fn(*(a.astype(np.float32) if a.dtype == dtype else a for a in args), **kwargs)
        assert out.loss.dtype == np.float32 and out.loss.shape == (), case
        np.testing.assert_array_equal(out.loss, wide.loss, err_msg=case)
        assert float(wide.loss) != 0 and set(out.grads) == set(wide.grads), case
        for name, g in wide.grads.items():
            assert out.grads[name].dtype == np.float32, (case, name)
            np.testing.assert_array_equal(out.grads[name], g, err_msg=f"{case}: {name}")


def test_wrt_limits_the_gradients(rng):
    q, k, queue = rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), rng.normal(size=(5, 4))
    full = refmoco.info_nce_loss(q, k, queue)
    only_q = refmoco.info_nce_loss(q, k, queue, wrt=("q",))
    assert set(only_q.grads) == {"q"}
    np.testing.assert_array_equal(only_q.grads["q"], full.grads["q"])
    assert refmoco.info_nce_loss(q, k, queue, wrt=()).grads == {}
    assert set(refmoco.cpc_loss(rng.normal(size=(2, 3, 2)), rng.normal(size=(2, 3, 2)),
                                rng.normal(size=(1, 2, 2)), wrt=["W"]).grads) == {"W"}


def test_loss_output_is_a_named_tuple_with_a_0d_loss(rng):
    loss, grads = refmoco.info_nce_loss(rng.normal(size=(2, 3)), rng.normal(size=(2, 3)))
    assert isinstance(loss, np.ndarray) and loss.shape == ()
    assert isinstance(float(loss), float) and set(grads) == {"q", "k"}


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("call, error, words", [
    (lambda r: refmoco.info_nce_loss(r(3, 4), r(2, 4)), ValueError, "k:"),
    (lambda r: refmoco.info_nce_loss(r(3, 4), r(3, 4), r(5, 3)), ValueError, "negatives:"),
    (lambda r: refmoco.info_nce_loss(r(3, 4), r(3, 4), r(2, 5, 4)), ValueError, "negatives:"),
    (lambda r: refmoco.info_nce_loss(r(3, 4), r(3, 4), temperature=0), ValueError,
     "temperature"),
    (lambda r: refmoco.info_nce_loss(r(3, 4), r(3, 4), temperature=float("nan")), ValueError,
     "temperature"),
    # 1 / T overflows float32 (every logit inf, the loss NaN): refused, naming the limit
    (lambda r: refmoco.info_nce_loss(r(3, 4).astype(np.float32), r(3, 4).astype(np.float32),
                                     temperature=1e-39), ValueError, "temperature.*float32"),
    (lambda r: refmoco.info_nce_loss(r(3, 4).astype(np.float16), r(3, 4).astype(np.float16),
                                     r(5, 4).astype(np.float16), temperature=1e-39),
     ValueError, "temperature.*float32"),
    (lambda r: refmoco.info_nce_loss(r(3, 4), r(3, 4), reduction="max"), ValueError,
     "reduction"),
    (lambda r: refmoco.info_nce_loss(r(3, 4), r(3, 4), wrt=("negatives",)), ValueError, "wrt"),
    (lambda r: refmoco.info_nce_loss(np.ones((3, 4), int), r(3, 4)), TypeError, "q:"),
    (lambda r: refmoco.info_nce_loss(r(3, 4), r(3, 4).astype(np.float32)), TypeError, "dtype"),
    (lambda r: refmoco.info_nce_loss(r(3, 4), r(3, 4), backend="jax"), ValueError, "backend"),
    (lambda r: refmoco.softmax_cross_entropy(r(3, 4), np.array([0, 1, 4])), ValueError,
     "labels"),
    (lambda r: refmoco.softmax_cross_entropy(r(3, 4), np.array([0.0, 1, 2])), TypeError,
     "labels"),
    (lambda r: refmoco.contrastive_loss(r(3, 4), r(3, 4), np.array([0, 2, 1])), ValueError,
     "y:"),
    (lambda r: refmoco.contrastive_loss(r(3, 4), r(3, 4), np.array([0, 1])), ValueError, "y:"),
    (lambda r: refmoco.contrastive_loss(r(3, 4), r(3, 4), np.array([0, 1, 1]), margin=-1),
     ValueError, "margin"),
    (lambda r: refmoco.cpc_loss(r(2, 3, 4), r(2, 3, 5), r(3, 4, 5)), ValueError, "W:"),
    (lambda r: refmoco.cpc_loss(r(2, 3, 4), r(2, 2, 5), r(1, 4, 5)), ValueError, "c:"),
    (lambda r: refmoco.mi_lower_bound(1.0, 0), ValueError, "num_candidates"),
])
def test_bad_input_raises_naming_the_argument(call, error, words, rng):
    with pytest.raises(error, match=words):
        call(lambda *shape: rng.normal(size=shape))


def test_numba_backend_without_numba_says_what_to_install(without_numba):
    with pytest.raises(refmoco.BackendUnavailableError, match=r"pip install 'refmoco\[numba\]'"):
        refmoco.info_nce_loss(np.ones((2, 3)), np.ones((2, 3)), backend="numba")


@given(arrays(st.tuples(st.integers(1, 4), st.integers(1, 4)), FLOAT))
def test_torch_cross_entropy_agrees(logits):
    torch = pytest.importorskip("torch")
    labels = np.arange(len(logits)) % logits.shape[1]
    t = torch.tensor(logits, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(t, torch.tensor(labels))
    loss.backward()
    out = refmoco.softmax_cross_entropy(t, torch.tensor(labels))  # tensors go in via DLPack
    assert_close(out.loss, np.float64(loss.item()), rtol=1e-12, atol=1e-15)
    assert_close(out.grads["logits"], t.grad.numpy(), rtol=1e-12, atol=1e-15)


# -- the shared queue in blocks (online log-sum-exp) -------------------------------------------

info_nce_module = refmoco.losses.info_nce  # the module (its block size, forward and backward)


def _queue_blocks_vs_references(q, k, queue, t, block_rows):
    """Blockwise forward/backward against the loop reference (per-query losses) and against
    the per-query mode on the tiled queue (gradients: the unblocked softmax code path)."""
    n = len(q)
    losses, cache = info_nce_module.info_nce_forward(q, k, queue, t, np, block_rows=block_rows)
    expected = [naive.info_nce(q[i : i + 1], k[i : i + 1], queue, t, "sum") for i in range(n)]
    scale = logit_scale(q, k, temperature=t)
    assert_close(losses, np.array(expected), rtol=1e-12, atol=1e-13 * scale)
    dlosses = np.linspace(0.5, 1.5, n)  # not all equal: each row's scale must reach its row
    grads = info_nce_module.info_nce_backward(dlosses, cache, ("q", "k", "negatives"), np)
    tiled = np.broadcast_to(queue, (n,) + queue.shape).copy()
    _, ref_cache = info_nce_module.info_nce_forward(q, k, tiled, t, np)
    ref = info_nce_module.info_nce_backward(dlosses, ref_cache, ("q", "k", "negatives"), np)
    tol = 1e-14 * scale * n
    assert_close(grads["q"], ref["q"], atol=tol)
    assert_close(grads["k"], ref["k"], atol=tol)
    assert_close(grads["negatives"], ref["negatives"].sum(axis=0), atol=tol)


@given(info_nce_inputs(mode="queue", unit=False), st.integers(1, 4))
def test_queue_in_small_blocks_matches_loop_reference(inputs, block_rows):
    q, k, negatives, t = inputs  # K in [1, 7]: several blocks, usually a ragged last one
    _queue_blocks_vs_references(q, k, negatives, t, block_rows)


@pytest.mark.parametrize("block_rows", [1, 2, 3, 7, 100])
def test_queue_blocks_with_a_maximum_that_moves_between_blocks(block_rows, rng):
    # Query 0's logits grow along the queue, by more than exp overflows in float64 at T = 0.01
    # (a new maximum in every block, far above the positive: the rescaling factors
    # exp(m_old - m_new) underflow to 0); query 1's fall (the first block holds the maximum);
    # query 2's maximum is its positive.
    c, num = 4, 7  # 7 keys: blocks of 2 or 3 leave a ragged last block
    ramp = np.linspace(0.0, 10.0, num)
    queue = np.zeros((num, c))
    queue[:, 0], queue[:, 1], queue[:, 2] = ramp, ramp[::-1], -1.0
    queue += 0.01 * rng.normal(size=queue.shape)
    q = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, -0.5, 0]]) + 0.01 * rng.normal(size=(3, c))
    k = np.array([[-1.0, 0, 0, 0], [0, 0, 0, 1.0], [0, 0, -1.0, 0]])
    for t in (0.01, 0.5):
        _queue_blocks_vs_references(q, k, queue, t, block_rows)


def test_queue_blocks_through_the_public_function(monkeypatch, rng):
    q, k = unit_rows(rng.normal(size=(3, 4))), unit_rows(rng.normal(size=(3, 4)))
    queue = unit_rows(rng.normal(size=(11, 4)))
    whole = refmoco.info_nce_loss(q, k, queue, temperature=0.2)
    monkeypatch.setattr(info_nce_module, "QUEUE_BLOCK_BYTES", 4 * 3 * 8)  # 4 keys per block
    blocks = refmoco.info_nce_loss(q, k, queue, temperature=0.2)
    assert_close(blocks.loss, np.float64(naive.info_nce(q, k, queue, 0.2)), rtol=1e-12)
    for name in ("q", "k", "negatives"):
        assert_close(blocks.grads[name], whole.grads[name], rtol=1e-13)
    check_grad(refmoco.info_nce_loss, {"q": q, "k": k, "negatives": queue, "temperature": 0.2},
               mode="elementwise", **FD)
    only_q = refmoco.info_nce_loss(q, k, queue, temperature=0.2, wrt=("q",))
    np.testing.assert_array_equal(only_q.grads["q"], blocks.grads["q"])


def test_queue_blocks_in_float32_stay_float32_and_finite(monkeypatch, rng):
    monkeypatch.setattr(info_nce_module, "QUEUE_BLOCK_BYTES", 5 * 8 * 4)  # 5 keys per block
    q = (rng.normal(size=(8, 16)) * 1e3).astype(np.float32)
    k = (rng.normal(size=(8, 16)) * 1e3).astype(np.float32)
    queue = (rng.normal(size=(32, 16)) * 1e3).astype(np.float32)
    out = refmoco.info_nce_loss(q, k, queue, temperature=0.01)
    assert out.loss.dtype == np.float32 and np.isfinite(out.loss)
    assert all(g.dtype == np.float32 and np.isfinite(g).all() for g in out.grads.values())
    assert_within_rounding_of_float64(out, q, k, queue, 0.01)  # as the test above
    losses, cache = info_nce_module.info_nce_forward(q, k, queue, 0.01, np)
    assert {a.dtype for a in (losses, *cache.queue)} == {np.dtype(np.float32)}


def test_queue_forward_without_q_keeps_no_gradient_state(rng):
    q, k, queue = rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), rng.normal(size=(5, 4))
    losses, cache = info_nce_module.info_nce_forward(q, k, queue, 0.2, np, wrt=("k",))
    assert cache.queue.mean_neg is None
    full, _ = info_nce_module.info_nce_forward(q, k, queue, 0.2, np)
    np.testing.assert_array_equal(losses, full)
    with pytest.raises(ValueError, match="'q'"):
        info_nce_module.info_nce_backward(np.ones(3), cache, ("q",), np)


# -- empty batches -----------------------------------------------------------------------------


def empty_batches(dtype):
    """``name -> (function, arrays, keywords)`` for every loss (and mode) with a batch of 0."""
    z = lambda *shape: np.zeros(shape, dtype)  # noqa: E731
    no_labels = np.zeros(0, np.int64)
    return {
        "cpc": (refmoco.cpc_loss, (z(0, 5, 3), z(0, 5, 2), z(2, 3, 2)), {}),
        "info_nce in-batch": (refmoco.info_nce_loss, (z(0, 4), z(0, 4)), {}),
        "info_nce queue": (refmoco.info_nce_loss, (z(0, 4), z(0, 4), z(3, 4)), {}),
        "info_nce per-query": (refmoco.info_nce_loss, (z(0, 4), z(0, 4), z(0, 3, 4)), {}),
        "contrastive": (refmoco.contrastive_loss, (z(0, 4), z(0, 4), no_labels), {}),
        "softmax_cross_entropy": (refmoco.softmax_cross_entropy, (z(0, 4), no_labels), {}),
        "softmax_cross_entropy, no classes": (refmoco.softmax_cross_entropy,
                                              (z(0, 0), no_labels), {}),
    }


ARGS = {refmoco.cpc_loss: ("z", "c", "W"), refmoco.info_nce_loss: ("q", "k", "negatives"),
        refmoco.contrastive_loss: ("x1", "x2"), refmoco.softmax_cross_entropy: ("logits",)}


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(empty_batches(np.float64)))
def test_an_empty_batch_has_loss_zero_and_gradients_of_the_inputs_shapes(name, dtype, reduction,
                                                                          backend):
    """No terms: the sum is 0 and so is the mean (as an empty mean is everywhere in refmoco);
    every gradient has its argument's shape and dtype, and is 0 (W's and a queue's too: no
    term reaches them)."""
    if backend == "numba":
        pytest.importorskip("numba")
    fn, arrays_, kwargs = empty_batches(dtype)[name]
    out = fn(*arrays_, **kwargs, reduction=reduction, backend=backend)
    assert isinstance(out.loss, np.ndarray) and out.loss.shape == () and out.loss.dtype == dtype
    assert float(out.loss) == 0.0
    given_args = dict(zip(ARGS[fn], arrays_))
    assert set(out.grads) == set(given_args)
    for arg, g in out.grads.items():
        assert g.shape == given_args[arg].shape and g.dtype == dtype, arg
        assert not g.any(), arg


@pytest.mark.parametrize("labels", [np.zeros(3, np.int64), [0, 0, 0]])
def test_softmax_cross_entropy_rows_without_classes_are_a_value_error(labels):
    with pytest.raises(ValueError, match="^logits: .*M >= 1"):
        refmoco.softmax_cross_entropy(np.zeros((3, 0)), labels)


# -- mi_lower_bound: a 0-d array for an array loss ----------------------------------------------


@pytest.mark.parametrize("loss, dtype", [
    (np.array(0.5), np.float64), (np.array(0.5, np.float32), np.float32),
])  # fmt: skip
def test_mi_lower_bound_of_an_array_is_a_0d_array_of_its_dtype(loss, dtype):
    bound = refmoco.mi_lower_bound(loss, 4)
    assert type(bound) is np.ndarray and bound.shape == () and bound.dtype == dtype
    assert float(bound) == pytest.approx(math.log(4) - 0.5, rel=1e-7)


@pytest.mark.parametrize("loss, kind", [
    (np.float64(0.5), np.float64), (np.float32(0.5), np.float32), (np.float16(0.5), np.float32),
])  # fmt: skip
def test_mi_lower_bound_of_a_numpy_scalar_is_a_numpy_scalar(loss, kind):
    bound = refmoco.mi_lower_bound(loss, 4)  # json.dumps takes np.float64, not a 0-d array
    assert type(bound) is kind
    assert float(bound) == pytest.approx(math.log(4) - 0.5, rel=1e-7)


def test_mi_lower_bound_keeps_python_floats_and_array_shapes():
    bound = refmoco.mi_lower_bound(0.5, 4)
    assert type(bound) is float and bound == math.log(4) - 0.5
    assert type(refmoco.mi_lower_bound(1, 4)) is float
    curve = refmoco.mi_lower_bound(np.array([0.5, 1.0], np.float32), 4)  # a loss per epoch
    assert curve.dtype == np.float32
    np.testing.assert_allclose(curve, [math.log(4) - 0.5, math.log(4) - 1.0], rtol=1e-7)
    with pytest.raises(TypeError, match="^loss: "):
        refmoco.mi_lower_bound(np.array(1), 4)
    with pytest.raises(TypeError, match="^loss: "):
        refmoco.mi_lower_bound(True, 4)


# -- hyper-parameters: real numbers only ---------------------------------------------------------


def _hyper_calls(value):
    x = unit_rows(np.random.default_rng(0).normal(size=(3, 4)))
    y = unit_rows(np.random.default_rng(1).normal(size=(3, 4)))
    return {
        "temperature": lambda: refmoco.info_nce_loss(x, y, temperature=value),
        "margin": lambda: refmoco.contrastive_loss(x, y, np.array([0, 1, 1]), margin=value),
        "eps": lambda: refmoco.l2_normalize(x, eps=value)[0],
        "momentum": lambda: refmoco.momentum_update(x.copy(), y, value),
    }


@pytest.mark.parametrize("name", list(_hyper_calls(0.5)))
@pytest.mark.parametrize("value", ["0.5", b"0.5", True, False, np.True_, 0.5j, None, [0.5],
                                   np.array([0.5]), np.array(True)])
def test_a_hyper_parameter_that_is_not_a_real_number_is_a_type_error(name, value):
    with pytest.raises(TypeError, match=f"^{name}: expected"):
        _hyper_calls(value)[name]()


@pytest.mark.parametrize("name", list(_hyper_calls(0.5)))
@pytest.mark.parametrize("value", [1, np.int64(1), np.float32(0.5), np.array(0.5),
                                   np.array(1, np.int32)])
def test_numpy_and_python_numbers_stay_accepted_as_hyper_parameters(name, value):
    out = _hyper_calls(value)[name]()
    ref = _hyper_calls(float(value))[name]()
    np.testing.assert_array_equal(getattr(out, "loss", out), getattr(ref, "loss", ref))


# -- host and device arrays in one call (the CuPy stand-in of fake_cupy.py, or a GPU) ----------


@pytest.fixture(params=["fake", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request, monkeypatch):
    """The device's array module: real CuPy on a GPU, or the strict stand-in on the host."""
    return device_module(request.param, monkeypatch)


def _pair_and_logits():
    rng = np.random.default_rng(7)
    x1, x2 = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    return x1, x2, np.array([0, 1, 1, 0]), rng.normal(size=(4, 5)), np.array([4, 0, 2, 2])


@pytest.mark.parametrize("as_host", [np.asarray, list], ids=["numpy", "list"])
def test_host_labels_with_device_arrays_are_the_mixing_error(xp, as_host):
    """Labels, a pair's y and a backward's dy live where the float arrays do: a host one with
    device arrays (or the other way round) is the library's own mixing error, naming it;
    nothing is copied behind the caller's back."""
    x1, x2, y, logits, labels = _pair_and_logits()
    d1, d2, dlogits = xp.asarray(x1), xp.asarray(x2), xp.asarray(logits)
    with pytest.raises(TypeError, match="^y: mixed NumPy and CuPy arrays"):
        refmoco.contrastive_loss(d1, d2, as_host(y))
    with pytest.raises(TypeError, match="^labels: mixed NumPy and CuPy arrays"):
        refmoco.softmax_cross_entropy(dlogits, as_host(labels))
    _, backward = refmoco.l2_normalize(d1)
    with pytest.raises(TypeError, match="^dy: mixed NumPy and CuPy arrays"):
        backward(x2)
    # and device labels with host arrays
    with pytest.raises(TypeError, match="^y: mixed NumPy and CuPy arrays"):
        refmoco.contrastive_loss(x1, x2, xp.asarray(y))
    with pytest.raises(TypeError, match="^labels: mixed NumPy and CuPy arrays"):
        refmoco.softmax_cross_entropy(logits, xp.asarray(labels))
    _, backward = refmoco.l2_normalize(x1)
    with pytest.raises(TypeError, match="^dy: mixed NumPy and CuPy arrays"):
        backward(xp.asarray(x2))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_labels_on_the_device_give_the_host_results(xp, dtype):
    x1, x2, y, logits, labels = (a.astype(dtype) if a.dtype.kind == "f" else a
                                 for a in _pair_and_logits())
    for fn, args in ((refmoco.contrastive_loss, (x1, x2, y)),
                     (refmoco.softmax_cross_entropy, (logits, labels))):
        ref = fn(*args)
        out = fn(*(xp.asarray(a) for a in args))
        assert isinstance(out.loss, xp.ndarray)
        assert_same(out.loss, ref.loss, fn.__name__)
        for name, g in ref.grads.items():
            assert isinstance(out.grads[name], xp.ndarray), name
            assert_same(out.grads[name], g, name)
    y_ref, back_ref = refmoco.l2_normalize(x1)
    y_dev, back_dev = refmoco.l2_normalize(xp.asarray(x1))
    assert_same(y_dev, y_ref, "y")
    assert_same(back_dev(xp.asarray(x2)), back_ref(x2), "dx")


def test_empty_batches_and_mi_lower_bound_on_the_device(xp):
    out = refmoco.cpc_loss(xp.zeros((0, 5, 3)), xp.zeros((0, 5, 2)), xp.zeros((2, 3, 2)))
    assert isinstance(out.loss, xp.ndarray) and float(out.loss) == 0.0
    assert isinstance(out.grads["W"], xp.ndarray) and out.grads["W"].shape == (2, 3, 2)
    assert not bool(out.grads["W"].any())
    out = refmoco.info_nce_loss(xp.zeros((0, 4), np.float32), xp.zeros((0, 4), np.float32),
                                reduction="sum")
    assert isinstance(out.loss, xp.ndarray) and float(out.loss) == 0.0
    assert out.loss.dtype == np.float32 and out.grads["q"].shape == (0, 4)
    bound = refmoco.mi_lower_bound(xp.asarray(np.array(0.5, np.float32)), 4)
    assert isinstance(bound, xp.ndarray) and bound.shape == () and bound.dtype == np.float32
    assert float(bound) == pytest.approx(math.log(4) - 0.5, rel=1e-7)


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("layout", ["c", "transposed"])
def test_xent_backward_writes_the_label_term_in_place_whatever_the_strides(overwrite, layout):
    """``dlogits = dloss * (softmax - onehot)`` for (T, B, C) logits (CPC's shape), C-contiguous
    or a transposed view; with ``overwrite=True`` the result is the cache's own buffer."""
    from refmoco.losses.softmax import xent_backward, xent_forward

    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 3, 5))  # (T, B, C)
    buffer = np.empty((3, 4, 5)).transpose(1, 0, 2) if layout == "transposed" else np.empty_like(logits)
    buffer[...] = logits  # the layout under test; overwritten when overwrite=True
    assert buffer.flags.c_contiguous == (layout == "c")
    labels = rng.integers(0, 5, size=(4, 3))
    dlosses = rng.normal(size=(4, 3))
    _, cache = xent_forward(buffer, labels, np, overwrite=overwrite)
    got = xent_backward(dlosses, cache, np, overwrite=overwrite)
    # float64 re-derivation, row by row
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    expected = p * dlosses[..., None]
    for t in range(4):
        for b in range(3):
            expected[t, b, labels[t, b]] -= dlosses[t, b]
    np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-15)
    if overwrite:
        assert got is cache.probs
