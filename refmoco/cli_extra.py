"""``refmoco cpc`` and ``refmoco mi-bound``: parsers, handlers, plots.

``add_cpc_parser(sub)`` and ``add_mi_parser(sub)`` register the subcommands on an
``argparse`` sub-parsers object; each sets ``handler`` (a function of the parsed arguments that
returns the exit status) as the parser's default. ``python -m refmoco.cli_extra cpc ...`` runs
them on their own.

Files written into ``--out``: ``cpc.json`` and ``cpc.png``; ``mi_bound.json`` and
``mi_bound.png`` (the staircase); ``moco_queue.json`` and ``moco_queue.png`` (MoCo's queues).
A command refuses to start (``FileExistsError``, nothing created or changed) when a file it would
write is already in ``--out``: an earlier run's results are never overwritten. It also refuses
(``ValueError``, before any step) an ``--out`` that cannot be made or written: a file, a path
below a file, a folder without write permission or on a read-only file system.

``HelpFormatter`` and ``non_negative_int`` are shared with ``refmoco train`` (``refmoco.cli``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ._checks import SEED_MAX
from .train import make_out, refuse_existing  # the rules refmoco train follows too


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default after its help text, except where the default is
    ``None`` or a flag's ``False``: such an option says in its help what happens without it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def non_negative_int(text: str) -> int:
    """``type=`` of ``--seed``: an integer from 0 to ``SEED_MAX`` (argparse names the option in
    its error). A larger seed would only fail at the first linear probe, after a run started."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    if value > SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer <= {SEED_MAX} (2**32 - 1), "
                                         f"got {text!r}")
    return value


class _Progress:
    """A tqdm bar when tqdm is installed and wanted, else a line every ``every`` steps."""

    def __init__(self, total: int, enabled: bool, unit: str = "step", every: int = 500):
        self.bar, self.enabled, self.every, self.count = None, enabled, every, 0
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit=unit, file=sys.stderr, mininterval=0.5)
            except ImportError:
                pass

    def __call__(self, info: dict) -> None:
        self.count += 1
        text = " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in info.items() if k != "step")  # fmt: skip
        if self.bar is not None:
            self.bar.update(1)
            if self.count % 50 == 0:
                self.bar.set_postfix_str(text, refresh=False)
        elif self.enabled and self.count % self.every == 0:
            print(f"{self.count}: {text}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _write_json(data: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


# ------------------------------------------------------------------------------------------ cpc

CPC_FILES = ("cpc.json", "cpc.png")


def add_cpc_parser(sub) -> argparse.ArgumentParser:
    """Register ``cpc``: train CPC on digit sequences, linear probe vs random init."""
    from .cpc import CPCConfig

    d = CPCConfig()
    p = sub.add_parser("cpc", help="train CPC (encoder + GRU + predictors) on digit sequences "
                       "and compare a linear probe with the random init",
                       formatter_class=HelpFormatter)  # fmt: skip
    p.add_argument("--steps", type=int, default=d.train_steps, help="Adam steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="B, sequences per step (the loss at chance is ln B)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="T, images per sequence")
    p.add_argument("--predict-steps", type=int, default=d.num_steps,
                   help="S, steps ahead predicted (< T)")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    p.add_argument("--hidden", type=int, default=d.hidden, help="encoder hidden width")
    p.add_argument("--embed-dim", type=int, default=d.embed_dim, help="D, per-step features")
    p.add_argument("--context-dim", type=int, default=d.context_dim, help="H, GRU state")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="steps between evaluations (linear probe on the test split)")
    p.add_argument("--dtype", choices=["float32", "float64"], default=d.dtype,
                   help="floating-point type of the parameters and data")
    p.add_argument("--seed", type=non_negative_int, default=d.seed,
                   help="seed of the split, the weights and the sequences (an integer from 0 "
                        "to 2**32 - 1)")
    p.add_argument("--out", default="runs/cpc",
                   help="folder for cpc.json and cpc.png; refused if it already holds either")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_cpc_command)
    return p


