"""The comparison helpers catch deliberately broken implementations and say what differs; the
strategies and the diagnostics do what they say."""

import doctest
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refmoco
import refmoco.diagnostics
import refmoco.mechanisms
import refmoco.testing.compare
import refmoco.testing.strategies
from refmoco.diagnostics import (
    collapse_check,
    embedding_spread,
    key_encoder_drift,
    same_sample_negatives,
)
from refmoco.nn import FlatParams, mlp_encoder
from refmoco.optim import SGD
from refmoco.testing import (
    compare_loss,
    compare_loss_and_grad,
    compare_moco_step,
    compare_momentum,
    compare_queue,
)
from refmoco.testing.strategies import (
    cpc_sequences,
    find_failure,
    info_nce_inputs,
    moco_step_scenarios,
    queue_scenarios,
)

T = 0.2
BUDGET = {"max_examples": 30, "raise_on_failure": False}


torch = pytest.importorskip("torch")
F = torch.nn.functional
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- correct implementations, in PyTorch ---------------------------------------------------------
def moco_loss(q, k, queue, temperature=T, positive_label=0, stop_gradient=True):
    """MoCo's builder.py with the queue as rows; the keyword arguments plant bugs."""
    if stop_gradient:
        k, queue = k.detach(), queue.clone().detach()
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # (N, 1)
    l_neg = torch.einsum("nc,kc->nk", q, queue)  # (N, K)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(len(q), dtype=torch.long) + positive_label
    return F.cross_entropy(logits, labels)


def in_batch_loss(q, k, dim=1):
    logits = q @ k.T / T
    return -torch.log_softmax(logits, dim=dim).diagonal().mean()


class MoCoStep:
    """A MoCo loss-and-enqueue step on a (K, C) queue; ``enqueue_first`` plants a bug."""

    def __init__(self, initial, enqueue_first=False):
        self.queue, self.ptr, self.enqueue_first = initial.clone(), 0, enqueue_first

    def _enqueue(self, k):
        n = len(k)
        self.queue[self.ptr:self.ptr + n] = k.detach()
        self.ptr = (self.ptr + n) % len(self.queue)

    def __call__(self, q, k):
        if self.enqueue_first:
            self._enqueue(k)
        loss = moco_loss(q, k, self.queue, temperature=0.07)
        if not self.enqueue_first:
            self._enqueue(k)
        return loss


class RingBuffer:
    """A PyTorch ring buffer that writes rows one at a time (refmoco's semantics)."""

    def __init__(self, initial):
        self.keys, self.ptr = initial.clone(), 0

    def enqueue(self, batch):
        for row in batch:
            self.keys[self.ptr] = row
            self.ptr = (self.ptr + 1) % len(self.keys)


def ema(target, source, m):
    with torch.no_grad():
        for name in target:
            target[name].mul_(m).add_(source[name], alpha=1 - m)


def ema_swapped(target, source, m):
    with torch.no_grad():
        for name in target:
            target[name].mul_(1 - m).add_(source[name], alpha=m)


def test_correct_implementations_pass():
    assert compare_loss_and_grad(moco_loss, "moco", temperature=T, **BUDGET).ok
    assert compare_loss_and_grad(in_batch_loss, "info_nce_in_batch", temperature=T, **BUDGET).ok
    assert compare_moco_step(MoCoStep, **BUDGET).ok
    assert compare_momentum(ema, **BUDGET).ok
    assert compare_queue(RingBuffer, **BUDGET).ok


# -- the planted bugs: each caught, with what differs named ---------------------------------------
def test_wrong_positive_index_is_caught():
    report = compare_loss(lambda q, k, queue: moco_loss(q, k, queue, positive_label=1), "moco",
                          framework="torch", temperature=T, **BUDGET)
    assert report.difference.what == "loss"
    assert report.inputs["q"].shape[0] == 1  # shrunk to a single query
    report = compare_loss(lambda q, k: in_batch_loss(q, k.roll(1, 0)), "info_nce_in_batch",
                          framework="torch", temperature=T, **BUDGET)
    assert report.difference.what == "loss" and report.inputs["q"].shape[0] == 2


