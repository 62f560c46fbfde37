r"""The InfoNCE bound against a known mutual information (Poole et al. 2019, Fig. 2).

``x ~ N(0, I_d)`` and ``y = rho x + sqrt(1 - rho^2) eps`` with ``eps ~ N(0, I_d)`` independent,
so that the true mutual information is :math:`I(x; y) = -\tfrac d2 \ln(1 - \rho^2)` nats. A
separable critic :math:`f(x, y) = g(x)^\top h(y)` (two MLPs) is trained with Adam on the InfoNCE
loss :math:`L` of batches of :math:`N` pairs with in-batch negatives, and :math:`\ln N - L` is the
estimate. The true MI steps up as a staircase (2, 4, 6, 8, 10 nats) while one critic keeps
training, as in the paper. The estimate tracks the truth while it is small and saturates below
:math:`\ln N`: InfoNCE's loss is never negative, so the bound can never exceed :math:`\ln N`.

:func:`run_moco_queue` is MoCo's version: the keys come from a momentum (EMA) copy of the query
encoder and the negatives from a queue of :math:`K` past keys, so the ceiling becomes
:math:`\ln(K + 1)` and grows with the queue instead of the batch.

References
----------
- Poole, Ozair, van den Oord, Alemi, Tucker. On Variational Bounds of Mutual Information.
  ICML 2019, arXiv:1905.06922.
- van den Oord, Li, Vinyals. CPC, arXiv:1807.03748. He et al. MoCo, arXiv:1911.05722.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from refmoco._checks import check_int, check_positive, check_temperature, check_unit_interval
from refmoco.adam import Adam
from refmoco.dictionary import Queue
from refmoco.losses import info_nce_loss, l2_normalize, softmax_cross_entropy
from refmoco.momentum import momentum_update
from refmoco.nn import FlatParams, Linear, Model, ReLU, Sequential
from refmoco.nn.layers import check_dtype
from refmoco.nn.sequential import Scoped


def rho_for_mi(mi: float, dim: int = 20, *, name: str = "mi") -> float:
    r"""The correlation :math:`\rho = \sqrt{1 - e^{-2 I / d}}` that gives ``mi`` nats in ``dim`` dims.

    ``mi`` must be finite, >= 0 and at most about 18.7 nats per dimension: beyond, :math:`\rho`
    rounds to 1 in double precision (an infinite MI, and ``1 - rho**2 == 0`` in the samples and
    the best critic). A ``ValueError`` names ``name``, the argument ``mi`` came from.

    Examples
    --------
    >>> round(rho_for_mi(2.0, 20), 4), round(gaussian_mi(rho_for_mi(2.0, 20), 20), 12)
    (0.4258, 2.0)
    """
    if not (math.isfinite(mi) and mi >= 0):
        raise ValueError(f"{name}: expected a finite number >= 0, got {mi!r}")
    rho = math.sqrt(-math.expm1(-2.0 * mi / dim))
    if 1.0 - rho * rho <= 0.0:  # rho == 1.0
        raise ValueError(f"{name}: expected at most about {18.7 * dim:g} nats (18.7 per dimension, "
                         f"dim = {dim}; beyond, the correlation rounds to 1), got {mi!r}")
    return rho


def gaussian_mi(rho: float, dim: int = 20) -> float:
    r"""The mutual information :math:`-\tfrac d2 \ln(1 - \rho^2)` of the correlated Gaussians."""
    if not 0 <= rho < 1:
        raise ValueError(f"rho: expected a number in [0, 1), got {rho!r}")
    return -0.5 * dim * math.log1p(-rho * rho)


def sample_correlated(rng: np.random.Generator, n: int, dim: int, rho: float, dtype="float32"):
    """``n`` pairs ``(x, y)``, each of shape (n, dim), with ``y = rho x + sqrt(1 - rho^2) eps``."""
    x = rng.standard_normal((n, dim))  # (n, d)
    eps = rng.standard_normal((n, dim))  # (n, d)
    y = rho * x + math.sqrt(1.0 - rho * rho) * eps  # (n, d)
    return x.astype(dtype), y.astype(dtype)


def critic_mlp(in_dim: int = 20, hidden: int = 256, out_dim: int = 32) -> Sequential:
    """``Linear(in, hidden), ReLU, Linear(hidden, hidden), ReLU, Linear(hidden, out)``."""
    return Sequential(
        Linear(in_dim, hidden), ReLU(), Linear(hidden, hidden), ReLU(), Linear(hidden, out_dim)
    )


def separable_critic(in_dim=20, hidden=256, out_dim=32) -> Model:
    """Two MLPs in one parameter buffer: names ``g.0.weight`` ... for x, ``h.0.weight`` ... for y.

    Not a chain: :func:`infonce_loss_and_grads` runs ``g`` and ``h`` on their own inputs.
    """
    return Model(Sequential(OrderedDict(
        g=critic_mlp(in_dim, hidden, out_dim), h=critic_mlp(in_dim, hidden, out_dim))))  # fmt: skip


def _run(net: Sequential, params: FlatParams, prefix: str, x: np.ndarray):
    """``net`` on ``x`` with the parameters under ``prefix``; the cache for :func:`_back`."""
    scoped = Scoped(params, prefix)
    out, cache = net.forward(scoped, {}, x)
    return out, (scoped, cache)


def _back(net, cache, dout, grads: FlatParams, prefix: str) -> None:
    _, g = net.backward(cache[0], cache[1], dout)
    for k, v in g.items():
        grads[f"{prefix}.{k}"][...] = v


def infonce_loss_and_grads(critic: Model, params: FlatParams, x, y):
    r"""InfoNCE loss of the separable critic on a batch, with in-batch negatives, and its gradient.

    Parameters
    ----------
    critic : Model
        From :func:`separable_critic`.
    params : FlatParams
    x, y : ndarray of shape (N, d)
        Row ``i`` of ``y`` is paired with row ``i`` of ``x``.

    Returns
    -------
    loss : float
        :math:`L = \frac1N \sum_i \big[\log\sum_j e^{g(x_i)^\top h(y_j)} - g(x_i)^\top h(y_i)\big]`.
    grads : FlatParams
        :math:`\partial L / \partial \theta`, the layout of ``params``.
    """
    g_net, h_net = critic.net["g"], critic.net["h"]
    gx, cg = _run(g_net, params, "g", x)  # (N, E)
    hy, ch = _run(h_net, params, "h", y)  # (N, E)
    out = info_nce_loss(gx, hy, temperature=1.0)  # logits gx @ hy.T: (N, N)
    grads = params.zeros_like()
    _back(g_net, cg, out.grads["q"], grads, "g")
    _back(h_net, ch, out.grads["k"], grads, "h")
    return float(out.loss), grads


def optimal_critic_estimate(rng: np.random.Generator, rho: float, dim: int, batch: int,
                            num_negatives: int | None = None, batches: int = 200):  # fmt: skip
    r"""The bound reached by the best critic, :math:`f^*(x, y) = \log p(y \mid x) / p(y)`.

    InfoNCE is tight only as :math:`N \to \infty`; this Monte-Carlo value (mean and standard
    error over ``batches`` batches, float64) is the most a trained critic can reach with this
    many candidates. ``num_negatives=None``: in-batch negatives, :math:`\ln N - L`;
    otherwise ``K`` fresh negatives shared by the batch, :math:`\ln(K + 1) - L`.

    Notes
    -----
    Up to terms in x alone, which cancel in the softmax over candidates,
    :math:`f^*(x, y) = \big(\rho\, x^\top y - \tfrac12 \rho^2 \lVert y\rVert^2\big) / (1-\rho^2)`.
    """
    c = 1.0 / (1.0 - rho * rho)

    def critic(x, cand):  # (N, d), (M, d) -> (N, M)
        return c * (rho * x @ cand.T - 0.5 * rho * rho * np.sum(cand * cand, axis=1))

    est = []
    for _ in range(batches):
        x, y = sample_correlated(rng, batch, dim, rho, "float64")  # (N, d) each
        scores = critic(x, y)  # (N, N), positives on the diagonal
        if num_negatives is None:
            labels, n_cand = np.arange(batch), batch
        else:
            neg = rng.standard_normal((num_negatives, dim))  # (K, d) from p(y)
            scores = np.concatenate([np.diag(scores)[:, None], critic(x, neg)], axis=1)  # (N,1+K)
            labels, n_cand = np.zeros(batch, np.int64), num_negatives + 1
        loss = float(softmax_cross_entropy(scores, labels, wrt=()).loss)
        est.append(math.log(n_cand) - loss)
    return float(np.mean(est)), float(np.std(est, ddof=1) / math.sqrt(batches))


@dataclass(frozen=True)
class MIConfig:
    """Settings of :func:`run_infonce_staircase` and :func:`run_moco_queue` (Poole et al.'s)."""

    dim: int = 20
    mis: tuple = (2.0, 4.0, 6.0, 8.0, 10.0)  # true MI of each level, nats
    steps_per_level: int = 4000
    batch_size: int = 64
    lr: float = 5e-4
    hidden: int = 256
    embed_dim: int = 32
    eval_batches: int = 200  # fresh batches for each level's final estimate
    queue_sizes: tuple = (63, 255, 1023, 4095)  # K for the MoCo analogue
    moco_mi: float = 10.0
    moco_steps: int = 4000
    moco_momentum: float = 0.99
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("dim", "hidden", "embed_dim"):
            check_int(getattr(self, name), name, minimum=1)
        check_int(self.batch_size, "batch_size", minimum=2)  # ln 1 = 0: in-batch, no negative
        for name in ("steps_per_level", "moco_steps"):  # the drift compares two quarters
            check_int(getattr(self, name), name, minimum=2)
        check_int(self.eval_batches, "eval_batches", minimum=2)
        check_positive(self.lr, "lr")
        check_unit_interval(self.moco_momentum, "moco_momentum")
        for mi in self.mis:  # the CLI's --levels
            rho_for_mi(mi, self.dim, name="mis (--levels)")
        rho_for_mi(self.moco_mi, self.dim, name="moco_mi")
        for k in self.queue_sizes:
            check_int(k, "queue_sizes", minimum=1)
        check_dtype(self.dtype)

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _window_means(values: list[float], window: int) -> list[float]:
    n = len(values) // window
    return [float(np.mean(values[i * window : (i + 1) * window])) for i in range(n)]


def _summary(estimates: list[float], log_n: float) -> dict:
    """Mean training estimate in the last two quarters of a level (is the curve flat?)."""
    q = max(len(estimates) // 4, 1)
    last, before = float(np.mean(estimates[-q:])), float(np.mean(estimates[-2 * q : -q]))
    return {"train_last_quarter": last, "train_third_quarter": before,
            "train_drift": last - before, "train_max": float(np.max(estimates)),
            "ceiling": log_n}  # fmt: skip


def run_infonce_staircase(config: MIConfig = MIConfig(), on_step: Callable | None = None) -> dict:
    r"""Train one separable critic through the MI staircase; estimate :math:`\ln N - L` per level.

    Parameters
    ----------
    config : MIConfig
    on_step : callable, optional
        Called after every step with ``{"level": true_mi, "step": int, "estimate": float}``.

    Returns
    -------
    dict
        ``levels``: per level, ``true_mi``, ``rho``, ``estimate`` (the mean of
        :math:`\ln N - L` over ``eval_batches`` fresh batches after the level's training, with
        its standard error ``estimate_se``) and the training summary (mean of the last two
        quarters, their difference ``train_drift``, the largest batch estimate ``train_max``);
        ``curve``: the training estimate averaged over windows of 50 steps (a level's last,
        incomplete window is left out), each with its ``step`` (the window's centre); ``ceiling``:
        :math:`\ln N`.
    """
    rng = np.random.default_rng(config.seed)
    critic = separable_critic(config.dim, config.hidden, config.embed_dim)
    params, _ = critic.init(rng, config.dtype)
    opt = Adam(lr=config.lr)
    log_n = math.log(config.batch_size)
    levels, curve = [], []
    for level, mi in enumerate(config.mis):
        rho = rho_for_mi(mi, config.dim)
        estimates = []
        for step in range(config.steps_per_level):
            x, y = sample_correlated(rng, config.batch_size, config.dim, rho, config.dtype)
            loss, grads = infonce_loss_and_grads(critic, params, x, y)
            opt.step(params, grads)
            estimates.append(log_n - loss)
            if on_step is not None:
                on_step({"level": mi, "step": step, "estimate": estimates[-1]})
        evals = []
        for _ in range(config.eval_batches):
            x, y = sample_correlated(rng, config.batch_size, config.dim, rho, config.dtype)
            evals.append(log_n - float(info_nce_loss(
                _run(critic.net["g"], params, "g", x)[0], _run(critic.net["h"], params, "h", y)[0],
                temperature=1.0, wrt=()).loss))  # fmt: skip
        best, best_se = optimal_critic_estimate(rng, rho, config.dim, config.batch_size,
                                                batches=config.eval_batches)  # fmt: skip
        levels.append({"true_mi": mi, "rho": rho, "estimate": float(np.mean(evals)),
                       "optimal_critic": best, "optimal_critic_se": best_se,
                       "estimate_se": float(np.std(evals, ddof=1) / math.sqrt(len(evals))),
                       **_summary(estimates, log_n)})  # fmt: skip
        start = level * config.steps_per_level  # the windows' centres, counted from step 0
        curve += [{"true_mi": mi, "estimate": e, "step": start + 50 * i + 25}
                  for i, e in enumerate(_window_means(estimates, 50))]
    return {"ceiling": log_n, "levels": levels, "curve": curve}


def moco_loss_and_grads(net: Sequential, params_q: FlatParams, params_k: FlatParams, x, y,
                        queue_keys, temperature: float):  # fmt: skip
    r"""MoCo's InfoNCE on one batch: queries ``g(x)``, keys ``g_k(y)`` from the EMA encoder.

    Parameters
    ----------
    net : Sequential
        The encoder architecture, shared by both encoders.
    params_q, params_k : FlatParams
        The query encoder (trained) and the key encoder (its moving average; no gradient).
    x, y : ndarray of shape (N, d)
    queue_keys : ndarray of shape (K, E)
        The negatives, shared by every query.
    temperature : float

    Returns
    -------
    loss : float
    grads : FlatParams
        Gradient for ``params_q`` only.
    keys : ndarray of shape (N, E)
        The batch's keys, to enqueue.

    Notes
    -----
    Queries and keys are L2-normalised as in MoCo:
    :math:`L = \frac1N\sum_i -\log \frac{e^{q_i\cdot k_i/\tau}}{e^{q_i\cdot k_i/\tau} +
    \sum_{j=1}^K e^{q_i\cdot n_j/\tau}}`, and :math:`\ln(K + 1) - L` is the bound.
    """
    qa, cache = net.forward(params_q, {}, x)  # (N, E)
    q, q_back = l2_normalize(qa)  # (N, E)
    k = l2_normalize(net.forward(params_k, {}, y)[0])[0]  # (N, E)
    out = info_nce_loss(q, k, queue_keys, temperature=temperature, wrt=("q",))
    grads = params_q.zeros_like()
    _, g = net.backward(params_q, cache, q_back(out.grads["q"]))
    for name, v in g.items():
        grads[name][...] = v
    return float(out.loss), grads, k


def run_moco_queue(config: MIConfig = MIConfig(), on_step: Callable | None = None, *,
                   temperature: float = 0.05) -> dict:  # fmt: skip
    r"""MoCo's analogue: for each queue size ``K``, the bound :math:`\ln(K+1) - L` it reaches.

    x and y are exchangeable (both :math:`N(0, I_d)`, correlation :math:`\rho`), so, as in MoCo,
    one architecture encodes both: the query encoder sees x and is trained; the key encoder,
    its exponential moving average (momentum ``moco_momentum``), sees y. The true MI is
    ``moco_mi``. ``temperature`` is checked (:func:`check_temperature`) before any step.

    Returns
    -------
    dict
        ``runs``: per ``K``, ``ceiling`` :math:`\ln(K+1)`, ``train_estimate`` (the mean of
        :math:`\ln(K+1) - L` over the last quarter of training, what MoCo's loss shows),
        ``train_drift`` (last quarter minus third), ``estimate`` with ``estimate_se``: the
        bound with the trained encoders on ``eval_batches`` fresh batches, each query scored
        against its positive and ``K`` fresh independent negatives (a proper lower bound:
        fixed critic, negatives drawn from :math:`p(y)`); ``curve`` of 50-step window means.
    """
    temperature = check_temperature(temperature, config.dtype)  # before any step
    net = critic_mlp(config.dim, config.hidden, config.embed_dim)
    model = Model(net)
    rho = rho_for_mi(config.moco_mi, config.dim)
    runs = []
    for kk in config.queue_sizes:
        rng = np.random.default_rng(config.seed)
        params_q, _ = model.init(rng, config.dtype)
        params_k = params_q.copy()
        queue = Queue(kk, config.embed_dim, dtype=config.dtype, seed=config.seed)
        opt, log_n, estimates = Adam(lr=config.lr), math.log(kk + 1), []
        for step in range(config.moco_steps):
            x, y = sample_correlated(rng, config.batch_size, config.dim, rho, config.dtype)
            loss, grads, keys = moco_loss_and_grads(net, params_q, params_k, x, y, queue.keys,
                                                    temperature)  # fmt: skip
            opt.step(params_q, grads)
            momentum_update(params_k.flat, params_q.flat, config.moco_momentum)
            queue.enqueue(keys)
            estimates.append(log_n - loss)
            if on_step is not None:
                on_step({"queue_size": kk, "step": step, "estimate": estimates[-1]})
        evals = []
        for _ in range(config.eval_batches):
            x, y = sample_correlated(rng, config.batch_size, config.dim, rho, config.dtype)
            y_neg = rng.standard_normal((kk, config.dim)).astype(config.dtype)  # from p(y)
            q = l2_normalize(net.forward(params_q, {}, x)[0])[0]  # (N, E)
            k = l2_normalize(net.forward(params_k, {}, y)[0])[0]  # (N, E)
            negs = l2_normalize(net.forward(params_k, {}, y_neg)[0])[0]  # (K, E)
            loss = float(info_nce_loss(q, k, negs, temperature=temperature, wrt=()).loss)
            evals.append(log_n - loss)
        s = _summary(estimates, log_n)
        best, best_se = optimal_critic_estimate(rng, rho, config.dim, config.batch_size, kk,
                                                batches=config.eval_batches)  # fmt: skip
        runs.append({"queue_size": kk, "ceiling": log_n, "estimate": float(np.mean(evals)),
                     "optimal_critic": best, "optimal_critic_se": best_se,
                     "estimate_se": float(np.std(evals, ddof=1) / math.sqrt(len(evals))),
                     "train_estimate": s["train_last_quarter"], "train_drift": s["train_drift"],
                     "curve": _window_means(estimates, 50)})  # fmt: skip
    return {"true_mi": config.moco_mi, "temperature": temperature, "runs": runs}


def config_from(**overrides: Any) -> MIConfig:
    """An :class:`MIConfig` with ``overrides`` applied (lists become tuples)."""
    return MIConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
