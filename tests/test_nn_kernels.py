"""The encoder layers' Numba kernels (refmoco.kernels.nn_cpu) against the NumPy reference.

The reference (refmoco.nn.functional) is itself checked against finite differences and PyTorch in
test_nn.py; here the same inputs go through ``backend="numpy"`` and ``backend="numba"`` in one
run, over hypothesis-drawn shapes, strides, paddings, memory layouts and dtypes, and one case per
op is also checked against central differences directly."""

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from refmoco.nn import cnn_encoder
from refmoco.nn import functional as F
from refmoco.testing import assert_close, check_grad

pytest.importorskip("numba")

TOL = {np.float64: 1e-12, np.float32: 1e-5}  # relative to the largest entry of the reference
DTYPE = st.sampled_from([np.float64, np.float32])


def channels_last(a):
    """The same (N, C, ...) values with channels-last memory (what the convolutions produce)."""
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


def close(actual, expected, dtype, name):
    assert_close(actual, expected, rtol=TOL[dtype], name=name)


@st.composite
def conv_cases(draw):
    n, c, o = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 4))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride, padding = draw(st.integers(1, 3)), draw(st.integers(0, 2))
    assume(h + 2 * padding >= kh and w + 2 * padding >= kw)
    return (n, c, h, w), (o, c, kh, kw), stride, padding


@given(case=conv_cases(), dtype=DTYPE, bias=st.booleans(), last=st.booleans(),
       seed=st.integers(0, 2**16))
def test_conv2d_numba_equals_numpy(case, dtype, bias, last, seed):
    x_shape, w_shape, stride, padding = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    x = channels_last(x) if last else x
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype) if bias else None
    y_ref, c_ref = F.conv2d_forward(x, w, b, stride=stride, padding=padding)
    y, c = F.conv2d_forward(x, w, b, stride=stride, padding=padding, backend="numba")
    assert c.backend == "numba" and c_ref.backend == "numpy"
    close(y, y_ref, dtype, "y")
    assert np.moveaxis(y, 1, -1).flags.c_contiguous  # channels-last memory, as the reference
    np.testing.assert_array_equal(c.cols, c_ref.cols)  # im2col is a copy: exactly equal
    dy = channels_last(rng.standard_normal(y.shape).astype(dtype))
    for name, got, want in zip(("dx", "dw", "db"), F.conv2d_backward(dy, c),
                               F.conv2d_backward(dy, c_ref), strict=True):
        close(got, want, dtype, name)