def run_cpc_command(args) -> int:
    """Handler of ``refmoco cpc``: train, write ``cpc.json`` and ``cpc.png``, print a summary.

    Refuses (``FileExistsError``) before training when either file is already in ``--out``, and
    (``ValueError``) when ``--out`` cannot be made or written.
    """
    from .cpc import CPCConfig, train_cpc

    config = CPCConfig(seq_len=args.seq_len, num_steps=args.predict_steps,
                       batch_size=args.batch_size, train_steps=args.steps, lr=args.lr,
                       hidden=args.hidden, embed_dim=args.embed_dim,
                       context_dim=args.context_dim, eval_every=args.eval_every,
                       seed=args.seed, dtype=args.dtype)  # fmt: skip
    refuse_existing(args.out, list(CPC_FILES))  # before any file is made or any step is run
    make_out(args.out)  # a folder that cannot be made or written: refused before training
    bar = _Progress(config.train_steps, not args.no_progress)
    t0 = time.perf_counter()
    try:
        metrics = train_cpc(config, on_step=bar)
    finally:
        bar.close()
    metrics["total_seconds"] = time.perf_counter() - t0
    json_name, png_name = CPC_FILES
    _write_json(metrics, os.path.join(args.out, json_name))
    _plot_cpc(metrics, os.path.join(args.out, png_name))
    summary = {k: metrics[k] for k in ("final", "random_init", "raw_pixels")}
    summary["total_seconds"] = round(metrics["total_seconds"], 1)
    print(json.dumps(summary, indent=2))
    return 0


def _plot_cpc(m: dict, path: str) -> None:
    plt = _pyplot()
    if plt is None:
        return
    init, hist = m["random_init"], m["history"]
    steps = [0] + [r["step"] for r in hist]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(steps, [init["test_loss"]] + [r["loss"] for r in hist], "o-",
                 label="CPC loss (train; step 0: test)")
    axes[0].plot([0, steps[-1]], [init["test_loss"], m["final"]["test_loss"]], "s", c="C1",
                 label="test sequences")
    axes[0].axhline(m["log_batch_size"], ls="--", c="gray", label="ln B (chance)")
    axes[0].set_title("CPC loss")
    axes[1].plot(steps, [init["linear_accuracy"]] + [r["linear_accuracy"] for r in hist], "o-",
                 label="CPC features")
    axes[1].axhline(m["random_init"]["linear_accuracy"], ls=":", c="gray", label="random init")
    axes[1].axhline(m["raw_pixels"]["linear_accuracy"], ls="--", c="k", lw=0.8,
                    label="raw pixels (64-d)")
    axes[1].set_title(f"linear probe, {m['config']['embed_dim']}-d per-step features (test)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------ mi-bound

MI_FILES = ("mi_bound.json", "mi_bound.png")  # the staircase
MOCO_FILES = ("moco_queue.json", "moco_queue.png")  # MoCo's queue sizes


def add_mi_parser(sub) -> argparse.ArgumentParser:
    """Register ``mi-bound``: Poole et al.'s staircase, and MoCo's queue-size analogue."""
    from .mi import MIConfig

    d = MIConfig()
    p = sub.add_parser("mi-bound", help="the InfoNCE bound against a known mutual information "
                       "(Poole et al. 2019, Fig. 2), and ln(K+1) - L for MoCo's queue sizes",
                       formatter_class=HelpFormatter)  # fmt: skip
    p.add_argument("--levels", type=float, nargs="*", default=list(d.mis),
                   help="true MI of each level of the staircase, nats (none: skip it)")
    p.add_argument("--steps-per-level", type=int, default=d.steps_per_level,
                   help="Adam steps at each level of the staircase")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="N, samples per batch, at least 2 (the staircase's ceiling is ln N)")
    p.add_argument("--dim", type=int, default=d.dim, help="d, the dimension of x and y")
    p.add_argument("--hidden", type=int, default=d.hidden, help="critic MLPs' hidden width")
    p.add_argument("--embed-dim", type=int, default=d.embed_dim, help="critic output size")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    p.add_argument("--eval-batches", type=int, default=d.eval_batches,
                   help="fresh batches behind each final estimate (at least 2)")
    p.add_argument("--queue-sizes", type=int, nargs="*", default=list(d.queue_sizes),
                   help="K for MoCo's analogue (none: skip it)")
    p.add_argument("--moco-mi", type=float, default=d.moco_mi,
                   help="true MI of MoCo's analogue, nats")
    p.add_argument("--moco-steps", type=int, default=d.moco_steps,
                   help="Adam steps for each queue size")
    p.add_argument("--moco-momentum", type=float, default=d.moco_momentum,
                   help="the key encoder's EMA momentum in MoCo's analogue")
    p.add_argument("--temperature", type=float, default=0.05,
                   help="MoCo's temperature, > 0 (run_moco_queue's default)")
    p.add_argument("--dtype", choices=["float32", "float64"], default=d.dtype,
                   help="floating-point type of the critics and samples")
    p.add_argument("--seed", type=non_negative_int, default=d.seed,
                   help="seed of the samples and the critics' weights (an integer from 0 to "
                        "2**32 - 1)")
    p.add_argument("--out", default="runs/mi-bound",
                   help="folder for the JSON and the plots; refused if it already holds a file "
                        "this run would write")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_mi_command)
    return p


