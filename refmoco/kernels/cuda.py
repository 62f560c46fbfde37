r"""Numba CUDA kernels: what ``backend="cupy"`` runs on CuPy arrays.

- :func:`info_nce_queue`: InfoNCE with a shared queue. cuBLAS (through CuPy) computes the logits
  ``(q / T) @ queue.T`` (1/T applied to q, as the reference does) and the gradients' matrix
  products; one kernel does the softmax cross-entropy of every row, forward and backward, in
  place over the logits (one block per query: a max and a sum reduction in shared memory, then
  the loss ``(max - l_pos) + log(sum)`` and ``(softmax - onehot) * scale / T``). The
  positive logit is kept in its own ``(N,)`` array: ``[l_pos, l_neg]`` is never concatenated.
- :func:`momentum_update`: ``target = m * target + (1 - m) * source``, one grid-stride pass,
  bitwise the reference: its products and sum are libdevice's round-to-nearest operations, which
  are never fused into a multiply-add (``tests/test_cuda_ptx.py`` reads the PTX).
- :func:`l2_normalize_rows` / :func:`l2_normalize_rows_backward`: the rows of the features
  divided by their norms (the reference's scaled norm, clamped at ``eps``) and the gradient
  back through it, one block per row, one launch each where the reference makes about a dozen
  and six. Equal to the reference to rounding.
- :func:`sgd_step`: ``torch.optim.SGD``'s step (weight decay, momentum, dampening, Nesterov) in
  one pass, bitwise the reference, as the momentum update is.
- :func:`im2col` / :func:`col2im`: the convolution's gather and scatter, one kernel each, which
  :func:`refmoco.nn.functional.conv2d_forward` and ``conv2d_backward`` call on this backend (the
  reference makes one strided copy, or addition, per kernel offset, plus the zero padding: eleven
  launches per layer where this makes one). Both are bitwise the reference: im2col copies; col2im
  gathers, one thread per input pixel, the entries that the reference adds into it, in the
  reference's order (kernel offsets (a, e) ascending, starting from zero), so no atomics are
  needed and the sums round alike. The products stay cuBLAS's.
- :func:`batch_norm_forward` / :func:`batch_norm_backward`: one launch each per layer, one block
  per channel of the array seen as ``(rows, C)`` (a view for the channels-last activations the
  convolutions make): the statistics in two passes summed in float64 (as the Numba CPU kernels),
  the running averages, ``x_hat`` and ``y``; backward ``dgamma``, ``dbeta`` and ``dx``. The
  reference's CuPy code is a dozen or so launches per layer and pass, and on a GPU the step is
  bound by its launches (docs/benchmarks.md). Equal to the reference to rounding, not bitwise.

Kernels take CuPy arrays as they are and are launched on CuPy's current stream, in one of two
ways (:data:`LAUNCHER`, set from ``REFMOCO_CUDA_LAUNCHER``):

- ``"numba"`` (the default): numba-cuda's own launch, which views the arrays through DLPack. On
  an H200 it cost the host 117 us a launch, where a CuPy elementwise op costs 13 us.
- ``"cupy"``: the same kernel compiled by Numba to PTX, once per argument types and device,
  loaded as a CuPy module and launched by CuPy's own launcher, the one its elementwise kernels
  go through. :func:`param_format` and :func:`param_values` lay the arguments out as numba-cuda
  does, and the layout is checked against the PTX's parameters at load. Not yet timed on a GPU
  (docs/benchmarks.md).

Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, set before Numba is imported) the
same functions run on NumPy arrays, with tiny blocks so that several blocks and the grid-stride
loops are exercised; ``tests/test_cuda_sim.py`` runs them that way.
"""

from __future__ import annotations

import functools
import math
import operator
import os
import re
import struct
import threading

import numba
import numpy as np

if not hasattr(np, "row_stack"):
    # numba-cuda (0.30 and older) registers an overload of np.row_stack when it compiles its
    # first kernel; NumPy 2.5 removed that alias of np.vstack, so every compile raised
    # AttributeError. Restore the alias (nothing in refmoco uses it) before Numba looks for it.
    setattr(np, "row_stack", np.vstack)  # noqa: B010 - an attribute NumPy 2.5 lacks

from numba import cuda  # noqa: E402

from ..backend import KERNEL_DTYPES, namespace_of
from . import check_sgd_buffers
from ._jit import CUDA_OPTIONS, cuda_device, cuda_jit

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)
THREADS = 4 if SIMULATOR else 256  # threads per block; a power of two (tree reductions)
MAX_BLOCKS = 3 if SIMULATOR else 4096  # grid-stride loops cover the rest