@st.composite
def bn_cases(draw):
    ndim = draw(st.sampled_from([2, 3, 4]))
    n, c = draw(st.integers(1, 6)), draw(st.integers(1, 5))
    spatial = tuple(draw(st.integers(1, 5)) for _ in range(ndim - 2))
    shape = (n, c, *spatial)
    assume(np.prod(shape) // c >= 2)
    return shape


@given(shape=bn_cases(), dtype=DTYPE, train=st.booleans(), last=st.booleans(),
       seed=st.integers(0, 2**16), spread=st.floats(0.1, 10.0), offset=st.floats(-3.0, 3.0))
def test_batch_norm_numba_equals_numpy(shape, dtype, train, last, seed, spread, offset):
    """Values drawn with a spread: a channel with (nearly) no variance makes x_hat the rounding
    error of its mean, which float32 NumPy (pairwise sums) and the kernels (float64 sums) round
    differently."""
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = (rng.standard_normal(shape) * spread + offset).astype(dtype)
    x = channels_last(x) if last and x.ndim > 2 else x
    gamma, beta = rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)
    stats = rng.standard_normal(c).astype(dtype), (rng.random(c) + 0.5).astype(dtype)
    ref_stats = [s.copy() for s in stats]
    our_stats = [s.copy() for s in stats]
    y_ref, c_ref = F.batch_norm_forward(x, gamma, beta, *ref_stats, train=train)
    y, cache = F.batch_norm_forward(x, gamma, beta, *our_stats, train=train, backend="numba")
    dy = rng.standard_normal(shape).astype(dtype)
    # the size of the terms each result is a sum of: x_hat = x inv_std - mean inv_std carries a
    # rounding error eps * s_x; dx = gamma inv_std (dy - mean(dy) - x_hat mean(dy x_hat))
    s_x = float(np.max(np.abs(x)) * np.max(c_ref.inv_std))
    g_max, d_max, m = float(np.max(np.abs(gamma))), float(np.max(np.abs(dy))), x.size // c
    s_dx = float(np.max(np.abs(gamma * c_ref.inv_std.reshape(-1)))) * d_max * (1 + s_x * s_x)
    # the running statistics: (1 - 0.1) old + 0.1 stat, whose sum may cancel; the mean's terms
    # are of the size of x, the variance's of x^2 (unbiased: m / (m - 1))
    x_max = float(np.max(np.abs(x)))
    scales = {"y": g_max * s_x + float(np.max(np.abs(beta))), "dx": s_dx,
              "dgamma": m * d_max * s_x, "dbeta": m * d_max,
              "running_mean": float(np.max(np.abs(stats[0]))) + 0.1 * x_max,
              "running_var": float(np.max(stats[1])) + 0.1 * x_max**2 * m / max(m - 1, 1)}
    tol = TOL[dtype]
    assert_close(y, y_ref, rtol=tol, atol=tol * scales["y"], name="y")
    for name, got, want in zip(("running_mean", "running_var"), our_stats, ref_stats, strict=True):
        assert_close(got, want, rtol=tol, atol=tol * scales[name], name=name)
    for name, got, want in zip(("dx", "dgamma", "dbeta"), F.batch_norm_backward(dy, cache),
                               F.batch_norm_backward(dy, c_ref), strict=True):
        assert_close(got, want, rtol=tol, atol=tol * scales[name], name=name)


def test_numba_conv_and_batch_norm_against_finite_differences():
    """An oracle independent of the reference: a conv -> BN chain in float64."""
    rng = np.random.default_rng(3)
    inputs = {"x": rng.standard_normal((3, 2, 5, 4)), "w": rng.standard_normal((4, 2, 3, 2)),
              "b": rng.standard_normal(4), "gamma": rng.standard_normal(4),
              "beta": rng.standard_normal(4)}
    r = rng.standard_normal((3, 4, 3, 3))  # weights of the scalar loss sum(r * y)

    def fun(x, w, b, gamma, beta):
        h, c1 = F.conv2d_forward(x, w, b, stride=2, padding=1, backend="numba")
        y, c2 = F.batch_norm_forward(h, gamma, beta, np.zeros(4), np.ones(4), train=True,
                                     backend="numba")
        dh, dgamma, dbeta = F.batch_norm_backward(r, c2)
        dx, dw, db = F.conv2d_backward(dh, c1)
        return np.sum(r * y), {"x": dx, "w": dw, "b": db, "gamma": dgamma, "beta": dbeta}

    check_grad(fun, inputs, mode="elementwise")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cnn_encoder_on_numba_equals_numpy(dtype):
    """A whole forward and backward (train mode; then eval mode), dtype preserved."""
    enc = cnn_encoder(in_channels=2, widths=(4, 5, 6), out_dim=3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 2, 9, 7)).astype(dtype)
    dz = rng.standard_normal((7, 3)).astype(dtype)
    results = {}
    for backend in ("numpy", "numba"):
        params, buffers = enc.init(np.random.default_rng(1), dtype)
        z, cache = enc.forward(params, buffers, x, train=True, backend=backend)
        dx, grads = enc.backward(params, cache, dz)
        z_eval, _ = enc.forward(params, buffers, x, train=False, backend=backend)
        results[backend] = z, dx, grads.flat, z_eval, buffers
    ref, ours = results["numpy"], results["numba"]
    for name, got, want in zip(("z", "dx", "grads", "z (eval)"), ours[:4], ref[:4], strict=True):
        assert got.dtype == dtype, name
        close(got, want, dtype, name)
    for key, want in ref[4].items():
        close(np.asarray(ours[4][key]), np.asarray(want), dtype if want.dtype.kind == "f"
              else np.float64, key)


