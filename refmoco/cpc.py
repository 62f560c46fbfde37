r"""Contrastive Predictive Coding end to end, every gradient by hand, on sequences of digits.

The model is CPC's three parts (van den Oord et al. 2018, Fig. 1): an encoder applied to every
time step, :math:`z_t = g_\text{enc}(x_t)`; an autoregressive context model,
:math:`c_t = \mathrm{GRU}(z_{\le t})`; and one bilinear predictor :math:`W_s` per step ahead,
scored by :func:`refmoco.cpc_loss` against the other sequences of the batch. The gradient of the
loss flows into ``z`` twice, directly and back through time through the GRU, and both reach the
encoder.

Its parameters are one :class:`~refmoco.nn.FlatParams` keyed by the ``state_dict()`` names of the
PyTorch module ::

    class CPC(torch.nn.Module):
        def __init__(self, F, hidden, D, H, S):
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(F, hidden), nn.ReLU(), nn.Linear(hidden, D))
            self.gru = nn.GRU(D, H, batch_first=True)
            self.predictors = nn.ModuleList(nn.Linear(H, D, bias=False) for _ in range(S))

so that ``W[s - 1]`` of :func:`refmoco.cpc_loss` is ``predictors.{s-1}.weight``.

The model runs where its parameters live: ``CPC.init(rng, dtype, backend="cupy")`` (or
``params.to("cupy")``) puts them on the GPU, and ``encode``, ``forward`` and ``loss_and_grads``
then take CuPy inputs and return CuPy arrays, computed by the same code with ``xp = cupy`` (an
input on the other device is a ``TypeError`` naming it, never a silent copy). The training loop
(:func:`train_cpc`), the data and the linear probes stay on the host.

The task (:func:`digit_sequences`): each sequence is a run of scikit-learn digit images whose
classes follow an arithmetic rule, ``label_t = (a + delta * t) mod 10``, with the start ``a`` and
step ``delta`` drawn per sequence and each image drawn at random from its class. Only the class of
a future image is predictable from the past, so a good CPC encoder must encode digit identity;
a linear probe on its per-step features measures that, against the same model at random
initialisation.

References
----------
van den Oord, Li, Vinyals. Representation Learning with Contrastive Predictive Coding.
arXiv:1807.03748.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from refmoco._checks import check_int, check_positive, check_seed
from refmoco.adam import Adam
from refmoco.backend import BACKENDS, as_array, check_device
from refmoco.losses import cpc_loss
from refmoco.nn import FlatParams, Linear, ReLU, Sequential
from refmoco.nn.gru import GRU, gru_backward, gru_forward
from refmoco.nn.layers import check_dtype
from refmoco.nn.sequential import Scoped

_GRU_NAMES = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")


class CPC:
    """CPC's encoder, GRU context model and predictors; owns no arrays (see the module notes).

    Parameters
    ----------
    in_features : int
        F, the size of one flattened time step (64 for 8x8 digits).
    hidden : int
        Width of the encoder's hidden layer.
    embed_dim : int
        D, the size of the encodings ``z``.
    context_dim : int
        H, the size of the contexts ``c``.
    num_steps : int
        S, how many steps ahead are predicted (``S < T``).

    Examples
    --------
    >>> import numpy as np
    >>> model = CPC(in_features=64, hidden=32, embed_dim=8, context_dim=16, num_steps=2)
    >>> params = model.init(np.random.default_rng(0), "float32")
    >>> list(params)[4:6], params["predictors.1.weight"].shape
    (['gru.weight_ih_l0', 'gru.weight_hh_l0'], (8, 16))
    >>> x = np.random.default_rng(1).random((4, 6, 64), dtype=np.float32)  # (B, T, F)
    >>> loss, grads = model.loss_and_grads(params, x)
    >>> loss.dtype, grads["gru.bias_hh_l0"].shape
    (dtype('float32'), (48,))
    """

    def __init__(self, in_features=64, hidden=128, embed_dim=16, context_dim=32, num_steps=3):
        self.encoder = Sequential(
            Linear(in_features, hidden), ReLU(), Linear(hidden, embed_dim)
        )
        self.gru = GRU(embed_dim, context_dim)
        self.predictor = Linear(context_dim, embed_dim, bias=False)
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps: expected an integer >= 1, got {num_steps!r}")
        self.num_steps = num_steps
        self.in_features, self.embed_dim, self.context_dim = in_features, embed_dim, context_dim

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """PyTorch ``state_dict()`` names and shapes, in order."""
        shapes = {f"encoder.{k}": s for k, s in self.encoder.param_shapes().items()}
        shapes.update({f"gru.{k}": s for k, s in self.gru.param_shapes().items()})
        for s in range(self.num_steps):
            shapes[f"predictors.{s}.weight"] = (self.embed_dim, self.context_dim)
        return shapes

    def init(self, rng: np.random.Generator, dtype: Any = "float32", *,
             backend: str = "numpy") -> FlatParams:
        """Fresh parameters, initialised as PyTorch initialises the module (no buffers).

        Parameters
        ----------
        rng : numpy.random.Generator
            Every draw is made from it on the host, so a seed gives the same weights on every
            backend.
        dtype : {"float32", "float64"}
        backend : {"numpy", "numba", "cupy"}
            Where the parameters live: the host, or the GPU for ``"cupy"`` (one copy of the
            host draws), as :meth:`refmoco.nn.Model.init`.
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        dt = check_dtype(dtype)
        arrays = {f"encoder.{k}": v for k, v in self.encoder.init_params(rng, dt).items()}
        arrays.update({f"gru.{k}": v for k, v in self.gru.init_params(rng, dt).items()})
        for s in range(self.num_steps):
            arrays[f"predictors.{s}.weight"] = self.predictor.init_params(rng, dt)["weight"]
        params = FlatParams(self.param_shapes(), dt)
        params.load_state_dict(arrays)
        return params.to(backend)

    def _W(self, params) -> np.ndarray:
        return params.xp.stack([params[f"predictors.{s}.weight"] for s in range(self.num_steps)])

    @staticmethod
    def _input(params: FlatParams, x):
        """``x`` as an array of the parameters' dtype on their device (else a TypeError)."""
        x = as_array(x, "x")
        check_device(x, "x", params.xp)
        return params.xp.asarray(x, dtype=params.dtype)

    def encode(self, params: FlatParams, x) -> np.ndarray:
        """Per-step features: the encoder on (N, F) inputs gives (N, D), on the parameters'
        device."""
        x = self._input(params, x)
        x = x.reshape(len(x), -1)
        return self.encoder.forward(Scoped(params, "encoder"), {}, x)[0]

    def forward(self, params: FlatParams, x):
        """Encodings and contexts of a batch of sequences.

        Parameters
        ----------
        params : FlatParams
        x : ndarray of shape (B, T, F)
            Cast to the parameters' dtype; on their device (NumPy for parameters on the host,
            CuPy for parameters on the GPU), else a ``TypeError``.

        Returns
        -------
        z : ndarray of shape (B, T, D)
        c : ndarray of shape (B, T, H)
        cache : tuple
            The encoder's and the GRU's caches.
        """
        x = self._input(params, x)
        if x.ndim != 3 or x.shape[2] != self.in_features:
            raise ValueError(
                f"x: expected shape (B, T, {self.in_features}), got {tuple(x.shape)}"
            )
        b, t, f = x.shape
        z, enc_cache = self.encoder.forward(Scoped(params, "encoder"), {}, x.reshape(b * t, f))
        z = z.reshape(b, t, -1)  # (B, T, D)
        c, gru_cache = gru_forward(z, None, *(params[f"gru.{k}"] for k in _GRU_NAMES))  # (B,T,H)
        return z, c, (enc_cache, gru_cache)

    def loss_and_grads(self, params: FlatParams, x):
        r"""The CPC loss of a batch of sequences and its gradient for every parameter.

        Parameters
        ----------
        params : FlatParams
        x : ndarray of shape (B, T, F)
            On the parameters' device, as in :meth:`forward`.

        Returns
        -------
        loss : ndarray, 0-d
            ``cpc_loss(z, c, W).loss`` (mean over the valid (s, t, b)), on the parameters'
            device (``float(loss)`` brings it to the host).
        grads : FlatParams
            Same layout, dtype and device as ``params``.

        Notes
        -----
        With :math:`(\partial z, \partial c, \partial W)` from :func:`refmoco.cpc_loss`,
        backpropagation through time gives :math:`\partial z^{\text{GRU}}` from
        :math:`\partial c` (:func:`refmoco.nn.gru.gru_backward`), and the encoder receives
        :math:`\partial z + \partial z^{\text{GRU}}`.
        """
        z, c, (enc_cache, gru_cache) = self.forward(params, x)
        out = cpc_loss(z, c, self._W(params))
        dz_gru, _, *dgru = gru_backward(out.grads["c"], gru_cache)  # (B, T, D), ...
        dz = out.grads["z"] + dz_gru  # (B, T, D): direct and through the contexts
        grads = params.zeros_like()
        self.encoder.backward_into(Scoped(params, "encoder"), enc_cache,  # into grads' views
                                   dz.reshape(-1, dz.shape[2]), Scoped(grads, "encoder"),
                                   input_grad=False)
        for k, v in zip(_GRU_NAMES, dgru, strict=True):
            grads[f"gru.{k}"][...] = v
        for s in range(self.num_steps):
            grads[f"predictors.{s}.weight"][...] = out.grads["W"][s]
        return out.loss, grads