LAUNCHERS = ("numba", "cupy")
LAUNCHER = os.environ.get("REFMOCO_CUDA_LAUNCHER", "numba")  # how _launch launches; see below
if LAUNCHER not in LAUNCHERS:
    raise ValueError(f"REFMOCO_CUDA_LAUNCHER must be one of {LAUNCHERS}, got {LAUNCHER!r}")

_STREAMS: dict = {}  # CuPy stream handle -> numba-cuda's wrapper of it, made once


def _launch(kernel, blocks, *args):
    """Launch on CuPy's current stream (the default stream under the simulator).

    With ``LAUNCHER == "numba"`` numba-cuda launches: the CuPy arrays go to the kernel as they
    are and numba-cuda (0.30) views them through DLPack on the launch's stream, which costs a
    few microseconds an array, where wrapping each in ``cuda.as_cuda_array`` first cost tens
    (320 us a launch in all on an H200, 117 us this way, against 13 us for a CuPy elementwise
    op: scripts/gpu_profile.py). The stream's wrapper is made once per handle; a handle names
    one stream for as long as it exists, so a reused handle is reused correctly.

    With ``LAUNCHER == "cupy"`` CuPy launches the kernel that Numba compiled
    (:func:`_cupy_function`), its arguments laid out by :func:`param_format`."""
    if SIMULATOR:
        kernel[blocks, THREADS](*args)
        return
    import cupy

    if LAUNCHER == "cupy":
        _cupy_function(cupy, kernel, args).launch(blocks, args)
        return
    ptr = cupy.cuda.get_current_stream().ptr
    stream = _STREAMS.get(ptr)
    if stream is None:
        stream = _STREAMS[ptr] = cuda.external_stream(ptr)
    kernel[blocks, THREADS, stream](*args)


# -- launching through CuPy ------------------------------------------------------------------------
# A numba-cuda kernel's parameters (its PTX ``.entry``): each array as ``meminfo, parent`` (null
# pointers here), ``nitems, itemsize, data``, then its shape and its strides in bytes, all 64-bit;
# each scalar as itself (a boolean in one byte). The values of a launch are packed into one
# buffer (``struct``, each at its natural alignment) and CuPy is handed a pointer to each: no
# Python object per parameter is made on a launch.

_FUNCTIONS: dict = {}  # (kernel, device, argument kinds) -> _Loaded, loaded once
_SCALARS = (bool, int, float, np.generic)


def _address(a):
    data = a.data
    return data.ptr if hasattr(data, "ptr") else a.ctypes.data  # CuPy; NumPy (the tests)


def param_values(args):
    """The values of the kernel's parameters for a launch's arguments, in numba-cuda's order."""
    values = []
    for a in args:
        if isinstance(a, _SCALARS):
            values.append(a)
        else:
            values += (0, 0, a.size, a.itemsize, _address(a), *a.shape, *a.strides)
    return values


def param_format(args):
    """The ``struct`` codes of the kernel's parameters: ``Q`` for a pointer, ``q`` for a 64-bit
    integer, ``?`` for a boolean, ``f``/``d`` for float32/float64 (a NumPy scalar's own code)."""
    codes = ""
    for a in args:
        if isinstance(a, bool):
            codes += "?"
        elif isinstance(a, int):
            codes += "q"
        elif isinstance(a, float):
            codes += "d"  # also a NumPy float64, a subclass of float
        elif isinstance(a, np.generic):
            codes += a.dtype.char
        else:
            codes += "QQqqQ" + "q" * (2 * a.ndim)
    return codes


def _kind(a):
    """What of an argument selects the compiled kernel: an array's dtype, dimensions and
    contiguity, a scalar's type."""
    if isinstance(a, _SCALARS):
        return type(a)
    return a.dtype, a.ndim, a.flags.c_contiguous


def signature(args):
    """The Numba argument types of a launch, as numba-cuda types them: an array is C-contiguous
    ("C") or strided ("A"), a Python int int64, a Python float float64."""
    return tuple(numba.typeof(a) if isinstance(a, _SCALARS)
                 else numba.types.Array(numba.from_dtype(a.dtype), a.ndim,
                                        "C" if a.flags.c_contiguous else "A")
                 for a in args)


_PTX_WIDTHS = {"u8": 1, "b8": 1, "s8": 1, "u16": 2, "b16": 2, "s16": 2, "f16": 2, "u32": 4,
               "b32": 4, "s32": 4, "f32": 4, "u64": 8, "b64": 8, "s64": 8, "f64": 8}


