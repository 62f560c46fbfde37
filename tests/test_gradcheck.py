"""refmoco.testing's oracles never pass a wrong result: ``assert_close`` with infinities, NaN,
integers, complex numbers and tensors that refmoco widens; ``check_grad`` with NaN gradients or
losses and with arguments that would leave nothing to check."""

import math
import re

import numpy as np
import pytest

from refmoco.testing import assert_close, check_grad, default_tolerance

INF = np.inf


def differs(match=None):
    return pytest.raises(AssertionError, match=match)


# -- assert_close: non-finite entries ----------------------------------------------------------
def masked_logits(n=4, seed=0):
    """Logits with the diagonal masked to -inf (a sample is not its own negative)."""
    x = np.random.default_rng(seed).normal(size=(n, n))
    np.fill_diagonal(x, -INF)
    return x


def test_a_wrong_finite_entry_next_to_infinities_is_caught():
    expected = np.array([[-INF, 1.0], [1.0, -INF]])
    with differs(r"2 of 4 entries differ; worst at \(0, 1\): np.float64\(100.0\) vs expected "
                 r"np.float64\(1.0\) .*scale=1.0\)"):
        assert_close(np.array([[-INF, 100.0], [-5.0, -INF]]), expected)


def test_masked_logits_agree_only_where_every_entry_does():
    expected = masked_logits()
    assert_close(expected.copy(), expected)
    wrong = expected.copy()
    wrong[2, 1] += 1e-6 * abs(wrong[2, 1])  # far above float64 round-off
    with differs(r"1 of 16 entries differ; worst at \(2, 1\)"):
        assert_close(wrong, expected)
    unmasked = expected.copy()
    unmasked[3, 3] = 0.0  # a mask forgotten
    with differs(r"worst at \(3, 3\): np.float64\(0.0\) vs expected np.float64\(-inf\)"):
        assert_close(unmasked, expected)


def test_the_scale_is_that_of_the_finite_entries():
    expected = np.array([-INF, 1.0, 2.0])
    # rtol = 1e-12 of max|finite| = 2: an error of 1e-12 passes, one of 1e-11 does not.
    assert_close(np.array([-INF, 1.0 + 1e-12, 2.0]), expected)
    with differs(r"scale=2.0\)"):
        assert_close(np.array([-INF, 1.0 + 1e-11, 2.0]), expected)
    with differs("scale=0.0"):  # no finite entry: the tolerance is atol alone
        assert_close(np.array([INF, 1.0]), np.array([INF, INF]))


@pytest.mark.parametrize("actual, expected", [
    ([1.0], [INF]),
    ([INF], [1.0]),
    ([INF], [-INF]),
    ([-INF], [INF]),
    ([np.nan], [INF]),
    ([INF], [np.nan]),
    ([np.nan], [1.0]),
    ([1.0], [np.nan]),
    ([1e308, -INF], [1e308, INF]),
])
def test_non_finite_entries_must_match_exactly(actual, expected):
    with differs(r"1 of \d entries differ"):
        assert_close(np.array(actual), np.array(expected))


def test_matching_infinities_and_nans_agree():
    assert_close(np.array([INF, -INF, np.nan, 3.0]), np.array([INF, -INF, np.nan, 3.0]))
    assert_close(np.float32([-INF, 1.0]), np.float32([-INF, 1.0]))


def test_a_non_finite_mismatch_is_shown_before_a_larger_finite_one():
    with differs(r"2 of 3 entries differ; worst at \(2,\): np.float64\(nan\) vs expected "
                 r"np.float64\(0.0\)"):
        assert_close(np.array([1e300, 0.0, np.nan]), np.array([0.0, 0.0, 0.0]))


def test_overflowing_differences_are_differences_and_warn_nothing():
    with np.errstate(all="raise"):
        with differs("1 of 1 entries differ"):
            assert_close(np.array([1.7e308]), np.array([-1.7e308]))
        with differs("1 of 2 entries differ"):
            assert_close(np.array([INF, 1.0]), np.array([-INF, 1.0]))