def test_missing_temperature_is_caught():
    report = compare_loss_and_grad(lambda q, k, queue: moco_loss(q, k, queue, temperature=1.0),
                                   "moco", temperature=T, **BUDGET)
    assert report.difference.what == "loss"
    assert "got" in report.difference.detail and "expected" in report.difference.detail


def test_queue_updated_before_the_logits_is_caught():
    report = compare_moco_step(lambda initial: MoCoStep(initial, enqueue_first=True), **BUDGET)
    assert report.difference.what == "call 1: loss"
    assert len(report.inputs["q"]) == 1  # one call suffices


def test_momentum_swapped_with_one_minus_momentum_is_caught():
    report = compare_momentum(ema_swapped, **BUDGET)
    assert report.difference.what.startswith("parameter 'layer0.weight' after the update")
    assert report.inputs["m"] != 0.5


def test_missing_stop_gradient_on_the_keys_is_caught():
    report = compare_loss_and_grad(lambda q, k, queue: moco_loss(q, k, queue,
                                                                 stop_gradient=False),
                                   "moco", temperature=T, **BUDGET)
    assert report.difference.what == "gradient w.r.t. 'k'"
    assert "expected none" in report.difference.detail and "no_grad" in report.difference.detail


def test_missing_stop_gradient_is_caught_in_a_step_too():
    class LeakyStep(MoCoStep):
        def __call__(self, q, k):
            queue = self.queue.clone()  # without the clone autograd fails: the queue changes
            logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / 0.07
            self._enqueue(k)
            return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))

    report = compare_moco_step(LeakyStep, **BUDGET)
    assert report.difference.what == "call 1: gradient w.r.t. 'k'"


def test_softmax_over_the_wrong_axis_is_caught():
    report = compare_loss_and_grad(lambda q, k: in_batch_loss(q, k, dim=0),
                                   "info_nce_in_batch", temperature=T, **BUDGET)
    assert report.difference.what in ("loss", "gradient w.r.t. 'q'", "gradient w.r.t. 'k'")
    assert report.inputs["q"].shape[0] == 2

    def cpc_over_contexts(z, c, W):  # CDCK2's direction, every step and time
        total, count = 0, 0
        for s in range(1, W.shape[0] + 1):
            for t in range(z.shape[1] - s):
                scores = z[:, t + s] @ (c[:, t] @ W[s - 1].T).T  # row: encoding, col: context
                total = total - torch.log_softmax(scores, dim=1).diagonal().sum()
                count += z.shape[0]
        return total / count

    report = compare_loss(cpc_over_contexts, "cpc", framework="torch", **BUDGET)
    assert report.difference.what == "loss" and report.inputs["z"].shape[0] == 2


def test_the_report_is_the_assertion_message():
    with pytest.raises(AssertionError) as info:
        compare_momentum(ema_swapped, max_examples=30)
    message = str(info.value)
    assert message.startswith("momentum_update disagrees: parameter 'layer0.weight'")
    assert "target = " in message and "m = " in message


def test_queue_semantics_are_told_apart():
    class Dropper:  # lightly's rule
        def __init__(self, initial):
            self.keys, self.ptr = initial.copy(), 0

        def enqueue(self, batch):
            n, size = len(batch), len(self.keys)
            if self.ptr + n >= size:
                self.keys[self.ptr:] = batch[: size - self.ptr]
                self.ptr = 0
            else:
                self.keys[self.ptr:self.ptr + n] = batch
                self.ptr += n

    assert compare_queue(Dropper, semantics="lightly", framework="numpy", **BUDGET).ok
    report = compare_queue(Dropper, semantics="refmoco", framework="numpy", **BUDGET)
    assert report.difference.what.startswith("call 1 (enqueue of 0 rows)") or (
        report.difference.what.startswith("queue contents after call"))
    official = compare_queue(lambda initial: refmoco.conventions.moco.MoCoQueue(
        *initial.shape, initial=initial), semantics="refmoco", layout="columns",
        read=lambda q: q.queue, framework="numpy", **BUDGET)
    assert official.difference.detail.startswith("raised")  # MoCo's K % N (N = 0 included)


