"""One training step of each mechanism against a float64 recomputation written separately in
PyTorch (autograd, torch.optim.SGD, torch BatchNorm), with the same weights, views and draws."""

import copy

import numpy as np
import pytest

from refmoco import MemoryBank, Queue
from refmoco.mechanisms import EndToEnd, MemoryBankMechanism, MoCo
from refmoco.nn import Flatten, Linear, ReLU, Sequential, cnn_encoder, mlp_encoder
from refmoco.nn.models import Encoder
from refmoco.optim import SGD
from refmoco.testing.torch_models import torch_twin

torch = pytest.importorskip("torch")
F = torch.nn.functional
pytestmark = pytest.mark.torch

LR, WD, SGD_M, T = 0.1, 5e-4, 0.9, 0.2


def build(kind, seed=0):
    if kind == "mlp":
        enc = mlp_encoder(in_features=16, hidden=12, feat_dim=10, out_dim=6)
        shape = (16,)
    elif kind == "cnn":
        enc = cnn_encoder(in_channels=1, widths=(3, 4, 5), out_dim=6)
        shape = (1, 6, 6)
    else:  # no batch norm anywhere: shuffle BN must then be invisible
        enc = Encoder(Sequential(Flatten(), Linear(16, 10), ReLU()),
                      Sequential(Linear(10, 10), ReLU(), Linear(10, 6)))
        shape = (16,)
    params, buffers = enc.init(np.random.default_rng(seed), "float64")
    return enc, params, buffers, shape


def split_bn(net, x, grp):
    """``net`` over each group of rows in training mode, its batch norms' running statistics
    updated as the ``SplitBatchNorm`` of MoCo's CIFAR-10 demo does: every group from the same
    running statistics, then their mean (and one more batch counted)."""
    bns = [b for b in net.modules() if isinstance(b, torch.nn.modules.batchnorm._BatchNorm)]
    start = [{k: v.clone() for k, v in b.named_buffers()} for b in bns]
    means = [{k: torch.zeros_like(v) for k, v in s.items() if v.is_floating_point()} for s in start]
    outs = []
    for g in grp:
        with torch.no_grad():
            for b, s in zip(bns, start):
                for k, v in b.named_buffers():  # .data: the graph saved these (unused) tensors
                    v.data.copy_(s[k])
        outs.append(net(x[g]))
        with torch.no_grad():
            for b, mean in zip(bns, means):
                for k, v in b.named_buffers():
                    if k in mean:
                        mean[k] += v / len(grp)
    with torch.no_grad():
        for b, mean in zip(bns, means):
            for k, v in b.named_buffers():
                if k in mean:
                    v.data.copy_(mean[k])
    return torch.cat(outs)


def views(shape, n, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *shape)), rng.normal(size=(n, *shape))


def torch_params(net):
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


# float64 steps, against PyTorch or between backends: an error is relative to the size of the
# array's entries (rounding in sums), not to each entry. Measured at most 4.0e-15 of max|expected|
# against PyTorch (a batch norm's bias, MoCo, MLP, 3 groups) and 1.4e-15 numba against numpy:
# REL = 1e-13 leaves 25x (70x) for other BLAS and kernels' summation orders.
REL = 1e-13


