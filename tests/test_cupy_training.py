"""Training on CuPy arrays: the encoders, the optimizer, the three mechanisms and the trainer with
``backend="cupy"`` against the NumPy reference, and the transfers between host and device.

Every device test runs twice, through the ``xp`` fixture:

- ``cupy``: a real GPU (marked ``gpu``; skipped without CuPy and a CUDA device, and
  ``REFMOCO_REQUIRE_GPU=1`` turns that skip into a failure, as in ``test_backends.py``);
- ``fake``: a strict stand-in for CuPy on the host (:class:`FakeCupy`, in ``fake_cupy.py``). Its
  arrays are NumPy arrays in a box whose type lives in a module named ``cupy``, so refmoco treats
  them as device arrays; it refuses what CuPy refuses (``np.asarray`` of a device array, NumPy
  functions on it, host arrays inside device operations, a host array written into a device
  array), so the generic ``xp`` code, the placement checks and every host/device transfer are
  exercised without a GPU. The CUDA kernels are not: on the fake, the mechanisms' InfoNCE and EMA
  run the NumPy reference on the boxed arrays (those kernels have their own GPU and simulator
  tests).

Tolerances, relative to the scale of the compared array: float64 1e-10, float32 1e-5.
"""

import functools
import json
import sys

import numpy as np
import pytest
from fake_cupy import (
    TOL,
    FakeCupy,
    assert_same,
    device_module,
    on_host_batch_norm_backward,
    on_host_batch_norm_forward,
    on_host_col2im,
    on_host_im2col,
    on_host_info_nce,
    on_host_momentum_update,
    on_host_sgd_step,
)

import refmoco.mechanisms as mechanisms
from refmoco import MemoryBank, Queue
from refmoco.backend import backend_of, check_device, namespace_of, to_backend, to_numpy
from refmoco.cli import main
from refmoco.data import Dataset, load_digits
from refmoco.mechanisms import EndToEnd, MemoryBankMechanism, MoCo
from refmoco.nn import FlatParams, cnn_encoder, mlp_encoder
from refmoco.nn import functional as F
from refmoco.optim import SGD
from refmoco.train import CHECKPOINT, TrainConfig, Trainer

LR, WD, SGD_M, T = 0.1, 5e-4, 0.9, 0.2


@pytest.fixture(params=["fake", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request, monkeypatch):
    """The device's array module: real CuPy on a GPU, or the strict stand-in on the host."""
    if request.param == "fake":
        return fake_device(monkeypatch)
    return device_module("cupy", monkeypatch)


def fake_device(monkeypatch):
    """The stand-in, with the CUDA kernels replaced by their references on the host
    (tests/test_cuda_sim.py runs the kernels themselves)."""
    from refmoco.kernels import cuda as kernels

    module = device_module("fake", monkeypatch)
    monkeypatch.setattr(mechanisms, "info_nce_loss",
                        functools.partial(on_host_info_nce, mechanisms.info_nce_loss))
    monkeypatch.setattr(mechanisms, "momentum_update",
                        functools.partial(on_host_momentum_update, mechanisms.momentum_update))
    monkeypatch.setattr(kernels, "sgd_step", on_host_sgd_step)
    monkeypatch.setattr(kernels, "im2col", on_host_im2col)
    monkeypatch.setattr(kernels, "col2im", on_host_col2im)
    monkeypatch.setattr(kernels, "batch_norm_forward", on_host_batch_norm_forward)
    monkeypatch.setattr(kernels, "batch_norm_backward", on_host_batch_norm_backward)
    return module


# -- helpers ---------------------------------------------------------------------------------------


def build(kind):
    if kind == "mlp":
        return mlp_encoder(in_features=16, hidden=12, feat_dim=10, out_dim=6), (16,)
    return cnn_encoder(in_channels=1, widths=(3, 4, 5), out_dim=6), (1, 6, 6)


def views(shape, n, seed, dtype="float64"):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, *shape)).astype(dtype),
            rng.normal(size=(n, *shape)).astype(dtype))


# -- the fake itself: it must refuse what CuPy refuses -----------------------------------------


