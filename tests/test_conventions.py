"""Each reproduction in refmoco.conventions against its formula written out in float64 (loops),
and against a plain-PyTorch transcription of its source for the gradients."""

import doctest
import functools
import math

import naive
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import refmoco
from refmoco.conventions import cpc, info_nce_pytorch, lightly, margin, moco, pml
from refmoco.testing import assert_close, check_grad
from refmoco.testing.strategies import (
    cpc_sequences,
    embeddings,
    enqueue_batches,
    info_nce_inputs,
    labelled_batches,
    queues,
)

torch = pytest.importorskip("torch")
F = torch.nn.functional
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / max(math.sqrt(float(v @ v)), 1e-12)


def xent(logits, target):
    """-log softmax(logits)[target], summed so that a loss near 0 keeps its relative digits."""
    top = max(logits)
    return math.log(sum(math.exp(x - top) for x in logits)) + (top - logits[target])


def close(actual, expected, scale=1.0, name="value", rtol=1e-11):
    """Relative to the value, with an absolute floor of ``rtol * scale``: ``scale`` is the size
    of the terms that cancel (1/T for a gradient of logits divided by T), below which float64
    round-off of two different summation orders cannot be resolved."""
    assert_close(actual, expected, rtol=rtol, atol=rtol * scale, name=name)


def t64(a, grad=True):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


# -- MoCo v1/v2 ----------------------------------------------------------------------------------
@given(queues(size=(1, 8), dim=(1, 4)), st.data())
def test_moco_queue_equals_refmoco_queue_on_the_batch_sizes_moco_accepts(initial, data):
    size, dim = initial.shape
    b = data.draw(st.sampled_from([d for d in range(1, size + 1) if size % d == 0]))
    official = moco.MoCoQueue(dim, size, initial=initial.T)
    ours = refmoco.Queue(size, dim, dtype="float64")
    ours.load_state_dict(dict(ours.state_dict(), keys=initial.copy()))
    for keys in data.draw(enqueue_batches(dim, batch=b)):
        official.enqueue(keys)
        ours.enqueue(keys)
        np.testing.assert_array_equal(official.queue.T, ours.keys)
        assert official.ptr == ours.ptr


def test_moco_queue_asserts_that_the_batch_size_divides_k():
    queue = moco.MoCoQueue(2, 6)
    with pytest.raises(AssertionError, match="K % batch_size"):
        queue.enqueue(np.ones((4, 2)))


@given(info_nce_inputs("queue"), st.floats(0.05, 1.0))
def test_moco_loss_is_builder_py_written_out(inputs, temperature):
    q, k, queue_rows = inputs["q"], inputs["k"], inputs["negatives"]
    out = moco.moco_loss(q, k, queue_rows.T, temperature=temperature)
    expected = np.mean([xent([q[i] @ k[i] / temperature]
                             + [q[i] @ n / temperature for n in queue_rows], 0)
                        for i in range(len(q))])
    close(out.loss, np.float64(expected))
    # gradients: builder.py's forward in PyTorch, with every input requiring a gradient
    tq, tk, tqueue = t64(q), t64(k), t64(queue_rows.T)
    logits = torch.cat([torch.einsum("nc,nc->n", tq, tk).unsqueeze(-1),
                        torch.einsum("nc,ck->nk", tq, tqueue)], dim=1) / temperature
    F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long)).backward()
    for name, t in (("q", tq), ("k", tk), ("queue", tqueue)):
        close(out.grads[name], t.grad.numpy(), 1 / temperature, name=name)
    logits_np, labels = moco.moco_logits(q, k, queue_rows.T, temperature=temperature)
    close(logits_np, logits.detach().numpy(), 1 / temperature)
    assert labels.tolist() == [0] * len(q)


# -- MoCo v3 -------------------------------------------------------------------------------------
@given(st.integers(1, 4).flatmap(lambda n: st.tuples(*[embeddings(n, 3) for _ in range(4)])),
       st.floats(0.1, 2.0))
