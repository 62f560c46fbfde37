"""refmoco.optim: SGD step by step against torch.optim.SGD, its state, and the cosine schedule."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refmoco.nn import FlatParams
from refmoco.optim import SGD, cosine_lr

TOL = {np.dtype("float32"): 1e-5, np.dtype("float64"): 1e-10}  # relative, by dtype


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