def test_the_stand_in_refuses_what_cupy_refuses(monkeypatch):
    fake = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    a = fake.asarray(np.arange(4.0))
    assert namespace_of(a) is fake and backend_of(a) == "cupy" and isinstance(a, fake.ndarray)
    for bad in (lambda: np.asarray(a), lambda: np.mean(a), lambda: a + np.ones(4),
                lambda: np.ones(4) * a, lambda: a.__setitem__(slice(None), np.ones(4)),
                lambda: fake.maximum(a, np.zeros(4))):
        with pytest.raises(TypeError):
            bad()
    b = a[np.array([0, 2])] * np.float32(2) + 1.0  # host indices and NumPy scalars are fine
    np.testing.assert_array_equal(b.get(), [1.0, 5.0])
    view = a[1:3]
    view += 1.0
    np.testing.assert_array_equal(to_numpy(a), [0.0, 2.0, 3.0, 3.0])
    assert float(a.sum()) == 8.0 and isinstance(a.sum(), fake.ndarray)


@pytest.mark.parametrize("case", ["empty batch", "float16"])
def test_batch_norm_on_the_device_dispatches_to_its_kernel_only_where_it_fits(case, monkeypatch):
    """The CUDA batch-norm kernels take a non-empty batch of one float32/float64 dtype; an empty
    evaluation batch (no zero-size launch) or another dtype runs the reference's CuPy code."""
    from refmoco.kernels import cuda as kernels

    xp = fake_device(monkeypatch)
    calls = []
    monkeypatch.setattr(kernels, "batch_norm_forward",
                        lambda *a, **k: calls.append("forward") or on_host_batch_norm_forward(*a, **k))
    monkeypatch.setattr(kernels, "batch_norm_backward",
                        lambda *a: calls.append("backward") or on_host_batch_norm_backward(*a))
    rng = np.random.default_rng(0)
    dtype = "float16" if case == "float16" else "float32"
    n = 0 if case == "empty batch" else 6
    x, dy = (xp.asarray(rng.normal(size=(n, 3, 2, 2)).astype(dtype)) for _ in range(2))
    params = [xp.asarray(v.astype(dtype)) for v in (np.ones(3), np.zeros(3), np.zeros(3),
                                                    np.ones(3))]
    y, cache = F.batch_norm_forward(x, *params, train=case != "empty batch")
    F.batch_norm_backward(dy, cache)
    assert calls == [] and y.shape == x.shape and y.dtype == x.dtype
    x32 = xp.asarray(rng.normal(size=(6, 3, 2, 2)).astype("float32"))  # the kernels' own case
    p32 = [xp.asarray(v.astype("float32")) for v in (np.ones(3), np.zeros(3), np.zeros(3),
                                                      np.ones(3))]
    _, cache = F.batch_norm_forward(x32, *p32, train=True)
    F.batch_norm_backward(x32, cache)
    assert calls == ["forward", "backward"]


@pytest.mark.parametrize("dtype, momentum, weight_decay, kernel", [
    ("float32", 0.9, 5e-4, True), ("float64", 0.0, 0.0, True), ("float32", 0.9, 0.0, True),
    ("float16", 0.9, 5e-4, False),  # computed in CuPy's float16, as the reference does
    ("float32", 1e-50, 5e-4, False),  # momentum rounds to 0 in float32: the reference decides
])
def test_sgd_on_the_device_dispatches_to_its_kernel_only_where_it_fits(dtype, momentum,
                                                                        weight_decay, kernel,
                                                                        monkeypatch):
    """On CuPy arrays the SGD step is one CUDA kernel where it computes the reference's step
    (float32 or float64, momentum and weight decay that keep their zeroness in the dtype), and
    the reference's CuPy code elsewhere; either way, two steps give the NumPy reference's
    parameters and momentum buffer, bitwise (on the stand-in the kernel is the reference on the
    host; tests/test_cuda_sim.py runs the kernel itself against it, bitwise too)."""
    from refmoco.kernels import cuda as kernels

    xp = fake_device(monkeypatch)
    calls = []
    monkeypatch.setattr(kernels, "sgd_step",
                        lambda *a, **k: calls.append(k["first_step"]) or on_host_sgd_step(*a, **k))
    rng = np.random.default_rng(0)
    p, g1, g2 = (rng.normal(size=11).astype(dtype) for _ in range(3))
    ref, dev = (SGD(0.1, momentum=momentum, weight_decay=weight_decay) for _ in range(2))
    p_dev = xp.asarray(p)
    for g in (g1, g2):
        ref.step(p, g)
        dev.step(p_dev, xp.asarray(g))
    # first_step: until a momentum buffer exists (without momentum, none ever does)
    assert calls == ([True, not momentum] if kernel else [])
    np.testing.assert_array_equal(to_numpy(p_dev), p)  # the stand-in computes with NumPy
    if momentum:
        np.testing.assert_array_equal(to_numpy(dev.momentum_buffer), ref.momentum_buffer)


