"""A small version of MoCo's Fig. 3: moco vs end-to-end vs memory bank at several dictionary
sizes, on translated digits (each 8x8 digit at a random place on a 16x16 canvas).

    python scripts/compare_mechanisms.py --epochs 60 --out runs/compare

Writes ``results.json`` and ``mechanisms.png`` into ``--out`` (one training run per point; the
runs are resumable, so an interrupted grid continues where it stopped).
"""

from __future__ import annotations

import argparse
import json
import os

from refmoco.train import CHECKPOINT, TrainConfig, make_out, run

# (series label, mechanism, dictionary sizes, options other than the defaults). The dictionary
# size K is the queue size (moco), the number of sampled negatives (memory bank), or the batch
# size (end-to-end: the dictionary is the batch). The memory bank collapses at MoCo's learning
# rate 0.06 (its stored positives lag the encoder); its default is 0.01, and it is run at both.
GRID = [
    ("moco", "moco", [128, 256, 512, 1024], {}),
    ("memory-bank, lr 0.06", "memory-bank", [128, 256, 512, 1024], {"lr": 0.06}),
    ("memory-bank, lr 0.01", "memory-bank", [128, 256, 512, 1024], {"lr": 0.01}),
    ("end-to-end", "end-to-end", [64, 128, 256], {}),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/compare")
    args = p.parse_args(argv)
    make_out(args.out)  # a folder that cannot be made or written: refused before any run
    results = []
    for label, mechanism, sizes, options in GRID:
        for size in sizes:
            kw = {"batch_size": size} if mechanism == "end-to-end" else {"queue_size": size}
            config = TrainConfig(mechanism=mechanism, data="translated-digits", encoder="cnn",
                                 epochs=args.epochs, seed=args.seed, **kw, **options)
            suffix = "".join(f"-{k}{v}" for k, v in options.items())
            folder = os.path.join(args.out, f"{mechanism}-{size}{suffix}")
            done = os.path.exists(os.path.join(folder, "metrics.json"))
            resume = os.path.exists(os.path.join(folder, CHECKPOINT))
            if done:
                metrics = json.load(open(os.path.join(folder, "metrics.json")))
            else:
                metrics = run(config, folder, resume=resume, progress=False)
            row = {"series": label, "dictionary_size": size, **metrics["final"],
                   "seconds": metrics["train_seconds_this_run"]}
            print(json.dumps(row), flush=True)
            results.append(row)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"epochs": args.epochs, "seed": args.seed, "results": results}, f, indent=2)
    plot(results, os.path.join(args.out, "mechanisms.png"), args.epochs)
    return 0


def plot(results, path, epochs) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, title in ((axes[0], "knn_accuracy", "kNN accuracy (head output)"),
                              (axes[1], "linear_accuracy", "linear probe (backbone features)")):
        for label, *_ in GRID:
            rows = [r for r in results if r["series"] == label]
            ax.plot([r["dictionary_size"] for r in rows], [r[metric] for r in rows], "o-",
                    label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("dictionary size K (end-to-end: batch size)")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"translated digits, CNN, {epochs} epochs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
