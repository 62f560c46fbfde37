"""refmoco.nn.gru: a loop transcription of the equations, finite differences, torch.nn.GRU, and
the same code on CuPy arrays (a GPU, or the stand-in of ``fake_cupy.py``) against NumPy."""

import numpy as np
import pytest
from fake_cupy import assert_same, device_module
from hypothesis import given, settings
from hypothesis import strategies as st

from refmoco.nn.gru import (
    GRU,
    gru_backward,
    gru_cell_backward,
    gru_cell_forward,
    gru_forward,
)
from refmoco.testing import assert_close, check_grad, default_tolerance

NAMES = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
seeds = st.integers(0, 2**32 - 1)
dims = st.integers(1, 4)
fast = settings(deadline=None)  # example counts come from the profile in conftest.py


def random_params(rng, i, h, dtype="float64", scale=0.8):
    """Weights larger than PyTorch's init, so the gates leave their linear range."""
    shapes = GRU(i, h).param_shapes()
    return {k: (scale * rng.standard_normal(s)).astype(dtype) for k, s in shapes.items()}


def naive_gru(x, h0, p):
    """PyTorch's documented equations, one gate and one sample at a time, in float64."""
    w_ih, w_hh, b_ih, b_hh = (np.asarray(p[k], np.float64) for k in NAMES)
    n_batch, t_len, _ = x.shape
    hs = w_hh.shape[1]
    W = {g: (w_ih[k * hs : (k + 1) * hs], w_hh[k * hs : (k + 1) * hs],
             b_ih[k * hs : (k + 1) * hs], b_hh[k * hs : (k + 1) * hs])
         for k, g in enumerate("rzn")}  # fmt: skip
    out = np.zeros((n_batch, t_len, hs))
    for b in range(n_batch):
        h = np.array(h0[b], np.float64)
        for t in range(t_len):
            xt = np.asarray(x[b, t], np.float64)
            r = 1 / (1 + np.exp(-(W["r"][0] @ xt + W["r"][2] + W["r"][1] @ h + W["r"][3])))
            z = 1 / (1 + np.exp(-(W["z"][0] @ xt + W["z"][2] + W["z"][1] @ h + W["z"][3])))
            n = np.tanh(W["n"][0] @ xt + W["n"][2] + r * (W["n"][1] @ h + W["n"][3]))
            h = (1 - z) * n + z * h
            out[b, t] = h
    return out


@fast
@given(seeds, dims, dims, dims, st.integers(1, 5))
def test_forward_matches_loop_transcription(seed, n, i, h, t):
    rng = np.random.default_rng(seed)
    p = random_params(rng, i, h)
    x, h0 = rng.standard_normal((n, t, i)), rng.standard_normal((n, h))
    out, _ = gru_forward(x, h0, *(p[k] for k in NAMES))
    assert_close(out, naive_gru(x, h0, p), name="out")


@fast
@given(seeds, dims, dims, dims, st.integers(1, 4))
def test_bptt_matches_finite_differences(seed, n, i, h, t):
    """Directional central differences of <u, out> + <v, h_T> for x, h0 and every parameter."""
    rng = np.random.default_rng(seed)
    p = random_params(rng, i, h)
    u, v = rng.standard_normal((n, t, h)), rng.standard_normal((n, h))

    def fun(x, h0, weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0):
        out, cache = gru_forward(x, h0, weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0)
        grads = gru_backward(u, cache, dh_last=v)
        loss = np.sum(u * out) + np.sum(v * out[:, -1])
        return loss, dict(zip(("x", "h0", *NAMES), grads, strict=True))

    inputs = {"x": rng.standard_normal((n, t, i)), "h0": rng.standard_normal((n, h)), **p}
    check_grad(fun, inputs, rtol=1e-7, seed=seed % 1000)


def test_bptt_elementwise_finite_differences(rng):
    """Every entry of every gradient, on one small case with a long-ish sequence (T = 6)."""
    n, i, h, t = 2, 3, 2, 6
    p = random_params(rng, i, h)
    u = rng.standard_normal((n, t, h))

    def fun(x, h0, **params):
        out, cache = gru_forward(x, h0, *(params[k] for k in NAMES))
        return np.sum(u * out), dict(zip(("x", "h0", *NAMES), gru_backward(u, cache), strict=True))

    inputs = {"x": rng.standard_normal((n, t, i)), "h0": rng.standard_normal((n, h)), **p}
    report = check_grad(fun, inputs, mode="elementwise", rtol=1e-7)
    assert set(report.errors) == {"x", "h0", *NAMES}


def test_gradient_reaches_the_first_step(rng):
    """A loss on the last output only still has a gradient for x at t = 0 (through time)."""
    p = random_params(rng, 2, 3)
    x = rng.standard_normal((1, 5, 2))
    out, cache = gru_forward(x, None, *(p[k] for k in NAMES))
    dout = np.zeros_like(out)
    dout[:, -1] = 1.0
    dx = gru_backward(dout, cache)[0]
    assert np.all(np.abs(dx[0, 0]) > 0)