# -- assert_close: integers, booleans, complex numbers ------------------------------------------
def test_integer_arrays_are_compared_exactly():
    assert_close(np.array([1, 2, 3]), np.array([1, 2, 3]))
    with differs(r"1 of 3 entries differ; worst at \(1,\): np.int64\(2\) vs expected "
                 r"np.int64\(5\) \(atol=0.0, rtol=0.0"):
        assert_close(np.array([1, 2, 3]), np.array([1, 5, 3]))
    big = 2**53  # float64 cannot tell big from big + 1
    with differs("1 of 1 entries differ"):
        assert_close(np.array([big + 1]), np.array([big]))
    with differs("1 of 1 entries differ"):
        assert_close(np.array([2**64 - 1], dtype=np.uint64), np.array([-1]), check_dtype=False)
    with differs(r"worst at \(0, 1\)"):
        assert_close(np.array([[7, 8]], dtype=np.int8), np.array([[7, 9]], dtype=np.int8))


def test_boolean_arrays_are_compared_exactly():
    assert_close(np.array([True, False]), np.array([True, False]))
    with differs(r"1 of 2 entries differ; worst at \(1,\)"):
        assert_close(np.array([True, True]), np.array([True, False]))


def test_integer_tolerances_when_asked_for():
    assert_close(np.array([1, 2]), np.array([1, 3]), atol=1)
    with differs(r"worst at \(1,\)"):
        assert_close(np.array([1, 2]), np.array([1, 4]), atol=1)


def test_integers_against_floats_use_the_float_tolerance():
    assert_close(np.array([1, 2]), np.array([1.0, 2.0]), check_dtype=False)
    with differs("dtype int64 != expected float64"):
        assert_close(np.array([1, 2]), np.array([1.0, 2.0]))
    with differs(r"rtol=1e-12"):
        assert_close(np.array([1, 2]), np.array([1.0, 2.5]), check_dtype=False)


def test_default_tolerance_of_each_kind():
    assert default_tolerance(np.float64) == 1e-12
    assert default_tolerance("float32") == 100 * 2.0**-23
    assert default_tolerance(np.float16) == 100 * 2.0**-10
    for dtype in (np.int64, np.int8, np.uint32, bool):
        assert default_tolerance(dtype) == 0.0
    for dtype in (np.complex128, object, str):
        with pytest.raises(TypeError, match="^dtype: "):
            default_tolerance(dtype)
    with pytest.raises(TypeError, match="^dtype: not a NumPy dtype"):
        default_tolerance("floaty")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    with pytest.raises(TypeError, match="^dtype: bfloat16 has no tolerance of its own"):
        default_tolerance(ml_dtypes.bfloat16)


@pytest.mark.parametrize("actual, expected, arg", [
    (np.array([1j]), np.array([2j]), "actual"),
    (np.array([1.0]), np.array([1.0 + 0j]), "expected"),
    (np.array([1 + 1j]), np.array([1 + 1j]), "actual"),
])
def test_complex_arrays_are_a_type_error_naming_the_argument(actual, expected, arg):
    with pytest.raises(TypeError, match=f"^{arg}: complex dtype complex128"):
        assert_close(actual, expected, check_dtype=False)


def test_non_numeric_arrays_are_a_type_error():
    with pytest.raises(TypeError, match="^actual: expected a real float, integer or boolean"):
        assert_close(np.array(["1.0"]), np.array([1.0]), check_dtype=False)
    with pytest.raises(TypeError, match="^expected: expected a real float"):
        assert_close(np.array([1.0]), np.array([1.0], dtype=object), check_dtype=False)


@pytest.mark.parametrize("kwargs, arg", [
    ({"atol": np.nan}, "atol"), ({"atol": -1e-9}, "atol"), ({"atol": INF}, "atol"),
    ({"rtol": np.nan}, "rtol"), ({"rtol": -1.0}, "rtol"), ({"rtol": INF}, "rtol"),
])
def test_a_tolerance_that_accepts_everything_is_refused(kwargs, arg):
    with pytest.raises(ValueError, match=f"^{arg}: expected a finite number >= 0"):
        assert_close(np.array([1.0]), np.array([5.0]), **kwargs)