def ptx_entry(ptx):
    """The kernel's name and the byte width of each of its parameters, read from its PTX."""
    match = re.search(r"\.entry\s+([\w$]+)\s*\((.*?)\)", ptx, re.S)
    if match is None:
        raise RuntimeError("the PTX holds no kernel entry")
    types = re.findall(r"\.param\s+\.(\w+)", match.group(2))
    return match.group(1), [_PTX_WIDTHS[t] for t in types]


def check_params(name, widths, codes):
    """Raise unless parameters of the ``struct`` codes ``codes`` fill the kernel's parameters
    exactly (their number and widths): a numba-cuda whose kernel ABI differs from what
    :func:`param_format` assumes is refused at load, rather than launched with misplaced
    arguments."""
    got = [struct.calcsize(c) for c in codes]
    if got != widths:
        raise RuntimeError(f"refmoco's layout of the arguments of {name} ({got} bytes) does not "
                           f"match its PTX parameters ({widths} bytes); run with "
                           "REFMOCO_CUDA_LAUNCHER=numba")


class ParamBuffer:
    """Host memory that a launch's parameter values are packed into (``struct`` codes
    ``codes``, each at its natural alignment, as a C struct lays them out), and the address of
    each value: what the driver reads the kernel's parameters from, when the launch is made."""

    def __init__(self, codes):
        self.pack = struct.Struct("@" + codes).pack_into
        self.buffer = np.zeros(max(1, struct.calcsize("@" + codes)), np.uint8)
        start = self.buffer.ctypes.data
        # the offset of each value: the size of the struct of all before it, padded to its own
        self.addresses = [start + struct.calcsize(f"@{codes[:i]}0{c}")
                          for i, c in enumerate(codes)]

    def fill(self, values):
        self.pack(self.buffer, 0, *values)


class _Loaded:
    """A kernel compiled for one set of argument kinds, loaded on one device: its CuPy function
    and the buffer its parameters are packed into, with a pointer to each for CuPy (a CuPy
    ``CPointer`` is passed as the address of the value, unconverted). The lock keeps the buffer
    from being refilled by another thread before the launch has read it."""

    def __init__(self, function, codes, cupy_function):
        self.function = function
        self.params = ParamBuffer(codes)
        self.pointers = [cupy_function.CPointer(a) for a in self.params.addresses]
        self.lock = threading.Lock()

    def launch(self, blocks, args):
        with self.lock:
            self.params.fill(param_values(args))
            self.function((blocks,), (THREADS,), self.pointers)  # on CuPy's current stream


def _cupy_function(cupy, kernel, args):
    """The loaded kernel that runs ``kernel`` for arguments like ``args`` on the current device:
    compiled by Numba (``compile_ptx``, the options of :func:`refmoco.kernels._jit.cuda_jit`) for
    the device's compute capability, loaded by CuPy, its parameters checked; then kept."""
    device = cupy.cuda.runtime.getDevice()
    key = (kernel, device, *map(_kind, args))
    loaded = _FUNCTIONS.get(key)
    if loaded is None:
        from cupy.cuda import function as cupy_function

        cc = divmod(int(cupy.cuda.Device(device).compute_capability), 10)
        ptx, _ = cuda.compile_ptx(kernel.py_func, signature(args), cc=cc, **CUDA_OPTIONS)
        name, widths = ptx_entry(ptx)
        codes = param_format(args)
        check_params(name, widths, codes)
        module = cupy_function.Module()
        module.load(ptx.encode() + b"\0")  # PTX text, NUL-terminated for the driver's loader
        loaded = _FUNCTIONS[key] = _Loaded(module.get_function(name), codes, cupy_function)
    return loaded


