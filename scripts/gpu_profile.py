"""Where the host's time goes when refmoco runs on a GPU: what scripts/gpu_check.sh runs after
the benchmark, so that one device call also says what to speed up next.

1. One kernel launch, host time (no synchronisation, the mean of 300 back-to-back launches of a
   256-element update): refmoco's two paths (``refmoco.kernels.cuda._launch``: numba-cuda's launch
   of CuPy arrays, and CuPy's launch of the PTX Numba compiled), numba-cuda's launch the way
   refmoco made it before (each array wrapped, a stream wrapper per launch) and with its stream
   and device arrays made once (what the dispatcher itself costs), a CuPy elementwise operation
   and a PyTorch one.
2. Each MoCo training step of the bench (``refmoco.bench``), refmoco ``cupy`` with each launcher
   and PyTorch CUDA:
   its wall time with synchronisation, and the GPU's busy time within it: the durations of the
   kernels and copies that PyTorch's profiler (CUPTI, which sees every kernel of the process:
   CuPy's, cuBLAS's and Numba's too) records, and how many there were. A step whose busy time
   is a small part of its wall time is bound by the host (launches, Python), not by the GPU.
   The ten longest kernels of refmoco's step (CuPy launch) follow, and its host profile.

    python scripts/gpu_profile.py          # needs CuPy, numba-cuda and a CUDA GPU
"""

import functools
import io
import statistics
import sys
import time


def per_call(fn, sync, calls=300):
    """Host seconds per call, back to back without synchronisation (after a warm-up)."""
    for _ in range(10):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls
    sync()
    return host


def launches(cupy):
    import numpy as np
    from numba import cuda

    import refmoco
    from refmoco.kernels import cuda as kernels

    sync = cupy.cuda.get_current_stream().synchronize
    x, y = cupy.zeros(256, cupy.float32), cupy.ones(256, cupy.float32)
    m, w = np.float32(0.9), np.float32(0.1)
    kernel = kernels._lerp_kernel(np.float32)
    stream = cuda.external_stream(cupy.cuda.get_current_stream().ptr)
    dx, dy = cuda.as_cuda_array(x, sync=False), cuda.as_cuda_array(y, sync=False)
    def wrapped():  # refmoco's launch before it passed CuPy arrays as they are
        s = cuda.external_stream(cupy.cuda.get_current_stream().ptr)
        kernel[1, kernels.THREADS, s](cuda.as_cuda_array(x, sync=False),
                                      cuda.as_cuda_array(y, sync=False), m, w)

    from refmoco.bench import _launched_by

    cases = {
        "refmoco _launch (numba-cuda, CuPy arrays)": lambda: kernels._launch(kernel, 1, x, y, m, w),
        "refmoco _launch (CuPy launch of Numba's PTX)": _launched_by(
            "cupy", lambda: kernels._launch(kernel, 1, x, y, m, w)),
        "as_cuda_array each array, a new stream wrapper": wrapped,
        "numba-cuda, stream and arrays made once": lambda: kernel[1, kernels.THREADS, stream](
            dx, dy, m, w),
        "refmoco.momentum_update (checks included)": lambda: refmoco.momentum_update(
            x, y, 0.9, backend="cupy"),
        "refmoco.momentum_update, CuPy launch": _launched_by("cupy", lambda: (
            refmoco.momentum_update(x, y, 0.9, backend="cupy"))),
        "CuPy elementwise (x *= 0.9)": lambda: cupy.multiply(x, m, out=x),
    }
    try:
        import torch

        t = torch.zeros(256, device="cuda")
        cases["PyTorch elementwise (t.mul_(0.9))"] = lambda: t.mul_(0.9)
    except Exception as exc:  # noqa: BLE001 - report and go on without it
        print(f"  (PyTorch CUDA unavailable: {exc})")
    print("one launch, host time (mean of 300 back to back):")
    for label, fn in cases.items():
        print(f"  {label:48s} {per_call(fn, sync) * 1e6:8.1f} us", flush=True)


def busy(torch, step, sync, steps=5):
    """(GPU busy seconds per step, kernels and copies per step, the profiler's table)."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        sync()
    rows = [r for r in prof.key_averages() if str(r.device_type).endswith("CUDA")]
    total = sum(r.self_device_time_total for r in rows) / 1e6 / steps
    count = sum(r.count for r in rows) / steps
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=10)
    return total, count, table


def steps(cupy):
    import numpy as np

    from refmoco import bench

    torch = bench._torch_cuda()
    print("MoCo training step: wall time (median of 15) and GPU busy time (5 steps profiled):")
    for name, encoder, shape in bench._step_specs():
        rng = np.random.default_rng(0)
        xq, xk = (rng.random((256, *shape), dtype=np.float32) for _ in range(2))
        runs = {}
        for launcher in ("numba", "cupy"):  # refmoco.kernels.cuda.LAUNCHERS
            step = bench._launched_by(launcher, functools.partial(  # its first step run here
                bench._refmoco_moco_step, encoder, "cupy", cupy.asarray(xq), cupy.asarray(xk),
                4096, 0.1, 0.99, 0.03))()
            runs[f"refmoco, {launcher} launch"] = (bench._launched_by(launcher, step),
                                                   cupy.cuda.get_current_stream().synchronize)
        if torch is not None:
            runs["PyTorch CUDA"] = (bench._torch_moco_step(torch, encoder, xq, xk, 4096, 0.1,
                                                           0.99, 0.03, "cuda"),
                                    torch.cuda.synchronize)
        print(f"  {name}")
        for label, (step, sync) in runs.items():
            wall = []
            for i in range(18):
                sync()
                t0 = time.perf_counter()
                step()
                sync()
                if i >= 3:  # warm-up: compilation, allocator pools
                    wall.append(time.perf_counter() - t0)
            line = f"    {label:21s} wall {statistics.median(wall) * 1e3:7.2f} ms"
            table = ""
            if torch is not None:
                try:
                    seconds, count, table = busy(torch, step, sync)
                    line += f", GPU busy {seconds * 1e3:7.2f} ms in {count:.0f} kernels and copies"
                except Exception as exc:  # noqa: BLE001 - the profiler is a bonus
                    line += f" (profiler failed: {exc!r})"
            print(line, flush=True)
            if label == "refmoco, cupy launch":
                if table:
                    print(table, flush=True)
                host_profile(step, sync)


def host_profile(step, sync, steps=5):
    """Where the host's time goes in refmoco's step (cProfile; its own overhead inflates the
    many small calls, so read the ranking, not the absolute times)."""
    import cProfile
    import pstats

    sync()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    sync()
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out).strip_dirs()
    stats.sort_stats("tottime").print_stats(22)
    stats.sort_stats("cumulative").print_stats("refmoco", 22)
    print(f"    host profile of {steps} steps:")
    print("\n".join("      " + line for line in out.getvalue().splitlines() if line.strip()),
          flush=True)


def main():
    from refmoco.bench import _cupy

    cupy = _cupy()
    if cupy is None:
        print("gpu_profile: needs CuPy with a CUDA GPU")
        return 1
    status = 0
    for part in (launches, steps):
        try:
            part(cupy)
        except Exception:  # noqa: BLE001 - print it, and still run the other part
            import traceback

            traceback.print_exc()
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