@pytest.mark.parametrize("shape, axis, dtype, kernel", [
    ((5, 4), -1, "float32", True), ((5, 4), 1, "float64", True),
    ((5, 4), 0, "float32", False), ((2, 3, 4), -1, "float32", False),
    ((5, 4), -1, "float16", True),  # computed in float32, as every float16 argument
    ((0, 4), -1, "float32", False),
])
def test_l2_normalize_on_the_device_dispatches_rows_to_its_kernel(shape, axis, dtype, kernel,
                                                                  monkeypatch):
    """The rows of a non-empty 2-d float device array take the CUDA normalisation kernels,
    forward and backward (float16 is computed in float32, by the kernels as by the reference);
    any other axis or rank, or an empty array, the reference's CuPy code. On the stand-in (kernels replaced by the reference on the host) both give the
    NumPy reference's values, bitwise; tests/test_cuda_sim.py runs the kernels themselves."""
    import refmoco
    from refmoco.kernels import cuda as kernels

    xp = fake_device(monkeypatch)
    calls = []
    forward, backward = kernels.l2_normalize_rows, kernels.l2_normalize_rows_backward
    monkeypatch.setattr(kernels, "l2_normalize_rows",
                        lambda *a: calls.append("forward") or forward(*a))
    monkeypatch.setattr(kernels, "l2_normalize_rows_backward",
                        lambda *a: calls.append("backward") or backward(*a))
    rng = np.random.default_rng(0)
    x, dy = (rng.normal(size=shape).astype(dtype) for _ in range(2))
    y_ref, back_ref = refmoco.l2_normalize(x, axis=axis)
    y, back = refmoco.l2_normalize(xp.asarray(x), axis=axis)
    dx = back(xp.asarray(dy))
    assert calls == (["forward", "backward"] if kernel else [])
    np.testing.assert_array_equal(to_numpy(y), y_ref)
    np.testing.assert_array_equal(to_numpy(dx), back_ref(dy))
    assert to_numpy(y).dtype == y_ref.dtype == np.dtype("float64" if dtype == "float64"
                                                        else "float32")


@pytest.mark.parametrize("shape, dy_last, y_last, dtype, launcher, kernel", [
    ((5, 3), False, False, "float32", "cupy", True),
    ((4, 5, 3, 2), True, True, "float64", "cupy", True),  # channels-last, as the CNN's
    ((4, 5, 3, 2), False, False, "float32", "cupy", True),
    ((4, 5, 3, 2), True, False, "float32", "cupy", False),  # two memory orders
    ((5, 3), False, False, "float16", "cupy", False),
    ((0, 3), False, False, "float32", "cupy", False),
    ((5, 3), False, False, "float32", "numba", False),  # numba-cuda's launch: CuPy's two ops
])
def test_relu_backward_on_the_device_takes_its_kernel_only_with_the_cupy_launcher(
        shape, dy_last, y_last, dtype, launcher, kernel, monkeypatch):
    """ReLU's backward is one CUDA launch where launches are cheap (REFMOCO_CUDA_LAUNCHER=cupy)
    and ``dy`` and ``y`` share a float32/float64 dtype and a memory order; else the reference's
    two CuPy operations. Both give the NumPy reference's values bitwise, in ``dy``'s memory
    order (the stand-in runs the kernel's reference on the host; tests/test_cuda_sim.py runs
    the kernel)."""
    import fake_cupy

    from refmoco.kernels import cuda as kernels

    xp = fake_device(monkeypatch)
    calls = []
    monkeypatch.setattr(kernels, "LAUNCHER", launcher)
    monkeypatch.setattr(kernels, "relu_backward",
                        lambda *a: calls.append(1) or fake_cupy.on_host_relu_backward(*a))
    rng = np.random.default_rng(0)
    x, dy = (rng.normal(size=shape).astype(dtype) for _ in range(2))

    def laid_out(a, last):
        return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1) if last else a

    x, dy = laid_out(x, y_last), laid_out(dy, dy_last)
    y, cache = F.relu_forward(xp.asarray(x))
    dx = F.relu_backward(xp.asarray(dy), cache)
    assert len(calls) == kernel
    want = dy * (x > 0)
    assert dx.dtype == want.dtype and dx.strides == want.strides  # dy's memory order
    np.testing.assert_array_equal(to_numpy(dx), want)
    assert np.array_equal(np.signbit(to_numpy(dx)), np.signbit(want))


