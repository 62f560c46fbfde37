"""The accuracy of refmoco's vectorised exponentials (refmoco.kernels.cpu.exp32 / exp64), the
figures docs/benchmarks.md quotes: every float32 input of the softmax's range [log(tiny), 0]
against float64 ``exp`` (about 45 s on 2 cores), and 3e7 uniform float64 inputs against long
double ``exp`` (x86: a 64-bit mantissa), plus one float64 input known to exceed 1 ulp.

    python scripts/exp_accuracy.py
"""

import numba
import numpy as np

from refmoco.kernels.cpu import exp32, exp64

CHUNK = 1 << 24


@numba.njit
def _apply32(x, out):
    for i in range(x.size):
        out[i] = exp32(x[i])


@numba.njit
def _apply64(x, out):
    for i in range(x.size):
        out[i] = exp64(x[i])


def float32_errors():
    """Yield (inputs, ulp errors of exp32) over every float32 in [log(tiny), -0.0], by chunks
    (non-positive floats ascend in their bit patterns from -0.0)."""
    tiny = np.finfo(np.float32).tiny
    first = 0x80000000  # -0.0
    last = int(np.array([np.log(tiny)], np.float32).view(np.uint32)[0])
    for start in range(first, last + 1, CHUNK):
        x = np.arange(start, min(start + CHUNK, last + 1), dtype=np.uint32).view(np.float32)
        got = np.empty_like(x)
        _apply32(x, got)
        exact = np.exp(x.astype(np.float64))
        ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
        yield x, np.where(exact >= tiny, np.abs(got - exact) / ulp, 0.0), exact


def main():
    worst, count, above = 0.0, 0, []
    for x, err, _ in float32_errors():
        worst, count = max(worst, float(err.max())), count + x.size
        above.append(x[err > 1])
    above = np.concatenate(above)
    exact = np.exp(above.astype(np.float64))
    np_err = np.abs(np.exp(above) - exact) / np.spacing(exact.astype(np.float32))
    print(f"exp32: {count} inputs, worst {worst:.4f} ulp, {above.size} above 1 ulp; float32 "
          f"np.exp above 1 ulp on {int((np_err > 1).sum())} of those")
    rng = np.random.default_rng(0)
    lo, worst, n_above = np.log(np.finfo(np.float64).tiny), 0.0, 0
    for _ in range(30):
        x = rng.uniform(lo, 0.0, 1_000_000)
        got = np.empty_like(x)
        _apply64(x, got)
        exact = np.exp(x.astype(np.longdouble))
        err = np.abs(got.astype(np.longdouble) - exact) / np.spacing(exact.astype(np.float64))
        worst, n_above = max(worst, float(err.max())), n_above + int((err > 1).sum())
    x = -50.94611977240689
    known = float(abs(np.longdouble(exp64(x)) - np.exp(np.longdouble(x)))
                  / np.spacing(np.exp(np.float64(x))))
    print(f"exp64: 3e7 uniform inputs, worst {worst:.4f} ulp, {n_above} above 1 ulp; "
          f"x = {x}: {known:.4f} ulp")


if __name__ == "__main__":
    main()