@fast
@given(seeds, dims, dims, dims)
def test_cell_is_one_step_of_the_sequence(seed, n, i, h):
    rng = np.random.default_rng(seed)
    p = random_params(rng, i, h)
    x, h0, dh = rng.standard_normal((n, i)), rng.standard_normal((n, h)), rng.standard_normal((n, h))
    h1, cell_cache = gru_cell_forward(x, h0, *(p[k] for k in NAMES))
    out, cache = gru_forward(x[:, None], h0, *(p[k] for k in NAMES))
    assert_close(h1, out[:, 0], name="h1")
    for a, b in zip(gru_cell_backward(dh, cell_cache), gru_backward(dh[:, None], cache), strict=True):
        assert_close(a, b.reshape(a.shape), name="grad")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtype_preserved(rng, dtype):
    layer = GRU(3, 4)
    p = layer.init_params(rng, dtype)
    x = rng.standard_normal((2, 5, 3)).astype(dtype)
    out, cache = layer.forward(p, {}, x)
    dx, grads = layer.backward(p, cache, np.ones_like(out))
    assert out.dtype == dx.dtype == np.dtype(dtype)
    assert all(g.dtype == np.dtype(dtype) and g.shape == p[k].shape for k, g in grads.items())


def test_layer_names_shapes_init_and_errors(rng):
    layer = GRU(5, 7)
    assert layer.param_shapes() == {
        "weight_ih_l0": (21, 5), "weight_hh_l0": (21, 7), "bias_ih_l0": (21,), "bias_hh_l0": (21,)
    }  # fmt: skip
    p = layer.init_params(rng, "float64")
    assert all(np.all(np.abs(v) <= 1 / np.sqrt(7)) for v in p.values())
    with pytest.raises(ValueError, match="x"):
        layer.forward(p, {}, rng.standard_normal((2, 3, 4)))
    with pytest.raises(ValueError, match="hidden_size"):
        GRU(3, 0)


# ---------------------------------------------------------------------------------- PyTorch



@pytest.mark.torch
@fast
@given(seeds, dims, dims, dims, st.integers(1, 5), st.sampled_from(["float32", "float64"]))
def test_matches_torch_gru_with_copied_weights(torch, seed, n, i, h, t, dtype):
    """Outputs, h_n and every gradient (x, h0, parameters) against autograd, both dtypes."""
    rng = np.random.default_rng(seed)
    layer = GRU(i, h)
    p = layer.init_params(rng, dtype)
    x = rng.standard_normal((n, t, i)).astype(dtype)
    h0 = rng.standard_normal((n, h)).astype(dtype)
    u, v = rng.standard_normal((n, t, h)).astype(dtype), rng.standard_normal((n, h)).astype(dtype)

    ref = torch.nn.GRU(i, h, batch_first=True).to(getattr(torch, dtype))
    ref.load_state_dict({k: torch.from_numpy(a.copy()) for k, a in p.items()})
    xt = torch.from_numpy(x.copy()).requires_grad_()
    h0t = torch.from_numpy(h0.copy())[None].requires_grad_()
    out_t, hn_t = ref(xt, h0t)
    ((out_t * torch.from_numpy(u)).sum() + (hn_t[0] * torch.from_numpy(v)).sum()).backward()

    out, cache = gru_forward(x, h0, *(p[k] for k in NAMES))
    dx, dh0, *dparams = gru_backward(u, cache, dh_last=v)
    # Rounding is relative to the terms, not to a result that cancels: each state is a convex
    # combination of tanh values and h0, so states are judged on the scale max(1, |h0|), and the
    # gradient as one vector over all the inputs (x, h0, parameters) of the scalar loss.
    tol = default_tolerance(dtype)
    atol = tol * max(1.0, float(np.max(np.abs(h0))))
    assert_close(out, out_t.detach().numpy(), atol=atol, name="out")
    assert_close(out[:, -1], hn_t[0].detach().numpy(), atol=atol, name="h_n")
    named = dict(ref.named_parameters())
    ours = np.concatenate([a.ravel() for a in (dx, dh0, *dparams)])
    theirs = np.concatenate([a.numpy().ravel() for a in
                             (xt.grad, h0t.grad[0], *(named[k].grad for k in NAMES))])  # fmt: skip
    assert_close(ours, theirs, name="gradient (x, h0, parameters)")


@pytest.mark.torch
def test_state_dict_round_trip_with_torch(torch, rng):
    """PyTorch's initialised weights load into the layer and give PyTorch's output."""
    ref = torch.nn.GRU(3, 4, batch_first=True).double()
    p = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    assert list(p) == list(GRU(3, 4).param_shapes())
    x = rng.standard_normal((2, 6, 3))
    out, _ = GRU(3, 4).forward(p, {}, x)
    assert_close(out, ref(torch.from_numpy(x))[0].detach().numpy(), name="out")


