"""One training step of each dictionary mechanism MoCo compares (He et al. 2019, Fig. 2).

- ``MoCo``: a queue of keys from a momentum (EMA) key encoder. Large and consistent.
- ``EndToEnd``: in-batch keys from the query encoder itself, gradients through both branches.
  Consistent, but only as large as the batch.
- ``MemoryBankMechanism`` (Wu et al. 2018): the positive and negatives are stored features of
  earlier epochs. Large, but inconsistent (each row comes from a different encoder).

Each step, in the order of the official MoCo code: the query forward; (MoCo) the momentum update
of the key encoder *before* the keys are computed, the keys under shuffle BN and with no
gradient; the logits against the dictionary *before* the current keys are enqueued; the loss and
its gradient; the backward through the encoder; one SGD step. Every mechanism keeps its whole
state as arrays (``state_dict``) so a run can be saved and resumed bit for bit.

On the GPU (``backend="cupy"``) the parameters, buffers, queue or bank and every intermediate are
CuPy arrays and the step is the same code with ``xp = cupy``: the views ``x_q``, ``x_k`` must be
CuPy arrays (a data loader's ``cupy.asarray``), the random draws (shuffle BN's permutation, the
memory bank's negatives) still come from host NumPy generators and their index arrays are copied
to the device, and the statistics come back as Python floats. ``state_dict`` is host NumPy arrays
wherever the run lives, and ``load_state_dict`` puts them back where this mechanism lives.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ._checks import check_finite, check_int, check_positive, check_unit_interval
from .backend import (
    as_array,
    backend_of,
    check_available,
    check_device,
    host_copy,
    namespace_of,
    to_backend,
    to_numpy,
)
from .dictionary import MemoryBank, Queue, check_ids, rng_from_array, rng_to_array
from .losses import info_nce_loss, l2_normalize
from .momentum import momentum_update
from .nn.models import _placement
from .optim import SGD

MECHANISMS = ("moco", "end-to-end", "memory-bank")


class StepStats(NamedTuple):
    """Diagnostics of one step (Python floats)."""

    loss: float
    pos_sim: float  # mean cosine similarity of a query and its positive
    neg_sim: float  # mean cosine similarity of a query and its negatives
    own_share: float  # share of the dictionary that came from the query's own sample


def _store(write, rows, what: str) -> None:
    """``write()`` the step's ``rows`` into the queue or bank, which refuse non-finite rows.
    When these rows are not finite, training has diverged, and a ``FloatingPointError`` says
    so (the rows are looked at only after a refusal: no extra read of the device)."""
    try:
        write()
    except ValueError as exc:
        if bool(namespace_of(rows).isfinite(rows).all()):
            raise
        raise FloatingPointError(f"training diverged: the {what} are not finite; lower the "
                                 f"learning rate or raise the temperature") from exc


def _read_stats(pending: Any, own_share: float) -> StepStats:
    """The step's (loss, pos_sim, neg_sim), stacked on the device when they were computed and
    read here, at the end of the step, in one transfer: on a GPU a read makes the host wait for
    every kernel queued so far. The other read of a step, the queue's (or bank's) check that
    the new rows are finite, comes just before, after the update is queued."""
    loss, pos_sim, neg_sim = to_numpy(pending).tolist()
    return StepStats(loss, pos_sim, neg_sim, own_share)


class Branch(NamedTuple):
    """A forward pass through the encoder, normalised, with what its backward needs."""

    z: Any  # L2-normalised head output, (N, out_dim)
    caches: list  # encoder caches, one per BN group
    groups: list  # row indices of each BN group ([slice(None)]: the whole batch in order)
    normalize_backward: Any


def encode(encoder, params, buffers, x, *, train: bool, groups=None,
           backend: str | None = None) -> Branch:
    """``normalize(encoder(x))``, with batch norm computed separately in each group of rows.

    ``groups`` (a list of index arrays partitioning the batch) emulates the per-GPU batch norm of
    MoCo's multi-GPU training on one process; ``None`` is one group, the whole batch in order,
    which goes through the encoder as it is (no gather or scatter of its rows). Host index
    arrays are copied to the device of ``x`` (nothing happens on the host).

    With several groups in training, the running statistics are updated once per call, as one
    batch norm over the whole batch would be: every group starts from the same running
    statistics, and the result is the mean of the groups' updates, ``(1 - momentum) * old +
    momentum * mean_g(stat_g)``, with the batch counter advanced by one. This is what the
    ``SplitBatchNorm`` of MoCo's CIFAR-10 demo does; the groups' statistics are not applied one
    after the other (that would compound the momentum to ``1 - (1 - momentum)^groups``).
    """
    xp = namespace_of(x)
    if groups is None:  # C-contiguous, as a gather of the rows would be (a copy only if not)
        out, cache = encoder.forward(params, buffers, xp.ascontiguousarray(x), train=train,
                                     backend=backend)
        z, backward = l2_normalize(out, axis=1)
        return Branch(z, [cache], [slice(None)], backward)
    groups = [xp.asarray(rows) for rows in groups]
    split = train and len(groups) > 1 and bool(buffers)
    start = {k: v.copy() for k, v in buffers.items()} if split else None
    total = {k: xp.zeros_like(v) for k, v in buffers.items() if v.dtype.kind == "f"} if split else None
    out, caches = None, []
    for i, rows in enumerate(groups):
        if split and i:
            for k, v in buffers.items():
                v[...] = start[k]
        z, cache = encoder.forward(params, buffers, x[rows], train=train, backend=backend)
        if split:
            for k, acc in total.items():
                acc += buffers[k]
        if out is None:
            out = xp.empty((len(x), z.shape[1]), dtype=z.dtype)
        out[rows] = z
        caches.append(cache)
    if split:  # the counters already hold start + 1, from the last group
        for k, acc in total.items():
            buffers[k][...] = acc / acc.dtype.type(len(groups))
    z, backward = l2_normalize(out, axis=1)
    return Branch(z, caches, groups, backward)


def backprop(encoder, params, branch: Branch, dz, grads, *, accumulate: bool) -> None:
    """Backpropagate ``dz`` (gradient of the normalised output) into ``grads``."""
    dout = branch.normalize_backward(dz)
    for i, (rows, cache) in enumerate(zip(branch.groups, branch.caches)):
        encoder.backward(params, cache, dout[rows], grads=grads,
                         accumulate=accumulate or i > 0, input_grad=False)  # no dx


def split_groups(n: int, num_groups: int) -> list:
    """Consecutive row ranges of (nearly) equal size: the per-GPU sub-batches."""
    return [np.asarray(g) for g in np.array_split(np.arange(n), min(num_groups, n))]


class Mechanism:
    """What every mechanism shares: the query encoder, its gradients and its optimizer.

    ``backend``: ``None`` follows the parameters (``"cupy"`` for a FlatParams on the GPU, else
    ``"numpy"``); ``"numba"`` runs the loss, EMA, SGD step, convolutions and batch norms as Numba
    kernels on the host; ``"cupy"`` needs the parameters, buffers and dictionary on the GPU.
    """

    name = ""

    def __init__(self, encoder, params, buffers, optimizer: SGD, *, temperature: float,
                 backend: str | None = None):
        self.backend = _check_placement(params, buffers, backend)
        self.encoder = encoder
        self.params = params  # FlatParams
        self.buffers = buffers  # dict of BN running statistics
        self.grads = params.zeros_like()  # on the parameters' device
        self.optimizer = optimizer
        self.temperature = check_positive(temperature, "temperature")

    def _arguments(self, x_q, x_k, ids, lr):
        """A step's arguments, checked before anything changes: the two views as arrays of one
        shape on this mechanism's device, ``ids`` as host int64 (one per row), ``lr`` >= 0. A
        rejected step leaves the mechanism as it was."""
        x_q, x_k = as_array(x_q, "x_q"), as_array(x_k, "x_k")
        check_device(x_q, "x_q", self.xp)
        check_device(x_k, "x_k", self.xp)
        if x_q.ndim < 1 or x_k.shape != x_q.shape:
            raise ValueError(f"x_k: expected the shape of x_q {tuple(x_q.shape)} (two views of "
                             f"the same samples), got {tuple(x_k.shape)}")
        if ids is None:
            raise TypeError("ids: expected the batch's sample ids (integers), got None")
        return x_q, x_k, check_ids(ids, len(x_q), "sample"), check_finite(lr, "lr")

    def _update(self, lr: float) -> None:
        self.optimizer.step(self.params.flat, self.grads.flat, lr=lr)

    def state_dict(self) -> dict:
        """Every array of the run as host NumPy arrays (what a checkpoint stores)."""
        state = {f"params/{k}": v for k, v in self.params.state_dict().items()}
        state.update({f"buffers/{k}": host_copy(v) for k, v in self.buffers.items()})
        state.update({f"optimizer/{k}": np.zeros(0, self.params.dtype) if v is None else np.array(v)
                      for k, v in self.optimizer.state_dict().items()})  # None: no buffer yet
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s arrays (host or device) into this mechanism's device.

        All or nothing: if any entry is rejected (a malformed optimizer entry, a queue of the
        wrong size, ...), everything already restored is put back as it was and the error is
        raised; the mechanism is then exactly as before the call.
        """
        backup = self.state_dict()  # host copies
        missing, unexpected = sorted(set(backup) - set(state)), sorted(set(state) - set(backup))
        if missing or unexpected:
            raise ValueError(f"state: does not fit this {self.name} mechanism "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        try:
            self._load_state_dict(state)
        except Exception:
            self._load_state_dict(backup)
            raise

    @property
    def xp(self):
        """The parameters' array module; a property (a stored module cannot be deep-copied)."""
        return self.params.xp

    def _load_state_dict(self, state: dict) -> None:
        self.params.load_state_dict(_section(state, "params"))
        _load_buffers(self.buffers, _section(state, "buffers"))
        self.optimizer.load_state_dict(_section(state, "optimizer"))

    def check_state(self, state: dict) -> None:
        """Raise ValueError if ``state`` does not fit this mechanism (nothing is changed)."""
        for prefix, expected in (("params", self.params), ("buffers", self.buffers)):
            got = _section(state, prefix)
            if set(got) != set(expected):
                raise ValueError(f"checkpoint: its {prefix} do not match this model "
                                 f"(different encoder or options?)")
            for k, v in got.items():
                if np.shape(v) != tuple(expected[k].shape):
                    raise ValueError(f"checkpoint: {prefix}/{k} has shape {np.shape(v)}, "
                                     f"expected {tuple(expected[k].shape)}")
        # the optimizer's momentum buffer (empty before the first step) follows the flat
        # parameters; a mismatch would otherwise surface only at the next step
        buf = np.asarray(state.get("optimizer/momentum_buffer", np.zeros(0)))
        if buf.size and (buf.shape != self.params.flat.shape or buf.dtype != self.params.dtype):
            raise ValueError(f"checkpoint: optimizer/momentum_buffer is {buf.shape} {buf.dtype}, "
                             f"expected {self.params.flat.shape} {self.params.dtype} (the flat "
                             f"parameters)")


def _check_placement(params, buffers, backend) -> str:
    """The mechanism's backend, checked against where the parameters and buffers live, as a
    model's forward checks it (a missing Numba or CuPy says what to install)."""
    check_available(backend)
    return _placement(params, buffers, None, backend)[0]


def _check_store(store, name: str, backend: str, encoder, params) -> None:
    """A queue or bank must live where the mechanism computes (``"numba"`` counts as host) and
    hold rows of the encoder's output size and the parameters' dtype."""
    if (store.backend == "cupy") != (backend == "cupy"):
        raise TypeError(f"{name}: it lives on backend={store.backend!r}, the mechanism on "
                        f"backend={backend!r}: create it with backend={backend!r}")
    out_dim = getattr(encoder, "out_dim", None)
    if out_dim is not None and store.dim != out_dim:
        raise ValueError(f"{name}: expected rows of the encoder's output size {out_dim}, got "
                         f"dim={store.dim}")
    if store.dtype != params.dtype:
        raise TypeError(f"{name}: expected dtype {params.dtype} (the parameters'), got "
                        f"{store.dtype}")


def _load_buffers(buffers: dict, saved: dict) -> None:
    """Copy saved buffers (host arrays) into ``buffers``, wherever those live."""
    for k, v in saved.items():
        buffers[k][...] = to_backend(v, backend_of(buffers[k]))


def _section(state: dict, prefix: str) -> dict:
    p = prefix + "/"
    return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}