def digit_sequences(images, labels, rng: np.random.Generator, batch: int, length: int,
                    deltas=(1, 2, 3)):  # fmt: skip
    """Sequences of digit images whose classes follow ``label_t = (a + delta * t) mod 10``.

    Parameters
    ----------
    images : ndarray of shape (N, ...)
        Flattened to (N, F).
    labels : ndarray of shape (N,), integers 0..9, every class present
    rng : numpy.random.Generator
    batch, length : int
        B sequences of T steps.
    deltas : sequence of int
        The steps the rule may use; one is drawn per sequence, as is the start ``a``.

    Returns
    -------
    x : ndarray of shape (B, T, F)
    seq_labels : ndarray of shape (B, T)
    delta : ndarray of shape (B,)
    """
    flat = np.asarray(images).reshape(len(images), -1)
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")  # image indices grouped by class
    counts = np.bincount(labels, minlength=10)  # (10,)
    if counts.shape != (10,) or np.any(counts == 0):
        raise ValueError("labels: expected classes 0..9, each with at least one image")
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # (10,) where each class starts
    start = rng.integers(0, 10, size=batch)  # (B,)
    delta = rng.choice(np.asarray(deltas), size=batch)  # (B,)
    seq_labels = (start[:, None] + delta[:, None] * np.arange(length)) % 10  # (B, T)
    within = (rng.random(seq_labels.shape) * counts[seq_labels]).astype(np.int64)  # (B, T)
    pick = order[first[seq_labels] + within]  # (B, T): a uniform image of each class
    return flat[pick], seq_labels, delta


