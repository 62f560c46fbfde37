"""How much what ran just before changes a momentum-update case of ``refmoco bench``.

Runs the momentum group's cases (``refmoco.bench.momentum_group``) in chosen pairs: each target
case right after each other case, and after 50 ms of nothing; prints the median time of the
target per predecessor. docs/benchmarks.md ("Order") quotes it.

    OPENBLAS_THREAD_TIMEOUT=4 python scripts/bench_order.py [--calls 12]
"""

import argparse
import statistics
import time

from refmoco.bench import momentum_group

TARGETS = ("refmoco numba, flat buffer", "torch._foreach_lerp_")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=12, help="timed calls per pair")
    args = parser.parse_args()
    cases = {c.label: c for c in momentum_group().cases}
    for c in cases.values():  # warm-up: compiles the kernels, starts the pools
        c.run()
    for target in (t for t in TARGETS if t in cases):
        for before in [*cases, None]:
            if before == target:
                continue
            times = []
            for _ in range(args.calls):
                if before is None:
                    time.sleep(0.05)
                else:
                    cases[before].run()
                t0 = time.perf_counter()
                cases[target].fn()
                times.append(time.perf_counter() - t0)
            print(f"{target:28s} after {before or 'nothing for 50 ms':28s} "
                  f"{statistics.median(times) * 1e3:6.2f} ms")


if __name__ == "__main__":
    main()