class MoCo(Mechanism):
    """MoCo: queue of keys from the momentum encoder (``m``) and shuffle BN in ``bn_groups``."""

    name = "moco"

    def __init__(self, encoder, params, buffers, optimizer, *, queue: Queue, momentum: float,
                 temperature: float, bn_groups: int = 1, seed: int = 0, backend=None):
        super().__init__(encoder, params, buffers, optimizer, temperature=temperature,
                         backend=backend)
        _check_store(queue, "queue", self.backend, encoder, params)
        self.queue = queue
        self.momentum = check_unit_interval(momentum, "momentum")
        self.bn_groups = check_int(bn_groups, "bn_groups", minimum=1)
        self.key_params = params.copy()  # the key encoder starts as a copy (MoCo: θk ← θq)
        self.key_buffers = {k: v.copy() for k, v in buffers.items()}
        self.rng = np.random.default_rng(seed)  # the shuffle of shuffle BN (host, every backend)

    def step(self, x_q, x_k, ids, lr: float) -> StepStats:
        xp = self.xp
        x_q, x_k, ids, lr = self._arguments(x_q, x_k, ids, lr)
        n = len(x_q)
        # shuffle BN's per-GPU groups; None: one group, the whole batch (nothing to split)
        groups = split_groups(n, self.bn_groups) if self.bn_groups > 1 else None
        q = encode(self.encoder, self.params, self.buffers, x_q, train=True, groups=groups,
                   backend=self.backend)
        # the key encoder: EMA first, then the keys of the shuffled batch, unshuffled
        momentum_update(self.key_params.flat, self.params.flat, self.momentum,
                        backend=self.backend)
        perm = xp.asarray(self.rng.permutation(n))  # drawn on the host, used where x_k lives
        k_shuffled = encode(self.encoder, self.key_params, self.key_buffers, x_k[perm],
                            train=True, groups=groups, backend=self.backend).z
        k = xp.empty_like(k_shuffled)
        k[perm] = k_shuffled  # unshuffle: row i is again the key of sample i
        # logits against the queue as it was before this batch (no gradient into k or queue)
        negatives = self.queue.keys
        own = float(np.mean(self.queue.ids[None, :] == ids[:, None]))  # host ids
        out = info_nce_loss(q.z, k, negatives, temperature=self.temperature, wrt=("q",),
                            backend=self.backend)
        pending = xp.stack([out.loss, (q.z * k).sum(axis=1).mean(),  # before the queue moves
                            (q.z @ negatives.mean(axis=0)).mean()])
        backprop(self.encoder, self.params, q, out.grads["q"], self.grads, accumulate=False)
        self._update(lr)
        # last, as in MoCo's Algorithm 1: the queue's check of the keys reads the device, which
        # then waits for a step that is all queued already
        _store(lambda: self.queue.enqueue(k, ids=ids), k, "keys")
        return _read_stats(pending, own)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update({f"key_params/{k}": v for k, v in self.key_params.state_dict().items()})
        state.update({f"key_buffers/{k}": host_copy(v) for k, v in self.key_buffers.items()})
        state.update({f"queue/{k}": v for k, v in self.queue.state_dict().items()})
        state["moco/rng_state"] = rng_to_array(self.rng)
        return state

    def _load_state_dict(self, state: dict) -> None:
        self.queue.load_state_dict(_section(state, "queue"))
        super()._load_state_dict(state)
        self.key_params.load_state_dict(_section(state, "key_params"))
        _load_buffers(self.key_buffers, _section(state, "key_buffers"))
        self.rng = rng_from_array(state["moco/rng_state"])