# -- host-only checks of the transfer logic ---------------------------------------------------------


def test_namespace_and_transfer_helpers_on_the_host():
    x = np.ones((2, 3), np.float32)
    assert namespace_of(x, None, 2.0) is np and namespace_of() is np
    assert backend_of(x) == "numpy"
    assert to_backend(x, "numpy") is x and to_backend(x, "numba") is x  # no copy on the host
    np.testing.assert_array_equal(to_backend([1.0, 2.0], "numpy"), [1.0, 2.0])
    check_device(x, "x", np)
    with pytest.raises(ValueError, match="backend"):
        to_backend(x, "gpu")


def test_im2col_window_view_is_the_definition():
    """The reference's im2col (a strided window view), which the CUDA and Numba gathers are
    compared with, against its definition written as loops."""
    rng = np.random.default_rng(0)
    for n, h, w, c, kh, kw, s in [(2, 6, 6, 3, 3, 3, 1), (3, 7, 5, 2, 3, 2, 2), (1, 4, 4, 1, 1, 1, 3),
                                  (2, 8, 8, 4, 3, 3, 2)]:
        x_pad = rng.normal(size=(n, h, w, c))
        ho, wo = (h - kh) // s + 1, (w - kw) // s + 1
        want = np.empty((n, ho, wo, kh, kw, c))
        for i, j, a, e in np.ndindex(ho, wo, kh, kw):
            want[:, i, j, a, e, :] = x_pad[:, s * i + a, s * j + e, :]
        np.testing.assert_array_equal(F._im2col(x_pad, kh, kw, s, 0, ho, wo), want)


def test_host_state_dicts_are_copies_and_placement_is_checked():
    enc, shape = build("cnn")
    params, buffers = enc.init(np.random.default_rng(0), "float32")
    same_params, same_buffers = enc.to(params, buffers, "numba")  # already on the host
    assert same_params is params and all(same_buffers[k] is buffers[k] for k in buffers)
    p2, b2 = enc.init(np.random.default_rng(0), "float32", backend="numba")
    np.testing.assert_array_equal(p2.flat, params.flat)
    sd = enc.state_dict(params, buffers)
    assert all(type(v) is np.ndarray and not np.shares_memory(v, params.flat) for v in sd.values())
    assert params.to("numpy") is params and params.backend == "numpy" and params.xp is np
    grads = FlatParams.from_arrays(dict(params))
    assert grads.same_layout(params) and not np.shares_memory(grads.flat, params.flat)
    with pytest.raises(ValueError, match="backend"):
        enc.init(np.random.default_rng(0), "float32", backend="gpu")
    with pytest.raises(ValueError, match="backend"):
        SGD(0.1, backend="gpu")
    x = np.zeros((2, *shape), np.float32)
    with pytest.raises(ValueError, match="backend"):  # the model is on the host
        enc.forward(params, buffers, x, train=True, backend="cupy")
    assert int(buffers["backbone.1.num_batches_tracked"]) == 0


def test_sgd_keeps_its_backend_and_a_host_copy_of_its_state():
    pytest.importorskip("numba")
    p, g = np.ones(4), np.full(4, 0.5)
    opt = SGD(0.1, momentum=0.9, backend="numba")
    opt.step(p, g)
    state = opt.state_dict()
    assert state["momentum_buffer"] is not opt.momentum_buffer
    other = SGD(0.1, momentum=0.9, backend="numba")
    other.load_state_dict(state)
    assert other.backend == "numba"  # the backend is the optimizer's own, not the state's
    q = p.copy()
    opt.step(p, g)
    other.step(q, g)
    np.testing.assert_array_equal(q, p)