def assert_near(actual, expected, name=""):
    """Float entries to REL of the largest expected magnitude; any other (integers, flags,
    a generator's state) exactly."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, name
    if expected.dtype.kind != "f":
        np.testing.assert_array_equal(actual, expected, err_msg=name)
    else:
        np.testing.assert_allclose(actual, expected, rtol=0,
                                   atol=REL * np.abs(expected).max(initial=0.0), err_msg=name)


def assert_state(ours: dict, theirs: dict):
    assert set(ours) == set(theirs)
    for k, v in ours.items():
        assert_near(v, theirs[k], k)


@pytest.mark.parametrize("kind, groups", [("mlp", 1), ("mlp", 3), ("cnn", 2)])
def test_moco_steps_match_torch(kind, groups):
    enc, params, buffers, shape = build(kind)
    n, K, m, steps = 8, 13, 0.9, 2
    queue = Queue(K, 6, dtype="float64", seed=1)
    moco = MoCo(enc, params, buffers, SGD(LR, momentum=SGD_M, weight_decay=WD), queue=queue,
                momentum=m, temperature=T, bn_groups=groups, seed=7)
    net_q = torch_twin(enc, params, buffers)
    net_k = copy.deepcopy(net_q)
    opt = torch.optim.SGD(net_q.parameters(), lr=LR, momentum=SGD_M, weight_decay=WD)
    t_queue = torch.tensor(queue.keys.copy())  # (K, C), rows
    ptr = 0
    perm_rng = np.random.default_rng(7)
    for step in range(steps):
        xq, xk = views(shape, n, step)
        ids = np.arange(step * n, (step + 1) * n)
        stats = moco.step(xq, xk, ids, LR)
        # -- the recomputation, as in MoCo's builder.py ------------------------------------
        grp = np.array_split(np.arange(n), groups)
        q = F.normalize(split_bn(net_q, torch.tensor(xq), grp), dim=1)
        with torch.no_grad():
            for pk, pq in zip(net_k.parameters(), net_q.parameters()):
                pk.mul_(m).add_(pq.detach(), alpha=1 - m)
            perm = perm_rng.permutation(n)
            ks = split_bn(net_k, torch.tensor(xk[perm]), grp)
            k = torch.empty_like(ks)
            k[torch.tensor(perm)] = F.normalize(ks, dim=1)
        l_pos = torch.einsum("nc,nc->n", q, k)[:, None]
        l_neg = torch.einsum("nc,kc->nk", q, t_queue.clone())  # as builder.py: a snapshot
        loss = F.cross_entropy(torch.cat([l_pos, l_neg], 1) / T, torch.zeros(n, dtype=torch.long))
        for j in range(n):  # enqueue one row at a time (no divisibility assumption)
            t_queue[(ptr + j) % K] = k[j]
        ptr = (ptr + n) % K
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert stats.loss == pytest.approx(loss.item(), rel=1e-12)
    assert_state({**moco.params, **moco.buffers}, torch_params(net_q))
    assert_state({**moco.key_params, **moco.key_buffers}, torch_params(net_k))
    assert_near(moco.queue.keys, t_queue.numpy(), "queue")
    assert moco.queue.ptr == ptr


def test_shuffle_bn_is_invisible_without_batch_norm():
    results = []
    for groups in (1, 4):
        enc, params, buffers, shape = build("nobn")
        moco = MoCo(enc, params, buffers, SGD(LR, momentum=SGD_M), bn_groups=groups, seed=3,
                    queue=Queue(10, 6, dtype="float64"), momentum=0.9, temperature=T)
        xq, xk = views(shape, 8, 0)
        loss = moco.step(xq, xk, np.arange(8), LR).loss
        results.append((loss, moco.params.flat.copy(), moco.queue.keys.copy()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-13)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(results[0][2], results[1][2], rtol=1e-12, atol=1e-15)


def test_shuffle_bn_changes_the_keys_with_batch_norm():
    losses = []
    for groups in (1, 4):
        enc, params, buffers, shape = build("mlp")
        moco = MoCo(enc, params, buffers, SGD(LR), queue=Queue(10, 6, dtype="float64"),
                    momentum=0.9, temperature=T, bn_groups=groups, seed=3)
        xq, xk = views(shape, 8, 0)
        losses.append(moco.step(xq, xk, np.arange(8), LR).loss)
    assert losses[0] != pytest.approx(losses[1], rel=1e-6)


def test_end_to_end_step_matches_torch():
    enc, params, buffers, shape = build("mlp")
    mech = EndToEnd(enc, params, buffers, SGD(LR, momentum=SGD_M, weight_decay=WD),
                    temperature=T)
    net = torch_twin(enc, params, buffers)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=SGD_M, weight_decay=WD)
    for step in range(2):
        xq, xk = views(shape, 8, step)
        stats = mech.step(xq, xk, np.arange(8), LR)
        q = F.normalize(net(torch.tensor(xq)), dim=1)
        k = F.normalize(net(torch.tensor(xk)), dim=1)
        loss = F.cross_entropy(q @ k.T / T, torch.arange(8))
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert stats.loss == pytest.approx(loss.item(), rel=1e-12)
    assert_state({**mech.params, **mech.buffers}, torch_params(net))


def test_memory_bank_step_matches_torch():
    enc, params, buffers, shape = build("mlp")
    n_data, M, n = 20, 7, 6
    bank = MemoryBank(n_data, 6, momentum=0.5, dtype="float64", seed=2)
    mech = MemoryBankMechanism(enc, params, buffers, SGD(LR, momentum=SGD_M), bank=bank,
                               num_negatives=M, temperature=T)
    net = torch_twin(enc, params, buffers)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=SGD_M)
    t_bank = torch.tensor(bank.bank.copy())
    draw_rng = np.random.default_rng(2)
    draw_rng.bit_generator.state = bank.rng.bit_generator.state
    for step in range(2):
        xq, xk = views(shape, n, step)
        ids = np.arange(step * n, (step + 1) * n)
        stats = mech.step(xq, xk, ids, LR)
        # uniform over the other rows, drawn as the bank does
        draws = draw_rng.integers(0, n_data - 1, size=(n, M))
        negs = draws + (draws >= ids[:, None])
        assert not (negs == ids[:, None]).any()
        q = F.normalize(net(torch.tensor(xq)), dim=1)
        pos = (q * t_bank[ids]).sum(1, keepdim=True)
        neg = torch.einsum("nc,nmc->nm", q, t_bank[negs])
        loss = F.cross_entropy(torch.cat([pos, neg], 1) / T, torch.zeros(n, dtype=torch.long))
        with torch.no_grad():
            t_bank[ids] = F.normalize(0.5 * t_bank[ids] + 0.5 * q, dim=1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert stats.loss == pytest.approx(loss.item(), rel=1e-12)
    assert_state({**mech.params, **mech.buffers}, torch_params(net))
    assert_near(mech.bank.bank, t_bank.numpy(), "bank")


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("mechanism", ["moco", "end-to-end", "memory-bank"])
def test_numba_backend_step_equals_the_numpy_step(mechanism, kind):
    """The CNN runs its convolutions and batch norms through refmoco.kernels.nn_cpu."""
    pytest.importorskip("numba")
    results = []
    for backend in ("numpy", "numba"):
        enc, params, buffers, shape = build(kind)
        opt = SGD(LR, momentum=SGD_M, weight_decay=WD, backend=backend)
        if mechanism == "moco":
            mech = MoCo(enc, params, buffers, opt, queue=Queue(13, 6, dtype="float64"),
                        momentum=0.9, temperature=T, bn_groups=2, backend=backend)
        elif mechanism == "end-to-end":
            mech = EndToEnd(enc, params, buffers, opt, temperature=T, backend=backend)
        else:
            mech = MemoryBankMechanism(enc, params, buffers, opt, num_negatives=5,
                                       bank=MemoryBank(20, 6, dtype="float64"), temperature=T,
                                       backend=backend)
        losses = [mech.step(*views(shape, 8, s), np.arange(8) + 8 * s, LR).loss
                  for s in range(2)]
        results.append((losses, mech.state_dict()))
    (loss_a, state_a), (loss_b, state_b) = results
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-12)
    assert set(state_a) == set(state_b)
    for key in state_a:
        assert_near(state_b[key], state_a[key], key)


@pytest.mark.parametrize("mechanism", ["moco", "end-to-end", "memory-bank"])
def test_load_state_dict_is_all_or_nothing(mechanism):
    """A state whose last-loaded entry is malformed leaves the mechanism exactly as it was,
    though the entries before it (queue or bank, parameters, buffers) were already valid."""
    def make(seed):
        enc, params, buffers, shape = build("mlp", seed=seed)
        opt = SGD(LR, momentum=SGD_M, weight_decay=WD)
        if mechanism == "moco":
            return MoCo(enc, params, buffers, opt, queue=Queue(13, 6, dtype="float64", seed=seed),
                        momentum=0.9, temperature=T, seed=seed), shape
        if mechanism == "end-to-end":
            return EndToEnd(enc, params, buffers, opt, temperature=T), shape
        return MemoryBankMechanism(enc, params, buffers, opt, num_negatives=5,
                                   bank=MemoryBank(20, 6, dtype="float64", seed=seed),
                                   temperature=T), shape

    mech, shape = make(0)
    mech.step(*views(shape, 8, 0), np.arange(8), LR)
    other, _ = make(1)
    other.step(*views(shape, 8, 1), np.arange(8) + 8, LR)
    before = mech.state_dict()
    bad = other.state_dict()
    bad["optimizer/step_count"] = np.array(-3)  # the optimizer is loaded after the rest
    with pytest.raises(ValueError, match="step_count"):
        mech.load_state_dict(bad)
    after = mech.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)
    mech.load_state_dict(other.state_dict())  # a good state still loads
    for key, value in other.state_dict().items():
        np.testing.assert_array_equal(mech.state_dict()[key], value, err_msg=key)


def _mechanism(kind, **options):
    enc, params, buffers, shape = build("mlp")
    opt = SGD(LR, momentum=SGD_M)
    if kind == "moco":
        args = dict(queue=Queue(13, 6, dtype="float64"), momentum=0.9, temperature=T, seed=3)
        return MoCo(enc, params, buffers, opt, **{**args, **options}), shape
    if kind == "end-to-end":
        return EndToEnd(enc, params, buffers, opt, **{"temperature": T, **options}), shape
    args = dict(bank=MemoryBank(20, 6, dtype="float64"), num_negatives=5, temperature=T)
    return MemoryBankMechanism(enc, params, buffers, opt, **{**args, **options}), shape


@pytest.mark.parametrize("kind, options, error, match", [
    ("moco", dict(momentum=1.5), ValueError, "momentum"),
    ("moco", dict(momentum="0.9"), TypeError, "momentum"),
    ("moco", dict(temperature=-0.2), ValueError, "temperature"),
    ("moco", dict(bn_groups=0), ValueError, "bn_groups"),
    ("moco", dict(bn_groups=2.0), TypeError, "bn_groups"),
    ("moco", dict(queue=Queue(13, 5, dtype="float64")), ValueError, "queue.*output size 6"),
    ("moco", dict(queue=Queue(13, 6, dtype="float32")), TypeError, "queue.*float64"),
    ("end-to-end", dict(temperature=0), ValueError, "temperature"),
    ("memory-bank", dict(num_negatives=0), ValueError, "num_negatives"),
    ("memory-bank", dict(bank=MemoryBank(20, 7, dtype="float64")), ValueError, "bank"),
    ("memory-bank", dict(bank=MemoryBank(1, 6, dtype="float64")), ValueError, "bank.*2 rows"),
])
def test_a_bad_option_is_refused_when_the_mechanism_is_made(kind, options, error, match):
    with pytest.raises(error, match=match):
        _mechanism(kind, **options)


@pytest.mark.parametrize("kind", ["moco", "end-to-end", "memory-bank"])
@pytest.mark.parametrize("bad, error, match", [
    (dict(x_k=np.zeros((10, 16))), ValueError, "x_k.*shape"),  # extra key rows
    (dict(x_k=np.zeros((6, 16))), ValueError, "x_k.*shape"),
    (dict(ids=np.arange(7)), ValueError, "ids.*shape"),
    (dict(ids=None), TypeError, "ids"),
    (dict(ids=np.arange(8.0)), TypeError, "ids.*integers"),
    (dict(lr=-0.1), ValueError, "lr"),
    (dict(lr=float("nan")), ValueError, "lr"),
    (dict(lr="0.1"), TypeError, "lr"),
    (dict(lr=True), TypeError, "lr"),
])
def test_a_refused_step_leaves_the_mechanism_unchanged(kind, bad, error, match):
    """Every argument is checked before the first forward pass: a rejected step has changed
    no parameter, buffer, optimizer state, key encoder, queue, bank or random state."""
    mech, shape = _mechanism(kind)
    mech.step(*views(shape, 8, 0), np.arange(8), LR)  # a state with momentum buffers etc.
    before = mech.state_dict()
    xq, xk = views(shape, 8, 1)
    args = {"x_q": xq, "x_k": xk, "ids": np.arange(8) + 8, "lr": LR, **bad}
    with pytest.raises(error, match=match):
        mech.step(args["x_q"], args["x_k"], args["ids"], args["lr"])
    after = mech.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)


def test_a_memory_bank_step_with_repeated_or_unknown_ids_changes_nothing():
    for ids, match in ((np.array([0, 1, 2, 3, 4, 5, 6, 6]), "distinct"),
                       (np.arange(8) + 15, r"ids.*\[0, 20\)")):
        mech, shape = _mechanism("memory-bank")
        before = mech.state_dict()
        with pytest.raises(ValueError, match=match):
            mech.step(*views(shape, 8, 0), ids, LR)
        for key, value in mech.state_dict().items():
            np.testing.assert_array_equal(value, before[key], err_msg=key)


def test_shuffle_bn_counts_one_batch_and_averages_the_groups_statistics():
    """With g groups, each running statistic moves once: ``(1 - 0.1) * old + 0.1 * mean over
    the groups`` of the group's batch mean (or unbiased variance), recomputed here from the
    rows with NumPy; a sequential update would move it to ``1 - 0.9^g`` of the way."""
    enc, params, buffers, shape = build("mlp")
    groups = 4
    mech = MoCo(enc, params, buffers, SGD(LR), queue=Queue(13, 6, dtype="float64"),
                momentum=0.9, temperature=T, bn_groups=groups, seed=3)
    old = {k: v.copy() for k, v in mech.buffers.items()}
    xq, xk = views(shape, 16, 0)
    w, b = np.asarray(mech.params["backbone.1.weight"]), np.asarray(mech.params["backbone.1.bias"])
    h = xq @ w.T + b  # the first Linear's output: what the first batch norm normalises
    parts = np.array_split(h, groups)
    mean = np.mean([p.mean(axis=0) for p in parts], axis=0)
    var = np.mean([p.var(axis=0, ddof=1) for p in parts], axis=0)
    mech.step(xq, xk, np.arange(16), LR)
    prefix = "backbone.2."
    np.testing.assert_allclose(mech.buffers[prefix + "running_mean"],
                               0.9 * old[prefix + "running_mean"] + 0.1 * mean, rtol=1e-12)
    np.testing.assert_allclose(mech.buffers[prefix + "running_var"],
                               0.9 * old[prefix + "running_var"] + 0.1 * var, rtol=1e-12)
    assert mech.buffers[prefix + "num_batches_tracked"] == old[prefix + "num_batches_tracked"] + 1


@pytest.mark.parametrize("kind", ["moco", "end-to-end", "memory-bank"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_mechanism_steps_as_the_original_and_on_its_own(kind, how):
    """``copy.deepcopy`` (and pickling) of a mechanism failed on the array module it stored.
    The copy now takes the same step bit for bit, into its own parameters, key encoder, queue or
    bank: the original is not touched by it."""
    import copy
    import pickle

    mech, shape = _mechanism(kind)
    mech.step(*views(shape, 8, 0), np.arange(8), LR)
    twin = copy.deepcopy(mech) if how == "deepcopy" else pickle.loads(pickle.dumps(mech))
    before = mech.state_dict()
    xq, xk = views(shape, 8, 1)
    theirs = twin.step(xq, xk, np.arange(8) + 8, LR)
    for key, value in mech.state_dict().items():  # the copy's step left the original alone
        np.testing.assert_array_equal(value, before[key], err_msg=key)
    ours = mech.step(xq, xk, np.arange(8) + 8, LR)
    assert tuple(ours) == tuple(theirs)
    for key, value in mech.state_dict().items():
        np.testing.assert_array_equal(twin.state_dict()[key], value, err_msg=key)
    assert np.shares_memory(twin.params["head.2.bias"], twin.params.flat)
