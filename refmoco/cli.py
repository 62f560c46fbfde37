"""The command line: ``refmoco train``, ``bench``, ``cpc`` and ``mi-bound``."""

from __future__ import annotations

import argparse
import json
import sys

from .backend import BackendUnavailableError
from .cli_extra import HelpFormatter, add_cpc_parser, add_mi_parser, non_negative_int
from .data import DATASETS
from .mechanisms import MECHANISMS
from .train import DEFAULT_LR, TrainConfig


def _train_parser(sub) -> None:
    d = TrainConfig()
    lr_defaults = ", ".join(f"{lr:g} for {m}" for m, lr in DEFAULT_LR.items())
    p = sub.add_parser("train", help="train an encoder by contrastive learning and evaluate it",
                       formatter_class=HelpFormatter)
    p.add_argument("--mechanism", choices=list(MECHANISMS), default=d.mechanism,
                   help="the dictionary of negatives: a queue of keys from a momentum encoder "
                        "(moco), the batch itself (end-to-end), or a memory bank of one stored "
                        "feature per image (memory-bank)")
    p.add_argument("--encoder", choices=["mlp", "cnn"], default=d.encoder,
                   help="a small CNN, or an MLP on the flattened pixels")
    p.add_argument("--epochs", type=int, default=d.epochs,
                   help="passes over the training split (with --resume: the total, counting "
                        "the epochs already done)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="images per step (at most the training split's size)")
    p.add_argument("--queue-size", type=int, default=d.queue_size,
                   help="K, the queue size (moco); the number of negatives (memory-bank)")
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help="T, the InfoNCE temperature")
    p.add_argument("--momentum", type=float, default=d.momentum,
                   help="the key encoder's EMA momentum (moco)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"SGD base learning rate, with cosine decay (default: {lr_defaults}; "
                        f"the memory bank collapses at moco's rate here)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="SGD weight decay")
    p.add_argument("--bn-groups", type=int, default=d.bn_groups,
                   help="shuffle BN: batch-norm groups emulating MoCo's per-GPU batches")
    p.add_argument("--dataset", choices=list(DATASETS), default=None,
                   help=f"a bundled dataset: digits (scikit-learn's 8x8 digits) or "
                        f"translated-digits (each digit at a random place on a 16x16 canvas) "
                        f"(default: {d.data}, unless --data is given)")
    p.add_argument("--data", default=None, metavar="FILE.npz",
                   help="your own images instead: arrays images (N,C,H,W) or (N,H,W) (uint8, "
                        "uint16, bool or float), labels (N,), optional boolean train mask (N,)")
    p.add_argument("--dtype", choices=["float32", "float64"], default=d.dtype,
                   help="floating-point type of the parameters and data")
    p.add_argument("--backend", choices=["numpy", "numba", "cupy"], default=d.backend,
                   help="numpy (the reference), numba (CPU kernels: refmoco[numba]) or cupy "
                        "(a GPU: refmoco[gpu])")
    p.add_argument("--seed", type=non_negative_int, default=d.seed,
                   help="seed of the split, the weights, the views and the batch order "
                        "(an integer from 0 to 2**32 - 1)")
    p.add_argument("--out", default="runs/latest",
                   help="folder for metrics.json, curves.png and checkpoint.npz")
    p.add_argument("--resume", action="store_true",
                   help="continue the checkpoint in --out (without it, an --out holding a "
                        "previous run is refused)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train(args) -> int:
    from .train import run

    if args.data and args.dataset:
        raise ValueError("give --data or --dataset, not both")
    config = TrainConfig(
        mechanism=args.mechanism, encoder=args.encoder, epochs=args.epochs,
        batch_size=args.batch_size, queue_size=args.queue_size, temperature=args.temperature,
        momentum=args.momentum, lr=args.lr, weight_decay=args.weight_decay,
        bn_groups=args.bn_groups, data=args.data or args.dataset or TrainConfig().data,
        dtype=args.dtype, backend=args.backend, seed=args.seed,
    )
    metrics = run(config, args.out, resume=args.resume, progress=not args.no_progress)
    summary = {k: metrics[k] for k in ("final", "random_init", "raw_pixels")}
    summary["train_seconds_this_run"] = round(metrics["train_seconds_this_run"], 1)
    summary["out"] = args.out
    print(json.dumps(summary, indent=2))
    return 0


def _bench_parser(sub) -> None:
    from .bench import add_arguments

    add_arguments(sub.add_parser("bench", help="time the hot path on each backend, side by side "
                                 "with PyTorch"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="refmoco", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _bench_parser(sub)
    add_cpc_parser(sub)
    add_mi_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "bench":
        from .bench import main as bench_main

        argv = sys.argv[1:] if argv is None else list(argv)
        return bench_main(argv[argv.index("bench") + 1 :])
    try:
        if hasattr(args, "handler"):  # cpc, mi-bound
            return args.handler(args)
        if args.command == "train":
            return _train(args)
    except (ValueError, TypeError, FileExistsError, FileNotFoundError, FloatingPointError,
            BackendUnavailableError) as exc:
        print(f"refmoco {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