def test_moco_v3_loss_is_ctr_q1_k2_plus_ctr_q2_k1_times_2t(arrays, temperature):
    assume(min(np.linalg.norm(a, axis=1).min() for a in arrays) > 1e-3)  # normalize's kink
    q1, q2, k1, k2 = arrays
    out = moco.moco_v3_loss(q1, q2, k1, k2, temperature=temperature)

    def ctr(q, k):
        qn, kn = [unit(r) for r in q], [unit(r) for r in k]
        return 2 * temperature * np.mean([xent([qn[i] @ kn[j] / temperature
                                                 for j in range(len(k))], i)
                                          for i in range(len(q))])

    close(out.loss, np.float64(ctr(q1, k2) + ctr(q2, k1)))
    tensors = [t64(a) for a in arrays]
    t1, t2, s1, s2 = tensors

    def ctr_t(q, k):  # moco-v3 builder.py's ctr_loss
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        logits = torch.einsum("nc,mc->nm", [q, k]) / temperature
        return F.cross_entropy(logits, torch.arange(len(q))) * (2 * temperature)

    (ctr_t(t1, s2) + ctr_t(t2, s1)).backward()
    for name, t in zip(("q1", "q2", "k1", "k2"), tensors):
        close(out.grads[name], t.grad.numpy(), 1 / temperature, name=name)


# -- lightly ---------------------------------------------------------------------------------------
@given(st.integers(1, 4).flatmap(lambda n: st.tuples(embeddings(n, 3), embeddings(n, 3))),
       st.floats(0.1, 1.0))
def test_lightly_ntxent_without_bank_has_2n_rows_of_2n_minus_1_logits(views, temperature):
    out0, out1 = views
    assume(min(np.linalg.norm(out0, axis=1).min(), np.linalg.norm(out1, axis=1).min()) > 1e-3)
    n = len(out0)
    z = [unit(r) for r in out0] + [unit(r) for r in out1]  # 2N normalised rows
    terms = []
    for a in range(2 * n):
        others = [b for b in range(2 * n) if b != a]  # every row but itself
        logits = [z[a] @ z[b] / temperature for b in others]
        terms.append(xent(logits, others.index((a + n) % (2 * n))))
    result = lightly.ntxent_loss(out0, out1, temperature=temperature)
    close(result.loss, np.float64(np.mean(terms)))


@given(info_nce_inputs("queue", unit=False), st.floats(0.1, 1.0))
def test_lightly_ntxent_with_bank_is_moco_on_normalised_views(inputs, temperature):
    out0, out1, bank = inputs["q"], inputs["k"], inputs["negatives"]
    assume(min(np.linalg.norm(out0, axis=1).min(), np.linalg.norm(out1, axis=1).min()) > 1e-3)
    expected = np.mean([xent([unit(out0[i]) @ unit(out1[i]) / temperature]
                             + [unit(out0[i]) @ b / temperature for b in bank], 0)
                        for i in range(len(out0))])
    result = lightly.ntxent_loss(out0, out1, bank, temperature=temperature)
    close(result.loss, np.float64(expected))


def test_lightly_memory_bank_drops_the_part_of_a_batch_that_overflows():
    bank = lightly.MemoryBankModule(5, 1, initial=np.zeros((5, 1)), dtype="float64")
    bank.enqueue(np.array([[1.0], [2.0], [3.0]]))
    bank.enqueue(np.array([[4.0], [5.0], [6.0]]))  # 6 does not fit: dropped, ptr back to 0
    assert bank.bank.ravel().tolist() == [1, 2, 3, 4, 5] and bank.ptr == 0
    bank.enqueue(np.array([[7.0]]))
    assert bank.bank.ravel().tolist() == [7, 2, 3, 4, 5] and bank.ptr == 1
    queue = refmoco.Queue(5, 1, dtype="float64")  # refmoco wraps 6 around instead
    for batch in ([[1.0], [2.0], [3.0]], [[4.0], [5.0], [6.0]]):
        queue.enqueue(np.array(batch))
    assert queue.keys.ravel().tolist() == [6, 2, 3, 4, 5]


@given(queues(size=(1, 8), dim=2), st.data())
def test_lightly_memory_bank_keeps_min_b_size_minus_ptr_rows_of_each_batch(initial, data):
    size = len(initial)
    bank = lightly.MemoryBankModule(size, 2, initial=initial, dtype="float64")
    for batch in data.draw(enqueue_batches(2, batch=(1, 2 * size))):
        ptr, before = bank.ptr, bank.bank.copy()
        kept = min(len(batch), size - ptr)
        bank.enqueue(batch)
        np.testing.assert_array_equal(bank.bank[ptr:ptr + kept], batch[:kept])
        untouched = np.r_[0:ptr, ptr + kept:size]
        np.testing.assert_array_equal(bank.bank[untouched], before[untouched])
        assert bank.ptr == (0 if ptr + len(batch) >= size else ptr + len(batch))
        _, view = bank.forward(batch[:1])  # reading (update=False) changes nothing
        np.testing.assert_array_equal(view.T, bank.bank)