# -- on the device ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_encoder_on_the_device_equals_numpy(xp, kind, dtype):
    enc, shape = build(kind)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, *shape)).astype(dtype)
    dz = rng.normal(size=(6, enc.out_dim)).astype(dtype)
    dh = rng.normal(size=(6, enc.feature_dim)).astype(dtype)
    results = []
    for backend, move in (("numpy", np.asarray), ("cupy", xp.asarray)):
        params, buffers = enc.init(np.random.default_rng(0), dtype, backend=backend)
        z, h, cache = enc.forward_features(params, buffers, move(x), train=True)
        dx, grads = enc.backward_features(params, cache, move(dz), move(dh))
        dx_only, grads_only = enc.backward(params, cache, move(dz))
        z_eval, h_eval, _ = enc.forward_features(params, buffers, move(x), train=False)
        out = {"params": params.flat, "z": z, "h": h, "dx": dx, "grads": grads.flat,
               "dx_only": dx_only, "grads_only": grads_only.flat, "z_eval": z_eval,
               "h_eval": h_eval, **buffers}
        kind_of_array = xp.ndarray if backend == "cupy" else np.ndarray
        for name, value in out.items():
            assert isinstance(value, kind_of_array), name  # nothing left the device
        results.append(out)
    ref, dev = results
    for name in ref:
        assert_same(dev[name], ref[name], name)
    for name in ("z", "h", "dx", "grads", "z_eval"):
        assert ref[name].dtype == np.dtype(dtype)  # dtype preserved


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("mechanism, dtype", [("moco", "float64"), ("moco", "float32"),
                                              ("end-to-end", "float64"),
                                              ("memory-bank", "float64")])
def test_mechanism_steps_on_the_device_equal_numpy(xp, mechanism, dtype, kind):
    """Two steps of each mechanism: params, key params, BN buffers, optimizer state, queue or
    bank (with ids, pointer and random states) and losses agree with the NumPy steps."""
    results = []
    for backend, move in (("numpy", np.asarray), ("cupy", xp.asarray)):
        enc, shape = build(kind)
        params, buffers = enc.init(np.random.default_rng(0), dtype, backend=backend)
        opt = SGD(LR, momentum=SGD_M, weight_decay=WD, backend=backend)
        if mechanism == "moco":
            mech = MoCo(enc, params, buffers, opt, momentum=0.9, temperature=T, bn_groups=2,
                        queue=Queue(13, 6, dtype=dtype, backend=backend))
        elif mechanism == "end-to-end":
            mech = EndToEnd(enc, params, buffers, opt, temperature=T)
        else:
            mech = MemoryBankMechanism(enc, params, buffers, opt, num_negatives=5,
                                       bank=MemoryBank(20, 6, dtype=dtype, backend=backend),
                                       temperature=T)
        assert mech.backend == backend  # inferred from where the parameters live
        stats = []
        for s in range(2):
            x_q, x_k = views(shape, 8, s, dtype)
            stats.append(mech.step(move(x_q), move(x_k), np.arange(8) + 8 * s, LR))
        assert all(isinstance(v, float) for row in stats for v in row)
        results.append((stats, mech.state_dict()))
    (stats_ref, state_ref), (stats_dev, state_dev) = results
    tol = TOL[np.dtype(dtype)]
    for a, b in zip(stats_dev, stats_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * 10)
    assert set(state_dev) == set(state_ref)
    for key, want in state_ref.items():
        assert isinstance(state_dev[key], (np.ndarray, np.generic)), key  # host arrays only
        assert_same(state_dev[key], want, key)
    assert state_ref["params/head.2.weight"].dtype == np.dtype(dtype)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("mechanism", ["moco", "end-to-end", "memory-bank"])