def wrong_gradient_of_q(q, k, queue):
    """MoCo's loss with the right value but half of the gradient w.r.t. q (the negatives' part
    detached)."""
    k, queue = k.detach(), queue.detach()
    logits = torch.cat([(q * k).sum(1, keepdim=True), q.detach() @ queue.T], dim=1) / T
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))


@pytest.mark.parametrize("wrt", [("Q",), ("negatives",), ("q", "negatives"), "queues"])
def test_wrt_naming_an_argument_the_reference_lacks_is_an_error(wrt):
    with pytest.raises(ValueError, match=r"^wrt: .* not among the arguments of 'moco': "
                                         r"\['q', 'k', 'queue'\]"):
        compare_loss_and_grad(wrong_gradient_of_q, "moco", wrt=wrt, temperature=T, **BUDGET)


@pytest.mark.parametrize("wrt", ["q", ("q",), ("q", "queue"), None])
def test_wrt_checks_the_gradients_it_names(wrt):
    report = compare_loss_and_grad(wrong_gradient_of_q, "moco", wrt=wrt, temperature=T,
                                   **BUDGET)
    assert report.difference.what == "gradient w.r.t. 'q'"
    assert compare_loss_and_grad(wrong_gradient_of_q, "moco", wrt=("k", "queue"),
                                 temperature=T, **BUDGET).ok  # their gradients are none


def test_wrt_naming_a_label_argument_is_an_error():
    def contrastive(x1, x2, y):
        return F.pairwise_distance(x1, x2, eps=0).mean() + 0 * y.sum()

    with pytest.raises(ValueError, match=r"^wrt: 'y' is not a float argument of "
                                         r"'contrastive' \(dtype int64\)"):
        compare_loss_and_grad(contrastive, "contrastive", wrt=("x1", "y"), **BUDGET)


def test_compare_arguments_that_would_hide_a_difference_are_refused():
    strategy = info_nce_inputs("queue").map(lambda d: {"q": d["q"], "k": d["k"]})

    def reference(q, k):
        return refmoco.LossOutput(np.mean(np.sum(q * k, 1)), {"q": k / len(q), "k": q / len(q)})

    def user(q, k):
        return (q * k.detach()).sum(1).mean()

    with pytest.raises(ValueError, match=r"^stop_gradient: \['key'\] not among args"):
        compare_loss_and_grad(user, reference, inputs=strategy, args=("q", "k"),
                              stop_gradient=("key",), **BUDGET)
    report = compare_loss_and_grad(user, reference, inputs=strategy, args=("q", "k"),
                                   stop_gradient="k", **BUDGET)
    assert report.ok  # "k" is one name, not the letters of one
    for extra in (dict(stop_gradient=("q",)), dict(inputs=strategy), dict(args=("q", "k"))):
        with pytest.raises(ValueError, match="only for a callable reference"):  # not ignored
            compare_loss_and_grad(user, "moco", temperature=T, **extra, **BUDGET)
    for bad in (float("nan"), float("inf"), -1e-3):
        with pytest.raises(ValueError, match="^rtol: expected a finite number >= 0"):
            compare_loss(lambda q, k, queue: moco_loss(q, k, queue, temperature=1.0), "moco",
                         framework="torch", temperature=T, rtol=bad, **BUDGET)