def test_lightly_ntxent_loss_reads_the_bank_before_adding_normalised_out1():
    loss_fn = lightly.NTXentLoss(0.5, memory_bank_size=(3, 2), initial=np.eye(3, 2))
    out0, out1 = np.array([[1.0, 0.0]]), np.array([[0.0, 2.0]])
    result = loss_fn(out0, out1)
    expected = xent([0.0, 1 / 0.5, 0.0, 0.0], 0)  # the bank as it was: e0, e1, 0
    assert_close(result.loss, np.float64(expected), rtol=1e-12)
    assert loss_fn.memory_bank.bank[0].tolist() == [0.0, 1.0] and loss_fn.memory_bank.ptr == 1
    loss_fn(out0, out1, update=False)
    assert loss_fn.memory_bank.ptr == 1


# -- PyTorch Metric Learning ---------------------------------------------------------------------
def pml_pairs(labels, ref_labels=None):
    ref = labels if ref_labels is None else ref_labels
    pos = [(i, j) for i in range(len(labels)) for j in range(len(ref))
           if labels[i] == ref[j] and (ref_labels is not None or i != j)]
    neg = [(i, j) for i in range(len(labels)) for j in range(len(ref)) if labels[i] != ref[j]]
    return pos, neg


def pml_contrastive_loop(x, labels, ref=None, ref_labels=None, pos_margin=0.0, neg_margin=1.0,
                         pos=None, neg=None):
    xn = [unit(r) for r in x]
    rn = xn if ref is None else [unit(r) for r in ref]
    if pos is None:
        pos, neg = pml_pairs(labels, ref_labels)
    if all(len(s) <= 1 for s in (pos, neg)):
        return 0.0
    pos_terms = [max(np.linalg.norm(xn[a] - rn[p]) - pos_margin, 0) for a, p in pos]
    neg_terms = [max(neg_margin - np.linalg.norm(xn[a] - rn[n]), 0) for a, n in neg]
    return sum(np.mean([t for t in terms if t > 0]) if any(t > 0 for t in terms) else 0.0
               for terms in (pos_terms, neg_terms))


def pml_ntxent_loop(x, labels, temperature):
    xn, (pos, neg) = [unit(r) for r in x], pml_pairs(labels)
    if all(len(s) <= 1 for s in (pos, neg)) or not pos or not neg:
        return 0.0
    return np.mean([-math.log(math.exp(-xent([xn[a] @ xn[p] / temperature] + [
        xn[a] @ xn[n] / temperature for a2, n in neg if a2 == a], 0)) + np.finfo(float).tiny)
        for a, p in pos])


@given(labelled_batches(n=(1, 7), dim=(1, 4)), st.floats(0.0, 0.5), st.floats(0.5, 2.0))
def test_pml_contrastive_loss_is_unsquared_hinges_averaged_over_nonzero_terms(batch, pm, nm):
    x, labels = batch
    assume(np.linalg.norm(x, axis=1).min() > 1e-3)
    result = pml.contrastive_loss(x, labels, pos_margin=pm, neg_margin=nm)
    expected = pml_contrastive_loop(x, labels, pos_margin=pm, neg_margin=nm)
    close(result.loss, np.float64(expected))


@given(labelled_batches(n=(1, 7), dim=(1, 4)), st.floats(0.05, 1.0))
def test_pml_ntxent_loss_has_one_term_per_positive_pair(batch, temperature):
    x, labels = batch
    assume(np.linalg.norm(x, axis=1).min() > 1e-3)
    result = pml.ntxent_loss(x, labels, temperature=temperature)
    close(result.loss, np.float64(pml_ntxent_loop(x, labels, temperature)))


def test_pml_wrt_names_are_checked_and_one_name_may_be_a_string():
    x = np.random.default_rng(0).normal(size=(4, 3))
    labels = np.array([0, 0, 1, 1])
    for loss in (pml.ntxent_loss, pml.contrastive_loss):
        one = loss(x, labels, wrt="embeddings")  # one name, not its letters
        assert set(one.grads) == {"embeddings"}
        for bad in (("foo",), ("ref_emb",)):  # no ref_emb was given
            with pytest.raises(ValueError, match="wrt"):
                loss(x, labels, wrt=bad)


