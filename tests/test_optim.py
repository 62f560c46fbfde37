"""refmoco.optim: SGD step by step against torch.optim.SGD, its state, and the cosine schedule."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refmoco.nn import FlatParams
from refmoco.optim import SGD, cosine_lr

# relative (rel_err below), by dtype. float64 against torch.optim.SGD, elementwise steps:
# measured at most 2.5e-16 (1000 hypothesis examples of 5 steps; 2.4e-16 over 400 configs), about
# one ulp: 1e-14 leaves 40x for fused multiply-adds and other kernels' rounding.
TOL = {np.dtype("float32"): 1e-5, np.dtype("float64"): 1e-14}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a) + np.abs(b)), 1e-300))



hyper = st.fixed_dictionaries(
    {
        "lr": st.floats(1e-3, 1.0),
        "momentum": st.sampled_from([0.0, 0.5, 0.9, 0.99]),
        "weight_decay": st.sampled_from([0.0, 1e-4, 0.1]),
        "dampening": st.sampled_from([0.0, 0.1, 0.5]),
        "nesterov": st.booleans(),
    }
)


@pytest.mark.torch
@settings(deadline=None)
@given(hyper, st.sampled_from(["float32", "float64"]), st.integers(0, 2**32 - 1))
def test_sgd_matches_torch_step_by_step(torch, h, dtype, seed):
    if h["nesterov"]:
        h = {**h, "momentum": h["momentum"] or 0.9, "dampening": 0.0}
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(17).astype(dtype)
    pt = torch.tensor(p.copy(), requires_grad=True)
    ours, theirs = SGD(**h), torch.optim.SGD([pt], **h)
    for step in range(5):
        g = rng.standard_normal(17).astype(dtype)
        lr = h["lr"] * (0.5 if step == 3 else 1.0)  # a schedule changes the rate mid-way
        for group in theirs.param_groups:
            group["lr"] = lr
        pt.grad = torch.from_numpy(g.copy())
        theirs.step()
        ours.step(p, g, lr=lr)
        assert p.dtype == np.dtype(dtype)
        assert rel_err(p, pt.detach().numpy()) <= TOL[np.dtype(dtype)], f"step {step}"
        if h["momentum"]:
            buf = theirs.state[pt]["momentum_buffer"].numpy()
            assert rel_err(ours.momentum_buffer, buf) <= TOL[np.dtype(dtype)]
    assert ours.step_count == 5 and ours.lr == h["lr"]


def test_sgd_first_step_and_momentum_by_hand():
    p, g = np.array([1.0, -2.0]), np.array([0.5, 0.25])
    opt = SGD(lr=0.1, momentum=0.9, weight_decay=0.1, dampening=0.5)
    opt.step(p, g)  # d = g + 0.1 p = [0.6, 0.05]; b = d (no dampening on the first step)
    np.testing.assert_allclose(p, [1.0 - 0.06, -2.0 - 0.005], rtol=1e-15)
    np.testing.assert_allclose(opt.momentum_buffer, [0.6, 0.05], rtol=1e-15)
    d = g + 0.1 * p
    b = 0.9 * np.array([0.6, 0.05]) + 0.5 * d
    expected = p - 0.1 * b
    opt.step(p, g)
    np.testing.assert_allclose(p, expected, rtol=1e-15)


def test_sgd_on_flat_params_updates_every_view_in_one_pass():
    params = FlatParams({"0.weight": (2, 2), "0.bias": (2,)}, "float32")
    grads = params.zeros_like()
    grads.flat[...] = 1.0
    SGD(lr=0.5).step(params, grads)
    np.testing.assert_array_equal(params["0.weight"], -0.5)
    np.testing.assert_array_equal(params["0.bias"], -0.5)
    np.testing.assert_array_equal(grads.flat, 1.0)  # the gradient is not modified


def test_sgd_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(0)
    p1, grads = rng.standard_normal(6), rng.standard_normal((6, 6))
    a = SGD(lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
    for g in grads[:3]:
        a.step(p1, g)
    copy = a.state_dict()
    copy["momentum_buffer"][0] += 1.0  # a copy: mutating it does not reach the optimizer
    assert a.momentum_buffer[0] != copy["momentum_buffer"][0]
    b = SGD(lr=1.0)
    b.load_state_dict(a.state_dict())
    assert b.state_dict()["step_count"] == 3 and b.nesterov
    p2 = p1.copy()
    for g in grads[3:]:
        a.step(p1, g)
        b.step(p2, g)
    np.testing.assert_array_equal(p1, p2)


def test_sgd_validation_names_the_argument():
    for kwargs, name in [({"lr": -1}, "lr"), ({"lr": 0.1, "momentum": -0.1}, "momentum"),
                         ({"lr": 0.1, "weight_decay": -1}, "weight_decay"),
                         ({"lr": 0.1, "dampening": 1.5}, "dampening"), ({"lr": float("nan")}, "lr"),
                         ({"lr": 0.1, "nesterov": True}, "nesterov"),
                         ({"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": True}, "nesterov")]:  # fmt: skip
        with pytest.raises(ValueError, match=name):
            SGD(**kwargs)
    for kwargs, name in [({"lr": "0.1"}, "lr"), ({"lr": True}, "lr"), ({"lr": None}, "lr"),
                         ({"lr": 0.1, "momentum": "0.9"}, "momentum")]:
        with pytest.raises(TypeError, match=f"^{name}: expected a real number"):
            SGD(**kwargs)  # float() would have parsed the string and taken True as 1
    opt, p = SGD(lr=0.1, momentum=0.9), np.ones(3)
    with pytest.raises(ValueError, match="grads"):
        opt.step(p, np.ones(4))
    with pytest.raises(TypeError, match="grads"):
        opt.step(p, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="lr"):
        opt.step(p, np.ones(3), lr=-0.5)
    np.testing.assert_array_equal(p, 1.0)  # nothing was written
    opt.step(p, np.ones(3))
    with pytest.raises(ValueError, match="momentum buffer"):
        opt.step(np.ones(5), np.ones(5))
    with pytest.raises(ValueError, match="missing"):
        opt.load_state_dict({"lr": 0.1})


@given(st.integers(1, 10_000), st.floats(0.0, 10.0), st.floats(0.0, 1.0), st.data())
@settings(deadline=None)
def test_cosine_lr_is_moco_v2s_half_cosine(total, base, final, data):
    step = data.draw(st.integers(0, total))
    lr = cosine_lr(step, total, base, final)
    assert cosine_lr(0, total, base, final) == pytest.approx(base, rel=1e-12)
    assert cosine_lr(total, total, base, final) == pytest.approx(final, rel=1e-12, abs=1e-15)
    assert min(base, final) - 1e-12 <= lr <= max(base, final) + 1e-12
    # MoCo v2's main_moco.py: lr *= 0.5 * (1. + math.cos(math.pi * epoch / args.epochs))
    if final == 0.0:
        assert lr == pytest.approx(
            base * 0.5 * (1.0 + math.cos(math.pi * step / total)), rel=1e-12, abs=1e-15
        )
    if step < total and base >= final:  # decreasing
        assert cosine_lr(step + 1, total, base, final) <= lr + 1e-12


def test_cosine_lr_validation():
    for args, name in [((0, 0, 0.1), "total_steps"), ((-1, 10, 0.1), "step"), ((11, 10, 0.1), "step"),
                       ((1, 10, -0.1), "base_lr"), ((1, 10, 0.1, -1.0), "final_lr")]:  # fmt: skip
        with pytest.raises(ValueError, match=name):
            cosine_lr(*args)


# -- backend="numba": what the reference accepts, with the reference's results -------------------

SGD_SETTINGS = [
    {},
    {"momentum": 0.9},
    {"momentum": 0.9, "weight_decay": 0.1, "dampening": 0.5},
    {"momentum": 0.9, "weight_decay": 1e-3, "nesterov": True},
]


def _sgd_both(p0, grads, **hyper):
    """The same steps with backend="numpy" and "numba" on copies of ``p0`` (an array, or a
    function that makes a fresh one: a view keeps its strides)."""
    out = {}
    for backend in ("numpy", "numba"):
        p = p0() if callable(p0) else p0.copy(order="K")
        opt = SGD(0.1, backend=backend, **hyper)
        for g in grads:
            opt.step(p, g)
        out[backend] = p, opt
    return out


def _assert_same_sgd(out):
    (p_ref, ref), (p, ours) = out["numpy"], out["numba"]
    assert p.dtype == p_ref.dtype
    np.testing.assert_array_equal(p, p_ref)
    assert ours.step_count == ref.step_count
    if ref.momentum_buffer is None:
        assert ours.momentum_buffer is None
    else:
        buf, want = ours.momentum_buffer, ref.momentum_buffer
        assert buf.dtype == want.dtype and buf.shape == want.shape
        np.testing.assert_array_equal(buf, want)
        np.testing.assert_array_equal(ours.state_dict()["momentum_buffer"],
                                      ref.state_dict()["momentum_buffer"])


@pytest.mark.parametrize("hyper", SGD_SETTINGS)
@pytest.mark.parametrize("dtype", [np.float16, np.longdouble])
def test_numba_sgd_in_other_dtypes_is_the_reference(dtype, hyper):
    """float16 and longdouble parameters (which the kernel does not compute in): the reference's
    update, bitwise, instead of a TypeError."""
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(9).astype(dtype)
    grads = [rng.standard_normal(9).astype(dtype) for _ in range(3)]
    _assert_same_sgd(_sgd_both(p0, grads, **hyper))


def _layouts():
    """(name, params, grads): strided views and Fortran-order 2-d arrays, as NumPy takes them."""
    rng = np.random.default_rng(2)
    for dtype in (np.float32, np.float64):
        base = rng.standard_normal((6, 2)).astype(dtype)
        grads = [rng.standard_normal((6, 2)).astype(dtype) for _ in range(3)]
        yield (f"{dtype.__name__} strided params", lambda b=base: b.copy()[:, 0],
               [g[:, 1].copy() for g in grads])
        yield f"{dtype.__name__} strided grads", base[:, 0].copy(), [g[:, 1] for g in grads]
        yield f"{dtype.__name__} fortran 2-d", np.asfortranarray(base), [
            np.asfortranarray(g) for g in grads]
        yield f"{dtype.__name__} fortran params, C grads", np.asfortranarray(base), grads
        yield (f"{dtype.__name__} reversed", lambda b=base: b.copy()[::-1, 1],
               [g[::-1, 0] for g in grads])


@pytest.mark.parametrize("hyper", SGD_SETTINGS)
@pytest.mark.parametrize("case", list(_layouts()), ids=lambda c: c[0])
def test_numba_sgd_on_any_memory_layout_is_the_reference(case, hyper):
    """Non-contiguous or Fortran-order arrays (the docstring: any shape works) update in place
    bitwise as the reference, instead of the kernel's ValueError."""
    _, p0, grads = case
    out = _sgd_both(p0, grads, **hyper)
    assert out["numba"][0].flags.c_contiguous == (p0.flags if not callable(p0) else p0().flags
                                                  ).c_contiguous  # the layout tested
    _assert_same_sgd(out)


