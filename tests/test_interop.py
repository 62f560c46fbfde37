"""The reproductions against the real packages, where they install beside CPU PyTorch, and
refmoco's results handed back as the caller's tensors (PyTorch, JAX).

Each package test skips when its package is missing. lightly imports torchvision from its
package ``__init__``; where torchvision is missing, its two source files that matter
(``loss/ntx_ent_loss.py``, ``models/modules/memory_bank.py``) are loaded on their own.
"""

import functools
import importlib.util
import pathlib
import sys
import types

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import refmoco
from refmoco.conventions import info_nce_pytorch, lightly, moco, pml
from refmoco.testing import assert_close, like
from refmoco.testing.strategies import embeddings, info_nce_inputs, labelled_batches

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


DTYPES = [np.float64, np.float32]


def tensor(a, grad=True):
    return torch.tensor(a, requires_grad=grad)


def grad_of(t):
    return np.zeros(tuple(t.shape), dtype=str(t.dtype).replace("torch.", "")) if t.grad is None \
        else t.grad.numpy()


def check(actual, expected, dtype, name, scale=1.0):
    """Relative tolerance by dtype (5e-14 in float64, 100 eps in float32), with an absolute floor
    of the same relative size of ``scale``, the size of the terms that cancel: a gradient through
    ``normalize`` and a division by T is a difference of terms of size 1 / (T * min |x|).
    float64: the error measured against the packages is at most 7.9e-16 of (max|expected| +
    scale) (1000 hypothesis examples per test; 5.6e-16 in the CI profile's), so 5e-14 leaves
    60x for other BLAS and PyTorch kernels' summation orders."""
    rtol = 5e-14 if dtype == np.float64 else 100 * float(np.finfo(np.float32).eps)
    assert_close(actual, expected, rtol=rtol, atol=rtol * scale, check_dtype=False, name=name)


def term_scale(temperature, *arrays):
    return 1.0 / (temperature * min(np.linalg.norm(a.reshape(-1, a.shape[-1]), axis=1).min()
                                    for a in arrays))


# -- PyTorch Metric Learning -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@given(batch=labelled_batches(n=(1, 8), dim=(1, 5), num_classes=(1, 3)))
def test_pml_losses_match_the_package(dtype, batch):
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    x, labels = batch[0].astype(dtype), batch[1]
    assume(np.linalg.norm(x, axis=1).min() > 1e-2)
    for t, theirs, ours in ((1.0, losses.ContrastiveLoss(pos_margin=0.1, neg_margin=0.9),
                             functools.partial(pml.contrastive_loss, pos_margin=0.1,
                                               neg_margin=0.9)),
                            (0.2, losses.NTXentLoss(temperature=0.2),
                             functools.partial(pml.ntxent_loss, temperature=0.2))):
        xt = tensor(x)
        loss = theirs(xt, torch.tensor(labels))
        loss.backward()
        out = ours(x, labels)
        check(out.loss, loss.detach().numpy(), dtype, "loss", 1 / t)
        check(out.grads["embeddings"], grad_of(xt), dtype, "grad", term_scale(t, x))


@pytest.mark.parametrize("dtype", DTYPES)
@given(st.integers(1, 6).flatmap(lambda size: st.tuples(
    st.just(size), st.lists(labelled_batches(n=(1, size), dim=3, num_classes=2),
                            min_size=1, max_size=5))), st.booleans())
def test_pml_cross_batch_memory_matches_the_package(dtype, scenario, masked):
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    size, batches = scenario
    theirs = losses.CrossBatchMemory(losses.NTXentLoss(0.3), 3, memory_size=size)
    ours = pml.CrossBatchMemory(functools.partial(pml.ntxent_loss, temperature=0.3), 3,
                                memory_size=size)
    for x, labels in batches:
        x = x.astype(dtype)
        assume(np.linalg.norm(x, axis=1).min() > 1e-2)
        mask = (np.arange(len(x)) % 2 == 1) if masked else None  # pml's MoCo-style use
        xt = tensor(x)
        loss = theirs(xt, torch.tensor(labels),
                      enqueue_mask=None if mask is None else torch.tensor(mask))
        if loss.requires_grad:
            loss.backward()
        out = ours(x, labels, enqueue_mask=mask)
        check(out.loss, loss.detach().numpy(), dtype, "loss", 1 / 0.3)
        check(out.grads["embeddings"], grad_of(xt), dtype, "grad", term_scale(0.3, x))
        check(ours.embedding_memory, theirs.embedding_memory.numpy(), dtype, "memory")
        assert ours.queue_idx == theirs.queue_idx