@pytest.mark.parametrize("bad", ["0.1", True, 1j])
def test_tolerances_follow_the_library_s_number_rule(bad):
    """As every hyper-parameter of refmoco: a str, bool or complex is a TypeError naming it."""
    with pytest.raises(TypeError, match="^rtol: "):
        assert_close(np.array([1.0]), np.array([1.0]), rtol=bad)
    with pytest.raises(TypeError, match="^eps: "):
        check_grad(with_grad(lambda x: 2 * x + 1.0), X, eps=bad)


def test_the_documented_message_is_unchanged():
    """docs/check-your-implementation.md shows this message for a 0-d loss."""
    with differs(re.escape("loss: 1 of 1 entries differ; worst at (): np.float64(8.5) vs "
                           "expected np.float64(8.75) (atol=0.0, rtol=1e-12, scale=8.75)")):
        assert_close(np.float64(8.5), np.float64(8.75), name="loss")


# -- assert_close: the dtypes of tensors, before refmoco widens them -----------------------------
def test_a_float16_tensor_is_float16_for_check_dtype():
    torch = pytest.importorskip("torch")
    with differs("dtype float16 != expected float32"):
        assert_close(torch.tensor([1.0], dtype=torch.float16), np.float32([1.0]))
    with differs("dtype bfloat16 != expected float32"):
        assert_close(torch.tensor([1.0], dtype=torch.bfloat16), np.float32([1.0]))
    with differs("dtype float32 != expected float16"):
        assert_close(np.float32([1.0]), torch.tensor([1.0], dtype=torch.float16))
    assert_close(torch.tensor([1.0], dtype=torch.float16), np.float16([1.0]))
    assert_close(torch.tensor([1.0], dtype=torch.float16), np.float32([1.0]), check_dtype=False)
    assert_close(torch.tensor([1.0], dtype=torch.float64), np.float64([1.0]))
    assert_close(torch.tensor([3, 4]), np.array([3, 4]))
    with differs(r"1 of 2 entries differ; worst at \(1,\)"):
        assert_close(torch.tensor([3, 4]), np.array([3, 5]))
    with pytest.raises(TypeError, match="^actual: complex"):
        assert_close(torch.tensor([1j]), np.array([1.0]), check_dtype=False)


def test_a_float16_tensor_has_float16_s_tolerance_as_a_float16_array_does():
    torch = pytest.importorskip("torch")
    expected = np.float32(2.279052257537842)  # a float32 reference; the result rounded to float16
    for actual in (torch.tensor(float(expected)).half(), np.float16(expected)):
        assert_close(actual, expected, check_dtype=False)
    with differs(r"rtol=0.0976"):  # float16's tolerance, as the array's: a real error still fails
        assert_close(torch.tensor(3.0).half(), expected, check_dtype=False)


def test_a_bfloat16_jax_array_is_bfloat16_for_check_dtype():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    with differs("dtype bfloat16 != expected float32"):
        assert_close(jnp.array([1.0], dtype=jnp.bfloat16), np.float32([1.0]))
    with differs("dtype float16 != expected float32"):
        assert_close(jnp.array([1.0], dtype=jnp.float16), np.float32([1.0]))
    assert_close(jnp.array([1.0], dtype=jnp.float32), np.float32([1.0]))
    bf16 = jnp.array([1.0, 2.0], dtype=jnp.bfloat16)
    assert_close(bf16, np.asarray(bf16))  # an ml_dtypes NumPy array: same dtype, same values
    with differs(r"rtol=1.19\d*e-05"):  # compared in float32, with float32's tolerance
        assert_close(bf16, np.asarray(bf16 * 1.0078125))
    with differs(r"worst at \(1,\)"):
        assert_close(bf16, np.asarray(jnp.array([1.0, 3.0], dtype=jnp.bfloat16)))