def test_a_float32_step_computes_nothing_on_the_device_in_float64(mechanism, kind, monkeypatch):
    """No silent upcast on the hot path: on the stand-in, every device operation of a float32
    training step is watched, and none may return a float64 array or write a float64 operand
    into a float32 array in place (``t *= np.float64(m)`` computes in float64). The loss and the
    EMA run as their host references here (their outputs are watched, not their insides): the
    CUDA kernels' PTX is checked for float64 instructions in tests/test_cuda_ptx.py."""
    import fake_cupy

    xp = fake_device(monkeypatch)
    upcasts = []
    call, inplace = fake_cupy._call, fake_cupy._inplace

    def watched_call(f, args, kwargs):
        out = call(f, args, kwargs)
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, fake_cupy.FakeDeviceArray) and o._a.dtype == np.float64:
                upcasts.append(getattr(f, "__name__", repr(f)))
        return out

    monkeypatch.setattr(fake_cupy, "_call", watched_call)
    for name in ("add", "sub", "mul", "truediv", "pow"):
        method = inplace(getattr(__import__("operator"), f"i{name}"))

        def watched_inplace(self, other, method=method, name=name):
            if getattr(fake_cupy._unwrap(other), "dtype", None) == np.float64:
                upcasts.append(f"__i{name}__")
            return method(self, other)

        monkeypatch.setattr(fake_cupy.FakeDeviceArray, f"__i{name}__", watched_inplace)
    enc, shape = build(kind)
    params, buffers = enc.init(np.random.default_rng(0), "float32", backend="cupy")
    opt = SGD(LR, momentum=SGD_M, weight_decay=WD, backend="cupy")
    if mechanism == "moco":
        mech = MoCo(enc, params, buffers, opt, momentum=0.9, temperature=T, bn_groups=2,
                    queue=Queue(13, 6, dtype="float32", backend="cupy"))
    elif mechanism == "end-to-end":
        mech = EndToEnd(enc, params, buffers, opt, temperature=T)
    else:
        mech = MemoryBankMechanism(enc, params, buffers, opt, num_negatives=5, temperature=T,
                                   bank=MemoryBank(20, 6, dtype="float32", backend="cupy"))
    for s in range(2):
        x_q, x_k = views(shape, 8, s, "float32")
        mech.step(xp.asarray(x_q), xp.asarray(x_k), np.arange(8) + 8 * s, LR)
    assert not upcasts, f"float64 on the device: {sorted(set(upcasts))}"
    for key, value in mech.state_dict().items():
        assert value.dtype != np.float64 or not key.startswith(("params/", "key_params/")), key


def test_mixing_host_and_device_arrays_is_a_type_error(xp):
    enc, _ = build("mlp")
    p_dev, b_dev = enc.init(np.random.default_rng(0), "float32", backend="cupy")
    p_host, b_host = enc.init(np.random.default_rng(0), "float32")
    x = np.ones((4, 16), np.float32)
    x_dev = xp.asarray(x)
    with pytest.raises(TypeError, match="x"):
        enc.forward(p_dev, b_dev, x, train=True)
    with pytest.raises(TypeError, match="x"):
        enc.forward_features(p_host, b_host, x_dev, train=True)
    with pytest.raises(TypeError, match="buffers"):
        enc.forward(p_dev, b_host, x_dev, train=True)
    with pytest.raises(ValueError, match="backend"):
        enc.forward(p_dev, b_dev, x_dev, train=True, backend="numpy")
    with pytest.raises(ValueError, match="backend"):
        enc.forward(p_dev, b_dev, x_dev, train=True, backend="numba")
    assert int(b_dev["backbone.2.num_batches_tracked"]) == 0  # the rejected calls changed nothing
    z, cache = enc.forward(p_dev, b_dev, x_dev, train=True)
    with pytest.raises(TypeError, match="dout"):
        enc.backward(p_dev, cache, np.ones(z.shape, np.float32))
    with pytest.raises(TypeError, match="grads"):
        enc.backward(p_dev, cache, xp.ones(z.shape, dtype=np.float32), grads=p_host.zeros_like())
    with pytest.raises(TypeError, match="params"):
        SGD(0.1, backend="cupy").step(p_host.flat, p_host.zeros_like().flat)
    with pytest.raises(TypeError, match="params"):
        SGD(0.1, backend="numpy").step(p_dev.flat, p_dev.zeros_like().flat)
    with pytest.raises(TypeError, match="grads"):
        SGD(0.1).step(p_dev.flat, p_host.zeros_like().flat)
    with pytest.raises(TypeError):
        FlatParams.from_arrays({"a": np.ones(2), "b": xp.ones(2)})
    with pytest.raises(TypeError, match="queue"):
        MoCo(enc, p_dev, b_dev, SGD(0.1), queue=Queue(8, 6), momentum=0.9, temperature=T)
    with pytest.raises(TypeError, match="bank"):
        MemoryBankMechanism(enc, p_dev, b_dev, SGD(0.1), bank=MemoryBank(8, 6),
                            num_negatives=3, temperature=T)
    with pytest.raises(ValueError, match="backend"):
        EndToEnd(enc, p_host, b_host, SGD(0.1), temperature=T, backend="cupy")
    moco = MoCo(enc, p_dev, b_dev, SGD(0.1), queue=Queue(8, 6, backend="cupy"), momentum=0.9,
                temperature=T)
    with pytest.raises(TypeError, match="x_q"):
        moco.step(x, x_dev, np.arange(4), 0.1)
    with pytest.raises(TypeError, match="x_k"):
        moco.step(x_dev, x, np.arange(4), 0.1)
    moco.step(x_dev, x_dev + 0.5, np.arange(4), 0.1)  # the right arrays work