def _blocks(size):
    """Blocks for a grid-stride loop over ``size`` elements, one per thread up to MAX_BLOCKS."""
    return max(1, min(-(-size // THREADS), MAX_BLOCKS))


def _check_dtype(dtype):
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"backend='cupy' computes in float32 or float64, got dtype {dtype}")


# -- block reductions ----------------------------------------------------------------------------
# Each returns to every thread of the block the reduction of one value per thread: a tree over
# the shared array ``sh`` (THREADS entries), in the same order every time. ``sh`` may be written
# again on return (everyone has read the result by then).


@cuda_device
def _block_max(sh, tid, value):
    sh[tid] = value
    cuda.syncthreads()
    step = THREADS // 2
    while step > 0:
        if tid < step and sh[tid + step] > sh[tid]:
            sh[tid] = sh[tid + step]
        cuda.syncthreads()
        step //= 2
    out = sh[0]
    cuda.syncthreads()
    return out


@cuda_device
def _block_sum(sh, tid, value):
    sh[tid] = value
    cuda.syncthreads()
    step = THREADS // 2
    while step > 0:
        if tid < step:
            sh[tid] += sh[tid + step]
        cuda.syncthreads()
        step //= 2
    out = sh[0]
    cuda.syncthreads()
    return out


# -- InfoNCE with a shared queue ----------------------------------------------------------------


@functools.cache
def _xent_kernel(dtype):
    """The row-wise softmax cross-entropy kernel for one float dtype (shared arrays need it)."""
    nb_dtype = numba.from_dtype(np.dtype(dtype))

    def xent_rows(l_pos, l_neg, g, losses, want_grad):
        """Row r of the logits (already divided by T) is ``[l_pos[r], l_neg[r, :]]``, target 0.
        Writes ``losses[r]`` and, if ``want_grad``, overwrites ``l_pos``/``l_neg`` with
        ``(softmax - onehot) * g``."""
        sh = cuda.shared.array(THREADS, nb_dtype)
        tid = cuda.threadIdx.x
        for r in range(cuda.blockIdx.x, l_neg.shape[0], cuda.gridDim.x):
            x0 = l_pos[r]
            # 1. the row maximum
            mx = x0
            for j in range(tid, l_neg.shape[1], THREADS):
                v = l_neg[r, j]
                mx = v if v > mx else mx
            mx = _block_max(sh, tid, mx)
            # 2. the sum of exp(x - max); thread 0 adds the positive
            total = math.exp(x0 - mx) if tid == 0 else nb_dtype(0.0)
            for j in range(tid, l_neg.shape[1], THREADS):
                total += math.exp(l_neg[r, j] - mx)
            log_s = math.log(_block_sum(sh, tid, total))  # everyone has read l_pos[r] by now
            lse = mx + log_s
            # 3. the loss ((m - l_pos) first: exact when the positive is the maximum) and the
            # gradient of the logits
            if tid == 0:
                losses[r] = (mx - x0) + log_s
                if want_grad:
                    l_pos[r] = (math.exp(x0 - lse) - nb_dtype(1.0)) * g
            if want_grad:
                for j in range(tid, l_neg.shape[1], THREADS):
                    l_neg[r, j] = math.exp(l_neg[r, j] - lse) * g

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
    l_pos = (q * k).sum(axis=1) * inv_t  # (N,), q_i . k_i / T
    l_neg = xp.ascontiguousarray((q * inv_t) @ queue.T)  # (N, K), cuBLAS; q / T as the reference
    losses = xp.empty(n, dtype)
    want_grad = bool(wrt)
    if n:
        blocks = min(n, MAX_BLOCKS)
        _launch(_xent_kernel(dtype.type), blocks, l_pos, l_neg, scale * inv_t, losses,
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


# -- L2 normalisation of rows ---------------------------------------------------------------------


@functools.cache
def _normalize_kernel(dtype):
    """``y = x / max(||x||, eps)`` for every row of a 2-d array, one block per row, with the
    reference's scaled norm ``a sqrt(sum (x / a)^2)``, ``a = max |x|`` (no overflow, no
    underflow), computed in the dtype."""
    nb_dtype = numba.from_dtype(np.dtype(dtype))

    def normalize_rows(x, y, denom, clamped, eps):
        sh = cuda.shared.array(THREADS, nb_dtype)
        tid = cuda.threadIdx.x
        for r in range(cuda.blockIdx.x, x.shape[0], cuda.gridDim.x):
            big = nb_dtype(0.0)  # a = max |x| (a NaN entry makes the sum, then y, NaN)
            for j in range(tid, x.shape[1], THREADS):
                v = abs(x[r, j])
                big = v if v > big else big
            big = _block_max(sh, tid, big)
            safe = big if big > nb_dtype(0.0) else nb_dtype(1.0)  # typed: no float64 compare
            total = nb_dtype(0.0)
            for j in range(tid, x.shape[1], THREADS):
                v = x[r, j] / safe
                total += v * v
            norm = big * math.sqrt(_block_sum(sh, tid, total))
            below = norm < eps  # torch's clamp_min: the gradient passes at norm == eps
            d = eps if below else norm
            if tid == 0:
                denom[r] = d
                clamped[r] = below
            for j in range(tid, x.shape[1], THREADS):
                y[r, j] = x[r, j] / d

    return cuda_jit(normalize_rows)


@functools.cache
def _normalize_backward_kernel(dtype):
    """``dx = (dy - y (y . dy)) / denom`` per row (``dy / denom`` where the norm was clamped),
    one block per row."""
    nb_dtype = numba.from_dtype(np.dtype(dtype))

    def normalize_rows_backward(y, dy, denom, clamped, dx):
        sh = cuda.shared.array(THREADS, nb_dtype)
        tid = cuda.threadIdx.x
        for r in range(cuda.blockIdx.x, y.shape[0], cuda.gridDim.x):
            total = nb_dtype(0.0)
            for j in range(tid, y.shape[1], THREADS):
                total += y[r, j] * dy[r, j]
            radial = _block_sum(sh, tid, total)
            d, below = denom[r], clamped[r]
            for j in range(tid, y.shape[1], THREADS):
                g = dy[r, j]
                dx[r, j] = (g if below else g - y[r, j] * radial) / d

    return cuda_jit(normalize_rows_backward)


def l2_normalize_rows(x, eps):
    """The rows of a non-empty 2-d float32/float64 device array divided by their norms (clamped
    below at ``eps``), in one launch where the reference's CuPy code makes about a dozen:
    ``(y, denom, clamped)``, the last two per row, for :func:`l2_normalize_rows_backward`.
    Equal to :func:`refmoco.losses.normalize.l2_normalize` to rounding."""
    xp = namespace_of(x)
    dtype = x.dtype
    _check_dtype(dtype)
    x = xp.ascontiguousarray(x)  # the features are; a strided view is copied
    n = x.shape[0]
    y = xp.empty(x.shape, dtype)
    denom, clamped = xp.empty(n, dtype), xp.empty(n, xp.bool_)
    _launch(_normalize_kernel(dtype.type), min(n, MAX_BLOCKS), x, y, denom, clamped,
            dtype.type(eps))
    return y, denom, clamped


def l2_normalize_rows_backward(y, dy, denom, clamped):
    """``dx`` of :func:`l2_normalize_rows` for the upstream gradient ``dy``, in one launch."""
    xp = namespace_of(y)
    dx = xp.empty(y.shape, y.dtype)
    _launch(_normalize_backward_kernel(y.dtype.type), min(y.shape[0], MAX_BLOCKS), y,
            xp.ascontiguousarray(dy), denom, clamped, dx)
    return dx


# -- ReLU's backward -------------------------------------------------------------------------------


@functools.cache
def _relu_backward_kernel(dtype):
    """``dx = dy * (y > 0)`` for one float dtype, grid-stride over the memory: the mask as 1 or
    0 in the dtype and the reference's product (a NaN in ``dy`` survives a 0 of the mask, a
    negative ``dy`` gives -0)."""
    cast = numba.from_dtype(np.dtype(dtype))

    def relu_backward(dy, y, dx):
        one, zero = cast(1), cast(0)
        for i in range(cuda.grid(1), dy.shape[0], cuda.gridsize(1)):
            dx[i] = dy[i] * (one if y[i] > 0 else zero)

    return cuda_jit(relu_backward)


def relu_backward_fits(dy, y):
    """Whether :func:`relu_backward` takes ``dy`` and ``y``: one float32/float64 dtype, one
    non-empty shape, and the same memory order (both C-contiguous, or both channels-last)."""
    from ..nn import functional as F

    order = F.memory_order(dy)
    return bool(dy.dtype in KERNEL_DTYPES and y.dtype == dy.dtype and y.shape == dy.shape
                and dy.size and order is not None and F.memory_order(y) == order)


def relu_backward(dy, y):
    """ReLU's ``dx = dy * (y > 0)`` in one launch (the reference makes two: the mask, the
    product), bitwise the reference, ``dx`` in ``dy``'s memory order; for arrays that
    :func:`relu_backward_fits`."""
    from ..nn import functional as F

    xp = namespace_of(dy)
    flat_dy, back = F.flat_memory(dy)
    flat = xp.empty(dy.size, dy.dtype)
    _launch(_relu_backward_kernel(dy.dtype.type), _blocks(dy.size), flat_dy,
            F.flat_memory(y)[0], flat)
    return back(flat)


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
    rounded as NumPy rounds them (bitwise the reference). A source of the other float dtype is
    read in the target's here (``cvt.rn``, subnormals kept): CuPy's own conversion kernel is
    compiled with ``-ftz=true`` and would flush float32 subnormals to zero, where NumPy's
    ``astype`` keeps them."""
    add, mul = _rounded_ops(dtype)
    cast = numba.from_dtype(np.dtype(dtype))

    def lerp(t, s, m, w):
        start = cuda.grid(1)
        for i in range(start, t.shape[0], cuda.gridsize(1)):
            t[i] = add(mul(t[i], m), mul(w, cast(s[i])))

    return cuda_jit(lerp)


def momentum_update(target, source, m):
    """In place, ``target = m * target + (1 - m) * source`` (the reference's rounding)."""
    xp = namespace_of(target)
    dtype = target.dtype
    _check_dtype(dtype)  # float16 is computed in float32 before this (refmoco.momentum_update)
    t = target if target.flags.c_contiguous else xp.ascontiguousarray(target)
    if source.dtype in KERNEL_DTYPES:  # converted in the kernel, as NumPy converts
        s = xp.ascontiguousarray(source)
    else:  # float16: exact in float32 and float64, whoever converts it
        s = xp.ascontiguousarray(source, dtype=dtype)
    if t.size:
        _launch(_lerp_kernel(dtype.type), _blocks(t.size), t.reshape(-1), s.reshape(-1),
                dtype.type(m), dtype.type(1.0 - m))
    if t is not target:
        target[...] = t


# -- the SGD step ---------------------------------------------------------------------------------


@functools.cache
def _sgd_kernel(dtype):
    """``torch.optim.SGD``'s step for one float dtype, element by element in one pass: each
    product and sum rounded on its own, as the reference's CuPy operations round them (bitwise
    the reference; ``p - lr d`` is computed as ``p + (-(lr d))``, the same rounding)."""
    add, mul = _rounded_ops(dtype)

    def sgd(p, g, buf, lr, momentum, damp_w, weight_decay, decay, nesterov, first_step):
        """``decay``: weight_decay != 0, decided on the host (a literal 0 here would be an int,
        and the comparison with it float64)."""
        use_momentum = buf.shape[0] != 0
        for i in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
            d = g[i]
            if decay:
                d = add(d, mul(weight_decay, p[i]))  # d_t = g_t + lambda theta
            if use_momentum:
                b = d if first_step else add(mul(buf[i], momentum), mul(damp_w, d))  # b_t
                buf[i] = b
                d = add(d, mul(momentum, b)) if nesterov else b  # u_t
            p[i] = add(p[i], -mul(lr, d))

    return cuda_jit(sgd)


def sgd_step(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """One ``torch.optim.SGD`` step on flat, contiguous device buffers, in place, in one launch:
    the contract of :func:`refmoco.kernels.cpu.sgd_step` (``buf`` the momentum buffer, set to the
    gradient at ``first_step``; ignored, and may be ``None``, when ``momentum == 0``), where the
    reference's CuPy code makes seven launches."""
    xp = namespace_of(p)
    dtype = p.dtype
    _check_dtype(dtype)
    check_sgd_buffers(p, g, buf, momentum)
    if not momentum:
        buf = xp.empty(0, dtype)  # none: the kernel reads its emptiness as momentum == 0
    if p.size:
        t = dtype.type
        _launch(_sgd_kernel(dtype.type), _blocks(p.size), p.reshape(-1), g.reshape(-1),
                buf.reshape(-1), t(lr), t(momentum), t(1.0 - dampening), t(weight_decay),
                bool(weight_decay), bool(nesterov), bool(first_step))


# -- convolution: im2col and col2im -------------------------------------------------------------


@cuda_jit
def _im2col_kernel(x, cols, kh, kw, s, p, ho, wo):
    """``cols`` (flat, ordered (n, i, j, a, e, c)) ``= x[n, s i + a - p, s j + e - p, c]``, 0
    outside the image; ``x`` is (N, H, W, C). One thread per entry of ``cols``."""
    h, w, ch = x.shape[1], x.shape[2], x.shape[3]
    for t in range(cuda.grid(1), cols.shape[0], cuda.gridsize(1)):
        c, u = t % ch, t // ch
        e, u = u % kw, u // kw
        a, u = u % kh, u // kh
        j, u = u % wo, u // wo
        i, n = u % ho, u // ho
        r, col = s * i + a - p, s * j + e - p
        if 0 <= r < h and 0 <= col < w:
            cols[t] = x[n, r, col, c]
        else:
            cols[t] = 0


@cuda_jit
def _col2im_kernel(dcols, dx, s, p):
    """``dx[n, r, col, c]`` (zero on entry) ``+= dcols[n, i, j, a, e, c]`` over every window
    entry that came from that pixel (``s i + a - p = r``, ``s j + e - p = col``), in the order
    of the reference's scatter: a, then e, ascending. One thread per pixel of ``dx``."""
    ho, wo, kh, kw = dcols.shape[1], dcols.shape[2], dcols.shape[3], dcols.shape[4]
    h, w, ch = dx.shape[1], dx.shape[2], dx.shape[3]
    for t in range(cuda.grid(1), dx.size, cuda.gridsize(1)):
        c, u = t % ch, t // ch
        col, u = u % w, u // w
        r, n = u % h, u // h
        acc = dx[n, r, col, c]  # 0, as the reference's zero-padded buffer
        for a in range(kh):
            di = r + p - a  # = s * i
            if di < 0:
                break
            if di % s == 0 and di // s < ho:
                for e in range(kw):
                    dj = col + p - e  # = s * j
                    if dj < 0:
                        break
                    if dj % s == 0 and dj // s < wo:
                        acc += dcols[n, di // s, dj // s, a, e, c]
        dx[n, r, col, c] = acc


def im2col(x_nhwc, kh, kw, s, p, ho, wo):
    """The (N, Ho, Wo, kh, kw, C) windows of a channels-last (N, H, W, C) device array."""
    xp = namespace_of(x_nhwc)
    x_nhwc = xp.ascontiguousarray(x_nhwc)  # a view when x is channels-last
    n, c = x_nhwc.shape[0], x_nhwc.shape[3]
    cols = xp.empty((n, ho, wo, kh, kw, c), x_nhwc.dtype)
    if cols.size:
        _launch(_im2col_kernel, _blocks(cols.size), x_nhwc, cols.reshape(-1), kh, kw, s, p, ho,
                wo)
    return cols


def col2im(dcols, h, w, s, p):
    """The (N, H, W, C) input gradient from the windows' gradients ``dcols`` (N, Ho, Wo, kh,
    kw, C), bitwise the reference's scatter."""
    xp = namespace_of(dcols)
    dcols = xp.ascontiguousarray(dcols)
    dx = xp.zeros((dcols.shape[0], h, w, dcols.shape[5]), dcols.dtype)
    if dx.size:
        _launch(_col2im_kernel, _blocks(dx.size), dcols, dx, s, p)
    return dx


# -- batch norm ---------------------------------------------------------------------------------


@functools.cache
def _bn_forward_kernel(dtype):
    """Batch norm's forward for one float dtype, one block per channel of a (rows, C) array:
    the statistics (train: two passes, summed in float64 as the Numba CPU kernel does), the
    running averages (PyTorch's update, the reference's order), then ``x_hat`` and ``y``;
    ``count``: one more batch on the counter ``counter[0]`` (by block 0's first thread)."""
    cast, f64 = numba.from_dtype(np.dtype(dtype)), numba.float64

    def bn_forward(x, gamma, beta, running_mean, running_var, inv_std, x_hat, y, train, eps,
                   keep, rate, unbias, counter, count):
        sh = cuda.shared.array(THREADS, numba.float64)
        tid = cuda.threadIdx.x
        m = x.shape[0]
        if count and cuda.blockIdx.x == 0 and tid == 0:
            counter[0] += 1
        for c in range(cuda.blockIdx.x, x.shape[1], cuda.gridDim.x):
            if train:
                mean64 = var64 = f64(0.0)  # float64 on the device and in the simulator alike
                for phase in range(2):  # the sum, then the sum of squares about the mean
                    acc = f64(0.0)
                    for r in range(tid, m, THREADS):
                        d = x[r, c] - mean64  # x itself in the first phase
                        acc += d if phase == 0 else d * d
                    if phase == 0:
                        mean64 = _block_sum(sh, tid, acc) / m
                    else:
                        var64 = _block_sum(sh, tid, acc) / m
                mean, var = cast(mean64), cast(var64)
                if tid == 0:  # running = running * (1 - rate) + rate * stat (unbiased var)
                    running_mean[c] = running_mean[c] * keep + rate * mean
                    running_var[c] = running_var[c] * keep + rate * var * unbias
            else:
                mean, var = running_mean[c], running_var[c]
            inv = cast(1.0) / math.sqrt(var + eps)
            if tid == 0:
                inv_std[c] = inv
            g, b = gamma[c], beta[c]
            for r in range(tid, m, THREADS):
                h = (x[r, c] - mean) * inv
                x_hat[r, c] = h
                y[r, c] = g * h + b

    return cuda_jit(bn_forward)


@functools.cache
def _bn_backward_kernel(dtype):
    """Batch norm's backward for one float dtype, one block per channel of a (rows, C) array:
    ``dgamma = sum dy x_hat`` and ``dbeta = sum dy`` in float64, then ``dx``."""
    cast, f64 = numba.from_dtype(np.dtype(dtype)), numba.float64

    def bn_backward(dy, x_hat, gamma, inv_std, dx, dgamma, dbeta, train):
        sh = cuda.shared.array(THREADS, numba.float64)
        tid = cuda.threadIdx.x
        m = dy.shape[0]
        for c in range(cuda.blockIdx.x, dy.shape[1], cuda.gridDim.x):
            sg = f64(0.0)
            sb = f64(0.0)
            for r in range(tid, m, THREADS):
                sg += dy[r, c] * x_hat[r, c]
                sb += dy[r, c]
            sg, sb = _block_sum(sh, tid, sg), _block_sum(sh, tid, sb)
            if tid == 0:
                dgamma[c] = cast(sg)
                dbeta[c] = cast(sb)
            g, inv = gamma[c], inv_std[c]
            if train:  # dx = gamma inv_std (dy - mean(dy) - x_hat mean(dy x_hat))
                scale, mean_dy, mean_dy_xhat = g * inv, cast(sb / m), cast(sg / m)
                for r in range(tid, m, THREADS):
                    dx[r, c] = scale * (dy[r, c] - mean_dy - x_hat[r, c] * mean_dy_xhat)
            else:  # the statistics are constants: dx = (dy gamma) inv_std
                for r in range(tid, m, THREADS):
                    dx[r, c] = dy[r, c] * g * inv

    return cuda_jit(bn_backward)


def fits(*arrays):
    """Whether the batch-norm kernels compute what the reference does for ``arrays``: one
    dtype, float32 or float64 (otherwise the reference runs: its result dtypes, its promotion)."""
    dtype = arrays[0].dtype
    return dtype in KERNEL_DTYPES and all(a.dtype == dtype for a in arrays)


def batch_norm_forward(x, gamma, beta, running_mean, running_var, *, train, momentum=0.1,
                       eps=1e-5, num_batches_tracked=None):
    """As :func:`refmoco.nn.functional.batch_norm_forward` (its arguments checked there, and
    :func:`fits`), in one launch: the reference's dozen or so CuPy launches per layer cost the
    host more than the GPU spends on them (docs/benchmarks.md). A device counter
    ``num_batches_tracked`` is counted in the launch too."""
    from ..nn import functional as F

    xp = namespace_of(x)
    dtype = x.dtype
    x2 = F.channel_rows(x)
    m, ch = x2.shape
    x_hat, y = xp.empty_like(x2), xp.empty_like(x2)
    inv_std = xp.empty(ch, dtype)
    counter = num_batches_tracked
    count = bool(train) and counter is not None
    in_launch = (count and ch > 0 and namespace_of(counter) is xp and counter.shape == ()
                 and counter.dtype == np.int64)  # PyTorch's, where x is
    if count and not in_launch:  # no launch, or a counter elsewhere or of another kind
        counter += 1
    if ch:
        t = dtype.type
        counter = counter.reshape(1) if in_launch else xp.empty(1, np.int64)  # unread if not
        _launch(_bn_forward_kernel(dtype.type), min(ch, MAX_BLOCKS), x2, gamma, beta,
                running_mean, running_var, inv_std, x_hat, y, bool(train), t(eps),
                t(1 - momentum), t(momentum), t(m / (m - 1) if m > 1 else 1.0), counter,
                in_launch)
    view = (1, -1) + (1,) * (x.ndim - 2)
    cache = F.BatchNormCache(F.from_channel_rows(x_hat, x.shape), inv_std.reshape(view),
                             gamma.reshape(view), train, "cupy")
    return F.from_channel_rows(y, x.shape), cache


def batch_norm_backward(dy, cache, out=None):
    """As :func:`refmoco.nn.functional.batch_norm_backward` (for arrays that :func:`fits`;
    ``out`` too), in one launch. In evaluation ``dx = (dy gamma) inv_std``, without reading
    ``x_hat``."""
    from ..nn import functional as F

    xp = namespace_of(dy)
    x_hat, inv_std, g, train, _ = cache
    dy2, x_hat2 = F.channel_rows(dy), F.channel_rows(x_hat)
    ch = dy2.shape[1]
    dx = xp.empty_like(dy2)
    dgamma, dbeta = (xp.empty(ch, dy.dtype), xp.empty(ch, dy.dtype)) if out is None else out
    if ch:
        _launch(_bn_backward_kernel(dy.dtype.type), min(ch, MAX_BLOCKS), dy2, x_hat2,
                g.reshape(-1), inv_std.reshape(-1), dx, dgamma, dbeta, bool(train))
    return F.from_channel_rows(dx, dy.shape), dgamma, dbeta
