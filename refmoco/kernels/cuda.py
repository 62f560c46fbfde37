r"""Numba CUDA kernels: what ``backend="cupy"`` runs on CuPy arrays.

- :func:`info_nce_queue`: InfoNCE with a shared queue. cuBLAS (through CuPy) computes the logits
  ``q @ queue.T`` and the gradients' matrix products; one kernel does the softmax cross-entropy
  of every row, forward and backward, in place over the logits (one block per query: a max and
  a sum reduction in shared memory, then the loss and ``(softmax - onehot) * scale / T``). The
  positive logit is kept in its own ``(N,)`` array: ``[l_pos, l_neg]`` is never concatenated.
- :func:`momentum_update`: ``target = m * target + (1 - m) * source``, one grid-stride pass,
  bitwise the reference: its products and sum are libdevice's round-to-nearest operations, which
  are never fused into a multiply-add (``tests/test_cuda_ptx.py`` reads the PTX).

Kernels take CuPy arrays through ``__cuda_array_interface__`` and are launched on CuPy's current
stream. Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, set before Numba is imported)
the same functions run on NumPy arrays, with tiny blocks so that several blocks and the
grid-stride loops are exercised; ``tests/test_cuda_sim.py`` runs them that way.
"""

from __future__ import annotations

import functools
import math
import operator

import numba
import numpy as np
from numba import cuda

from ..backend import is_cupy_array, namespace_of
from ._jit import cuda_jit

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)
THREADS = 4 if SIMULATOR else 256  # threads per block; a power of two (tree reductions)
MAX_BLOCKS = 3 if SIMULATOR else 4096  # grid-stride loops cover the rest


def _launch(kernel, blocks, *args):
    """Launch on CuPy's current stream (the default stream under the simulator)."""
    if SIMULATOR:
        kernel[blocks, THREADS](*args)
        return
    import cupy

    stream = cuda.external_stream(cupy.cuda.get_current_stream().ptr)
    args = [cuda.as_cuda_array(a, sync=False) if is_cupy_array(a) else a for a in args]
    kernel[blocks, THREADS, stream](*args)


def _check_dtype(dtype):
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"backend='cupy' computes in float32 or float64, got dtype {dtype}")


# -- InfoNCE with a shared queue ----------------------------------------------------------------


@functools.cache
def _xent_kernel(dtype):
    """The row-wise softmax cross-entropy kernel for one float dtype (shared arrays need it)."""
    nb_dtype = numba.from_dtype(np.dtype(dtype))

    def xent_rows(l_pos, l_neg, inv_t, g, losses, want_grad):
        """Row r of the logits is ``[l_pos[r], l_neg[r, :]] * inv_t``, target 0. Writes
        ``losses[r]`` and, if ``want_grad``, overwrites ``l_pos``/``l_neg`` with
        ``(softmax - onehot) * g``."""
        sh = cuda.shared.array(THREADS, nb_dtype)
        tid = cuda.threadIdx.x
        for r in range(cuda.blockIdx.x, l_neg.shape[0], cuda.gridDim.x):
            x0 = l_pos[r] * inv_t
            # 1. the row maximum
            mx = x0
            for j in range(tid, l_neg.shape[1], THREADS):
                v = l_neg[r, j] * inv_t
                mx = v if v > mx else mx
            sh[tid] = mx
            cuda.syncthreads()
            step = THREADS // 2
            while step > 0:
                if tid < step and sh[tid + step] > sh[tid]:
                    sh[tid] = sh[tid + step]
                cuda.syncthreads()
                step //= 2
            mx = sh[0]
            cuda.syncthreads()
            # 2. the sum of exp(x - max); thread 0 adds the positive
            total = math.exp(x0 - mx) if tid == 0 else nb_dtype(0.0)
            for j in range(tid, l_neg.shape[1], THREADS):
                total += math.exp(l_neg[r, j] * inv_t - mx)
            sh[tid] = total
            cuda.syncthreads()
            step = THREADS // 2
            while step > 0:
                if tid < step:
                    sh[tid] += sh[tid + step]
                cuda.syncthreads()
                step //= 2
            lse = mx + math.log(sh[0])
            cuda.syncthreads()  # everyone has read sh[0] and l_pos[r]
            # 3. the loss and the gradient of the logits
            if tid == 0:
                losses[r] = lse - x0
                if want_grad:
                    l_pos[r] = (math.exp(x0 - lse) - nb_dtype(1.0)) * g
            if want_grad:
                for j in range(tid, l_neg.shape[1], THREADS):
                    l_neg[r, j] = math.exp(l_neg[r, j] * inv_t - lse) * g

    return cuda_jit(xent_rows)