def test_numpy_and_callable_references():
    def info_nce_numpy(q, k, negatives):
        out = refmoco.info_nce_loss(q, k, negatives, temperature=0.5)
        return out.loss, out.grads

    assert compare_loss_and_grad(info_nce_numpy, "info_nce", framework="numpy",
                                 temperature=0.5, **BUDGET).ok
    strategy = info_nce_inputs("queue").map(lambda d: {"q": d["q"], "k": d["k"]})
    report = compare_loss(lambda q, k: float(np.mean(np.sum(q * k, axis=1))),
                          lambda q, k: refmoco.LossOutput(np.mean(np.sum(q * k, 1)) * 2, {}),
                          inputs=strategy, args=("q", "k"), **BUDGET)
    assert report.difference.what == "loss"


def test_jax_implementations_can_be_compared():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy

    def jax_moco(q, k, queue):
        k, queue = jax.lax.stop_gradient(k), jax.lax.stop_gradient(queue)
        logits = jnp.concatenate([jnp.sum(q * k, 1, keepdims=True), q @ queue.T], 1) / T
        return jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[:, 0])

    assert compare_loss_and_grad(jax_moco, "moco", framework="jax", dtype="float32",
                                 temperature=T, max_examples=5).ok  # JAX compiles per shape
    if not jax.config.jax_enable_x64:
        with pytest.raises(ValueError, match="jax_enable_x64"):
            refmoco.testing.to_framework(np.zeros(2), "jax")
        with pytest.raises(ValueError, match="^framework='jax' with dtype='float64' needs "
                                             "jax.config.update"):  # raised, not a difference
            compare_loss_and_grad(jax_moco, "moco", framework="jax", temperature=T, **BUDGET)


def test_a_jax_momentum_update_that_returns_target_with_its_entries_rebound_passes():
    """JAX arrays cannot be written in place, so a functional update that rebinds the entries of
    the dict it got and returns it is right (a PyTorch model would keep its old tensors: that is
    caught for torch); a wrong m is still caught."""
    pytest.importorskip("jax")

    def functional(target, source, m):
        for name in target:
            target[name] = target[name] * m + source[name] * (1 - m)
        return target

    def swapped(target, source, m):
        return {n: target[n] * (1 - m) + source[n] * m for n in target}

    assert compare_momentum(functional, framework="jax", dtype="float32", **BUDGET).ok
    report = compare_momentum(swapped, framework="jax", dtype="float32", **BUDGET)
    assert not report.ok and "after the update" in report.difference.what


# -- code that writes to its inputs, or to the wrong arrays --------------------------------------
def test_a_numpy_loss_that_normalises_its_inputs_in_place_is_caught():
    def normalises_in_place(x1, x2, y):
        x1 /= np.maximum(np.linalg.norm(x1, axis=1, keepdims=True), 1e-12)
        x2 /= np.maximum(np.linalg.norm(x2, axis=1, keepdims=True), 1e-12)
        out = refmoco.contrastive_loss(x1, x2, y)
        return out.loss, out.grads

    report = compare_loss_and_grad(normalises_in_place, "contrastive", framework="numpy",
                                   **BUDGET)
    assert report.difference.what in ("input 'x1'", "input 'x2'")
    assert "modified it in place" in report.difference.detail
    assert np.linalg.norm(report.inputs["x1"]) != 1 or np.linalg.norm(report.inputs["x2"]) != 1


def test_a_torch_loss_that_writes_to_an_input_is_caught():
    def scales_the_queue(q, k, queue):
        queue.mul_(0.5)  # the queue needs no gradient, so PyTorch lets this through
        return moco_loss(q, k, queue * 2)

    report = compare_loss(scales_the_queue, "moco", framework="torch", temperature=T, **BUDGET)
    assert report.difference.what == "input 'queue'"