# -- assert_close: results smaller than the terms they come from ---------------------------------
def aligned_moco_step(torch, dtype, seed, T=0.05, N=8, C=32, K=256, temperature=None):
    """MoCo's loss at a small temperature with every key equal to its query (a trained encoder):
    the loss and its gradients are near 0, differences of terms of size 1/T and 1/(N T)."""
    F = torch.nn.functional
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(N, C, dtype=dtype, generator=g), dim=1).requires_grad_()
    k = q.detach().clone().requires_grad_()
    queue = F.normalize(torch.randn(K, C, dtype=dtype, generator=g), dim=1).requires_grad_()
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / (temperature or T)
    loss = F.cross_entropy(logits, torch.zeros(N, dtype=torch.long))
    loss.backward()
    return loss.detach(), {"q": q.grad, "k": k.grad, "negatives": queue.grad}, (q, k, queue)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_documented_scales_pass_correct_code_and_fail_a_small_bug(torch, dtype):
    """docs/check-your-implementation.md compares a loss with ``scale=1/T`` and its gradients
    with ``scale=1/(N*T)``. At T = 0.05 with aligned keys the loss is ~1e-4 and the default
    (relative to the result) fails correct float64 code; with the scales it passes, while a
    temperature off by one part in a million still fails."""
    import refmoco

    T, N = 0.05, 8
    dt = getattr(torch, dtype)
    for seed in range(3):
        loss, grads, (q, k, queue) = aligned_moco_step(torch, dt, seed, T=T, N=N)
        ref = refmoco.info_nce_loss(q, k, queue, temperature=T)
        assert_close(loss, ref.loss, scale=1 / T, name="loss")
        for name, g in grads.items():
            assert_close(g, ref.grads[name], scale=1 / (N * T), name=name)
        if dtype == "float64":
            bug_loss, bug_grads, _ = aligned_moco_step(torch, dt, seed, T=T, N=N,
                                                       temperature=T * (1 + 1e-6))
            with differs("^loss: 1 of 1 entries differ"):
                assert_close(bug_loss, ref.loss, scale=1 / T, name="loss")
            with differs("^dq: "):
                assert_close(bug_grads["q"], ref.grads["q"], scale=1 / (N * T), name="dq")
    with differs("^loss: 1 of 1 entries differ"):  # without the scale: relative to the loss
        assert_close(loss, ref.loss, name="loss")


def test_the_scale_is_a_floor_of_the_largest_expected_entry():
    assert_close(np.array([1e-4 + 1e-12]), np.array([1e-4]), scale=1.0)
    with differs(r"scale=0.0001\)"):
        assert_close(np.array([1e-4 + 1e-12]), np.array([1e-4]), scale=1e-4 / 10)
    with differs(r"scale=3.0\)"):  # never below max|expected|: no loosening of large results
        assert_close(np.array([3.0 + 1e-10]), np.array([3.0]), scale=1e-3)
    for bad in (-1.0, np.nan, INF):
        with pytest.raises(ValueError, match="^scale: expected a finite number >= 0"):
            assert_close(np.array([1.0]), np.array([1.0]), scale=bad)


# -- check_grad ----------------------------------------------------------------------------------
def square(x):
    return float(np.sum(x**2)), {"x": 2 * x}


def with_grad(g):
    return lambda x: (float(np.sum(x**2)), {"x": g(x)})


X = {"x": np.array([0.5, -1.0, 2.0])}


def test_a_right_gradient_passes_and_a_wrong_one_fails():
    assert check_grad(square, X).max_rel_error < 1e-8
    with differs("relative errors {'x'"):
        check_grad(with_grad(lambda x: 2 * x + 1e-3), X)


@pytest.mark.parametrize("bad", [np.nan, INF, -INF])
@pytest.mark.parametrize("mode", ["directional", "elementwise"])
def test_a_non_finite_gradient_fails(bad, mode):
    def grad(x):
        g = 2 * x
        g[1] = bad
        return g

    with differs(r"relative errors {'x': inf}"):
        check_grad(with_grad(grad), X, mode=mode)
    report = check_grad(with_grad(grad), X, mode=mode, raise_on_failure=False)
    assert report.max_rel_error == INF and report.errors == {"x": INF}


def test_a_non_finite_loss_fails():
    def nan_loss(x):
        return math.nan, {"x": 2 * x}

    with differs("a loss of nan at inputs"):
        check_grad(nan_loss, X)
    assert check_grad(nan_loss, X, raise_on_failure=False).errors == {"x": INF}
    with differs("a loss of inf"):
        check_grad(lambda x: (math.inf, {"x": 2 * x}), X)