def info_nce_queue(q, k, queue, temperature, reduction, wrt):
    """InfoNCE with a shared queue on the GPU; the contract of
    :func:`refmoco.kernels.cpu.info_nce_queue` (per-query losses, gradients of the reduced
    loss)."""
    xp = namespace_of(q)
    dtype = q.dtype
    _check_dtype(dtype)
    n = q.shape[0]
    inv_t = dtype.type(1.0 / temperature)
    scale = dtype.type((1.0 / n if n else 0.0) if reduction == "mean" else 1.0)
    l_pos = (q * k).sum(axis=1)  # (N,), q_i . k_i
    l_neg = xp.ascontiguousarray(q @ queue.T)  # (N, K), cuBLAS
    losses = xp.empty(n, dtype)
    want_grad = bool(wrt)
    if n:
        blocks = min(n, MAX_BLOCKS)
        _launch(_xent_kernel(dtype.type), blocks, l_pos, l_neg, inv_t, scale * inv_t, losses,
                want_grad)
    grads = {}
    dpos, dneg = l_pos[:, None], l_neg  # now the gradients of the logits, (N, 1) and (N, K)
    if "q" in wrt:
        grads["q"] = dpos * k + dneg @ queue  # (N, C)
    if "k" in wrt:
        grads["k"] = dpos * q  # (N, C)
    if "negatives" in wrt:
        grads["negatives"] = dneg.T @ q  # (K, C)
    return losses, grads


# -- momentum update ----------------------------------------------------------------------------


def _rounded_ops(dtype):
    """``(add, mul)``, each rounded on its own. NVVM contracts ``a * b + c * d`` into a fused
    multiply-add (one rounding where NumPy has two) even without fastmath, and ptxas may fuse a
    ``mul``/``add`` pair that carries no rounding modifier; libdevice's ``__fadd_rn``,
    ``__fmul_rn`` (``__dadd_rn``, ``__dmul_rn``) become ``add.rn``/``mul.rn``, which are never
    fused. The simulator computes on NumPy scalars, which round every operation already."""
    if SIMULATOR:
        return operator.add, operator.mul
    from numba.cuda import libdevice

    if dtype == np.float32:
        return libdevice.fadd_rn, libdevice.fmul_rn
    return libdevice.dadd_rn, libdevice.dmul_rn


@functools.cache
def _lerp_kernel(dtype):
    """The momentum kernel for one float dtype: ``t = t * m + w * s``, each product and the sum
    rounded as NumPy rounds them (bitwise the reference)."""
    add, mul = _rounded_ops(dtype)

    def lerp(t, s, m, w):
        start = cuda.grid(1)
        for i in range(start, t.shape[0], cuda.gridsize(1)):
            t[i] = add(mul(t[i], m), mul(w, s[i]))

    return cuda_jit(lerp)


def momentum_update(target, source, m):
    """In place, ``target = m * target + (1 - m) * source`` (the reference's rounding)."""
    xp = namespace_of(target)
    dtype = target.dtype
    if dtype not in (np.float32, np.float64):  # float16: CuPy's elementwise formula
        target *= dtype.type(m)
        target += dtype.type(1.0 - m) * source.astype(dtype, copy=False)
        return
    t = target if target.flags.c_contiguous else xp.ascontiguousarray(target)
    s = xp.ascontiguousarray(source, dtype=dtype)
    if t.size:
        blocks = min(-(-t.size // THREADS), MAX_BLOCKS)
        _launch(_lerp_kernel(dtype.type), blocks, t.reshape(-1), s.reshape(-1), dtype.type(m),
                dtype.type(1.0 - m))
    if t is not target:
        target[...] = t
