"""The one place where refmoco compiles Numba code, and the thread settings it relies on.

Every CPU kernel is compiled through :func:`jit` and every CUDA kernel through :func:`cuda_jit`:
no on-disk cache (stale caches have segfaulted other projects), no ``fastmath`` (the kernels are
oracles: their results must follow IEEE arithmetic in the order the code is written), and NumPy's
error model (a division by zero gives ``inf``, as in NumPy, and loops stay vectorisable).

Threads
-------
Every kernel is a serial Numba function that releases the GIL (``nogil``). An op that is worth
running on several cores calls :func:`run_parts`: the arrays are cut into contiguous parts along
their first axis, one per thread, and the parts run at once, the calling thread taking the first
and a small pool of Python threads the others. Idle pool threads sleep on a condition variable.

Why not Numba's own ``parallel=True`` (``prange``), measured on a 2-core machine
(``docs/benchmarks.md``): its default ``omp`` layer (libgomp) spins after each parallel region,
so the next BLAS call or PyTorch op finds a core taken (2x slower and worse); its ``workqueue``
layer sleeps but its launches were slow here (a momentum update over 11.2M parameters took
7.3–8.9 ms with ``prange`` against 5.4–5.8 ms split over two Python threads, and
``torch._foreach_lerp_`` 5.7–6.2 ms), and it aborts the process when two Python threads launch
parallel kernels at once. Numba's threading layer is never started by refmoco.

The number of threads is ``NUMBA_NUM_THREADS`` (default: the CPUs this process may use).
OpenBLAS's workers also spin after each call; ``OPENBLAS_THREAD_TIMEOUT=4`` makes them sleep
almost at once. OpenBLAS reads it when NumPy loads, which a library cannot precede: set it in your
shell (``refmoco bench`` sets it for itself). :func:`thread_settings` reports what is in effect.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_OPTIONS = {"nogil": True, "cache": False, "fastmath": False,
            "error_model": "numpy"}


def jit(fn=None):
    """``numba.njit`` with refmoco's options (serial, releases the GIL)."""
    decorate = numba.njit(**_OPTIONS)
    return decorate if fn is None else decorate(fn)


def num_threads() -> int:
    """Threads for :func:`run_parts`: ``NUMBA_NUM_THREADS`` (default: the usable CPUs)."""
    return max(1, int(numba.config.NUMBA_NUM_THREADS))


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _workers() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max(1, num_threads() - 1), thread_name_prefix="refmoco")
        return _pool


def _forget_pool_after_fork() -> None:
    """A forked child (a data-loader worker, say) has none of the parent's threads: a pool
    inherited from the parent would queue work that no thread runs. Start afresh there."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def run_parts(kernel, arrays, scalars=(), *, work: int, min_work: int) -> None:
    """Run ``kernel(*parts, *scalars)`` on contiguous parts of ``arrays`` at once.

    Every array is cut along its first axis at the same places (so they must share its length;
    an empty array, such as an unused buffer, is passed whole to every part), into as many parts
    as there are threads but no part with less than ``min_work`` of the ``work`` (below that, a
    thread's start costs more than it saves). The calling thread runs the first part; the call
    returns when all are done and re-raises a part's exception. ``kernel`` must release the GIL
    (:func:`jit` does) and must write only into its own part.
    """
    size = len(arrays[0])
    parts = max(1, min(num_threads(), work // max(1, min_work), size))
    if parts == 1:
        kernel(*arrays, *scalars)
        return
    align = 16 if arrays[0].ndim == 1 else 1  # 1-d parts start on 64-byte lines (float32)
    cuts = [0] + [size * i // parts // align * align for i in range(1, parts)] + [size]

    def part(lo, hi):
        return [a[lo:hi] if len(a) else a for a in arrays]

    pending = [_workers().submit(kernel, *part(lo, hi), *scalars)
               for lo, hi in zip(cuts[1:-1], cuts[2:], strict=True)]
    try:
        kernel(*part(cuts[0], cuts[1]), *scalars)
    finally:
        for f in pending:
            f.result()


CUDA_OPTIONS = {"fastmath": False}  # every CUDA kernel's compile options, however it is launched


def cuda_jit(fn):
    """``numba.cuda.jit`` with refmoco's options (:data:`CUDA_OPTIONS`, no cache)."""
    from numba import cuda

    return cuda.jit(fn, cache=False, **CUDA_OPTIONS)


def cuda_device(fn):
    """A CUDA device function with refmoco's options, inlined into each kernel that calls it at
    Numba's IR level, so it compiles with the kernel, for the kernel's compute capability. A
    device function compiled on its own asks the CUDA driver for the current device, and the
    PTX tests (tests/test_cuda_ptx.py) compile every kernel where there is none."""
    from numba import cuda

    return cuda.jit(fn, device=True, inline="always", cache=False, **CUDA_OPTIONS)


@intrinsic
def bits_to_float(typingctx, bits):
    """Reinterpret the bits of an int32 as a float32 (int64 as float64); vectorises."""
    if bits == types.int32:
        sig, llvm_type = types.float32(types.int32), ir.FloatType()
    elif bits == types.int64:
        sig, llvm_type = types.float64(types.int64), ir.DoubleType()
    else:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_type)

    return sig, codegen


@intrinsic
def fma(typingctx, a, b, c):
    """``a * b + c`` rounded once (IEEE fused multiply-add; a CPU without FMA gets libm's
    ``fma``). Exact rounding, so results stay deterministic without ``fastmath``."""
    if a == b == c and a in (types.float32, types.float64):
        def codegen(context, builder, signature, args):
            return builder.fma(*args)

        return a(a, b, c), codegen
    return None


def thread_settings() -> dict:
    """The thread-related settings in effect, as the benchmark reports them."""
    from numba.np.ufunc import parallel

    started = getattr(parallel, "_is_initialized", False)
    layer = getattr(parallel, "_threading_layer", None) if started else None
    env = ("OPENBLAS_THREAD_TIMEOUT", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
           "OMP_WAIT_POLICY", "NUMBA_NUM_THREADS")
    return {
        "cpus": os.cpu_count(),
        "kernel_threads": num_threads(),
        "numba_threading_layer": layer or "not started",
        **{name: os.environ.get(name, "-") for name in env},
    }
