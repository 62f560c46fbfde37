"""refmoco.nn: gradients against finite differences, PyTorch equivalence, FlatParams, models."""

import copy
import pickle
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import refmoco
from refmoco.losses import l2_normalize
from refmoco.nn import (
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    FlatParams,
    Flatten,
    GlobalAvgPool2d,
    L2Normalize,
    Layer,
    Linear,
    Model,
    ReLU,
    Sequential,
    cnn_encoder,
    mlp_encoder,
)
from refmoco.nn.functional import ReLUCache
from refmoco.optim import SGD

# relative (rel_err below), by dtype. float64 against PyTorch: measured at most 1.4e-15 for
# the layers (1000 hypothesis examples; 2.9e-16 in the CI profile's) and 8.9e-16 for the
# encoders (3 steps), 7e-17 for the convolution against loops: 1e-13 leaves 70x over the worst
# for other BLAS and PyTorch kernels' summation orders.
TOL = {np.dtype("float32"): 1e-5, np.dtype("float64"): 1e-13}
H = 1e-4  # step of the 5-point stencil below: truncation O(H**4), rounding O(eps / H)
FD_TOL = 1e-10  # relative error allowed on top of the stencil's rounding floor (check_directional)
seeds = st.integers(0, 2**32 - 1)
fast = settings(deadline=None)  # example counts come from the profile in conftest.py


def rel_err(a, b):
    """max|a - b| / max(|a| + |b|), the scale-free error every comparison reports."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(
        np.max(np.abs(a - b), initial=0.0) / max(np.max(np.abs(a) + np.abs(b), initial=0.0), 1e-300)
    )


def assert_close(actual, expected, dtype, what=""):
    err = rel_err(actual, expected)
    assert err <= TOL[np.dtype(dtype)], f"{what}: relative error {err:.3g}"


def derivative(g):
    """d/dt g(t) at t = 0 by the 5-point central stencil (error O(H**4))."""
    return (-g(2 * H) + 8 * g(H) - 8 * g(-H) + g(-2 * H)) / (12 * H)


def check_directional(phi, analytic, scale, what):
    """``phi(t) = <u, f(x + t v)>`` against ``analytic = <backward(u), v>``.

    Besides the relative ``FD_TOL``, the stencil has a rounding floor: each of its values carries
    an error of a few ulps of ``scale = sum|u * f(x)|``, divided by ``H``. Where the derivative
    cancels to near zero (batch norm of two samples), that floor is what remains.
    """
    numeric = derivative(phi)
    floor = 10 * np.finfo(np.float64).eps * scale / H
    err = abs(numeric - analytic)
    assert err <= FD_TOL * (abs(numeric) + abs(analytic)) + floor, (
        f"{what}: finite difference {numeric!r} vs backward {analytic!r} (error {err:.3g}, floor {floor:.3g})"
    )


def tangent(rng, shape):
    """A random direction of unit length (the stencil's steps then stay H long)."""
    v = rng.standard_normal(shape)
    return v / np.linalg.norm(v)


def random_state(layer, rng, dtype="float64"):
    """Parameters and buffers away from their initial values (so every term of the math counts)."""
    params = {
        k: v + rng.uniform(-0.5, 0.5, v.shape).astype(dtype)
        for k, v in layer.init_params(rng, dtype).items()
    }
    buffers = layer.init_buffers(dtype)
    for k, v in buffers.items():
        if k == "running_mean":
            v[...] = rng.standard_normal(v.shape)
        elif k == "running_var":
            v[...] = rng.uniform(0.5, 2.0, v.shape)
    return params, buffers


def check_layer_grads(layer, x, train, rng):
    """Directional finite-difference checks of dx and of every parameter gradient, float64."""
    params, buffers = random_state(layer, rng)

    def out(x_, p_):
        return layer.forward(p_, {k: v.copy() for k, v in buffers.items()}, x_, train=train)[0]

    y, cache = layer.forward(params, {k: v.copy() for k, v in buffers.items()}, x, train=train)
    u = rng.standard_normal(y.shape)  # cotangent
    scale = np.sum(np.abs(u * y))
    dx, grads = layer.backward(params, cache, u)
    assert dx.shape == x.shape and set(grads) == set(params)
    v = tangent(rng, x.shape)
    check_directional(lambda t: np.sum(u * out(x + t * v, params)), np.sum(dx * v), scale, "dx")
    for k in params:
        vk = tangent(rng, params[k].shape)
        assert grads[k].shape == params[k].shape

        def phi(t, k=k, vk=vk):
            return np.sum(u * out(x, {**params, k: params[k] + t * vk}))

        check_directional(phi, np.sum(grads[k] * vk), scale, k)


# --------------------------------------------------------------------- finite differences


@fast
@given(seeds, st.integers(1, 4), st.integers(1, 5), st.integers(1, 5), st.booleans())
def test_linear_grads(seed, n, d_in, d_out, bias):
    rng = np.random.default_rng(seed)
    check_layer_grads(Linear(d_in, d_out, bias=bias), rng.standard_normal((n, d_in)), False, rng)


@fast
@given(seeds, st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 6),
       st.integers(1, 6), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2), st.booleans())  # fmt: skip