class NumpyStep:
    """A correct NumPy MoCo step; ``in_place`` renormalises the keys over the wrong axis, in
    place, before enqueueing them."""

    def __init__(self, initial, in_place=False):
        self.queue, self.ptr, self.in_place = np.array(initial), 0, in_place

    def __call__(self, q, k):
        out = refmoco.info_nce_loss(q, k, self.queue, temperature=0.07, wrt=("q",))
        if self.in_place:
            k /= np.linalg.norm(k, axis=0, keepdims=True) + 1e-12
        n = len(k)
        self.queue[self.ptr:self.ptr + n] = k
        self.ptr = (self.ptr + n) % len(self.queue)
        return out.loss, {"q": out.grads["q"], "k": None}


def test_a_numpy_step_that_corrupts_its_keys_in_place_is_caught():
    assert compare_moco_step(NumpyStep, framework="numpy", **BUDGET).ok
    report = compare_moco_step(lambda initial: NumpyStep(initial, in_place=True),
                               framework="numpy", **BUDGET)
    assert report.difference.what == "call 1: input 'k'"


def test_a_step_whose_loss_ignores_q_says_the_gradient_is_missing():
    class DetachedQ(MoCoStep):
        def __call__(self, q, k):
            return super().__call__(q.detach(), k)

    report = compare_moco_step(DetachedQ, **BUDGET)
    assert report.difference.what == "call 1: gradient w.r.t. 'q'"
    assert report.difference.detail.startswith("none reaches it")


def ema_rebinds(target, source, m):
    """The common mistake: the dict entries are rebound, the model's tensors never change."""
    with torch.no_grad():
        for name in target:
            target[name] = target[name] * m + source[name] * (1 - m)


def test_a_momentum_update_that_rebinds_the_dict_entries_is_caught():
    for returned in (None, "target"):
        def update(target, source, m, returned=returned):
            ema_rebinds(target, source, m)
            return target if returned else None

        report = compare_momentum(update, **BUDGET)
        assert report.difference.what.startswith("parameter 'layer0.weight' after the update")
        assert "was rebound to a new array" in report.difference.detail


def test_a_momentum_update_may_return_new_parameters_but_not_write_the_source():
    assert compare_momentum(lambda t, s, m: {n: t[n] * m + s[n] * (1 - m) for n in t},
                            **BUDGET).ok  # the functional (JAX) style

    def zeroes_the_source(target, source, m):
        ema(target, source, m)
        for p in source.values():
            p.zero_()

    report = compare_momentum(zeroes_the_source, **BUDGET)
    assert report.difference.what == "source parameter 'layer0.weight'"
    report = compare_momentum(lambda t, s, m: [t[n] for n in t], **BUDGET)
    assert report.difference.what == "the returned value"


def test_a_result_that_holds_only_once_is_not_a_pass():
    calls = [0]

    def flaky(q, k, queue):  # wrong on its first call only
        calls[0] += 1
        return moco_loss(q, k, queue) * (2 if calls[0] == 1 else 1)

    report = compare_loss(flaky, "moco", framework="torch", temperature=T, **BUDGET)
    assert report.difference.what == "the call"
    assert report.difference.detail.startswith("not reproducible: loss differed")


# -- wrong arguments of compare_*: raised to the caller, naming the argument --------------------
@pytest.mark.parametrize("kwargs, error, match", [
    ({"framework": "pytorch"}, ValueError, r"^framework: expected one of"),
    ({"dtype": "float16"}, ValueError, r"^dtype: expected 'float32' or 'float64'"),
    ({"dtype": "int32"}, ValueError, r"^dtype: expected 'float32' or 'float64'"),
    ({"dtype": "bfloat16"}, ValueError, r"^dtype: expected 'float32' or 'float64'"),
    ({"tempreature": T}, TypeError, r"^tempreature: not a hyper-parameter of the reference "
                                    r"'moco' \(it takes \['temperature'\]\)"),
    ({"temperature": -0.2}, ValueError, r"^temperature: expected a finite number > 0"),
    ({"q": np.ones((1, 1))}, TypeError, r"^q: an input the comparison draws"),
])
def test_a_wrong_argument_is_raised_not_reported_as_a_difference(kwargs, error, match):
    kwargs = {"temperature": T, **kwargs}
    with pytest.raises(error, match=match):
        compare_loss_and_grad(moco_loss, "moco", **kwargs, **BUDGET)