def test_a_bad_backend_is_a_value_error_and_changes_nothing():
    enc = cnn_encoder(in_channels=1, widths=(2, 2, 2), out_dim=2)
    params, buffers = enc.init(np.random.default_rng(0), "float64")
    before = {k: np.array(v) for k, v in buffers.items()}
    x = np.ones((2, 1, 6, 6))
    with pytest.raises(ValueError, match="backend"):
        enc.forward(params, buffers, x, train=True, backend="cupy")
    with pytest.raises(ValueError, match="backend"):
        enc.forward_features(params, buffers, x, train=True, backend="torch")
    with pytest.raises(ValueError, match="backend"):
        F.conv2d_forward(x, np.ones((1, 1, 3, 3)), backend="Numba")
    for k, v in before.items():
        np.testing.assert_array_equal(buffers[k], v, err_msg=k)


@given(shape=st.lists(st.integers(1, 5), min_size=2, max_size=4).map(tuple), dtype=DTYPE,
       last=st.booleans(), same=st.booleans(), seed=st.integers(0, 2**16))
def test_relu_numba_equals_numpy(shape, dtype, last, same, seed):
    """Values and memory layout of y, the mask and dx; dy in the same or another layout."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    x[..., 0] = 0.0  # the kink: no gradient at 0, as PyTorch
    x = channels_last(x) if last and x.ndim > 2 else x
    y_ref, c_ref = F.relu_forward(x)
    y, cache = F.relu_forward(x, backend="numba")
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(cache.mask, c_ref.mask)
    assert y.dtype == dtype
    assert [st_ for st_, n in zip(y.strides, shape) if n > 1] == [  # the same memory order
        st_ for st_, n in zip(y_ref.strides, shape) if n > 1]
    dy = rng.standard_normal(shape).astype(dtype)
    dy = dy if same and not last else channels_last(dy) if dy.ndim > 2 else dy
    np.testing.assert_array_equal(F.relu_backward(dy, cache), F.relu_backward(dy, c_ref))


def test_relu_numba_keeps_nan_like_numpy():
    x = np.array([[np.nan, -1.0, 2.0]], np.float32)
    y, cache = F.relu_forward(x, backend="numba")
    np.testing.assert_array_equal(y, F.relu_forward(x)[0])
    dy = np.array([[1.0, np.inf, 3.0]], np.float32)
    with np.errstate(invalid="ignore"):  # inf * 0 = nan, as the reference's product
        np.testing.assert_array_equal(F.relu_backward(dy, cache), dy * (x > 0))


# -- what the kernels do not compute: the reference's results, dtypes and errors ------------------

OTHER_DTYPES = [np.float16, np.longdouble]


def assert_same(got, want, name):
    """Bitwise the same values (NaN where NaN) and the same dtype."""
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype}, expected {want.dtype}"
    np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.parametrize("dtype", OTHER_DTYPES)
def test_conv2d_and_relu_on_numba_in_other_dtypes_are_the_reference(dtype):
    """float16 and longdouble (which Numba does not compute in) give the reference's values and
    dtypes, forward and backward, instead of a NotImplementedError or TypingError."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 5, 4)).astype(dtype)
    w = rng.standard_normal((4, 3, 3, 2)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    y_ref, c_ref = F.conv2d_forward(x, w, b, stride=2, padding=1)
    y, c = F.conv2d_forward(x, w, b, stride=2, padding=1, backend="numba")
    assert_same(y, y_ref, "y")
    dy = rng.standard_normal(y.shape).astype(dtype)
    for name, got, want in zip(("dx", "dw", "db"), F.conv2d_backward(dy, c),
                               F.conv2d_backward(dy, c_ref), strict=True):
        assert_same(got, want, name)
    r_ref, rc_ref = F.relu_forward(x)
    r, rc = F.relu_forward(x, backend="numba")
    assert_same(r, r_ref, "relu y")
    assert_same(rc.mask, rc_ref.mask, "relu mask")
    assert_same(F.relu_backward(x, rc), F.relu_backward(x, rc_ref), "relu dx")


def test_relu_backward_on_numba_with_another_dy_dtype_is_the_reference():
    x = np.array([[-1.0, 0.0, 2.0]], np.float32)
    _, cache = F.relu_forward(x, backend="numba")
    for dy in (np.ones((1, 3), np.float16), np.ones((1, 3), np.longdouble)):
        assert_same(F.relu_backward(dy, cache), dy * (x > 0), str(dy.dtype))


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_cache_is_its_output_and_the_gradient_passes_where_x_is_positive(backend, dtype):
    """The cache keeps ``y`` (no mask of its own); ``y > 0`` is ``x > 0`` at the kink, for
    both zeros, a subnormal, the infinities and NaN; the gradient is ``dy`` there, else 0."""
    x = np.array([[-1.0, -0.0, 0.0, np.finfo(dtype).smallest_subnormal, 2.0, np.inf, -np.inf,
                   np.nan]], dtype)
    y, cache = F.relu_forward(x, backend=backend)
    assert cache.y is y
    np.testing.assert_array_equal(cache.mask, x > 0)
    dy = np.array([[3.0, -3.0, 3.0, -3.0, 3.0, -3.0, 3.0, 3.0]], dtype)
    np.testing.assert_array_equal(F.relu_backward(dy, cache), np.where(x > 0, dy, 0.0))


def test_elementwise_passes_on_several_threads_give_the_bits_of_one(monkeypatch):
    """Batch norm's normalisation and input gradient and ReLU's two passes are cut into parts
    of rows on several threads from ELEMENTWISE_MIN elements a thread: elementwise, so the
    result is bitwise the one-thread result (a channels-last 4-d input, as the CNN's)."""
    from refmoco.kernels import _jit, nn_cpu

    rng = np.random.default_rng(3)
    x = channels_last(rng.standard_normal((49, 64, 16, 16)).astype(np.float32))  # > 3 * 2^18
    dy = channels_last(rng.standard_normal(x.shape).astype(np.float32))
    gamma, beta = rng.standard_normal(64).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    assert x.size // nn_cpu.ELEMENTWISE_MIN >= 3  # three parts below, none too small

    def run():
        stats = np.zeros(64, np.float32), np.ones(64, np.float32)
        y, cache = F.batch_norm_forward(x, gamma, beta, *stats, train=True, backend="numba")
        dx, dgamma, dbeta = F.batch_norm_backward(dy, cache)
        r, rc = F.relu_forward(y, backend="numba")
        return [y, cache.x_hat, *stats, dx, dgamma, dbeta, r, F.relu_backward(dx, rc)]

    monkeypatch.setattr(_jit, "num_threads", lambda: 3)
    parts = run()
    monkeypatch.setattr(nn_cpu, "ELEMENTWISE_MIN", x.size + 1)  # one part each
    for i, (a, b) in enumerate(zip(parts, run(), strict=True)):
        assert a.strides == b.strides and np.array_equal(a.view(np.uint32), b.view(np.uint32)), i


def _bn_both(x, params, *, train, dy_dtype=None):
    """Forward and backward of batch norm on both backends, each on its own copy of the
    running statistics; returns {backend: (y, running_mean, running_var, dx, dgamma, dbeta)}."""
    out = {}
    for backend in ("numpy", "numba"):
        gamma, beta, mean, var = (p.copy() for p in params)
        y, cache = F.batch_norm_forward(x, gamma, beta, mean, var, train=train, backend=backend)
        dy = np.linspace(-1, 2, y.size).reshape(y.shape).astype(dy_dtype or y.dtype)
        out[backend] = (y, mean, var, *F.batch_norm_backward(dy, cache))
    return out


NAMES = ("y", "running_mean", "running_var", "dx", "dgamma", "dbeta")


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("dtype", OTHER_DTYPES)
def test_batch_norm_on_numba_in_other_dtypes_is_the_reference(dtype, train):
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((3, 2, 4, 3)) * 2 + 1).astype(dtype)
    params = [rng.standard_normal(2).astype(dtype), rng.standard_normal(2).astype(dtype),
              rng.standard_normal(2).astype(dtype), (rng.random(2) + 0.5).astype(dtype)]
    out = _bn_both(x, params, train=train)
    for name, got, want in zip(NAMES, out["numba"], out["numpy"], strict=True):
        assert got.dtype == dtype, name
        assert_same(got, want, name)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("x_dtype, p_dtype", [(np.float32, np.float64), (np.float64, np.float32),
                                              (np.float16, np.float32)])