def test_conv2d_grads(seed, n, c, o, h, w, k, stride, padding, bias):
    assume(h + 2 * padding >= k and w + 2 * padding >= k)
    rng = np.random.default_rng(seed)
    layer = Conv2d(c, o, k, stride=stride, padding=padding, bias=bias)
    check_layer_grads(layer, rng.standard_normal((n, c, h, w)), False, rng)


def test_conv2d_elementwise_against_loops():
    """A loop-by-loop convolution (padding 1, stride 2) and its elementwise gradients."""
    rng = np.random.default_rng(0)
    x, w, b = (
        rng.standard_normal((2, 2, 5, 4)),
        rng.standard_normal((3, 2, 3, 3)),
        rng.standard_normal(3),
    )
    layer, params = Conv2d(2, 3, 3, stride=2, padding=1), {"weight": w, "bias": b}
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    naive = np.zeros((2, 3, 3, 2))
    for n, o, i, j in np.ndindex(*naive.shape):
        naive[n, o, i, j] = b[o] + np.sum(w[o] * xp[n, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3])
    y, cache = layer.forward(params, {}, x)
    assert_close(y, naive, "float64", "conv forward")
    u = rng.standard_normal(y.shape)
    dx, grads = layer.backward(params, cache, u)
    for name, arr, grad in [
        ("x", x, dx),
        ("weight", w, grads["weight"]),
        ("bias", b, grads["bias"]),
    ]:
        numeric = np.zeros_like(arr)
        for idx in np.ndindex(*arr.shape):
            e = np.zeros_like(arr)
            e[idx] = 1

            def phi(t, e=e, name=name):
                xx = x + t * e if name == "x" else x
                pp = {**params, name: params[name] + t * e} if name != "x" else params
                return np.sum(u * layer.forward(pp, {}, xx)[0])

            numeric[idx] = derivative(phi)
        assert rel_err(numeric, grad) <= FD_TOL, name


@fast
@given(seeds, st.integers(2, 5), st.integers(1, 3), st.sampled_from([(), (1,), (3,), (2, 2), (1, 3)]),
       st.booleans())  # fmt: skip
def test_batch_norm_grads(seed, n, c, spatial, train):
    rng = np.random.default_rng(seed)
    layer = BatchNorm2d(c) if len(spatial) == 2 else BatchNorm1d(c)
    z = rng.standard_normal((n, c, *spatial))
    axes = (0, *range(2, z.ndim))
    z = (z - z.mean(axis=axes, keepdims=True)) / z.std(axis=axes, keepdims=True)
    # per-channel std in [0.5, 3], away from the sqrt(var + eps) singularity the stencil would feel
    channel = (1, c) + (1,) * len(spatial)
    x = rng.uniform(0.5, 3.0, channel) * z + rng.standard_normal(channel)
    check_layer_grads(layer, x, train, rng)


@fast
@given(seeds, st.sampled_from([(3, 4), (2, 3, 2, 2)]))
def test_relu_flatten_pool_l2_grads(seed, shape):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(shape)
    x = np.sign(z) * (0.1 + np.abs(z))  # 0.1 away from the kink, farther than the stencil reaches
    for layer in (ReLU(), Flatten(), L2Normalize(axis=1)):
        check_layer_grads(layer, x, True, rng)
    if len(shape) == 4:
        check_layer_grads(GlobalAvgPool2d(), x, True, rng)
        y, cache = GlobalAvgPool2d().forward({}, {}, x)
        dx, _ = GlobalAvgPool2d().backward({}, cache, np.ones_like(y))
        assert np.moveaxis(dx, 1, -1).flags.c_contiguous  # channels-last, as the convolutions'


def test_l2_normalize_layer_is_losses_l2_normalize():
    x, dy = np.random.default_rng(1).standard_normal((2, 4, 5))
    y, cache = L2Normalize(axis=-1).forward({}, {}, x)
    y_ref, back = l2_normalize(x, axis=-1)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(L2Normalize().backward({}, cache, dy)[0], back(dy))


def relu_masks(cache):
    """Every ReLU mask in a (nested) cache, to tell when a stencil step crosses a kink."""
    if isinstance(cache, ReLUCache):
        return [cache.mask]
    if isinstance(cache, tuple) and not isinstance(cache, np.ndarray):
        return [m for c in cache for m in relu_masks(c)]
    return []