# -- info-nce-pytorch ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["queue", "per_query", "in_batch"])
@given(data=st.data())
def test_info_nce_pytorch_matches_the_package(dtype, mode, data):
    package = pytest.importorskip("info_nce")
    inputs = data.draw(info_nce_inputs(mode, unit=False, dtype=dtype))
    arrays = [a for a in (inputs["q"], inputs["k"], inputs["negatives"]) if a is not None]
    assume(min(np.linalg.norm(a.reshape(-1, a.shape[-1]), axis=1).min() for a in arrays) > 1e-2)
    paired = "paired" if mode == "per_query" else "unpaired"
    tensors = [tensor(a) for a in arrays]
    loss = package.info_nce(*tensors, temperature=0.1, negative_mode=paired)
    loss.backward()
    out = info_nce_pytorch.info_nce(*arrays, negative_mode=paired)
    check(out.loss, loss.detach().numpy(), dtype, "loss", 1 / 0.1)
    for name, t in zip(("query", "positive_key", "negative_keys"), tensors):
        check(out.grads[name], grad_of(t), dtype, name, term_scale(0.1, *arrays))


# -- lightly ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def lightly_modules():
    """(ntx_ent_loss, memory_bank) modules of the installed lightly, or skip."""
    try:
        from lightly.loss import ntx_ent_loss
        from lightly.models.modules import memory_bank
        return ntx_ent_loss, memory_bank
    except ImportError:
        pass
    spec = importlib.util.find_spec("lightly")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("lightly is not installed")
    root = pathlib.Path(next(iter(spec.submodule_search_locations)))
    saved = {k: v for k, v in sys.modules.items() if k == "lightly" or k.startswith("lightly.")}
    try:  # stand-in packages, so that only the two files (and lightly.utils.dist) execute
        for name in ("lightly", "lightly.models", "lightly.models.modules", "lightly.utils",
                     "lightly.loss"):
            sys.modules[name] = types.ModuleType(name)
            sys.modules[name].__path__ = []
        sys.modules["lightly.models.utils"] = types.ModuleType("lightly.models.utils")
        sys.modules["lightly.models"].utils = sys.modules["lightly.models.utils"]
        loaded = []
        for name, path in (("lightly.utils.dist", "utils/dist.py"),
                           ("lightly.models.modules.memory_bank",
                            "models/modules/memory_bank.py"),
                           ("lightly.loss.ntx_ent_loss", "loss/ntx_ent_loss.py")):
            file_spec = importlib.util.spec_from_file_location(name, root / path)
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[name] = module
            file_spec.loader.exec_module(module)
            loaded.append(module)
        sys.modules["lightly.utils"].dist = loaded[0]
        return loaded[2], loaded[1]
    except Exception as exc:  # a layout this loader does not know
        pytest.skip(f"lightly's sources could not be loaded without torchvision: {exc}")
    finally:
        for name in [k for k in sys.modules if k == "lightly" or k.startswith("lightly.")]:
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.mark.parametrize("dtype", DTYPES)
@given(st.integers(1, 5).flatmap(lambda n: st.tuples(embeddings(n, 3), embeddings(n, 3))))
def test_lightly_ntxent_without_bank_matches_the_package(dtype, views):
    ntx_ent_loss, _ = lightly_modules()
    out0, out1 = (v.astype(dtype) for v in views)
    assume(min(np.linalg.norm(out0, axis=1).min(), np.linalg.norm(out1, axis=1).min()) > 1e-2)
    t0, t1 = tensor(out0), tensor(out1)
    loss = ntx_ent_loss.NTXentLoss(temperature=0.3)(t0, t1)
    loss.backward()
    out = lightly.ntxent_loss(out0, out1, temperature=0.3)
    scale = term_scale(0.3, out0, out1)
    check(out.loss, loss.detach().numpy(), dtype, "loss", 1 / 0.3)
    check(out.grads["out0"], grad_of(t0), dtype, "out0", scale)
    check(out.grads["out1"], grad_of(t1), dtype, "out1", scale)


@given(st.integers(1, 8), st.lists(st.integers(1, 12), min_size=1, max_size=5),
       st.integers(0, 2**32 - 1))
def test_lightly_ntxent_with_its_memory_bank_matches_the_package(size, batch_sizes, seed):
    ntx_ent_loss, _ = lightly_modules()
    theirs = ntx_ent_loss.NTXentLoss(temperature=0.2, memory_bank_size=(size, 3))
    ours = lightly.NTXentLoss(0.2, memory_bank_size=(size, 3),
                              initial=theirs.memory_bank.bank.numpy())
    rng = np.random.default_rng(seed)
    for b in batch_sizes:  # float32: lightly's bank is float32
        out0, out1 = rng.standard_normal((2, b, 3)).astype(np.float32)
        t0, t1 = tensor(out0), tensor(out1)
        loss = theirs(t0, t1)
        loss.backward()
        out = ours(out0, out1)
        check(out.loss, loss.detach().numpy(), np.float32, "loss", 1 / 0.2)
        check(out.grads["out0"], grad_of(t0), np.float32, "out0", term_scale(0.2, out0, out1))
        check(ours.memory_bank.bank, theirs.memory_bank.bank.numpy(), np.float32, "bank")
        assert ours.memory_bank.ptr == int(theirs.memory_bank.bank_ptr)