def test_params_move_both_ways_and_checkpoints_are_host_arrays(xp):
    enc, shape = build("cnn")
    params, buffers = enc.init(np.random.default_rng(0), "float32")
    p_dev, b_dev = enc.to(params, buffers, "cupy")
    assert p_dev.backend == "cupy" and p_dev.xp is xp and p_dev is not params
    assert isinstance(p_dev["backbone.0.weight"], xp.ndarray)
    assert p_dev.zeros_like().backend == "cupy" and p_dev.copy().backend == "cupy"
    p_dev["head.2.bias"][...] = 3.0  # the views are views of the device buffer
    assert float(p_dev.flat[-1]) == 3.0 and float(params.flat[-1]) != 3.0
    sd = enc.state_dict(p_dev, b_dev)
    assert all(type(v) is np.ndarray for v in sd.values())
    assert all(type(v) is np.ndarray for v in p_dev.state_dict().values())
    p_back, b_back = enc.to(p_dev, b_dev, "numpy")
    assert p_back.backend == "numpy"
    np.testing.assert_array_equal(p_back.flat, to_numpy(p_dev.flat))
    # a host state dict loads into the device model, and a device one into the host model
    params2, buffers2 = enc.init(np.random.default_rng(5), "float32", backend="cupy")
    enc.load_state_dict(params2, buffers2, sd)
    np.testing.assert_array_equal(to_numpy(params2.flat), to_numpy(p_dev.flat))
    assert isinstance(buffers2["backbone.1.running_var"], xp.ndarray)
    host_params, host_buffers = enc.init(np.random.default_rng(5), "float32")
    host_params.load_state_dict({k: xp.asarray(v) for k, v in p_dev.state_dict().items()})
    np.testing.assert_array_equal(host_params.flat, to_numpy(p_dev.flat))


@pytest.fixture(scope="module")
def small():
    d = load_digits(seed=0)
    return Dataset(d.x_train[:200], d.y_train[:200], d.x_test[:100], d.y_test[:100], "small")


