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
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .dictionary import MemoryBank, Queue, rng_from_array, rng_to_array
from .losses import info_nce_loss, l2_normalize
from .momentum import momentum_update
from .optim import SGD

MECHANISMS = ("moco", "end-to-end", "memory-bank")


class StepStats(NamedTuple):
    """Diagnostics of one step (Python floats)."""

    loss: float
    pos_sim: float  # mean cosine similarity of a query and its positive
    neg_sim: float  # mean cosine similarity of a query and its negatives
    own_share: float  # share of the dictionary that came from the query's own sample


class Branch(NamedTuple):
    """A forward pass through the encoder, normalised, with what its backward needs."""

    z: Any  # L2-normalised head output, (N, out_dim)
    caches: list  # encoder caches, one per BN group
    groups: list  # row indices of each BN group
    normalize_backward: Any


def encode(encoder, params, buffers, x, *, train: bool, groups=None,
           backend: str = "numpy") -> Branch:
    """``normalize(encoder(x))``, with batch norm computed separately in each group of rows.

    ``groups`` (a list of index arrays partitioning the batch) emulates the per-GPU batch norm of
    MoCo's multi-GPU training on one process; ``None`` is one group, the whole batch.
    """
    groups = [np.arange(len(x))] if groups is None else groups
    out, caches = None, []
    for rows in groups:
        z, cache = encoder.forward(params, buffers, x[rows], train=train, backend=backend)
        if out is None:
            out = np.empty((len(x), z.shape[1]), dtype=z.dtype)
        out[rows] = z
        caches.append(cache)
    z, backward = l2_normalize(out, axis=1)
    return Branch(z, caches, groups, backward)


def backprop(encoder, params, branch: Branch, dz, grads, *, accumulate: bool) -> None:
    """Backpropagate ``dz`` (gradient of the normalised output) into ``grads``."""
    dout = branch.normalize_backward(dz)
    for i, (rows, cache) in enumerate(zip(branch.groups, branch.caches)):
        encoder.backward(params, cache, dout[rows], grads=grads,
                         accumulate=accumulate or i > 0)


def split_groups(n: int, num_groups: int) -> list:
    """Consecutive row ranges of (nearly) equal size: the per-GPU sub-batches."""
    return [np.asarray(g) for g in np.array_split(np.arange(n), min(num_groups, n))]