@settings(deadline=None)
@given(seeds, st.sampled_from(["mlp", "cnn"]), st.booleans())
def test_encoder_grads_with_features(seed, kind, with_dh):
    """The encoder's dx and parameter gradients, with an extra gradient on the features h."""
    rng = np.random.default_rng(seed)
    if kind == "mlp":
        model, x = mlp_encoder(12, 7, 6, 5), rng.standard_normal((5, 3, 4))
    else:
        model, x = cnn_encoder(2, (3, 4), 5), rng.standard_normal((3, 2, 5, 5))
    params, buffers = model.init(rng, "float64")
    params.flat[...] += rng.uniform(-0.3, 0.3, params.size)
    z, h, cache = model.forward_features(
        params, {k: b.copy() for k, b in buffers.items()}, x, train=True
    )
    u, w = rng.standard_normal(z.shape), rng.standard_normal(h.shape) if with_dh else None
    dx, grads = model.backward_features(params, cache, u, w)
    masks = relu_masks(cache)
    scale = np.sum(np.abs(u * z)) + (np.sum(np.abs(w * h)) if with_dh else 0.0)

    def phi(x_, p_):
        z_, h_, c_ = model.forward_features(
            p_, {k: b.copy() for k, b in buffers.items()}, x_, train=True
        )
        same = all(np.array_equal(a, b) for a, b in zip(relu_masks(c_), masks, strict=True))
        assume(same)  # a stencil point across a ReLU kink: not differentiable there
        return np.sum(u * z_) + (np.sum(w * h_) if with_dh else 0.0)

    v = tangent(rng, x.shape)
    check_directional(lambda t: phi(x + t * v, params), np.sum(dx * v), scale, "dx")
    vp = params.zeros_like()
    vp.flat[...] = tangent(rng, params.size)
    moved = params.copy()

    def phi_p(t):
        moved.flat[...] = params.flat + t * vp.flat
        return phi(x, moved)

    check_directional(phi_p, np.dot(grads.flat, vp.flat), scale, "params")


# --------------------------------------------------------------------- model interface, dtypes


@pytest.mark.parametrize("make, shape", [(mlp_encoder, (6, 64)), (cnn_encoder, (4, 1, 8, 8))])
def test_float32_is_preserved_everywhere(make, shape):
    model = make()
    params, buffers = model.init(np.random.default_rng(0), "float32")
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    z, h, cache = model.forward_features(params, buffers, x, train=True)
    dx, grads = model.backward_features(params, cache, np.ones_like(z), np.ones_like(h))
    assert {z.dtype, h.dtype, dx.dtype, params.flat.dtype, grads.flat.dtype} == {
        np.dtype("float32")
    }
    assert all(b.dtype == np.float32 for k, b in buffers.items() if "num_batches" not in k)
    z_eval, _ = model.forward(params, buffers, x, train=False)
    assert z_eval.dtype == np.float32


def test_encoder_names_shapes_and_init():
    model = cnn_encoder()
    assert list(model.param_shapes())[:3] == [
        "backbone.0.weight",
        "backbone.0.bias",
        "backbone.1.weight",
    ]
    assert model.buffer_names[:3] == ("backbone.1.running_mean", "backbone.1.running_var",
                                      "backbone.1.num_batches_tracked")  # fmt: skip
    assert (model.feature_dim, model.out_dim) == (64, 128)
    p1, b1 = model.init(np.random.default_rng(3), "float64")
    p2, _ = model.init(np.random.default_rng(3), "float64")
    np.testing.assert_array_equal(p1.flat, p2.flat)
    assert not any("running" in k or "num_batches" in k for k in p1)  # buffers are not parameters
    assert np.abs(p1["backbone.3.weight"]).max() <= 1 / np.sqrt(32 * 9)  # U(+-1/sqrt(fan_in))
    assert np.abs(p1["head.2.bias"]).max() <= 1 / np.sqrt(64)
    np.testing.assert_array_equal(p1["backbone.1.weight"], 1.0)
    np.testing.assert_array_equal(b1["backbone.4.running_var"], 1.0)
    counter = b1["backbone.4.num_batches_tracked"]
    assert counter.shape == () and counter.dtype == np.int64