def test_trainer_checkpoints_resume_across_backends(xp, tmp_path, small):
    """One epoch on one backend, the checkpoint, the second epoch on the other backend: the
    state moves exactly and the run ends where a run on the host ends."""
    pytest.importorskip("sklearn")

    def config(backend):
        return TrainConfig(encoder="mlp", epochs=2, batch_size=64, queue_size=96, bn_groups=2,
                           dtype="float64", backend=backend)

    ref = Trainer(config("numpy"), small)
    ref.train_epoch()
    ref.train_epoch()
    want = ref.mechanism.state_dict()
    for first, second in (("cupy", "numpy"), ("numpy", "cupy")):
        a = Trainer(config(first), small)
        a.train_epoch()
        folder = tmp_path / f"{first}-then-{second}"
        folder.mkdir()
        a.save(str(folder))
        with np.load(folder / CHECKPOINT, allow_pickle=False) as f:  # host arrays, no pickle
            assert "mechanism/params/head.2.weight" in f.files
        b = Trainer(config(second), small)
        b.load(str(folder))
        saved, loaded = a.state_dict(), b.state_dict()
        for key in saved:
            if key != "trainer/config":  # records the backend, which may change on resume
                np.testing.assert_array_equal(loaded[key], saved[key], err_msg=key)
        row = b.train_epoch()
        assert b.epoch == 2 and np.isfinite(row["loss"])
        got = b.mechanism.state_dict()
        for key, value in want.items():
            assert_same(got[key], value, f"{first} then {second}: {key}", tol_scale=10.0)
        scores = b.evaluate(linear=False)
        assert all(isinstance(v, float) for v in scores.values())
        z, h = b.features(small.x_test[:10].astype("float64"))
        assert type(z) is np.ndarray and type(h) is np.ndarray  # evaluation runs on the host


def test_cli_trains_with_backend_cupy(xp, tmp_path, capsys):
    pytest.importorskip("sklearn")
    d = load_digits(seed=0)
    images = (np.concatenate([d.x_train, d.x_test])[:240, 0] * 255).astype(np.uint8)
    labels = np.concatenate([d.y_train, d.y_test])[:240]
    np.savez(tmp_path / "mine.npz", images=images, labels=labels, train=np.arange(240) < 180)
    code = main(["train", "--data", str(tmp_path / "mine.npz"), "--out", str(tmp_path / "o"),
                 "--epochs", "1", "--batch-size", "60", "--queue-size", "60", "--backend", "cupy",
                 "--encoder", "mlp", "--no-progress"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert 0 <= summary["final"]["knn_accuracy"] <= 1
    metrics = json.load(open(tmp_path / "o" / "metrics.json"))
    assert metrics["config"]["backend"] == "cupy" and len(metrics["epochs"]) == 1


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_a_moco_step_on_the_device_copies_no_gradient_and_reads_the_device_twice(kind,
                                                                                  monkeypatch):
    """What a step costs a GPU's host, watched on the stand-in (no timing): the layers compute
    the gradients into the buffer's views, so the only strided writes are the convolutions'
    transposed weight gradients, the unshuffle of the keys and the enqueue (before, one more per
    parameter); and the device is read twice, at the end (the queue's finiteness check and the
    statistics), never in the middle of the step."""
    import fake_cupy

    xp = fake_device(monkeypatch)
    writes, reads = [], []
    setitem = fake_cupy.FakeDeviceArray.__setitem__

    def watched_setitem(self, idx, value):
        writes.append(self._a.shape)
        return setitem(self, idx, value)

    monkeypatch.setattr(fake_cupy.FakeDeviceArray, "__setitem__", watched_setitem)
    for name in ("get", "__float__", "__int__", "__bool__"):
        method = getattr(fake_cupy.FakeDeviceArray, name)

        def read(self, *args, method=method, name=name, **kwargs):
            reads.append(name)
            return method(self, *args, **kwargs)

        monkeypatch.setattr(fake_cupy.FakeDeviceArray, name, read)
    enc, shape = build(kind)
    params, buffers = enc.init(np.random.default_rng(0), "float32", backend="cupy")
    mech = MoCo(enc, params, buffers, SGD(LR, momentum=SGD_M, weight_decay=WD, backend="cupy"),
                momentum=0.9, temperature=T, queue=Queue(16, 6, dtype="float32", backend="cupy"))
    x_q, x_k = views(shape, 8, 0, "float32")
    x_q, x_k = xp.asarray(x_q), xp.asarray(x_k)
    mech.step(x_q, x_k, np.arange(8), LR)  # the first step makes the optimizer's buffer
    writes.clear(), reads.clear()
    stats = mech.step(x_q, x_k, np.arange(8) + 8, LR)
    convs = [w.shape for w in (params[k] for k in params) if w.ndim == 4]
    assert sorted(writes) == sorted([*convs, (8, 6), (16, 6)]), writes  # dw's; k; the queue
    assert len(reads) == 2, reads
    assert np.isfinite(stats.loss)