def test_a_finite_difference_that_is_nan_fails():
    def nan_off_the_point(x):  # finite at x, NaN at x +- eps v
        loss = float(np.sum(x**2)) if np.array_equal(x, X["x"]) else math.nan
        return loss, {"x": 2 * x}

    with differs(r"relative errors {'x': inf}"):
        check_grad(nan_off_the_point, X)


def test_nothing_to_check_is_an_error_not_a_pass():
    with pytest.raises(ValueError, match="^fun: returned no gradients"):
        check_grad(lambda x: (float(np.sum(x)), {}), X)
    with pytest.raises(ValueError, match="^wrt: nothing to check"):
        check_grad(square, X, wrt=())
    with pytest.raises(ValueError, match="^num_directions: expected an integer >= 1"):
        check_grad(square, X, num_directions=0)


@pytest.mark.parametrize("kwargs, arg", [
    ({"rtol": 0.0}, "rtol"), ({"rtol": np.nan}, "rtol"), ({"rtol": INF}, "rtol"),
    ({"eps": 0.0}, "eps"), ({"eps": -1e-6}, "eps"), ({"eps": np.nan}, "eps"),
    ({"tiny": INF}, "tiny"), ({"tiny": 0.0}, "tiny"),
])
def test_a_setting_that_hides_every_error_is_refused(kwargs, arg):
    with pytest.raises(ValueError, match=f"^{arg}: expected a finite number > 0"):
        check_grad(with_grad(lambda x: 2 * x + 1.0), X, **kwargs)


def test_wrt_names_one_argument_as_a_string():
    def two(xy, z):
        return float(np.sum(xy**2) + np.sum(z**3)), {"xy": 2 * xy, "z": 0 * z}

    inputs = {"xy": np.array([1.0, 2.0]), "z": np.array([1.0])}
    assert set(check_grad(two, inputs, wrt="xy").errors) == {"xy"}
    with differs("relative errors {'z'"):
        check_grad(two, inputs, wrt="z")


def test_wrt_must_name_a_float_array_of_the_inputs():
    def with_t(x, t):
        return float(np.sum(x**2) / t), {"x": 2 * x / t, "t": -np.sum(x**2) / t**2}

    with pytest.raises(ValueError, match=r"^wrt: 't' is not a float array of inputs"):
        check_grad(with_t, {"x": X["x"], "t": 0.5})
    with pytest.raises(ValueError, match=r"^wrt: fun returned no gradient for 'y'"):
        check_grad(square, X, wrt=("y",))


@pytest.mark.parametrize("rtol", [1.0, 2.0, 1e6])
def test_an_rtol_that_accepts_any_gradient_is_refused(rtol):
    with pytest.raises(ValueError, match=r"^rtol: expected a number < 1"):
        check_grad(with_grad(lambda x: -50 * x), X, rtol=rtol)


@pytest.mark.parametrize("tiny", [1e300, 1e7])
def test_a_tiny_that_accepts_errors_of_the_loss_s_size_is_refused(tiny):
    with pytest.raises(ValueError, match=r"^tiny: .* as large as the loss"):
        check_grad(with_grad(lambda x: -50 * x), X, tiny=tiny)
    check_grad(square, X, tiny=1e-3)  # a floor below the derivatives' size is accepted


def test_what_fun_returns_is_named_when_it_cannot_be_checked():
    with differs(r"^grads\['x'\]: None, no gradient"):
        check_grad(lambda x: (float(np.sum(x**2)), {"x": None}), X)
    with pytest.raises(TypeError, match=r"^fun: returned a loss of shape \(3,\); the gradient "
                                        r"check needs a scalar"):
        check_grad(lambda x: (x**2, {"x": 2 * x}), X)
    with pytest.raises(TypeError, match=r"^fun: expected it to return \(loss, grads\)"):
        check_grad(lambda x: float(np.sum(x**2)), X)
    with pytest.raises(TypeError, match=r"^fun: expected grads .* to be a dict"):
        check_grad(lambda x: (float(np.sum(x**2)), 2 * x), X)