def test_backward_writes_or_accumulates_into_grads():
    model = mlp_encoder(10, 8, 6, 4)
    rng = np.random.default_rng(0)
    params, buffers = model.init(rng, "float64")
    (x1, x2), (u1, u2) = rng.standard_normal((2, 5, 10)), rng.standard_normal((2, 5, 4))
    _, c1 = model.forward(params, buffers, x1, train=True)
    _, c2 = model.forward(params, buffers, x2, train=True)
    g1, g2 = model.backward(params, c1, u1)[1], model.backward(params, c2, u2)[1]
    grads = params.zeros_like()
    grads.flat[...] = 7.0
    _, out = model.backward(params, c1, u1, grads=grads)  # overwrites
    assert out is grads
    np.testing.assert_array_equal(grads.flat, g1.flat)
    model.backward(params, c2, u2, grads=grads, accumulate=True)
    np.testing.assert_allclose(grads.flat, g1.flat + g2.flat, rtol=1e-14)
    with pytest.raises(ValueError, match="dout"):
        model.backward(params, c1, u1[:, :3])
    with pytest.raises(ValueError, match="grads"):
        model.backward(params, c1, u1, grads=FlatParams({"a": (3,)}, "float64"))


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_gradients_computed_into_grads_are_the_new_arrays_bitwise(kind, dtype, backend):
    """With ``grads=`` (no accumulation) the layers compute their gradients straight into its
    views; every entry is overwritten (NaN before) with the bits the copying path gives, and
    ``dx`` is the same."""
    pytest.importorskip("numba") if backend == "numba" else None
    rng = np.random.default_rng(5)
    if kind == "mlp":
        model, x = mlp_encoder(12, 7, 6, 5), rng.standard_normal((5, 3, 4))
    else:  # conv with and without bias, BatchNorm2d, pooling, the head's linears
        model, x = cnn_encoder(2, (3, 4), 5), rng.standard_normal((3, 2, 5, 5))
    params, buffers = model.init(rng, dtype)
    x = x.astype(dtype)
    z, h, cache = model.forward_features(params, buffers, x, train=True, backend=backend)
    u, w = rng.standard_normal(z.shape).astype(dtype), rng.standard_normal(h.shape).astype(dtype)
    dx_new, new = model.backward_features(params, cache, u, w)
    grads = params.zeros_like()
    grads.flat[...] = np.nan
    dx, out = model.backward_features(params, cache, u, w, grads=grads)
    assert out is grads and grads.flat.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(grads.flat, new.flat)
    np.testing.assert_array_equal(dx, dx_new)
    grads.flat[...] = np.nan  # Model.backward, through the whole Sequential
    _, out = Model.backward(model, params, cache, u, grads=grads)
    np.testing.assert_array_equal(grads.flat, model.backward(params, cache, u)[1].flat)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_without_input_grad_the_parameters_gradients_are_the_same_bits(kind, backend,
                                                                       monkeypatch):
    """``input_grad=False`` (what training asks): dx is None, the gradients are bitwise those
    with dx, written or accumulated; the first convolution's col2im is not run."""
    pytest.importorskip("numba") if backend == "numba" else None
    rng = np.random.default_rng(7)
    if kind == "mlp":  # Flatten first: skipped, and the first Linear makes no dx
        model, x = mlp_encoder(12, 7, 6, 5), rng.standard_normal((5, 3, 4))
    else:
        model, x = cnn_encoder(2, (3, 4), 5), rng.standard_normal((3, 2, 5, 5))
    params, buffers = model.init(rng, "float32")
    z, h, cache = model.forward_features(params, buffers, x.astype(np.float32), train=True,
                                         backend=backend)
    u, w = (rng.standard_normal(a.shape).astype(np.float32) for a in (z, h))
    _, want = model.backward_features(params, cache, u, w)
    scatters = []
    real = refmoco.nn.functional._gather_scatter

    def counted(b):
        im2col, col2im = real(b)
        return im2col, lambda *a: scatters.append(1) or col2im(*a)

    monkeypatch.setattr(refmoco.nn.functional, "_gather_scatter", counted)
    grads = params.zeros_like()
    grads.flat[...] = np.nan
    dx, out = model.backward_features(params, cache, u, w, grads=grads, input_grad=False)
    assert dx is None and out is grads
    np.testing.assert_array_equal(grads.flat, want.flat)
    convs = sum(isinstance(layer, Conv2d) for layer in model.backbone.layers.values())
    assert len(scatters) == max(convs - 1, 0) and convs in (0, 2)  # not the first's
    base = rng.standard_normal(params.size).astype(np.float32)
    grads.flat[...] = base
    assert model.backward(params, cache, u, grads=grads, accumulate=True, input_grad=False)[0] is None
    np.testing.assert_array_equal(grads.flat, base + model.backward(params, cache, u)[1].flat)
    dx, new = Model.backward(model, params, cache, u, input_grad=False)  # a new buffer
    assert dx is None
    np.testing.assert_array_equal(new.flat, model.backward(params, cache, u)[1].flat)


@dataclass(frozen=True)
class _Scale(Layer):
    """``y = a x`` for a learned scalar ``a``: a layer that defines ``backward`` only."""

    def param_shapes(self):
        return {"a": ()}

    def init_params(self, rng, dtype="float32"):
        return {"a": np.ones((), dtype)}

    def forward(self, params, buffers, x, *, train=False, backend=None):
        return params["a"] * x, x

    def backward(self, params, cache, dy):
        return params["a"] * dy, {"a": np.sum(dy * cache)}