def test_wrong_arguments_of_the_stateful_comparisons_are_raised():
    with pytest.raises(ValueError, match=r"^max_examples: expected an integer >= 1"):
        compare_loss(moco_loss, "moco", framework="torch", temperature=T, max_examples=0)
    with pytest.raises(ValueError, match=r"^layout: expected one of \('rows', 'columns'\)"):
        compare_queue(RingBuffer, layout="column", **BUDGET)
    with pytest.raises(ValueError, match=r"^semantics: expected one of"):
        compare_queue(RingBuffer, semantics="MoCo", **BUDGET)
    with pytest.raises(ValueError, match=r"^framework: expected one of"):
        compare_momentum(ema, framework="pytorch", **BUDGET)
    with pytest.raises(ValueError, match=r"^framework: expected one of \('torch', 'numpy'\)"):
        compare_moco_step(MoCoStep, framework="jax", **BUDGET)
    with pytest.raises(ValueError, match=r"^temperature: expected a finite number > 0"):
        compare_moco_step(MoCoStep, temperature=0.0, **BUDGET)
    with pytest.raises(ValueError, match=r"^layout: expected one of"):
        compare_moco_step(MoCoStep, layout="cols", **BUDGET)


def test_a_reference_that_raises_is_the_caller_s_error():
    strategy = info_nce_inputs("queue").map(lambda d: {"q": d["q"], "k": d["k"]})

    def broken_reference(q, k):
        raise KeyError("the reference's own bug")

    with pytest.raises(KeyError, match="the reference's own bug"):
        compare_loss(lambda q, k: 0.0, broken_reference, inputs=strategy, args=("q", "k"),
                     **BUDGET)


def test_like_needs_an_array_to_take_the_type_of():
    for reference in ([1.0], 3.0, None):
        with pytest.raises(TypeError, match="^reference: expected an array"):
            refmoco.testing.like(np.array([1.0]), reference)


# -- strategies ---------------------------------------------------------------------------------
@given(info_nce_inputs("per_query", dtype="float32"), cpc_sequences(),
       queue_scenarios("moco"), moco_step_scenarios())
def test_strategies_draw_what_they_say(nce, zcw, queue, step):
    q, negatives = nce["q"], nce["negatives"]
    assert q.dtype == np.float32 and negatives.shape[::2] == (q.shape[0], q.shape[1])
    assert np.allclose(np.linalg.norm(negatives, axis=-1), 1, atol=1e-6)
    z, c, W = zcw
    assert W.shape[0] < z.shape[1] and W.shape[1:] == (z.shape[2], c.shape[2])
    sizes = {len(b) for b in queue["batches"]}
    assert len(sizes) == 1 and len(queue["initial"]) % sizes.pop() == 0
    assert len(step["initial"]) % len(step["q"][0]) == 0


def test_find_failure_returns_the_smallest_failing_example():
    assert find_failure(st.integers(0, 1000), lambda x: x > 10, seed=1) == 11
    assert find_failure(st.integers(0, 10), lambda x: x > 10) is None


# -- diagnostics ---------------------------------------------------------------------------------
def test_collapsed_embeddings_put_the_loss_at_ln_k_plus_1(rng):
    q = np.tile(rng.standard_normal(8), (4, 1))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    out = refmoco.info_nce_loss(q, q, np.tile(q[:1], (63, 1)), temperature=0.07)
    report = collapse_check([float(out.loss)] * 5, num_candidates=64)
    assert report.collapsed and math.isclose(report.chance, math.log(64))
    assert "stuck at chance" in report.message
    assert not collapse_check([4.0, 2.0, 1.0], 64, window=2).collapsed
    assert embedding_spread(q) == 0.0


