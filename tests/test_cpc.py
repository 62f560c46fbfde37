"""refmoco.cpc: the whole model's gradient by finite differences and against PyTorch autograd,
the digit-sequence task, a short training run and ``refmoco cpc``, and the model on CuPy arrays
(a GPU, or the stand-in of ``fake_cupy.py``) against NumPy."""

import json
import math

import numpy as np
import pytest
from fake_cupy import assert_same, device_module
from hypothesis import given, settings
from hypothesis import strategies as st

from refmoco.adam import Adam
from refmoco.cpc import CPC, CPCConfig, digit_sequences, train_cpc
from refmoco.nn import FlatParams
from refmoco.testing import assert_close, check_grad

seeds = st.integers(0, 2**32 - 1)
fast = settings(deadline=None)


def flat_fun(model, params):
    """``fun(flat, x) -> (loss, {"flat": grads})`` for check_grad, on a copy of the layout."""

    def fun(flat, x):
        p = FlatParams(params.shapes, flat.dtype, flat=np.ascontiguousarray(flat))
        loss, grads = model.loss_and_grads(p, x)
        return loss, {"flat": grads.flat}

    return fun


def test_full_gradient_elementwise_finite_differences(rng):
    """Every parameter of a tiny model (encoder, GRU, predictors), one central difference each."""
    model = CPC(in_features=5, hidden=4, embed_dim=3, context_dim=4, num_steps=2)
    params = model.init(rng, "float64")
    params.flat[:] += 0.5 * rng.standard_normal(params.size)  # leave PyTorch's small init
    x = rng.standard_normal((3, 4, 5))
    report = check_grad(flat_fun(model, params), {"flat": params.flat.copy(), "x": x},
                        wrt=["flat"], mode="elementwise", rtol=1e-7)  # fmt: skip
    assert report.max_rel_error <= 1e-7


@fast
@given(seeds, st.integers(2, 4), st.integers(3, 5), st.integers(1, 2))
def test_full_gradient_directional(seed, b, t, s):
    rng = np.random.default_rng(seed)
    model = CPC(in_features=4, hidden=5, embed_dim=3, context_dim=2, num_steps=s)
    params = model.init(rng, "float64")
    params.flat[:] += 0.5 * rng.standard_normal(params.size)
    x = rng.standard_normal((b, t, 4))
    check_grad(flat_fun(model, params), {"flat": params.flat.copy(), "x": x}, wrt=["flat"],
               rtol=1e-7, seed=seed % 1000)  # fmt: skip


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtype_preserved(rng, dtype):
    model = CPC(6, 5, 4, 3, 2)
    params = model.init(rng, dtype)
    loss, grads = model.loss_and_grads(params, rng.standard_normal((3, 4, 6)))
    assert loss.dtype == grads.dtype == params.dtype == np.dtype(dtype)
    assert model.encode(params, rng.standard_normal((7, 6))).dtype == np.dtype(dtype)



def torch_cpc(torch, f, hidden, d, h, s):
    nn = torch.nn

    class Ref(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(f, hidden), nn.ReLU(), nn.Linear(hidden, d))
            self.gru = nn.GRU(d, h, batch_first=True)
            self.predictors = nn.ModuleList(nn.Linear(h, d, bias=False) for _ in range(s))

        def forward(self, x):
            """CPC's loss written independently: a cross-entropy per (s, t) over the batch."""
            z = self.encoder(x)  # (B, T, D)
            c, _ = self.gru(z)  # (B, T, H)
            b, t = x.shape[:2]
            terms = []
            for k, pred in enumerate(self.predictors, start=1):
                for tt in range(t - k):
                    logits = pred(c[:, tt]) @ z[:, tt + k].T  # (B, B)
                    target = torch.arange(b)
                    terms.append(nn.functional.cross_entropy(logits, target, reduction="none"))
            return torch.cat(terms).mean()

    return Ref()