def test_a_layer_without_backward_into_has_its_gradients_copied():
    model = Model(Sequential(Linear(3, 2), _Scale()))
    rng = np.random.default_rng(0)
    params, buffers = model.init(rng, "float64")
    params["1.a"][...] = 1.5
    x, u = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    y, cache = model.forward(params, buffers, x, train=True)
    grads = params.zeros_like()
    grads.flat[...] = np.nan
    dx, _ = model.backward(params, cache, u, grads=grads)
    w, b = params["0.weight"], params["0.bias"]  # the gradients written out by hand
    np.testing.assert_allclose(grads["1.a"], np.sum(u * (x @ w.T + b)), rtol=1e-14)
    np.testing.assert_allclose(grads["0.weight"], (1.5 * u).T @ x, rtol=1e-14)
    np.testing.assert_allclose(grads["0.bias"], (1.5 * u).sum(axis=0), rtol=1e-14)
    np.testing.assert_allclose(dx, 1.5 * u @ w, rtol=1e-14)


def test_grads_sharing_the_parameters_buffer_is_refused_before_anything_is_written():
    model = mlp_encoder(10, 8, 6, 4)
    rng = np.random.default_rng(0)
    params, buffers = model.init(rng, "float64")
    z, cache = model.forward(params, buffers, rng.standard_normal((5, 10)), train=True)
    before = params.flat.copy()
    for grads in (copy.copy(params), FlatParams(params.shapes, params.dtype, flat=params.flat)):
        with pytest.raises(ValueError, match="grads: shares memory with params"):
            model.backward(params, cache, np.ones_like(z), grads=grads)
    np.testing.assert_array_equal(params.flat, before)


def test_batch_norm_train_needs_two_values_and_eval_uses_running_stats():
    bn = BatchNorm1d(3)
    params, buffers = bn.init_params(None, "float64"), bn.init_buffers("float64")
    with pytest.raises(ValueError, match="x"):
        bn.forward(params, buffers, np.ones((1, 3)), train=True)
    buffers["running_mean"][...] = [1.0, 2.0, 3.0]
    y, _ = bn.forward(params, buffers, np.full((1, 3), 2.0), train=False)
    np.testing.assert_allclose(y, [[1 / np.sqrt(1 + 1e-5), 0.0, -1 / np.sqrt(1 + 1e-5)]])
    assert buffers["num_batches_tracked"] == 0


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_batch_norm_counts_training_batches_only(backend):
    """``num_batches_tracked``: +1 per training pass, in place, on every backend; not in
    evaluation, nor for a batch refused."""
    pytest.importorskip("numba") if backend == "numba" else None
    bn = BatchNorm2d(2)
    params, buffers = bn.init_params(None, "float32"), bn.init_buffers("float32")
    counter = buffers["num_batches_tracked"]
    x = np.random.default_rng(0).standard_normal((3, 2, 2, 2)).astype(np.float32)
    for _ in range(3):
        bn.forward(params, buffers, x, train=True, backend=backend)
    bn.forward(params, buffers, x, train=False, backend=backend)
    with pytest.raises(ValueError, match="x"):
        bn.forward(params, buffers, x[:1, :, :1, :1], train=True, backend=backend)
    assert buffers["num_batches_tracked"] is counter and counter.dtype == np.int64
    assert int(counter) == 3


def test_bad_configurations_name_the_argument():
    for make, name in [(lambda: Linear(0, 3), "in_features"), (lambda: Conv2d(1, 2, 3, stride=0), "stride"),
                       (lambda: Conv2d(1, 2, 3, padding=-1), "padding"), (lambda: BatchNorm2d(2, momentum=2), "momentum"),
                       (lambda: mlp_encoder().init(np.random.default_rng(0), "float16"), "dtype"),
                       (lambda: Sequential(OrderedDict([("a.b", ReLU())])), "layers")]:  # fmt: skip
        with pytest.raises(ValueError, match=name):
            make()
    with pytest.raises(ValueError, match="x"):
        Linear(3, 2).forward({"weight": np.ones((2, 3)), "bias": np.ones(2)}, {}, np.ones((4, 5)))
    with pytest.raises(TypeError, match="x"):
        model = mlp_encoder(4, 3, 3, 2)
        params, buffers = model.init(np.random.default_rng(0))
        model.forward(params, buffers, np.ones((2, 4), np.int64), train=False)


# --------------------------------------------------------------------- FlatParams