def test_numba_sgd_updates_a_view_in_place():
    for backend in ("numpy", "numba"):
        base = np.ones((4, 2), np.float32)
        SGD(0.5, momentum=0.9, backend=backend).step(base[:, 0], np.ones(4, np.float32))
        np.testing.assert_array_equal(base, [[0.5, 1.0]] * 4, err_msg=backend)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_sgd_momentum_that_vanishes_in_the_dtype_is_the_reference(dtype):
    """momentum=1e-50 is not 0 (the reference keeps a buffer, the first one the gradient), but
    is 0 in float32: the kernel skipped the buffer it had allocated uninitialised, and a
    dampening was not applied. Likewise a weight decay of 1e-50 (0 * inf is NaN in the
    reference)."""
    g = np.full(4, 0.5, dtype)
    for backend in ("numpy", "numba"):
        np.full(4, 7.0, dtype)  # memory an uninitialised buffer may reuse
        opt = SGD(0.1, momentum=1e-50, dampening=0.5, backend=backend)
        p = np.ones(4, dtype)
        opt.step(p, g)
        np.testing.assert_array_equal(opt.momentum_buffer, g, err_msg=backend)  # b_1 = g
        np.testing.assert_array_equal(opt.state_dict()["momentum_buffer"], g, err_msg=backend)
        opt.step(p, g)  # b_2 = 1e-50 b_1 + 0.5 g
        b2 = dtype(1e-50) * g + dtype(0.5) * g
        np.testing.assert_array_equal(opt.momentum_buffer, b2, err_msg=backend)
        np.testing.assert_array_equal(p, np.ones(4, dtype) - dtype(0.1) * g - dtype(0.1) * b2,
                                      err_msg=backend)
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal(5).astype(dtype)
    p0[0], p0[1] = np.inf, -0.0
    grads = [rng.standard_normal(5).astype(dtype) for _ in range(3)]
    for g_ in grads:
        g_[1] = -0.0
    for hyper in ({"momentum": 1e-50}, {"weight_decay": 1e-50}, {"momentum": 0.5,
                  "weight_decay": 1e-50, "nesterov": True}, {"momentum": 1e-320}):
        with np.errstate(invalid="ignore", over="ignore"):
            _assert_same_sgd(_sgd_both(p0, grads, **hyper))


def test_numba_sgd_errors_are_the_reference_s():
    """A read-only parameter array is NumPy's ValueError on both backends (not a Numba typing
    error); read-only gradients are fine."""
    for backend in ("numpy", "numba"):
        p = np.ones(3, np.float32)
        p.flags.writeable = False
        with pytest.raises(ValueError, match="read-only"):
            SGD(0.1, backend=backend).step(p, np.ones(3, np.float32))
        p, g = np.ones(3, np.float32), np.ones(3, np.float32)
        g.flags.writeable = False
        SGD(0.1, momentum=0.9, backend=backend).step(p, g)
        np.testing.assert_array_equal(p, np.float32(1) - np.float32(0.1))