@pytest.mark.torch
@fast
@given(seeds, st.sampled_from(["float32", "float64"]))
def test_matches_torch_autograd(torch, seed, dtype):
    """Same weights, loss and every gradient as the PyTorch module the names come from."""
    rng = np.random.default_rng(seed)
    model = CPC(in_features=6, hidden=8, embed_dim=4, context_dim=5, num_steps=3)
    ref = torch_cpc(torch, 6, 8, 4, 5, 3).to(getattr(torch, dtype))
    assert list(ref.state_dict()) == list(model.param_shapes())
    params = model.init(rng, dtype)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in params.state_dict().items()})
    x = rng.standard_normal((5, 6, 6)).astype(dtype)
    loss_t = ref(torch.from_numpy(x))
    loss_t.backward()
    loss, grads = model.loss_and_grads(params, x)
    assert_close(loss, loss_t.detach().numpy(), name="loss")
    theirs = dict(ref.named_parameters())
    if dtype == "float64":
        for name in grads:
            assert_close(grads[name], theirs[name].grad.numpy(), name=name)
    else:  # a bias gradient can cancel to far below its terms: float32 is judged on the whole
        flat = np.concatenate([theirs[name].grad.numpy().ravel() for name in grads])
        assert_close(grads.flat, flat, name="all gradients")


@fast
@given(seeds, st.integers(1, 6), st.integers(1, 9))
def test_digit_sequences_follow_the_rule(seed, b, t):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), 3)
    images = rng.standard_normal((30, 2, 2))
    x, seq_labels, delta = digit_sequences(images, labels, rng, b, t, deltas=(1, 3))
    assert x.shape == (b, t, 4) and set(delta) <= {1, 3}
    assert np.all(np.diff(seq_labels, axis=1) % 10 == delta[:, None] % 10)
    flat = images.reshape(30, -1)
    for i in range(b):  # every step is an image of the step's class
        for j in range(t):
            rows = np.flatnonzero(np.all(flat == x[i, j], axis=1))
            assert rows.size == 1 and labels[rows[0]] == seq_labels[i, j]


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_steps"):
        CPC(num_steps=0)
    with pytest.raises(ValueError, match="labels"):
        digit_sequences(np.zeros((3, 4)), np.array([0, 1, 2]), np.random.default_rng(0), 2, 3)
    model = CPC(4, 3, 2, 2, 1)
    with pytest.raises(ValueError, match="x"):
        model.forward(model.init(np.random.default_rng(0)), np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="num_steps"):
        CPCConfig(seq_len=3, num_steps=3)
    with pytest.raises(ValueError, match="batch_size"):
        CPCConfig(batch_size=1)
    with pytest.raises(ValueError, match="lr"):
        CPCConfig(lr=0.0)
    for seed, error in ((-1, ValueError), (2**32, ValueError), (1.5, TypeError)):
        with pytest.raises(error, match="^seed: expected"):  # was accepted, to fail mid-run
            CPCConfig(seed=seed)
    assert CPCConfig(seed=2**32 - 1).seed == 2**32 - 1


@pytest.fixture(scope="module")
def tiny_digits():
    """A stratified 400-image subset of the digits (probes run in well under a second)."""
    from refmoco.data import Dataset, load_digits

    ds = load_digits(seed=0)
    return Dataset(ds.x_train[:300], ds.y_train[:300], ds.x_test[:100], ds.y_test[:100], "tiny")


def test_short_training_lowers_the_test_loss(tiny_digits):
    cfg = CPCConfig(train_steps=60, batch_size=16, seq_len=5, num_steps=2, hidden=32,
                    embed_dim=8, context_dim=8, eval_every=30, lr=3e-3)  # fmt: skip
    m = train_cpc(cfg, dataset=tiny_digits)
    assert [r["step"] for r in m["history"]] == [30, 60]
    assert abs(m["random_init"]["test_loss"] - math.log(16)) < 0.05  # chance at init
    assert m["final"]["test_loss"] < m["random_init"]["test_loss"] - 0.2
    assert m["final"]["mi_bound"] == pytest.approx(math.log(16) - m["final"]["test_loss"])