def test_flat_params_views_share_the_buffer():
    p = FlatParams({"a.weight": (2, 3), "a.bias": (2,), "b": ()}, "float32")
    assert p.size == 9 and len(p) == 3 and p.flat.dtype == np.float32
    p["a.bias"][:] = [1.0, 2.0]
    p.flat[-1] = 5.0
    np.testing.assert_array_equal(p.flat, [0, 0, 0, 0, 0, 0, 1, 2, 5])
    assert p["b"] == 5.0 and all(np.shares_memory(p[k], p.flat) for k in p)
    g = p.zeros_like()
    assert p.same_layout(g) and not np.shares_memory(g.flat, p.flat) and not g.flat.any()
    sd = p.state_dict()
    sd["a.bias"][:] = 0.0  # a copy
    assert p["a.bias"][0] == 1.0


def test_flat_params_load_state_dict_validates_before_writing():
    p = FlatParams({"w": (2, 2), "b": (2,)}, "float64")
    p.flat[...] = np.arange(6.0)
    before = p.flat.copy()
    bad = [({"w": np.ones((2, 2)), "b": np.ones(3)}, ValueError, "'b'"),
           ({"w": np.ones((2, 2))}, ValueError, "missing"),
           ({"w": np.ones((2, 2)), "b": np.ones(2), "x": np.ones(1)}, ValueError, "unexpected"),
           ({"w": np.ones((2, 2)), "b": np.ones(2, np.int64)}, TypeError, "'b'")]  # fmt: skip
    for state, error, match in bad:
        with pytest.raises(error, match=match):
            p.load_state_dict(state)
        np.testing.assert_array_equal(p.flat, before)
    p.load_state_dict({"w": np.ones((2, 2)), "b": np.ones(2), "x": 0}, strict=False)
    np.testing.assert_array_equal(p.flat, 1.0)


WHOLE_COPIES = {"deepcopy": copy.deepcopy, "pickle": lambda p: pickle.loads(pickle.dumps(p))}


@pytest.mark.parametrize("how", sorted(WHOLE_COPIES))
def test_flat_params_copied_whole_are_views_of_the_new_buffer(how):
    model = mlp_encoder(4, 3, 3, 2)
    params, buffers = model.init(np.random.default_rng(0), "float64")
    dup = WHOLE_COPIES[how](params)
    assert type(dup) is FlatParams and dup.same_layout(params) and list(dup) == list(params)
    assert not np.shares_memory(dup.flat, params.flat)
    for k in params:
        assert np.shares_memory(dup[k], dup.flat) and not np.shares_memory(dup[k], params.flat)
        np.testing.assert_array_equal(dup[k], params[k])
    before = params.flat.copy()
    dup.flat += 1.0  # reaches the copy's named arrays, not the original
    np.testing.assert_array_equal(params.flat, before)
    assert all(np.array_equal(dup[k], params[k] + 1.0) for k in params)


@pytest.mark.parametrize("how", sorted(WHOLE_COPIES))
def test_a_copied_key_encoder_trains_through_its_named_arrays(how, rng):
    """The PyTorch way to make a key encoder (``copy.deepcopy``), or a pickled one: the SGD step
    and the momentum update write ``.flat``, and the forward pass must read what they wrote."""
    model = mlp_encoder(4, 3, 3, 2)
    params, buffers = model.init(np.random.default_rng(0), "float64")
    x = rng.standard_normal((5, 4))

    def forward(p):
        return model.forward(p, {k: b.copy() for k, b in buffers.items()}, x, train=False)[0]

    def rebuilt(p):  # named arrays that are views of p.flat by construction
        return FlatParams(p.shapes, p.dtype, flat=p.flat.copy())

    query = WHOLE_COPIES[how](params)
    grads = query.zeros_like()
    grads.flat[:] = rng.standard_normal(grads.size)
    z_before = forward(query)
    SGD(0.5).step(query, grads)
    np.testing.assert_allclose(query.flat, params.flat - 0.5 * grads.flat, rtol=1e-15)
    for k in query:
        np.testing.assert_array_equal(query[k], rebuilt(query)[k])
    z_after = forward(query)
    assert not np.allclose(z_after, z_before)
    np.testing.assert_array_equal(z_after, forward(rebuilt(query)))

    key = WHOLE_COPIES[how](params)  # the key encoder starts as a copy, then follows the query
    refmoco.momentum_update(key.flat, query.flat, 0.5)  # as MoCo.step does
    np.testing.assert_allclose(key.flat, 0.5 * params.flat + 0.5 * query.flat, rtol=1e-15)
    for k in key:
        np.testing.assert_array_equal(key[k], rebuilt(key)[k])
    np.testing.assert_array_equal(forward(key), forward(rebuilt(key)))
    assert not np.allclose(forward(key), forward(params))