class Mechanism:
    """What every mechanism shares: the query encoder, its gradients and its optimizer."""

    name = ""

    def __init__(self, encoder, params, buffers, optimizer: SGD, *, temperature: float,
                 backend: str = "numpy"):
        self.backend = backend  # "numba": loss, EMA, SGD step, convolutions and BN as Numba kernels
        self.encoder = encoder
        self.params = params  # FlatParams
        self.buffers = buffers  # dict of BN running statistics
        self.grads = params.zeros_like()
        self.optimizer = optimizer
        self.temperature = float(temperature)

    def _update(self, lr: float) -> None:
        self.optimizer.step(self.params.flat, self.grads.flat, lr=lr)

    def state_dict(self) -> dict:
        state = {f"params/{k}": v.copy() for k, v in self.params.items()}
        state.update({f"buffers/{k}": np.array(v) for k, v in self.buffers.items()})
        state.update({f"optimizer/{k}": np.array(v)
                      for k, v in self.optimizer.state_dict().items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        self.params.load_state_dict(_section(state, "params"))
        for k, v in _section(state, "buffers").items():
            self.buffers[k][...] = v
        self.optimizer.load_state_dict(_section(state, "optimizer"))

    def check_state(self, state: dict) -> None:
        """Raise ValueError if ``state`` does not fit this mechanism (nothing is changed)."""
        for prefix, expected in (("params", self.params), ("buffers", self.buffers)):
            got = _section(state, prefix)
            if set(got) != set(expected):
                raise ValueError(f"checkpoint: its {prefix} do not match this model "
                                 f"(different encoder or options?)")
            for k, v in got.items():
                if np.shape(v) != np.shape(expected[k]):
                    raise ValueError(f"checkpoint: {prefix}/{k} has shape {np.shape(v)}, "
                                     f"expected {np.shape(expected[k])}")


def _section(state: dict, prefix: str) -> dict:
    p = prefix + "/"
    return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}


class MoCo(Mechanism):
    """MoCo: queue of keys from the momentum encoder (``m``) and shuffle BN in ``bn_groups``."""

    name = "moco"

    def __init__(self, encoder, params, buffers, optimizer, *, queue: Queue, momentum: float,
                 temperature: float, bn_groups: int = 1, seed: int = 0, backend="numpy"):
        super().__init__(encoder, params, buffers, optimizer, temperature=temperature,
                         backend=backend)
        self.queue = queue
        self.momentum = float(momentum)
        self.bn_groups = int(bn_groups)
        self.key_params = params.copy()  # the key encoder starts as a copy (MoCo: θk ← θq)
        self.key_buffers = {k: np.array(v) for k, v in buffers.items()}
        self.rng = np.random.default_rng(seed)  # the shuffle of shuffle BN

    def step(self, x_q, x_k, ids, lr: float) -> StepStats:
        n = len(x_q)
        groups = split_groups(n, self.bn_groups)
        q = encode(self.encoder, self.params, self.buffers, x_q, train=True, groups=groups,
                   backend=self.backend)
        # the key encoder: EMA first, then the keys of the shuffled batch, unshuffled
        momentum_update(self.key_params.flat, self.params.flat, self.momentum,
                        backend=self.backend)
        perm = self.rng.permutation(n)
        k_shuffled = encode(self.encoder, self.key_params, self.key_buffers, x_k[perm],
                            train=True, groups=groups, backend=self.backend).z
        k = np.empty_like(k_shuffled)
        k[perm] = k_shuffled  # unshuffle: row i is again the key of sample i
        # logits against the queue as it was before this batch (no gradient into k or queue)
        negatives = self.queue.keys
        own = float(np.mean(self.queue.ids[None, :] == np.asarray(ids)[:, None]))
        out = info_nce_loss(q.z, k, negatives, temperature=self.temperature, wrt=("q",),
                            backend=self.backend)
        stats = StepStats(float(out.loss), float(np.mean(np.sum(q.z * k, axis=1))),
                          float(np.mean(q.z @ negatives.mean(axis=0))), own)
        self.queue.enqueue(k, ids=ids)
        backprop(self.encoder, self.params, q, out.grads["q"], self.grads, accumulate=False)
        self._update(lr)
        return stats

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update({f"key_params/{k}": v.copy() for k, v in self.key_params.items()})
        state.update({f"key_buffers/{k}": np.array(v) for k, v in self.key_buffers.items()})
        state.update({f"queue/{k}": v for k, v in self.queue.state_dict().items()})
        state["moco/rng_state"] = rng_to_array(self.rng)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.queue.load_state_dict(_section(state, "queue"))
        super().load_state_dict(state)
        self.key_params.load_state_dict(_section(state, "key_params"))
        for k, v in _section(state, "key_buffers").items():
            self.key_buffers[k][...] = v
        self.rng = rng_from_array(state["moco/rng_state"])


class EndToEnd(Mechanism):
    """End-to-end: the keys are the other rows of the batch, encoded by the query encoder."""

    name = "end-to-end"

    def step(self, x_q, x_k, ids, lr: float) -> StepStats:
        q = encode(self.encoder, self.params, self.buffers, x_q, train=True, backend=self.backend)
        k = encode(self.encoder, self.params, self.buffers, x_k, train=True, backend=self.backend)
        out = info_nce_loss(q.z, k.z, None, temperature=self.temperature, backend=self.backend)
        sims = q.z @ k.z.T  # (N, N)
        n = len(x_q)
        neg = float((sims.sum() - np.trace(sims)) / max(n * (n - 1), 1))
        stats = StepStats(float(out.loss), float(np.mean(np.diag(sims))), neg, 0.0)
        backprop(self.encoder, self.params, q, out.grads["q"], self.grads, accumulate=False)
        backprop(self.encoder, self.params, k, out.grads["k"], self.grads, accumulate=True)
        self._update(lr)
        return stats


class MemoryBankMechanism(Mechanism):
    """Memory bank: positive = the sample's stored row, negatives = ``num_negatives`` other
    rows drawn uniformly; the sample's row is then moved towards the new feature."""

    name = "memory-bank"

    def __init__(self, encoder, params, buffers, optimizer, *, bank: MemoryBank,
                 num_negatives: int, temperature: float, backend="numpy"):
        super().__init__(encoder, params, buffers, optimizer, temperature=temperature,
                         backend=backend)
        self.bank = bank
        self.num_negatives = int(num_negatives)

    def step(self, x_q, x_k, ids, lr: float) -> StepStats:
        ids = np.asarray(ids)
        q = encode(self.encoder, self.params, self.buffers, x_q, train=True, backend=self.backend)
        negative_rows = self.bank.sample(ids, self.num_negatives)  # (N, M) from the bank's rng
        positives = self.bank.bank[ids]  # (N, C)
        negatives = self.bank.bank[negative_rows]  # (N, M, C)
        out = info_nce_loss(q.z, positives, negatives, temperature=self.temperature, wrt=("q",),
                            backend=self.backend)
        stats = StepStats(float(out.loss), float(np.mean(np.sum(q.z * positives, axis=1))),
                          float(np.mean(np.einsum("nc,nmc->nm", q.z, negatives))), 0.0)
        self.bank.update(ids, q.z)
        backprop(self.encoder, self.params, q, out.grads["q"], self.grads, accumulate=False)
        self._update(lr)
        return stats

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update({f"bank/{k}": v for k, v in self.bank.state_dict().items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        self.bank.load_state_dict(_section(state, "bank"))
        super().load_state_dict(state)