@dataclass(frozen=True)
class CPCConfig:
    """Settings of :func:`train_cpc`."""

    seq_len: int = 8
    num_steps: int = 3
    batch_size: int = 64
    train_steps: int = 2000
    lr: float = 1e-3
    hidden: int = 128
    embed_dim: int = 16
    context_dim: int = 32
    eval_every: int = 250
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("train_steps", "hidden", "embed_dim", "context_dim", "eval_every"):
            check_int(getattr(self, name), name, minimum=1)
        check_int(self.batch_size, "batch_size", minimum=2)
        check_int(self.seq_len, "seq_len", minimum=2)
        if check_int(self.num_steps, "num_steps", minimum=1) >= self.seq_len:
            raise ValueError(f"num_steps: expected < seq_len = {self.seq_len}, got {self.num_steps}")
        check_positive(self.lr, "lr")
        check_seed(self.seed)
        check_dtype(self.dtype)

    def to_json(self) -> dict:
        return asdict(self)


def _probe(model: CPC, params: FlatParams, ds, seed: int) -> float:
    from refmoco.evaluate import linear_probe_accuracy

    return linear_probe_accuracy(model.encode(params, ds.x_train), ds.y_train,
                                 model.encode(params, ds.x_test), ds.y_test, seed=seed)  # fmt: skip