def test_flat_params_deepcopy_keeps_what_shares_its_buffer():
    p = FlatParams({"w": (2, 2), "b": (2,)}, "float64")
    p.flat[:] = np.arange(6.0)
    held = copy.deepcopy({"params": p, "flat": p.flat, "w": p["w"], "again": p})
    new = held["params"]
    assert held["again"] is new and held["flat"] is new.flat
    assert np.shares_memory(held["w"], new.flat)
    new.flat[:] = -1.0
    assert (held["w"] == -1.0).all() and (p.flat == np.arange(6.0)).all()
    flat_first = copy.deepcopy([p.flat, p])  # the buffer copied before the FlatParams
    assert flat_first[1].flat is flat_first[0]


def test_flat_params_shallow_copy_shares_the_buffer():
    p = FlatParams({"w": (2, 2), "b": (2,)}, "float64")
    same = copy.copy(p)
    assert same is not p and same.flat is p.flat and list(same) == list(p)
    assert all(np.shares_memory(same[k], p.flat) for k in p)
    same.flat[:] = 3.0
    assert all((p[k] == 3.0).all() for k in p)


def test_flat_params_unpickle_the_state_saved_before_getstate():
    """A FlatParams pickled by an older refmoco stored its ``__dict__``, named arrays and all:
    those load as views of the buffer too."""
    p = FlatParams({"w": (2, 2), "b": (2,)}, "float64")
    p.flat[:] = np.arange(6.0)
    old_state = copy.deepcopy(dict(vars(p)))  # as pickled: the named arrays separate arrays
    assert not np.shares_memory(old_state["_views"]["w"], old_state["flat"])
    q = FlatParams.__new__(FlatParams)
    q.__setstate__(old_state)
    assert all(np.shares_memory(q[k], q.flat) for k in q)
    np.testing.assert_array_equal(q.flat, p.flat)


def test_model_load_state_dict_is_all_or_nothing():
    model = mlp_encoder(4, 3, 3, 2)
    params, buffers = model.init(np.random.default_rng(0), "float64")
    sd = model.state_dict(params, buffers)
    assert list(sd)[:7] == ["backbone.1.weight", "backbone.1.bias", "backbone.2.weight", "backbone.2.bias",
                            "backbone.2.running_mean", "backbone.2.running_var", "backbone.2.num_batches_tracked"]  # fmt: skip
    sd = {k: v + 1 for k, v in sd.items()}
    flat, bufs = params.flat.copy(), {k: v.copy() for k, v in buffers.items()}
    for broken in (
        {**sd, "head.0.weight": np.ones((3, 2))},
        {**sd, "backbone.2.running_var": np.ones(2)},
        {**sd, "backbone.2.running_mean": np.array(["a"] * 3)},  # checked before params move
        {**sd, "backbone.2.running_var": np.ones(3) + 1j},  # complex: not silently made real
        {**sd, "backbone.2.num_batches_tracked": np.array(1.5)},
    ):
        with pytest.raises((ValueError, TypeError), match="state_dict"):
            model.load_state_dict(params, buffers, broken)
        np.testing.assert_array_equal(params.flat, flat)
        assert all(np.array_equal(buffers[k], bufs[k]) for k in bufs)
    model.load_state_dict(params, buffers, sd)
    np.testing.assert_array_equal(params.flat, flat + 1)
    assert buffers["backbone.5.num_batches_tracked"] == 1


# --------------------------------------------------------------------- PyTorch equivalence



def torch_encoder(kind, nn):
    """The two default encoders written out in torch.nn, by hand."""
    if kind == "mlp":
        backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(),
                                 nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU())  # fmt: skip
        feat = 256
    else:
        backbone = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        feat = 64
    head = nn.Sequential(nn.Linear(feat, feat), nn.ReLU(), nn.Linear(feat, 128))
    return nn.Sequential(OrderedDict(backbone=backbone, head=head))


