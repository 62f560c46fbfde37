"""refmoco.adam: Adam step by step against torch.optim.Adam and a transcription of Kingma & Ba."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refmoco.adam import Adam
from refmoco.nn import FlatParams
from refmoco.testing import assert_close

seeds = st.integers(0, 2**32 - 1)
fast = settings(deadline=None)
hyper = st.fixed_dictionaries(
    {
        "lr": st.floats(1e-4, 0.5),
        "betas": st.tuples(st.sampled_from([0.0, 0.5, 0.9]), st.sampled_from([0.9, 0.99, 0.999])),
        "eps": st.sampled_from([1e-8, 1e-3]),
        "weight_decay": st.sampled_from([0.0, 1e-2, 0.3]),
        "amsgrad": st.booleans(),
    }
)


def kingma_ba(p, grads, lr, betas, eps, weight_decay, amsgrad):
    """Algorithm 1 of Kingma & Ba, one scalar at a time in float64, with PyTorch's placement of
    eps (after dividing sqrt(v) by sqrt(1 - beta2^t)), L2 decay and AMSGrad's running max."""
    p = [float(a) for a in p]
    m, v, vmax = [0.0] * len(p), [0.0] * len(p), [0.0] * len(p)
    b1, b2 = betas
    for t, g in enumerate(grads, start=1):
        for i in range(len(p)):
            d = float(g[i]) + weight_decay * p[i]
            m[i] = b1 * m[i] + (1 - b1) * d
            v[i] = b2 * v[i] + (1 - b2) * d * d
            vmax[i] = max(vmax[i], v[i])
            m_hat = m[i] / (1 - b1**t)
            v_hat = (vmax[i] if amsgrad else v[i]) / (1 - b2**t)
            p[i] -= lr * m_hat / (math.sqrt(v_hat) + eps)
    return np.array(p)


@fast
@given(hyper, seeds)
def test_matches_transcription_float64(h, seed):
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(7)
    grads = [rng.standard_normal(7) for _ in range(6)]
    p = p0.copy()
    opt = Adam(**h)
    for g in grads:
        opt.step(p, g)
    assert_close(p, kingma_ba(p0, grads, **h), name="params")
    assert opt.step_count == 6



@pytest.mark.torch
@fast
@given(hyper, st.sampled_from(["float32", "float64"]), seeds)
def test_matches_torch_step_by_step(torch, h, dtype, seed):
    """Parameters and every state buffer after each of 8 steps; the rate changes mid-way."""
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(13).astype(dtype)
    pt = torch.tensor(p.copy(), requires_grad=True)
    ours, theirs = Adam(**h), torch.optim.Adam([pt], **h)
    for step in range(8):
        g = rng.standard_normal(13).astype(dtype)
        lr = h["lr"] * (0.3 if step >= 5 else 1.0)
        for group in theirs.param_groups:
            group["lr"] = lr
        pt.grad = torch.from_numpy(g.copy())
        theirs.step()
        ours.step(p, g, lr=lr)
        state = theirs.state[pt]
        assert p.dtype == ours.exp_avg.dtype == np.dtype(dtype)
        assert_close(p, pt.detach().numpy(), name=f"params, step {step}")
        assert_close(ours.exp_avg, state["exp_avg"].numpy(), name="exp_avg")
        assert_close(ours.exp_avg_sq, state["exp_avg_sq"].numpy(), name="exp_avg_sq")
        if h["amsgrad"]:
            assert_close(ours.max_exp_avg_sq, state["max_exp_avg_sq"].numpy(), name="max")
        assert ours.step_count == int(state["step"])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_beta1_zero_keeps_exactly_the_last_gradient(dtype):
    """m_t = b1 m + (1 - b1) d is d_t itself at b1 = 0; PyTorch's lerp forms weights >= 1/2 as
    d - (d - m)(1 - w), which gives it exactly (m + w (d - m) would not: 0.01000023 here)."""
    p = np.zeros(1, dtype)
    opt = Adam(lr=0.1, betas=(0.0, 0.999))
    opt.step(p, np.array([10.0], dtype))
    last = np.array([0.01], dtype)
    opt.step(p, last)
    np.testing.assert_array_equal(opt.exp_avg, last)


def test_first_step_moves_by_lr_against_the_gradient():
    """Closed form: after one step m/sqrt(v) = g/|g| exactly, so each entry moves by lr."""
    p = np.array([1.0, -2.0, 0.5], np.float32)
    g = np.array([3.0, -1e-3, 40.0], np.float32)
    Adam(lr=0.01, eps=0.0).step(p, g)
    assert_close(p, np.array([0.99, -1.99, 0.49], np.float32), name="params")


def test_flatparams_and_state_dict_round_trip(rng):
    params = FlatParams({"w": (3, 2), "b": (3,)}, "float32")
    params.flat[:] = rng.standard_normal(params.size)
    a = Adam(lr=0.1, weight_decay=0.01, amsgrad=True)
    for _ in range(3):
        a.step(params, rng.standard_normal(params.size).astype(np.float32))
    b = Adam(lr=1.0)
    b.load_state_dict(a.state_dict())
    twin = params.flat.copy()
    for _ in range(3):
        g = rng.standard_normal(params.size).astype(np.float32)
        a.step(params, g)
        b.step(twin, g)
    np.testing.assert_array_equal(params.flat, twin)  # the same state gives the same steps
    assert b.step_count == 6 and b.amsgrad


def test_bad_arguments_raise_and_change_nothing(rng):
    with pytest.raises(ValueError, match="betas"):
        Adam(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        Adam(lr=-1)
    opt = Adam()
    p = np.zeros(4)
    with pytest.raises(ValueError, match="grads"):
        opt.step(p, np.zeros(5))
    with pytest.raises(TypeError, match="grads"):
        opt.step(p, np.zeros(4, np.float32))
    with pytest.raises(TypeError, match="params"):
        opt.step(np.zeros(4, np.int64), np.zeros(4, np.int64))
    assert opt.step_count == 0 and opt.exp_avg is None
    opt.step(p, np.ones(4))
    state = opt.state_dict()
    with pytest.raises(ValueError, match="exp_avg_sq"):
        Adam().load_state_dict({**state, "exp_avg_sq": np.zeros(3)})
    with pytest.raises(ValueError, match="step_count"):
        Adam().load_state_dict({**state, "step_count": -1})
    with pytest.raises(ValueError, match="params"):
        opt.step(np.zeros(5), np.zeros(5))  # another size than the state