@given(st.integers(1, 6).flatmap(lambda size: st.tuples(
    st.just(size), st.lists(labelled_batches(n=(1, size), dim=2, num_classes=2),
                            min_size=1, max_size=4))))
def test_pml_cross_batch_memory_enqueues_before_the_loss(scenario):
    size, batches = scenario
    memory = pml.CrossBatchMemory(pml.contrastive_loss, 2, memory_size=size)
    rows, row_labels, written = [None] * size, [0] * size, 0  # loop model of the memory
    for x, labels in batches:
        assume(np.linalg.norm(x, axis=1).min() > 1e-3)
        slots = [(written + i) % size for i in range(len(x))]
        for i, s in enumerate(slots):  # the batch goes in first
            rows[s], row_labels[s] = x[i], labels[i]
        written += len(x)
        filled = min(written, size)
        ref, ref_labels = np.array(rows[:filled]), np.array(row_labels[:filled])
        pos, neg = pml_pairs(labels, ref_labels)
        if len(x) > 1:  # pml keeps the self comparison of a batch of one (see its docstring)
            pos = [(a, p) for a, p in pos if p != slots[a]]
        # AvgNonZeroReducer counts the positive pairs at distance > 0: two different rows with
        # the same direction ([1, 1] and [0.09375, 0.09375]) are at 0 or 1e-17 depending on
        # rounding, which changes the count; keep such ties out
        unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
        assume(all(np.array_equal(x[a], ref[p]) or np.linalg.norm(unit(x[a]) - unit(ref[p])) > 1e-6
                   for a, p in pos))
        expected = pml_contrastive_loop(x, labels, ref, ref_labels, pos=pos, neg=neg)
        close(memory(x, labels).loss, np.float64(expected))


def test_pml_remove_self_comparisons_keeps_a_batch_of_one_as_pml_does():
    pairs = (np.array([0]), np.array([3]), np.array([], int), np.array([], int))
    kept = pml.remove_self_comparisons(pairs, np.array([3]), ref_size=5)
    assert kept[0].tolist() == [0]  # pml's offset arithmetic moves 0 to ref_size
    pairs = (np.array([0, 1, 1]), np.array([4, 0, 2]), np.array([], int), np.array([], int))
    kept = pml.remove_self_comparisons(pairs, np.array([4, 0]), ref_size=5)  # wraps around
    assert list(zip(kept[0].tolist(), kept[1].tolist())) == [(1, 2)]


# -- info-nce-pytorch -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["queue", "per_query", "in_batch"])
@given(data=st.data())
def test_info_nce_pytorch_normalises_inside_in_its_three_modes(mode, data):
    inputs = data.draw(info_nce_inputs(mode, unit=False))
    q, k, negs = inputs["q"], inputs["k"], inputs["negatives"]
    rows = [q, k] + ([] if negs is None else [negs.reshape(-1, q.shape[1])])
    assume(min(np.linalg.norm(r, axis=1).min() for r in rows) > 1e-3)
    terms = []
    for i in range(len(q)):
        if negs is None:
            terms.append(xent([unit(q[i]) @ unit(kj) / 0.1 for kj in k], i))
        else:
            own = negs[i] if negs.ndim == 3 else negs
            terms.append(xent([unit(q[i]) @ unit(k[i]) / 0.1]
                              + [unit(q[i]) @ unit(n) / 0.1 for n in own], 0))
    paired = "paired" if mode == "per_query" else "unpaired"
    result = info_nce_pytorch.info_nce(q, k, negs, negative_mode=paired)
    close(result.loss, np.float64(np.mean(terms)))
    per_query = info_nce_pytorch.info_nce(q, k, negs, negative_mode=paired, reduction="none")
    close(per_query.loss, np.array(terms))
    assert per_query.grads == {}


def test_info_nce_pytorch_rejects_what_the_package_rejects():
    q = np.ones((2, 3))
    with pytest.raises(ValueError, match="2 dimensions"):
        info_nce_pytorch.info_nce(q, q, np.ones((2, 4, 3)))
    with pytest.raises(ValueError, match="same number of samples"):
        info_nce_pytorch.info_nce(q, q, np.ones((3, 4, 3)), negative_mode="paired")