def test_cli_writes_metrics_and_plot(tmp_path, monkeypatch, tiny_digits, capsys):
    import refmoco.data
    from refmoco.cli_extra import main

    monkeypatch.setattr(refmoco.data, "load_digits", lambda seed=0: tiny_digits)
    rc = main(["cpc", "--steps", "4", "--batch-size", "8", "--seq-len", "4", "--predict-steps",
               "2", "--hidden", "8", "--embed-dim", "4", "--context-dim", "4", "--eval-every",
               "2", "--out", str(tmp_path), "--no-progress"])  # fmt: skip
    assert rc == 0
    metrics = json.loads((tmp_path / "cpc.json").read_text())
    assert metrics["config"]["train_steps"] == 4 and len(metrics["history"]) == 2
    assert metrics["log_batch_size"] == pytest.approx(math.log(8))
    assert (tmp_path / "cpc.png").stat().st_size > 0
    assert json.loads(capsys.readouterr().out)["final"] == metrics["final"]


# ---------------------------------------------------------------------------------- on the device


@pytest.fixture(params=["fake", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request, monkeypatch):
    """The device's array module: real CuPy on a GPU, or the strict stand-in on the host."""
    return device_module(request.param, monkeypatch)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_on_the_device_equals_numpy(xp, dtype):
    """The same seed gives the same weights on the device; encodings, contexts, loss and every
    gradient equal NumPy's, stay on the device and keep the dtype; so do three Adam steps in
    float64 (in float32, Adam's ``g / sqrt(v)`` would turn the rounding of a gradient that
    cancels to ~0 into an update of size ``lr``)."""
    model = CPC(in_features=6, hidden=8, embed_dim=4, context_dim=5, num_steps=2)
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((5, 4, 6)) for _ in range(3)]  # float64: cast to the params' dtype
    frames = rng.standard_normal((7, 6))
    results = []
    for backend, move in (("numpy", np.asarray), ("cupy", xp.asarray)):
        params = model.init(np.random.default_rng(0), dtype, backend=backend)
        assert params.backend == backend and params.dtype == np.dtype(dtype)
        out = {"init": params.flat.copy(), "encode": model.encode(params, move(frames))}
        out["z"], out["c"], _ = model.forward(params, move(xs[0]))
        out["loss"], grads = model.loss_and_grads(params, move(xs[0]))
        assert grads.same_layout(params) and grads.backend == backend
        out["grads"] = grads.flat
        opt = Adam(lr=1e-2)
        for i, x in enumerate(xs if dtype == "float64" else []):
            loss, grads = model.loss_and_grads(params, move(x))
            opt.step(params, grads)
            out[f"loss {i}"] = loss
        out["trained"] = params.flat
        results.append(out)
    ref, dev = results
    for name, want in ref.items():
        assert want.dtype == np.dtype(dtype), name
        assert isinstance(dev[name], xp.ndarray), name  # nothing left the device
        assert_same(dev[name], want, name)


def test_mixing_host_and_device_arrays_is_a_type_error(xp):
    model = CPC(in_features=4, hidden=3, embed_dim=2, context_dim=2, num_steps=1)
    p_dev = model.init(np.random.default_rng(0), "float32", backend="cupy")
    p_host = model.init(np.random.default_rng(0), "float32")
    x = np.ones((2, 3, 4), np.float32)
    x_dev = xp.asarray(x)
    for params, wrong in ((p_dev, x), (p_host, x_dev)):
        with pytest.raises(TypeError, match="^x: "):
            model.loss_and_grads(params, wrong)
        with pytest.raises(TypeError, match="^x: "):
            model.forward(params, wrong)
        with pytest.raises(TypeError, match="^x: "):
            model.encode(params, wrong[0])
    with pytest.raises(ValueError, match="backend"):
        model.init(np.random.default_rng(0), backend="gpu")
    loss, _ = model.loss_and_grads(p_dev, x_dev)  # the right arrays work
    assert isinstance(loss, xp.ndarray) and np.isfinite(float(loss))