# ---------------------------------------------------------------------------------- on the device


@pytest.fixture(params=["fake", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request, monkeypatch):
    """The device's array module: real CuPy on a GPU, or the strict stand-in on the host."""
    return device_module(request.param, monkeypatch)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_on_the_device_equals_numpy(xp, dtype):
    """Sequence, cell and layer, forward and backward, with an initial state and a gradient of
    the final state: the device results equal NumPy's, stay on the device and keep the dtype."""
    rng = np.random.default_rng(0)
    n, i, h, t = 3, 4, 5, 6
    p = random_params(rng, i, h, dtype)
    x, h0 = rng.standard_normal((n, t, i)).astype(dtype), rng.standard_normal((n, h)).astype(dtype)
    u, v = rng.standard_normal((n, t, h)).astype(dtype), rng.standard_normal((n, h)).astype(dtype)
    layer = GRU(i, h)
    results = []
    for move in (np.asarray, xp.asarray):
        w = [move(p[k]) for k in NAMES]
        out, cache = gru_forward(move(x), move(h0), *w)
        grads = gru_backward(move(u), cache, dh_last=move(v))
        h1, cell_cache = gru_cell_forward(move(x[:, 0]), move(h0), *w)
        cell_grads = gru_cell_backward(move(v), cell_cache)
        out_layer, layer_cache = layer.forward(dict(zip(NAMES, w, strict=True)), {}, move(x))
        dx_layer, layer_grads = layer.backward(dict(zip(NAMES, w, strict=True)), layer_cache,
                                               move(u))  # fmt: skip
        results.append({"out": out, **dict(zip(("dx", "dh0", *NAMES), grads, strict=True)),
                        "h1": h1, **{f"cell {k}": g for k, g in zip(
                            ("dx", "dh", *NAMES), cell_grads, strict=True)},
                        "layer out": out_layer, "layer dx": dx_layer,
                        **{f"layer {k}": g for k, g in layer_grads.items()}})  # fmt: skip
    ref, dev = results
    assert set(dev) == set(ref)
    for name, want in ref.items():
        assert isinstance(want, np.ndarray) and want.dtype == np.dtype(dtype), name
        assert isinstance(dev[name], xp.ndarray), name  # nothing left the device
        assert_same(dev[name], want, name)


def test_mixing_host_and_device_arrays_is_a_type_error(xp):
    """An argument on the other device than the weights is a TypeError that names it."""
    rng = np.random.default_rng(0)
    p = random_params(rng, 2, 3)
    x, h0 = rng.standard_normal((2, 4, 2)), rng.standard_normal((2, 3))
    host = [p[k] for k in NAMES]
    dev = [xp.asarray(a) for a in host]
    x_dev, h0_dev = xp.asarray(x), xp.asarray(h0)
    with pytest.raises(TypeError, match="^x: "):
        gru_forward(x, h0_dev, *dev)
    with pytest.raises(TypeError, match="^h0: "):
        gru_forward(x_dev, h0, *dev)
    with pytest.raises(TypeError, match="^b_hh: "):
        gru_forward(x_dev, None, *dev[:3], host[3])
    with pytest.raises(TypeError, match="^x: "):  # host weights: the device input is the odd one
        gru_forward(x_dev, None, *host)
    out, cache = gru_forward(x_dev, h0_dev, *dev)
    with pytest.raises(TypeError, match="^dout: "):
        gru_backward(np.ones(out.shape), cache)
    with pytest.raises(TypeError, match="^dh_last: "):
        gru_backward(xp.ones(out.shape), cache, dh_last=np.ones(h0.shape))
    with pytest.raises(TypeError, match="^h: "):
        gru_cell_forward(x_dev[:, 0], h0, *dev)
    _, cell_cache = gru_cell_forward(x_dev[:, 0], h0_dev, *dev)
    with pytest.raises(TypeError, match="^dh_new: "):
        gru_cell_backward(np.ones(h0.shape), cell_cache)
    layer, params = GRU(2, 3), dict(zip(NAMES, dev, strict=True))
    with pytest.raises(TypeError, match="^x: "):
        layer.forward(params, {}, x)
    with pytest.raises(TypeError, match="^x: "):  # backend="cupy" names the device of the input
        layer.forward(dict(zip(NAMES, host, strict=True)), {}, x, backend="cupy")
    with pytest.raises(ValueError, match="backend"):
        layer.forward(params, {}, x_dev, backend="gpu")
    out_layer, _ = layer.forward(params, {}, x_dev, backend="cupy")  # the right arrays work
    assert isinstance(out_layer, xp.ndarray)
