"""The one place where refmoco compiles Numba code, and the thread settings it relies on.

Every CPU kernel is compiled through :func:`jit` and every CUDA kernel through :func:`cuda_jit`:
no on-disk cache (stale caches have segfaulted other projects), no ``fastmath`` (the kernels are
oracles: their results must follow IEEE arithmetic in the order the code is written), and NumPy's
error model (a division by zero gives ``inf``, as in NumPy, and loops stay vectorisable).

Threads
-------
Measured on a shared 2-core machine (``docs/benchmarks.md``), two thread pools that spin while
idle slow whatever runs next, by 2x and more:

- Numba's default ``omp`` layer (libgomp) spins after each parallel region: the next serial
  kernel, BLAS call or PyTorch op finds a core taken. :func:`choose_threading_layer` therefore
  selects Numba's ``workqueue`` layer, which sleeps, unless you chose a layer yourself
  (``NUMBA_THREADING_LAYER``, or ``numba.config.THREADING_LAYER`` before the first parallel
  call). That layer aborts the process if two Python threads launch parallel kernels at once, so
  refmoco's parallel kernels take :data:`PARALLEL_LOCK`; if your own code runs ``parallel=True``
  functions from several threads, set ``NUMBA_THREADING_LAYER=omp`` (or ``tbb``).
- OpenBLAS's workers spin after each call; ``OPENBLAS_THREAD_TIMEOUT=4`` makes them sleep almost
  at once. OpenBLAS reads it when NumPy loads, which a library cannot precede: set it in your
  shell (``refmoco bench`` sets it for itself). The InfoNCE kernel is serial Numba between BLAS
  calls, in blocks large enough that it stays fast either way.

:func:`thread_settings` reports what is in effect.
"""

from __future__ import annotations

import os
import threading

import numba
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_OPTIONS = {"nogil": True, "cache": False, "fastmath": False,
            "error_model": "numpy"}


PARALLEL_LOCK = threading.Lock()  # one parallel kernel at a time (workqueue is not thread-safe)


def choose_threading_layer() -> None:
    """Use Numba's ``workqueue`` layer unless the user has chosen a layer."""
    if "NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default":
        numba.config.THREADING_LAYER = "workqueue"


def jit(fn=None, *, parallel: bool = False):
    """``numba.njit`` with refmoco's options; ``parallel=True`` for ``prange`` loops."""
    decorate = numba.njit(**_OPTIONS, parallel=parallel)
    return decorate if fn is None else decorate(fn)


def cuda_jit(fn):
    """``numba.cuda.jit`` with refmoco's options (no fastmath, no cache)."""
    from numba import cuda

    return cuda.jit(fn, fastmath=False, cache=False)


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


def thread_settings() -> dict:
    """The thread-related settings in effect, as the benchmark reports them."""
    from numba.np.ufunc import parallel

    started = getattr(parallel, "_is_initialized", False)
    layer = getattr(parallel, "_threading_layer", None) if started else None
    env = ("OPENBLAS_THREAD_TIMEOUT", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
           "OMP_WAIT_POLICY", "NUMBA_THREADING_LAYER", "NUMBA_NUM_THREADS")
    return {
        "cpus": os.cpu_count(),
        "numba_threads": numba.config.NUMBA_NUM_THREADS,
        "numba_threading_layer": layer or f"{numba.config.THREADING_LAYER} (not started)",
        **{name: os.environ.get(name, "-") for name in env},
    }