@pytest.mark.torch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("direction", ["numpy_to_torch", "torch_to_numpy"])
def test_encoder_matches_torch(torch, kind, dtype, direction):
    tdtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    model = mlp_encoder() if kind == "mlp" else cnn_encoder()
    rng = np.random.default_rng(0)
    net = torch_encoder(kind, torch.nn).to(tdtype)
    params, buffers = model.init(rng, dtype)
    assert list(net.state_dict()) == list(model.state_dict(params, buffers))
    if direction == "numpy_to_torch":
        net.load_state_dict(
            {k: torch.from_numpy(v) for k, v in model.state_dict(params, buffers).items()}
        )
    else:
        model.load_state_dict(params, buffers, net.state_dict())
    shape = (16, 64) if kind == "mlp" else (16, 1, 8, 8)
    # three training steps (no optimizer: the gradients and the running stats are compared)
    for _ in range(3):
        x, u = (
            rng.standard_normal(shape).astype(dtype),
            rng.standard_normal((16, 128)).astype(dtype),
        )
        z, cache = model.forward(params, buffers, x, train=True)
        dx, grads = model.backward(params, cache, u)
        xt = torch.tensor(x, requires_grad=True)
        net.zero_grad()
        zt = net.train()(xt)
        zt.backward(torch.from_numpy(u))
        assert_close(z, zt.detach().numpy(), dtype, "z")
        assert_close(dx, xt.grad.numpy(), dtype, "dx")
        # One module's gradients are compared as one vector: the bias of a Linear/Conv2d feeding
        # a training-mode batch norm has a gradient that is zero up to rounding (the mean is
        # subtracted), comparable only at the scale of its weight's gradient.
        for module in {name.rsplit(".", 1)[0] for name, _ in net.named_parameters()}:
            named = [(k, p) for k, p in net.named_parameters() if k.rsplit(".", 1)[0] == module]
            ours = np.concatenate([grads[k].ravel() for k, _ in named])
            theirs = np.concatenate([p.grad.numpy().ravel() for _, p in named])
            assert_close(ours, theirs, dtype, module)
    for name, b in net.named_buffers():
        assert_close(buffers[name], b.numpy(), dtype, name)
    z_eval, _ = model.forward(params, buffers, x, train=False)
    assert_close(z_eval, net.eval()(torch.from_numpy(x)).detach().numpy(), dtype, "z (eval)")


def torch_layer(layer, nn):
    if isinstance(layer, Linear):
        return nn.Linear(layer.in_features, layer.out_features, bias=layer.bias)
    if isinstance(layer, Conv2d):
        return nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                         padding=layer.padding, bias=layer.bias)  # fmt: skip
    return {BatchNorm1d: nn.BatchNorm1d, BatchNorm2d: nn.BatchNorm2d}[type(layer)](
        layer.num_features
    )


@pytest.mark.torch
@settings(deadline=None)
@given(seeds, st.sampled_from(["float32", "float64"]), st.integers(0, 3), st.integers(1, 3),
       st.integers(0, 2), st.booleans())  # fmt: skip
def test_layers_match_torch(torch, seed, dtype, which, stride, padding, train):
    rng = np.random.default_rng(seed)
    layer, shape = [(Linear(5, 4), (3, 5)), (Conv2d(2, 3, (3, 2), stride=stride, padding=padding), (2, 2, 6, 5)),
                    (BatchNorm1d(3), (4, 3)), (BatchNorm2d(3), (2, 3, 2, 3))][which]  # fmt: skip
    params, buffers = random_state(layer, rng, dtype)
    module = torch_layer(layer, torch.nn).to(getattr(torch, dtype)).train(train)
    module.load_state_dict(
        {k: torch.from_numpy(v.copy()) for k, v in {**params, **buffers}.items()}
    )
    for _ in range(2):
        x = (2 * rng.standard_normal(shape) + 1).astype(dtype)
        y, cache = layer.forward(params, buffers, x, train=train)
        u = rng.standard_normal(y.shape).astype(dtype)
        dx, grads = layer.backward(params, cache, u)
        xt = torch.tensor(x, requires_grad=True)
        module.zero_grad()
        yt = module(xt)
        yt.backward(torch.from_numpy(u))
        assert {y.dtype, dx.dtype, *(g.dtype for g in grads.values())} == {np.dtype(dtype)}
        assert_close(y, yt.detach().numpy(), dtype, "y")
        assert_close(dx, xt.grad.numpy(), dtype, "dx")
        for k, p in module.named_parameters():
            assert_close(grads[k], p.grad.numpy(), dtype, k)
    for k, b in module.named_buffers():
        assert_close(buffers[k], b.numpy(), dtype, k)


@pytest.mark.parametrize("shape", [(3, 5), (3, 5, 7), (2, 5, 3, 4)])
@pytest.mark.parametrize("last", [False, True])
def test_channel_rows_is_moveaxis_and_from_channel_rows_its_inverse(shape, last):
    """channel_rows moves axis 1 last (a view for channels-last memory and 2-d arrays) and
    from_channel_rows undoes it with channels-last memory: the strides of ``np.moveaxis``."""
    from refmoco.nn.functional import channel_rows, from_channel_rows

    x = np.random.default_rng(0).random(shape)
    if last:
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    rows = channel_rows(x)
    expected = np.ascontiguousarray(np.moveaxis(x, 1, -1)).reshape(-1, shape[1])
    assert rows.flags.c_contiguous and np.array_equal(rows, expected)
    assert np.shares_memory(rows, x) == (last or len(shape) == 2)
    back = from_channel_rows(rows, shape)
    assert np.array_equal(back, x) and np.shares_memory(back, rows)
    assert back.strides == np.moveaxis(rows.reshape(shape[0], *shape[2:], shape[1]), -1, 1).strides