class EndToEnd(Mechanism):
    """End-to-end: the keys are the other rows of the batch, encoded by the query encoder."""

    name = "end-to-end"

    def step(self, x_q, x_k, ids, lr: float) -> StepStats:
        x_q, x_k, ids, lr = self._arguments(x_q, x_k, ids, lr)
        q = encode(self.encoder, self.params, self.buffers, x_q, train=True, backend=self.backend)
        k = encode(self.encoder, self.params, self.buffers, x_k, train=True, backend=self.backend)
        out = info_nce_loss(q.z, k.z, None, temperature=self.temperature, backend=self.backend)
        sims = q.z @ k.z.T  # (N, N)
        n = len(x_q)
        neg = (sims.sum() - sims.trace()) / max(n * (n - 1), 1)
        pending = self.xp.stack([out.loss, sims.diagonal().mean(), neg])
        backprop(self.encoder, self.params, q, out.grads["q"], self.grads, accumulate=False)
        backprop(self.encoder, self.params, k, out.grads["k"], self.grads, accumulate=True)
        self._update(lr)
        return _read_stats(pending, 0.0)


class MemoryBankMechanism(Mechanism):
    """Memory bank: positive = the sample's stored row, negatives = ``num_negatives`` other
    rows drawn uniformly; the sample's row is then moved towards the new feature."""

    name = "memory-bank"

    def __init__(self, encoder, params, buffers, optimizer, *, bank: MemoryBank,
                 num_negatives: int, temperature: float, backend=None):
        super().__init__(encoder, params, buffers, optimizer, temperature=temperature,
                         backend=backend)
        _check_store(bank, "bank", self.backend, encoder, params)
        if bank.size < 2:
            raise ValueError(f"bank: expected at least 2 rows (a sample's negatives are the other "
                             f"rows), got size={bank.size}")
        self.bank = bank
        self.num_negatives = check_int(num_negatives, "num_negatives", minimum=1)

    def step(self, x_q, x_k, ids, lr: float) -> StepStats:
        xp = self.xp
        x_q, x_k, ids, lr = self._arguments(x_q, x_k, ids, lr)  # ids on the host: the bank
        ids = self.bank.check_rows(ids, "ids", distinct=True)  # samples and checks them there
        q = encode(self.encoder, self.params, self.buffers, x_q, train=True, backend=self.backend)
        negative_rows = self.bank.sample(ids, self.num_negatives)  # (N, M) from the bank's rng
        positives = self.bank.bank[xp.asarray(ids)]  # (N, C)
        negatives = self.bank.bank[xp.asarray(negative_rows)]  # (N, M, C)
        out = info_nce_loss(q.z, positives, negatives, temperature=self.temperature, wrt=("q",),
                            backend=self.backend)
        pending = xp.stack([out.loss, (q.z * positives).sum(axis=1).mean(),  # before the update
                            xp.einsum("nc,nmc->nm", q.z, negatives).mean()])
        backprop(self.encoder, self.params, q, out.grads["q"], self.grads, accumulate=False)
        self._update(lr)
        _store(lambda: self.bank.update(ids, q.z), q.z, "features")  # last (reads the device)
        return _read_stats(pending, 0.0)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update({f"bank/{k}": v for k, v in self.bank.state_dict().items()})
        return state

    def _load_state_dict(self, state: dict) -> None:
        self.bank.load_state_dict(_section(state, "bank"))
        super()._load_state_dict(state)