def _timed(fn, total: int, enabled: bool, **kwargs) -> dict:
    bar, t0 = _Progress(total, enabled), time.perf_counter()
    try:
        result = fn(on_step=bar, **kwargs)
    finally:
        bar.close()
    result["seconds"] = time.perf_counter() - t0
    return result


def run_mi_command(args) -> int:
    """Handler of ``refmoco mi-bound``: each experiment asked for, its JSON and its plot.

    The staircase (skipped by ``--levels`` with no values) writes ``mi_bound.json`` and
    ``mi_bound.png``; MoCo's queue sizes (skipped by ``--queue-sizes`` with no values) write
    ``moco_queue.json`` and ``moco_queue.png``. Refuses (``FileExistsError``) before any
    experiment runs when one of the files it would write is already in ``--out`` (``ValueError``
    when ``--out`` cannot be made or written), and every option (``--temperature`` too, even when
    MoCo's queues are skipped) is checked before that.
    """
    from ._checks import check_temperature
    from .mi import config_from, run_infonce_staircase, run_moco_queue

    config = config_from(mis=args.levels, steps_per_level=args.steps_per_level,
                         batch_size=args.batch_size, dim=args.dim, hidden=args.hidden,
                         embed_dim=args.embed_dim, lr=args.lr, eval_batches=args.eval_batches,
                         queue_sizes=args.queue_sizes, moco_mi=args.moco_mi,
                         moco_steps=args.moco_steps, moco_momentum=args.moco_momentum,
                         seed=args.seed, dtype=args.dtype)  # fmt: skip
    temperature = check_temperature(args.temperature, config.dtype)
    files = (list(MI_FILES) if config.mis else []) + (list(MOCO_FILES) if config.queue_sizes else [])
    refuse_existing(args.out, files)  # before any file is made or any step is run
    make_out(args.out)  # a folder that cannot be made or written: refused before any step
    summary: dict = {}
    if config.mis:
        m = _timed(run_infonce_staircase, len(config.mis) * config.steps_per_level,
                   not args.no_progress, config=config)  # fmt: skip
        _write_json({"config": config.to_json(), **m}, os.path.join(args.out, MI_FILES[0]))
        _plot_staircase(m, config, os.path.join(args.out, MI_FILES[1]))
        summary["infonce"] = {"ceiling_ln_N": m["ceiling"], "seconds": round(m["seconds"], 1),
                              "levels": [{k: round(lv[k], 3) for k in _LEVEL_KEYS}
                                         for lv in m["levels"]]}  # fmt: skip
    if config.queue_sizes:
        m = _timed(run_moco_queue, len(config.queue_sizes) * config.moco_steps,
                   not args.no_progress, config=config, temperature=temperature)  # fmt: skip
        _write_json({"config": {**config.to_json(), "temperature": temperature}, **m},
                    os.path.join(args.out, MOCO_FILES[0]))  # fmt: skip
        _plot_moco(m, os.path.join(args.out, MOCO_FILES[1]))
        summary["moco"] = {"true_mi": m["true_mi"], "seconds": round(m["seconds"], 1),
                           "runs": [{k: round(r[k], 3) for k in _RUN_KEYS}
                                    for r in m["runs"]]}  # fmt: skip
    print(json.dumps(summary, indent=2))
    return 0