# -- CPC -----------------------------------------------------------------------------------------
@given(cpc_sequences(batch=(1, 4), time=(3, 6)), st.data())
def test_cdck2_is_its_model_code_softmax_over_contexts(zcw, data):
    z, c, W = zcw
    b = data.draw(embeddings(len(W), z.shape[2], bound=1.0))
    t = data.draw(st.integers(0, z.shape[1] - len(W) - 1))
    cdck2 = cpc.cdck2_loss(z, c, W, b, t)
    batch, steps = len(z), len(W)
    loop = sum(xent([z[i, t + s] @ (W[s - 1] @ c[j, t] + b[s - 1]) for j in range(batch)], i)
               for s in range(1, steps + 1) for i in range(batch)) / (batch * steps)
    close(cdck2.loss, np.float64(loop))
    tz, tc, tW, tb = t64(z), t64(c), t64(W), t64(b)  # CDCK2.forward from the predictions on
    nce = 0
    for s in range(steps):
        pred = F.linear(tc[:, t], tW[s], tb[s])  # Wk[s](c_t)
        total = torch.mm(tz[:, t + s + 1], pred.T)
        nce = nce + torch.sum(torch.diag(torch.nn.LogSoftmax(dim=1)(total)))
    (nce / (-1.0 * batch * steps)).backward()
    for name, tensor in (("z", tz), ("c", tc), ("W", tW), ("b", tb)):
        close(cdck2.grads[name], tensor.grad.numpy(), name=name)


