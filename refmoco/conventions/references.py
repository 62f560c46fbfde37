"""Named references for :mod:`refmoco.testing.compare`: which function, which arguments in which
order, which arguments sit under a stop-gradient, and which inputs to draw.

``REFERENCES[name]`` is a :class:`Reference`. Its ``inputs(dtype, params)`` returns a hypothesis
strategy of dicts of NumPy arrays (hypothesis is imported only then). The queue references
(:func:`queue_reference`) share one small interface, ``enqueue(keys)`` and ``rows()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from .. import losses
from ..dictionary import Queue
from . import info_nce_pytorch, lightly, moco, pml


class Reference(NamedTuple):
    """A loss to compare with: ``fn(**inputs, **params)`` returns a ``LossOutput``."""

    name: str
    fn: Callable
    args: tuple  # the order in which the user's function takes the arrays
    inputs: Callable  # (dtype, params) -> hypothesis strategy of dicts
    stop_gradient: tuple = ()  # arguments that must receive no gradient
    why: str = ""  # why they receive none, for the report


def _info_nce(mode):
    def inputs(dtype, params):
        from ..testing.strategies import info_nce_inputs
        strategy = info_nce_inputs(mode, dtype=dtype)
        return strategy.map(lambda d: {k: v for k, v in d.items() if v is not None})
    return inputs


def _moco(q, k, queue, temperature=0.07):
    out = losses.info_nce_loss(q, k, queue, temperature=temperature)
    return out._replace(grads={"q": out.grads["q"]})


def _moco_inputs(dtype, params):
    return _info_nce("queue")(dtype, params).map(
        lambda d: {"q": d["q"], "k": d["k"], "queue": d["negatives"]})


def _moco_v3_inputs(dtype, params):
    from hypothesis import strategies as st

    from ..testing.strategies import embeddings
    shape = st.tuples(st.integers(1, 4), st.integers(1, 5))
    return shape.flatmap(lambda s: st.fixed_dictionaries(
        {name: embeddings(*s, dtype=dtype).filter(_no_short_rows)
         for name in ("q1", "q2", "k1", "k2")}))


def _no_short_rows(x) -> bool:
    """Away from the kink of the normalisation at 0 (autograd and refmoco may differ there)."""
    return bool(np.all(np.linalg.norm(x, axis=-1) > 1e-3))


def _contrastive_inputs(dtype, params):
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp

    from ..testing.strategies import embeddings
    margin = params.get("margin", 1.0)

    def pairs(shape):
        return st.fixed_dictionaries({
            "x1": embeddings(*shape, dtype=dtype), "x2": embeddings(*shape, dtype=dtype),
            "y": hnp.arrays(np.int64, (shape[0],), elements=st.integers(0, 1))})

    def off_kinks(ex) -> bool:  # d = 0 and d = margin are kinks of the loss
        d = np.linalg.norm(ex["x1"] - ex["x2"], axis=1)
        return bool(np.all(d > 1e-3) and np.all(np.abs(d - margin) > 1e-3))

    return st.tuples(st.integers(1, 5), st.integers(1, 4)).flatmap(pairs).filter(off_kinks)


def _labelled_inputs(dtype, params):
    from ..testing.strategies import labelled_batches
    return labelled_batches(dtype=dtype).filter(lambda b: _no_short_rows(b[0])).map(
        lambda b: {"embeddings": b[0], "labels": b[1]})


def _lightly_inputs(dtype, params):
    return _moco_v3_inputs(dtype, params).map(lambda d: {"out0": d["q1"], "out1": d["k1"]})


def _info_nce_pytorch_inputs(dtype, params):
    mode = params.get("negative_mode", "unpaired")
    return _info_nce("queue" if mode == "unpaired" else "per_query")(dtype, params).map(
        lambda d: {"query": d["q"], "positive_key": d["k"], "negative_keys": d["negatives"]})


def _cpc_inputs(dtype, params):
    from ..testing.strategies import cpc_sequences
    return cpc_sequences(dtype=dtype).map(lambda t: dict(zip(("z", "c", "W"), t)))


def _softmax_inputs(dtype, params):
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp

    from ..testing.strategies import embeddings
    return embeddings((1, 5), (1, 6), dtype=dtype, bound=5.0).flatmap(
        lambda x: hnp.arrays(np.int64, (len(x),), elements=st.integers(0, x.shape[1] - 1)).map(
            lambda y: {"logits": x, "labels": y}))


REFERENCES = {r.name: r for r in (
    Reference("info_nce", losses.info_nce_loss, ("q", "k", "negatives"), _info_nce("queue")),
    Reference("info_nce_in_batch", losses.info_nce_loss, ("q", "k"), _info_nce("in_batch")),
    Reference("info_nce_per_query", losses.info_nce_loss, ("q", "k", "negatives"),
              _info_nce("per_query")),
    Reference("moco", _moco, ("q", "k", "queue"), _moco_inputs, ("k", "queue"),
              "MoCo computes the keys under torch.no_grad() and detaches the queue"),
    Reference("moco_v3", moco.moco_v3_loss, ("q1", "q2", "k1", "k2"), _moco_v3_inputs,
              ("k1", "k2"), "MoCo v3 computes the keys under torch.no_grad()"),
    Reference("contrastive", losses.contrastive_loss, ("x1", "x2", "y"), _contrastive_inputs),
    Reference("softmax_cross_entropy", losses.softmax_cross_entropy, ("logits", "labels"),
              _softmax_inputs),
    Reference("cpc", losses.cpc_loss, ("z", "c", "W"), _cpc_inputs),
    Reference("lightly.ntxent", lightly.ntxent_loss, ("out0", "out1"), _lightly_inputs),
    Reference("pml.contrastive", pml.contrastive_loss, ("embeddings", "labels"),
              _labelled_inputs),
    Reference("pml.ntxent", pml.ntxent_loss, ("embeddings", "labels"), _labelled_inputs),
    Reference("info_nce_pytorch", info_nce_pytorch.info_nce,
              ("query", "positive_key", "negative_keys"), _info_nce_pytorch_inputs),
)}


def resolve_reference(reference, inputs=None, args=None, stop_gradient=None) -> Reference:
    """A :class:`Reference` from a name of :data:`REFERENCES`, or from a loss function with the
    strategy of its ``inputs`` (dicts of keyword arguments) and the order of its ``args``."""
    if isinstance(reference, str):
        given = [n for n, v in (("inputs", inputs), ("args", args),
                                ("stop_gradient", stop_gradient)) if v is not None]
        if given:  # they would be ignored: a named reference brings its own
            raise ValueError(f"{', '.join(given)}: only for a callable reference; "
                             f"{reference!r} brings its own")
        if reference not in REFERENCES:
            raise ValueError(f"reference: expected one of {sorted(REFERENCES)} or a callable, "
                             f"got {reference!r}")
        return REFERENCES[reference]
    if inputs is None or args is None:
        raise ValueError("a callable reference needs inputs= (a strategy of dicts) and args=")
    name = getattr(reference, "__qualname__", repr(reference))
    return Reference(name, reference, tuple(args), lambda dtype, params: inputs,
                     tuple(stop_gradient or ()), "stop_gradient= says so")


class _QueueAdapter:
    """One interface over the three queue semantics: ``enqueue(keys)`` and ``rows()``."""

    def __init__(self, obj, rows: Callable):
        self.obj, self._rows = obj, rows

    def enqueue(self, keys) -> None:
        self.obj.enqueue(keys)

    def rows(self) -> np.ndarray:
        return np.array(self._rows(self.obj))

    def differs(self, got: np.ndarray) -> str | None:
        """None when ``got`` (K, C) holds this queue's rows, else which rows differ."""
        want = self.rows()
        if got.shape != want.shape:
            return f"shape {got.shape} != expected {want.shape}"
        bad = np.nonzero(~np.all(np.isclose(got, want, rtol=1e-6, atol=0), axis=1))[0]
        if bad.size == 0:
            return None
        i = int(bad[0])
        return f"rows {bad.tolist()} differ; row {i}: got {got[i]}, expected {want[i]}"


def queue_reference(semantics: str, initial: np.ndarray) -> _QueueAdapter:
    """A reference queue holding ``initial`` (K, C), one key per row.

    ``"refmoco"``: :class:`refmoco.Queue` (wraps around); ``"moco"``:
    :class:`~refmoco.conventions.moco.MoCoQueue` (asserts ``K % N == 0``); ``"lightly"``:
    :class:`~refmoco.conventions.lightly.MemoryBankModule` (drops what overflows).
    """
    size, dim = initial.shape
    if semantics == "refmoco":
        queue = Queue(size, dim, dtype=initial.dtype)
        queue.load_state_dict(dict(queue.state_dict(), keys=np.array(initial)))
        return _QueueAdapter(queue, lambda q: q.keys)
    if semantics == "moco":
        return _QueueAdapter(moco.MoCoQueue(dim, size, initial=initial.T), lambda q: q.queue.T)
    if semantics == "lightly":
        bank = lightly.MemoryBankModule(size, dim, initial=initial, dtype=initial.dtype)
        return _QueueAdapter(bank, lambda b: b.bank)
    raise ValueError(f"semantics: expected 'refmoco', 'moco' or 'lightly', got {semantics!r}")