_LEVEL_KEYS = ("true_mi", "estimate", "estimate_se", "optimal_critic", "train_drift", "train_max")
_RUN_KEYS = ("queue_size", "ceiling", "estimate", "estimate_se", "optimal_critic",
             "train_estimate", "train_drift")  # fmt: skip


def _plot_staircase(m: dict, config, path: str) -> None:
    plt = _pyplot()
    if plt is None:
        return
    steps = [r["step"] for r in m["curve"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    ax = axes[0]
    ax.plot(steps, [r["estimate"] for r in m["curve"]], label="InfoNCE estimate ln N - L (train)")
    ax.plot(steps, [r["true_mi"] for r in m["curve"]], "k", lw=1.5, label="true MI")
    ax.axhline(m["ceiling"], ls="--", c="r", label=f"ln {config.batch_size} = {m['ceiling']:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("nats")
    ax.set_title(f"Poole et al. Fig. 2: InfoNCE, separable critic, batch {config.batch_size}")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[1]
    mis = [lv["true_mi"] for lv in m["levels"]]
    ax.errorbar(mis, [lv["estimate"] for lv in m["levels"]],
                yerr=[2 * lv["estimate_se"] for lv in m["levels"]], fmt="o-",
                label="estimate (fresh batches, ±2 s.e.)")  # fmt: skip
    ax.plot(mis, [lv["optimal_critic"] for lv in m["levels"]], "g^:", ms=5,
            label="best critic log p(y|x)/p(y)")
    ax.plot(mis, mis, "k", lw=1, label="true MI")
    ax.axhline(m["ceiling"], ls="--", c="r", label="ln N")
    ax.set_xlabel("true MI (nats)")
    ax.set_title("end of each level")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_moco(m: dict, path: str) -> None:
    plt = _pyplot()
    if plt is None:
        return
    runs = m["runs"]
    ks = [r["queue_size"] for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    ax = axes[0]
    ax.plot(ks, [r["ceiling"] for r in runs], "r--", marker="x", label="ceiling ln(K+1)")
    ax.errorbar(ks, [r["estimate"] for r in runs], yerr=[2 * r["estimate_se"] for r in runs],
                fmt="o-", label="ln(K+1) - L, fresh negatives (±2 s.e.)")
    ax.plot(ks, [r["train_estimate"] for r in runs], "s:", label="ln(K+1) - L, queue (train)")
    ax.plot(ks, [r["optimal_critic"] for r in runs], "g^:", ms=5,
            label="best critic log p(y|x)/p(y)")
    ax.axhline(m["true_mi"], c="k", lw=1, label=f"true MI = {m['true_mi']:g}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("queue size K")
    ax.set_ylabel("nats")
    ax.set_title("MoCo: the bound is capped by ln(K+1), not by the batch")
    ax.legend(fontsize=8)
    ax = axes[1]
    for r in runs:
        x = [(i + 0.5) * 50 for i in range(len(r["curve"]))]
        line = ax.plot(x, r["curve"], label=f"K = {r['queue_size']}")[0]
        ax.axhline(r["ceiling"], ls="--", c=line.get_color(), lw=0.8)
    ax.set_xlabel("step")
    ax.set_title("training (dashed: ln(K+1))")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    """``python -m refmoco.cli_extra {cpc,mi-bound} ...`` (the same as ``refmoco ...``)."""
    parser = argparse.ArgumentParser(prog="refmoco", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_cpc_parser(sub)
    add_mi_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, TypeError, FileExistsError, FileNotFoundError,
            FloatingPointError) as exc:
        print(f"refmoco {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