def test_same_sample_negatives_counts_the_queue_rows_of_each_query():
    queue = refmoco.Queue(6, 2, dtype="float64")
    queue.enqueue(np.ones((5, 2)), ids=[3, 1, 3, 2, 3])
    report = same_sample_negatives(queue, np.array([3, 2, 9, -1]))
    expected = [sum(int(i == q and i >= 0) for i in queue.ids) for q in (3, 2, 9, -1)]
    assert report.counts.tolist() == expected == [3, 1, 0, 0]
    assert report.queries_affected == 2 and math.isclose(report.share, 4 / 24)


def test_key_encoder_drift_is_the_relative_distance():
    key = {"a": np.array([1.0, 2.0]), "b": np.array([[0.0]])}
    query = {"a": np.array([1.0, 0.0]), "b": np.array([[1.0]])}
    report = key_encoder_drift(key, query)
    assert math.isclose(report.relative, math.sqrt((4 + 1) / (1 + 1)))
    assert math.isclose(report.per_param["a"], 2.0) and report.per_param["b"] == 1.0
    with pytest.raises(ValueError, match="names"):
        key_encoder_drift(key, {"a": query["a"]})
    reordered = key_encoder_drift(key, {"b": query["b"], "a": query["a"]})  # matched by name
    assert reordered.relative == report.relative and reordered.per_param == report.per_param


def test_key_encoder_drift_of_a_moco_run_matches_its_flat_params_by_name(rng):
    """``key_encoder_drift(moco.key_params, moco.params)``: two FlatParams (Mappings, not
    dicts) are matched by name, as the dicts of the same arrays are."""
    model = mlp_encoder(4, 3, 3, 2)
    params, buffers = model.init(np.random.default_rng(0), "float64")
    moco = refmoco.mechanisms.MoCo(model, params, buffers, SGD(0.5), momentum=0.9,
                                   queue=refmoco.Queue(16, 2, dtype="float64"), temperature=0.2)
    for step in range(2):
        x = rng.standard_normal((4, 4))
        moco.step(x, x + 0.1 * rng.standard_normal(x.shape), np.arange(4) + 4 * step, lr=0.5)
    key, query = moco.key_params, moco.params
    report = key_encoder_drift(key, query)
    # ||θk - θq|| / ||θq||, over all parameters and per parameter
    flat_k, flat_q = np.asarray(key.flat, np.float64), np.asarray(query.flat, np.float64)
    assert 0 < report.relative and math.isclose(
        report.relative, np.linalg.norm(flat_k - flat_q) / np.linalg.norm(flat_q), rel_tol=1e-12)
    assert list(report.per_param) == list(key)
    for name in key:
        expected = np.linalg.norm(key[name] - query[name]) / np.linalg.norm(query[name])
        assert math.isclose(report.per_param[name], expected, rel_tol=1e-12), name
    as_dicts = key_encoder_drift({k: v.copy() for k, v in key.items()},
                                 {k: query[k].copy() for k in reversed(list(query))})
    assert as_dicts == report

    renamed = FlatParams({("x" + k if k == next(iter(query)) else k): s
                          for k, s in query.shapes.items()}, query.dtype, flat=query.flat)
    with pytest.raises(ValueError, match=r"query_params: expected the names of key_params; "
                                         r"missing \['.+'\], unexpected \['x.+'\]"):
        key_encoder_drift(key, renamed)
    with pytest.raises(TypeError, match="query_params: expected a mapping"):
        key_encoder_drift(key, list(query.values()))
    with pytest.raises(TypeError, match="query_params: expected a sequence"):
        key_encoder_drift(list(key.values()), query)
    with pytest.raises(ValueError, match=r"query_params: expected the length of key_params \(2\)"):
        key_encoder_drift([key.flat, key.flat], [query.flat])


@pytest.mark.parametrize("module", [refmoco.testing.compare, refmoco.testing.strategies,
                                    refmoco.diagnostics])
def test_documented_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
