"""The worst float64 relative gradient error of every loss over many random inputs.

    python scripts/gradient_errors.py --trials 300

Each trial draws shapes and values, and compares the hand-written gradients with central
differences (``refmoco.testing.check_grad``, directional, eps = 1e-6) in float64. Prints, per
loss, the worst relative error seen and the median.
"""

from __future__ import annotations

import argparse

import numpy as np

import refmoco
from refmoco.testing import check_grad


def unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def draw(rng: np.random.Generator, name: str):
    n, c = int(rng.integers(1, 9)), int(rng.integers(1, 17))
    t = float(rng.uniform(0.05, 2.0))
    if name == "info_nce (queue)":
        return refmoco.info_nce_loss, dict(q=unit(rng.normal(size=(n, c))),
                                           k=unit(rng.normal(size=(n, c))),
                                           negatives=unit(rng.normal(size=(rng.integers(1, 65), c))),
                                           temperature=t)
    if name == "info_nce (per-query)":
        return refmoco.info_nce_loss, dict(q=unit(rng.normal(size=(n, c))),
                                           k=unit(rng.normal(size=(n, c))),
                                           negatives=unit(rng.normal(size=(n, rng.integers(1, 9), c))),
                                           temperature=t)
    if name == "info_nce (in-batch)":
        return refmoco.info_nce_loss, dict(q=unit(rng.normal(size=(n, c))),
                                           k=unit(rng.normal(size=(n, c))), temperature=t)
    if name == "softmax_cross_entropy":
        m = int(rng.integers(1, 12))
        return refmoco.softmax_cross_entropy, dict(logits=rng.normal(size=(n, m)) * 3,
                                                   labels=rng.integers(0, m, size=n))
    if name == "contrastive":
        x1, x2 = rng.normal(size=(n, c)), rng.normal(size=(n, c))
        d = np.linalg.norm(x1 - x2, axis=1)
        margin = float(np.median(d)) + 0.01 if n > 1 else 1.0
        return refmoco.contrastive_loss, dict(x1=x1, x2=x2, y=rng.integers(0, 2, size=n),
                                              margin=margin)
    if name == "cpc":
        b, tt = int(rng.integers(1, 5)), int(rng.integers(2, 7))
        d, h = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        s = int(rng.integers(1, tt))
        return refmoco.cpc_loss, dict(z=rng.normal(size=(b, tt, d)), c=rng.normal(size=(b, tt, h)),
                                      W=rng.normal(size=(s, d, h)) * 0.5)
    raise ValueError(name)


NAMES = ["info_nce (queue)", "info_nce (per-query)", "info_nce (in-batch)",
         "softmax_cross_entropy", "contrastive", "cpc"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    print(f"{'loss':24s} {'trials':>6s} {'worst':>10s} {'median':>10s}")
    overall = 0.0
    for name in NAMES:
        errors = []
        for _ in range(args.trials):
            fun, inputs = draw(rng, name)
            errors.append(check_grad(fun, inputs, raise_on_failure=False).max_rel_error)
        overall = max(overall, max(errors))
        print(f"{name:24s} {args.trials:6d} {max(errors):10.2e} {np.median(errors):10.2e}")
    print(f"worst overall: {overall:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