def _test_loss(model: CPC, params: FlatParams, ds, config: CPCConfig, batches: int = 20):
    rng = np.random.default_rng(config.seed + 1)  # the same test sequences for every call
    losses = [float(model.loss_and_grads(params, digit_sequences(
        ds.x_test, ds.y_test, rng, config.batch_size, config.seq_len)[0])[0])
        for _ in range(batches)]  # fmt: skip
    return float(np.mean(losses))


def train_cpc(config: CPCConfig = CPCConfig(), on_step: Callable | None = None,
              dataset=None) -> dict:  # fmt: skip
    r"""Train CPC with Adam on digit sequences; linear probes against the random init.

    Parameters
    ----------
    config : CPCConfig
    on_step : callable, optional
        Called after every step with ``{"step": int, "loss": float}``.
    dataset : refmoco.data.Dataset, optional
        Default: scikit-learn's digits split by ``config.seed``. Sequences for training are
        drawn from its train split, for the test loss from its test split.

    Returns
    -------
    dict
        ``config``; ``history`` (per evaluation: ``step``, mean training ``loss`` since the
        previous one, ``linear_accuracy``); ``final`` and ``random_init``, each
        ``{"linear_accuracy", "test_loss", "mi_bound"}`` where ``mi_bound`` is
        :math:`\ln B - L_\text{test}`; ``raw_pixels`` (the probe on the pixels);
        ``train_seconds``.
    """
    from refmoco.data import load_digits

    ds = load_digits(seed=config.seed) if dataset is None else dataset
    rng = np.random.default_rng(config.seed)
    f = int(np.prod(ds.x_train.shape[1:]))
    model = CPC(f, config.hidden, config.embed_dim, config.context_dim, config.num_steps)
    params = model.init(rng, config.dtype)
    log_b = math.log(config.batch_size)

    def evaluate(p):
        test_loss = _test_loss(model, p, ds, config)
        return {"linear_accuracy": _probe(model, p, ds, config.seed), "test_loss": test_loss,
                "mi_bound": log_b - test_loss}  # fmt: skip

    random_init = evaluate(params)
    opt, history, window, t0 = Adam(lr=config.lr), [], [], time.perf_counter()
    for step in range(1, config.train_steps + 1):
        x, _, _ = digit_sequences(ds.x_train, ds.y_train, rng, config.batch_size, config.seq_len)
        loss, grads = model.loss_and_grads(params, x)
        opt.step(params, grads)
        window.append(float(loss))
        if on_step is not None:
            on_step({"step": step, "loss": window[-1]})
        if step % config.eval_every == 0 or step == config.train_steps:
            history.append({"step": step, "loss": float(np.mean(window)),
                            "linear_accuracy": _probe(model, params, ds, config.seed)})  # fmt: skip
            window = []
    seconds = time.perf_counter() - t0
    from refmoco.evaluate import linear_probe_accuracy

    flat = (ds.x_train.reshape(len(ds.x_train), -1), ds.x_test.reshape(len(ds.x_test), -1))
    raw = linear_probe_accuracy(flat[0], ds.y_train, flat[1], ds.y_test, seed=config.seed)
    return {"config": config.to_json(), "history": history, "final": evaluate(params),
            "random_init": random_init, "raw_pixels": {"linear_accuracy": raw},
            "log_batch_size": log_b, "train_seconds": seconds}  # fmt: skip