# -- handing results back --------------------------------------------------------------------------
def torch_info_nce(q, k, negatives, temperature):
    """PyTorch's InfoNCE with a shared queue, and its gradients (q, k, negatives)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, negatives)]
    qt, kt, nt = leaves
    logits = torch.cat([(qt * kt).sum(1, keepdim=True), qt @ nt.T], dim=1) / temperature
    loss = torch.nn.functional.cross_entropy(logits, torch.zeros(len(qt), dtype=torch.long))
    loss.backward()
    return loss.detach().numpy(), {n: t.grad.numpy() for n, t in zip(("q", "k", "negatives"),
                                                                       leaves)}


def test_like_returns_torch_tensors_of_the_callers_dtype(rng):
    """float16/bfloat16 (API.md; ``as_array``, ``float_array``): widened to float32, which is
    exact, computed in float32 (a float32 result equal bit for bit to the float32 call's), and
    handed back by ``like`` rounded once to the caller's dtype. The float32 call itself is
    checked against PyTorch's float32 InfoNCE."""
    base = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((4, 3))), dim=1)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        q = base.to(dtype)
        raw = refmoco.info_nce_loss(q, q, q[:2], temperature=0.5)
        out = like(raw, q)
        assert isinstance(out.loss, torch.Tensor) and out.loss.dtype == dtype
        assert out.grads["q"].dtype == dtype and out.grads["q"].shape == q.shape
        if dtype not in (torch.float16, torch.bfloat16):
            continue
        wide = q.float()  # every float16 and bfloat16 value is a float32 value
        assert torch.equal(wide.to(dtype), q)
        expected = refmoco.info_nce_loss(wide, wide, wide[:2], temperature=0.5)
        loss32, grads32 = torch_info_nce(wide, wide, wide[:2], 0.5)
        check(expected.loss, loss32, np.float32, "float32 loss", 1 / 0.5)
        for name in ("q", "k", "negatives"):
            check(expected.grads[name], grads32[name], np.float32, name, term_scale(0.5, wide))
        inputs = [q]
        if dtype == torch.float16:  # the same values as NumPy arrays
            inputs.append(q.numpy())
        if dtype == torch.bfloat16 and importlib.util.find_spec("ml_dtypes"):
            import ml_dtypes

            inputs.append(wide.numpy().astype(ml_dtypes.bfloat16))  # JAX's bfloat16 arrays
        for x in inputs:
            got = refmoco.info_nce_loss(x, x, x[:2], temperature=0.5)
            back = like(got, x)
            for name, value, value32 in [("loss", got.loss, expected.loss),
                                         *[(n, got.grads[n], expected.grads[n])
                                           for n in expected.grads]]:
                assert value.dtype == np.float32, (type(x), name)
                np.testing.assert_array_equal(value, value32, err_msg=f"{type(x)} {name}")
            for returned, value32 in [(back.loss, expected.loss),
                                      *[(back.grads[n], expected.grads[n])
                                        for n in expected.grads]]:
                rounded = torch.from_numpy(np.asarray(value32)).to(dtype)  # rounded once
                if isinstance(x, torch.Tensor):
                    assert returned.dtype == dtype and torch.equal(returned, rounded)
                else:
                    assert returned.dtype == x.dtype
                    assert np.array_equal(returned.astype(np.float32), rounded.float().numpy())
    queue = moco.MoCoQueue(3, 4, initial=np.zeros((3, 4)))
    back = like(queue.queue, torch.zeros(1, dtype=torch.float32))  # a read-only view: copied
    back += 1
    assert back.dtype == torch.float32 and np.all(queue.queue == 0)
    assert like({"a": [np.ones(2)]}, torch.zeros(1))["a"][0].tolist() == [1.0, 1.0]
    labels = like(np.arange(3), torch.zeros(1, dtype=torch.float16))
    assert labels.dtype == torch.int64  # only floating results take the caller's dtype


def test_cpu_tensors_are_read_without_a_copy():
    t = torch.randn(5, 3, dtype=torch.float64)
    target = {"w": t}
    refmoco.momentum_update(target, {"w": torch.zeros(5, 3, dtype=torch.float64)}, 0.5)
    assert target["w"] is t  # updated in place through DLPack
    assert np.shares_memory(refmoco.to_numpy(t), t.numpy())


def test_jax_arrays_go_in_and_come_back():
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    q = jnp.asarray(np.eye(3, dtype=np.float32))
    out = like(refmoco.info_nce_loss(q, q, None, temperature=0.5), q)
    assert isinstance(out.loss, jax.Array) and out.grads["q"].dtype == jnp.float32
    expected = np.log(np.exp(2.0) + 2) - 2.0
    assert abs(float(out.loss) - expected) < 1e-6
    k = jnp.asarray(np.eye(3, dtype=np.float32))  # the keys as a constant: d/dq only
    grad = jax.grad(lambda x: jnp.mean(jax.nn.logsumexp(x @ k.T / 0.5, axis=1)
                                       - jnp.sum(x * k, axis=1) / 0.5))(q)
    assert_close(out.grads["q"], np.asarray(grad), name="dq")