@given(cpc_sequences(batch=(1, 3), time=(2, 5)), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_cpc_audio_is_its_criterion_code_summed_over_steps(zcw, m, seed):
    z, c, W = zcw
    batch, seq, d = z.shape
    steps = len(W)
    window = seq - steps
    bi, si = cpc.cpc_audio_negative_indices(batch, seq, window, m, np.random.default_rng(seed))
    assert np.all(si != np.arange(window)) and bi.shape == (batch, m, window)
    negatives = z[bi, si]  # (B, M, w, D)
    result = cpc.cpc_audio_loss(z, c, W, negatives)
    loop = 0.0
    for s in range(1, steps + 1):
        terms = [xent([float(W[s - 1] @ c[b, t] @ cand) / d
                       for cand in [z[b, t + s]] + list(negatives[b, :, t])], 0)
                 for b in range(batch) for t in range(window)]
        loop += np.mean(terms)
    close(result.loss, np.float64(loop))
    tz, tc, tW, tn = t64(z), t64(c), t64(W), t64(negatives)  # PredictionNetwork + criterion
    losses = []
    for k in range(1, steps + 1):
        pos = tz[:, k:k + window].view(batch, 1, window, d)
        candidates = torch.cat((pos, tn), dim=1)
        loc_c = F.linear(tc[:, :window], tW[k - 1]).view(batch, 1, window, d)
        preds = (loc_c * candidates).mean(dim=3).permute(0, 2, 1).contiguous()
        preds = preds.view(-1, preds.size(2))
        losses.append(F.cross_entropy(preds, torch.zeros(batch * window, dtype=torch.long)))
    torch.stack(losses).sum().backward()
    for name, tensor in (("z", tz), ("c", tc), ("W", tW), ("negatives", tn)):
        close(result.grads[name], tensor.grad.numpy(), name=name)


# -- margin loss with 1 = similar ----------------------------------------------------------------
@given(embeddings(n=(1, 6), dim=1, bound=3.0).map(lambda a: np.abs(a[:, 0])), st.data())
def test_tfa_contrastive_loss_is_twice_hadsell_with_the_labels_flipped(d, data):
    y = data.draw(st.lists(st.integers(0, 1), min_size=len(d), max_size=len(d)))
    y = np.array(y)
    result = margin.tfa_contrastive_loss(y, d, margin=1.5)
    loop = np.mean([yi * di**2 + (1 - yi) * max(1.5 - di, 0) ** 2 for yi, di in zip(y, d)])
    assert_close(result.loss, np.float64(loop), rtol=1e-12)
    x1 = np.zeros((len(d), 1))
    hadsell = refmoco.contrastive_loss(x1, d[:, None], 1 - y, margin=1.5)
    assert_close(result.loss, 2 * hadsell.loss, rtol=1e-12)
    expected_grad = [(2 * yi * di - 2 * (1 - yi) * max(1.5 - di, 0)) / len(d)
                     for yi, di in zip(y, d)]
    assert_close(result.grads["y_pred"], np.array(expected_grad), rtol=1e-12)


@pytest.mark.parametrize("legacy", [False, True])
def test_caffe_contrastive_loss_forward_and_its_own_backward(legacy, rng):
    a, b = rng.normal(size=(8, 3)) * 0.4, rng.normal(size=(8, 3)) * 0.4
    y = np.array([1, 0, 0, 1, 0, 0, 1, 0])
    result = margin.caffe_contrastive_loss(a, b, y, margin=1.0, legacy_version=legacy)
    dist_sq = ((a - b) ** 2).sum(axis=1)
    dissimilar = (np.maximum(1.0 - dist_sq, 0) if legacy
                  else np.maximum(1.0 - np.sqrt(dist_sq), 0) ** 2)
    loop = sum(ds if yi else dis for ds, dis, yi in zip(dist_sq, dissimilar, y)) / 8 / 2
    assert_close(result.loss, np.float64(loop), rtol=1e-12)
    if not legacy:  # the forward is Hadsell's with y flipped; the backward has d + 1e-4
        assert_close(result.loss, refmoco.contrastive_loss(a, b, 1 - y).loss, rtol=1e-12)
        exact = refmoco.contrastive_loss(a, b, 1 - y).grads["x1"]
        d = np.sqrt(dist_sq)[:, None]
        assert_close(result.grads["a"], np.where(y[:, None] == 1, exact, exact * d / (d + 1e-4)),
                     rtol=1e-12)
    else:
        coef = np.where(y == 1, 1 / 8, np.where(1.0 - dist_sq > 0, -1 / 8, 0))
        assert_close(result.grads["a"], coef[:, None] * (a - b), rtol=1e-12)
    assert_close(result.grads["b"], -result.grads["a"], rtol=0)


# -- finite differences and the documented examples -----------------------------------------------
def test_convention_gradients_match_finite_differences(rng):
    x = {n: rng.normal(size=(3, 4)) for n in ("q1", "q2", "k1", "k2")}
    check_grad(functools.partial(moco.moco_v3_loss, temperature=0.2), x, rtol=1e-6)
    check_grad(functools.partial(lightly.ntxent_loss, temperature=0.3),
               {"out0": x["q1"], "out1": x["q2"]}, rtol=1e-6)
    check_grad(functools.partial(lightly.ntxent_loss, temperature=0.3),
               {"out0": x["q1"], "out1": x["q2"], "negatives": x["k1"]}, rtol=1e-6)
    labels, ref_labels = np.array([0, 0, 1]), np.array([0, 1, 1, 3])
    for fn in (pml.contrastive_loss, functools.partial(pml.ntxent_loss, temperature=0.3)):
        check_grad(fn, {"embeddings": x["q1"], "labels": labels})
        check_grad(fn, {"embeddings": x["q1"], "labels": labels,
                        "ref_emb": rng.normal(size=(4, 4)), "ref_labels": ref_labels})
    for negatives, mode in ((None, "unpaired"), (x["k1"], "unpaired"),
                            (rng.normal(size=(3, 5, 4)), "paired")):
        inputs = {"query": x["q1"], "positive_key": x["q2"], "negative_keys": negatives}
        check_grad(functools.partial(info_nce_pytorch.info_nce, negative_mode=mode),
                   {k: v for k, v in inputs.items() if v is not None}, rtol=1e-6)
    z, c = rng.normal(size=(3, 5, 2)), rng.normal(size=(3, 5, 3))
    W, b = rng.normal(size=(2, 2, 3)), rng.normal(size=(2, 2))
    check_grad(functools.partial(cpc.cdck2_loss, t=1), {"z": z, "c": c, "W": W, "b": b})
    check_grad(cpc.cpc_audio_loss, {"z": z, "c": c, "W": W,
                                    "negatives": rng.normal(size=(3, 2, 3, 2))})
    # the paper's loss: its value against the loop transcription of CPC eq. (4) (tests/naive.py),
    # its gradients against finite differences, like the implementations above
    assert_close(cpc.paper_loss(z, c, W).loss, np.float64(naive.cpc(z, c, W)), rtol=1e-12)
    check_grad(cpc.paper_loss, {"z": z, "c": c, "W": W}, rtol=1e-6)


@pytest.mark.parametrize("module", [cpc, info_nce_pytorch, lightly, margin, moco, pml])
def test_documented_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