def test_batch_norm_on_numba_with_mixed_dtypes_is_the_reference(x_dtype, p_dtype, train):
    """float32 activations with float64 weight and statistics: the reference promotes (a float64
    y); the kernels wrote into an array like x (float32)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 3, 2, 2)).astype(x_dtype)
    params = [rng.standard_normal(3).astype(p_dtype), rng.standard_normal(3).astype(p_dtype),
              rng.standard_normal(3).astype(p_dtype), (rng.random(3) + 0.5).astype(p_dtype)]
    out = _bn_both(x, params, train=train)
    assert out["numpy"][0].dtype == np.result_type(x_dtype, p_dtype)
    check_bn(out)


def check_bn(out, tol_dtype=None):
    """The forward (y and the running statistics) bitwise the reference's; the backward too,
    or, where its cache and dy share one float32/float64 dtype (the forward's promoted one), the
    kernels' sums to rounding. Every dtype the reference's. ``tol_dtype``: everything to that
    dtype's rounding (a forward that ran the kernels)."""
    for name, got, want in zip(NAMES, out["numba"], out["numpy"], strict=True):
        if tol_dtype or name in NAMES[3:] and got.dtype in (np.float32, np.float64):
            assert got.dtype == want.dtype, name
            close(got, want, tol_dtype or got.dtype.type, name)
        else:
            assert_same(got, want, name)


def test_batch_norm_on_numba_with_one_mixed_array_or_dy_is_the_reference():
    """One float64 array among float32 ones (beta alone; the running variance alone, in eval),
    and a float64 dy for a float32 forward: the reference's promotion."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    f32 = [rng.standard_normal(3).astype(np.float32) for _ in range(3)] + [
        (rng.random(3) + 0.5).astype(np.float32)]
    for i, train in ((1, True), (3, False)):
        params = list(f32)
        params[i] = params[i].astype(np.float64)
        out = _bn_both(x, params, train=train)
        assert out["numba"][0].dtype == np.float64
        check_bn(out)
    for train in (True, False):  # the forward ran the float32 kernels: x_hat to float32 rounding
        out = _bn_both(x, f32, train=train, dy_dtype=np.float64)
        assert all(a.dtype == np.float64 for a in out["numba"][3:])
        check_bn(out, tol_dtype=np.float32)


def test_batch_norm_eval_on_numba_with_int_input_is_the_reference():
    """An int32 x with float64 statistics in evaluation: the reference computes a float64 y; the
    kernel wrote it into an int32 array (truncated)."""
    x = np.arange(-8, 8, dtype=np.int32).reshape(2, 2, 2, 2)
    params = [np.array([1.5, -0.5]), np.array([0.25, 0.0]), np.array([0.5, -1.0]),
              np.array([2.0, 0.5])]
    out = _bn_both(x, params, train=False)
    y = out["numba"][0]
    assert y.dtype == np.float64
    x_hat = (x - params[2][None, :, None, None]) / np.sqrt(params[3] + 1e-5)[None, :, None, None]
    np.testing.assert_allclose(y, params[0][None, :, None, None] * x_hat
                               + params[1][None, :, None, None], rtol=1e-15)
    check_bn(out)


@pytest.mark.parametrize("x_shape, w_shape, stride, padding, message", [
    ((1, 1, 2, 2), (1, 1, 3, 3), 1, 0, "a 3x3 kernel does not fit a 2x2 input padded by 0"),
    ((1, 1, 2, 2), (1, 1, 3, 3), 2, 0, "a 3x3 kernel does not fit a 2x2 input padded by 0"),
    ((1, 1, 1, 1), (1, 1, 4, 4), 3, 1, "a 4x4 kernel does not fit a 1x1 input padded by 1"),
    ((2, 1, 5, 2), (1, 1, 3, 5), 1, 1, "a 3x5 kernel does not fit a 5x2 input padded by 1"),
])
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_conv2d_kernel_larger_than_the_padded_input_is_a_value_error(
        x_shape, w_shape, stride, padding, message, backend):
    """The reference raised NumPy's window-view error, the Numba backend returned an empty
    (N, O, 0, 0) output: both name the argument now."""
    with pytest.raises(ValueError, match="^w: " + message):
        F.conv2d_forward(np.ones(x_shape), np.ones(w_shape), stride=stride, padding=padding,
                         backend=backend)


def test_conv2d_kernel_as_large_as_the_padded_input_is_one_window():
    for backend in ("numpy", "numba"):
        y, _ = F.conv2d_forward(np.ones((1, 1, 1, 2)), np.ones((1, 1, 3, 4)), padding=1,
                                backend=backend)
        np.testing.assert_array_equal(y, [[[[2.0]]]])  # the two pixels, inside the zero border


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_norm_eval_backward_on_numba_ignores_x(dtype):
    """In evaluation dx = dy gamma / sqrt(running_var + eps) does not depend on x: a NaN or
    infinite input pixel leaves dx finite (the kernel multiplied x_hat by a zero there), and dx
    is the reference's, bitwise."""
    x = np.ones((2, 3, 2, 2), dtype)
    x[0, 0, 0, 0], x[1, 2, 1, 0] = np.nan, np.inf
    gamma, beta = np.array([1.0, -2.0, 0.5], dtype), np.zeros(3, dtype)
    mean, var = np.zeros(3, dtype), np.array([1.0, 4.0, 0.25], dtype)
    dy = np.random.default_rng(9).standard_normal(x.shape).astype(dtype)
    _, c_ref = F.batch_norm_forward(x, gamma, beta, mean, var, train=False)
    _, cache = F.batch_norm_forward(x, gamma, beta, mean, var, train=False, backend="numba")
    dx, dgamma, dbeta = F.batch_norm_backward(dy, cache)
    expected = dy * (gamma / np.sqrt(var + dtype(1e-5)))[None, :, None, None]
    assert np.all(np.isfinite(dx))
    np.testing.assert_allclose(dx, expected, rtol=TOL[dtype])
    with np.errstate(invalid="ignore"):
        ref = F.batch_norm_backward(dy, c_ref)
    for name, got, want in zip(("dx", "dgamma", "dbeta"), (dx, dgamma, dbeta), ref, strict=True):
        if name == "dgamma":  # sum dy x_hat: not finite where x is not, as the reference
            assert np.isnan(got[0]) and got[2] == want[2] and np.isinf(got[2])
            assert got.dtype == dtype
            np.testing.assert_allclose(got[1], want[1], rtol=TOL[dtype])
        elif name == "dx":
            assert_same(got, want, name)
        else:
            np.testing.assert_allclose(got, want, rtol=TOL[dtype])
