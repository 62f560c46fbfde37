"""The Numba CUDA kernels compiled by the real CUDA compiler (NVVM), without a GPU.

The simulator (``test_cuda_sim.py``) runs the kernels' logic in Python; it neither types them the
way the CUDA target does nor shows what the compiler makes of the arithmetic. Here each kernel is
compiled to PTX with ``numba.cuda.compile_ptx`` for the argument types its launch passes, and the
PTX is read for two promises:

- a float32 kernel computes in float32: no double-precision register or instruction (a float64
  constant or an untyped literal would silently upcast the hot path);
- the momentum kernel rounds like NumPy, so its result is bitwise the reference's: every float
  multiply and add carries the ``.rn`` modifier and nothing is fused into ``fma``/``mad`` (NVVM
  contracts ``a * b + c * d`` into a fused multiply-add unless told not to; it did, before
  ``_rounded_ops``).
- the col2im kernel only adds (bitwise the reference's scatter of additions).

Needs numba-cuda with NVVM (``pip install "numba-cuda[cu12]"``), which CI installs; without it
the tests skip, and ``REFMOCO_REQUIRE_NVVM=1`` (set by ``.ci/run``) makes that skip a failure.
"""

import functools
import os
import re
import struct

import numba
import numpy as np
import pytest

CC = (8, 0)  # the oldest architecture that CUDA 13 and the GPUs refmoco is run on both support


@pytest.fixture(scope="module")
def kernels():
    """``refmoco.kernels.cuda`` compiled for the GPU, or skip (fail under REFMOCO_REQUIRE_NVVM)."""
    if numba.config.ENABLE_CUDASIM:
        pytest.skip("NUMBA_ENABLE_CUDASIM is set: the simulator compiles nothing")
    from numba import cuda

    def probe(x):
        x[0] = 1.0

    try:
        from refmoco.kernels import cuda as kernels  # first: its NumPy 2.5 shim (np.row_stack)

        cuda.compile_ptx(probe, (numba.float32[::1],), cc=CC)
    except Exception as exc:  # no numba-cuda, no NVVM or libdevice: the install is incomplete
        message = f"needs numba-cuda with NVVM (pip install 'numba-cuda[cu12]'): {exc!r}"
        if os.environ.get("REFMOCO_REQUIRE_NVVM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return kernels


def ptx_of(kernel, *args):
    """The PTX of ``kernel`` (a ``cuda_jit`` dispatcher) for the types of ``args``, the arrays and
    scalars a launch passes (contiguous arrays type as what ``as_cuda_array`` gives)."""
    return _compiled(kernel.py_func, tuple(numba.typeof(a) for a in args))


@functools.cache
def _compiled(py_func, sig):
    """Each kernel and signature compiled once per test run (several tests read the same PTX)."""
    from numba import cuda

    ptx, _ = cuda.compile_ptx(py_func, sig, cc=CC)
    return ptx


def xent_args(dtype, n=3, k=5):
    """What ``info_nce_queue`` passes to the row kernel: l_pos, l_neg (divided by T already),
    the gradient scale, the losses and want_grad."""
    t = np.dtype(dtype).type
    return (np.zeros(n, dtype), np.zeros((n, k), dtype), t(1.0), np.zeros(n, dtype), True)


def lerp_args(dtype, size=7):
    """What ``momentum_update`` passes: the flat target and source, m and 1 - m."""
    t = np.dtype(dtype).type
    return np.zeros(size, dtype), np.zeros(size, dtype), t(0.99), t(1.0 - 0.99)


def normalize_args(dtype, n=3, c=5):
    """What ``l2_normalize_rows`` passes: x, y, the denominators, the clamps, eps."""
    t = np.dtype(dtype).type
    return (np.zeros((n, c), dtype), np.zeros((n, c), dtype), np.zeros(n, dtype),
            np.zeros(n, np.bool_), t(1e-12))


def normalize_backward_args(dtype, n=3, c=5):
    """What ``l2_normalize_rows_backward`` passes: y, dy, the denominators, the clamps, dx."""
    rows = np.zeros((n, c), dtype)
    return rows, rows, np.zeros(n, dtype), np.zeros(n, np.bool_), rows


def sgd_args(dtype, size=7):
    """What ``sgd_step`` passes: p, g, the momentum buffer, lr, momentum, 1 - dampening, weight
    decay, whether it is nonzero, nesterov, first_step."""
    t = np.dtype(dtype).type
    return (np.zeros(size, dtype), np.zeros(size, dtype), np.zeros(size, dtype), t(0.1), t(0.9),
            t(1.0), t(5e-4), True, False, False)


def im2col_args(dtype):
    """What ``im2col`` passes: the channels-last input, the flat windows, kh, kw, s, p, Ho, Wo."""
    return np.zeros((2, 5, 5, 3), dtype), np.zeros(2 * 3 * 3 * 9 * 3, dtype), 3, 3, 2, 1, 3, 3


def col2im_args(dtype):
    """What ``col2im`` passes: the windows' gradients, the input gradient, s, p."""
    return np.zeros((2, 3, 3, 3, 3, 3), dtype), np.zeros((2, 5, 5, 3), dtype), 2, 1


def bn_forward_args(dtype, m=6, c=3):
    """What ``batch_norm_forward`` passes: x as (rows, C), gamma, beta, the running mean and
    variance, inv_std, x_hat, y, train, eps, 1 - momentum, momentum, m / (m - 1), the batch
    counter (int64, as a 1-element view), whether to count."""
    t = np.dtype(dtype).type
    rows, vec = np.zeros((m, c), dtype), np.zeros(c, dtype)
    return (rows, vec, vec, vec, vec, vec, rows, rows, True, t(1e-5), t(0.9), t(0.1), t(1.2),
            np.zeros(1, np.int64), True)


def bn_backward_args(dtype, m=6, c=3):
    """What ``batch_norm_backward`` passes: dy, x_hat (rows, C), gamma, inv_std, dx, dgamma,
    dbeta, train."""
    rows, vec = np.zeros((m, c), dtype), np.zeros(c, dtype)
    return rows, rows, vec, vec, rows, vec, vec, True


def all_kernels(kernels, dtype):
    """(name, PTX) of every kernel for one dtype."""
    return [("xent", ptx_of(kernels._xent_kernel(dtype), *xent_args(dtype))),
            ("lerp", ptx_of(kernels._lerp_kernel(dtype), *lerp_args(dtype))),
            ("relu_backward", ptx_of(kernels._relu_backward_kernel(dtype),
                                     *(np.zeros(10, dtype) for _ in range(3)))),
            ("sgd", ptx_of(kernels._sgd_kernel(dtype), *sgd_args(dtype))),
            ("normalize", ptx_of(kernels._normalize_kernel(dtype), *normalize_args(dtype))),
            ("normalize_backward", ptx_of(kernels._normalize_backward_kernel(dtype),
                                          *normalize_backward_args(dtype))),
            ("im2col", ptx_of(kernels._im2col_kernel, *im2col_args(dtype))),
            ("col2im", ptx_of(kernels._col2im_kernel, *col2im_args(dtype)))]


def instructions(ptx):
    """The PTX's instructions (no directives, labels or comments), stripped."""
    lines = (line.split("//")[0].strip() for line in ptx.splitlines())
    return [ln for ln in lines if ln and not ln.startswith((".", "$", "{", "}", ")", "("))]


def float_arithmetic(ptx, width):
    """The float add/sub/mul/fma/mad instructions of one width (32 or 64) in the PTX."""
    pattern = re.compile(rf"^(add|sub|mul|fma|mad)(\.\w+)*\.f{width}\b")
    return [ins for ins in instructions(ptx) if pattern.match(ins)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernels_compile_for_the_gpu(kernels, dtype):
    ptx = dict(all_kernels(kernels, dtype))
    assert all(".entry" in code for code in ptx.values())
    width = 32 if dtype == np.float32 else 64
    for name in ("xent", "normalize", "normalize_backward"):  # block reductions synchronise
        assert "bar.sync" in ptx[name], name
    for name in ("xent", "lerp", "sgd", "normalize", "normalize_backward", "col2im",
                 "relu_backward"):
        assert float_arithmetic(ptx[name], width), name


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_norm_kernels_compile_and_sum_in_float64(kernels, dtype):
    """Both kernels compile for the argument types their launches pass, reduce across the block
    (``bar.sync``), and accumulate in float64 whatever the dtype (as the Numba CPU kernels)."""
    for kernel, args in ((kernels._bn_forward_kernel(dtype), bn_forward_args(dtype)),
                         (kernels._bn_backward_kernel(dtype), bn_backward_args(dtype))):
        ptx = ptx_of(kernel, *args)
        assert ".entry" in ptx and "bar.sync" in ptx
        assert [ins for ins in float_arithmetic(ptx, 64) if ins.startswith("add")]


def test_float32_kernels_compute_in_float32(kernels):
    for name, ptx in all_kernels(kernels, np.float32):
        doubles = [ln.strip() for ln in ptx.splitlines() if ".f64" in ln]
        assert not doubles, f"{name}: float64 in a float32 kernel: {doubles[:5]}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_col2im_only_adds(kernels, dtype):
    """The scatter's sums round like the reference's additions: no multiply, nothing fused."""
    width = 32 if dtype == np.float32 else 64
    ops = float_arithmetic(ptx_of(kernels._col2im_kernel, *col2im_args(dtype)), width)
    assert ops and {ins.split(".")[0] for ins in ops} == {"add"}, ops[:5]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_momentum_kernel_rounds_every_operation_like_numpy(kernels, dtype):
    width = 32 if dtype == np.float32 else 64
    ops = float_arithmetic(ptx_of(kernels._lerp_kernel(dtype), *lerp_args(dtype)), width)
    fused = [ins for ins in ops if ins.startswith(("fma", "mad"))]
    assert not fused, f"fused multiply-adds round once where NumPy rounds twice: {fused[:3]}"
    loose = [ins for ins in ops if ".rn." not in ins]  # without .rn, ptxas may fuse mul and add
    assert not loose, f"float operations without a rounding modifier: {loose[:3]}"
    assert {ins.split(".")[0] for ins in ops} == {"mul", "add"}  # t * m + w * s, nothing else


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_kernel_rounds_every_operation_like_numpy(kernels, dtype):
    """As the momentum kernel: every product and sum of the SGD step rounded on its own, none
    fused, no flush-to-zero, so the step is bitwise the NumPy reference's."""
    width = 32 if dtype == np.float32 else 64
    ptx = ptx_of(kernels._sgd_kernel(dtype), *sgd_args(dtype))
    ops = float_arithmetic(ptx, width)
    fused = [ins for ins in ops if ins.startswith(("fma", "mad"))]
    assert not fused, f"fused multiply-adds round once where NumPy rounds twice: {fused[:3]}"
    loose = [ins for ins in ops if ".rn." not in ins]
    assert not loose, f"float operations without a rounding modifier: {loose[:3]}"
    assert {ins.split(".")[0] for ins in ops} == {"mul", "add"}
    assert not [ins for ins in instructions(ptx) if ".ftz" in ins]


@pytest.mark.parametrize("dtype, source", [(np.float32, np.float64), (np.float64, np.float32),
                                           (np.float32, np.float32)])
def test_momentum_kernel_keeps_subnormals_like_numpy(kernels, dtype, source):
    """No flush-to-zero (``.ftz``) anywhere in the momentum kernel, the conversion of a source
    of the other dtype included: NumPy keeps float32 subnormals (``np.float64(1e-45)`` is
    1.4e-45 in float32), so the kernel must, to be bitwise the reference. CuPy compiles its
    own kernels with ``-ftz=true``, which is why the conversion happens in this kernel."""
    t, s, m, w = lerp_args(dtype)
    ptx = ptx_of(kernels._lerp_kernel(dtype), t, s.astype(source), m, w)
    flushing = [ins for ins in instructions(ptx) if ".ftz" in ins]
    assert not flushing, flushing[:3]
    if source != dtype:
        dst, src = (f"f{8 * np.dtype(x).itemsize}" for x in (dtype, source))
        assert any(ins.startswith("cvt.") and f".{dst}.{src}" in ins for ins in instructions(ptx))


def test_the_ptx_reader_sees_a_fused_multiply_add(kernels):
    """The reader itself: the plain expression ``t * m + w * s`` compiles to an ``fma`` (what
    the momentum kernel avoids), so the check above is not vacuous."""
    from refmoco.kernels._jit import cuda_jit

    @cuda_jit
    def plain(t, s, m, w):
        i = numba.cuda.grid(1)
        if i < t.shape[0]:
            t[i] = t[i] * m + w * s[i]

    ops = float_arithmetic(ptx_of(plain, *lerp_args(np.float32)), 32)
    assert any(ins.startswith("fma") for ins in ops), ops


def test_kernels_compile_with_a_numpy_that_has_no_row_stack(kernels):
    """NumPy 2.5 removed ``np.row_stack``, and numba-cuda (0.30 and older) registers an overload
    of it at its first compile: every kernel raised AttributeError (seen on the GPU machine's
    NumPy 2.5.2). Importing refmoco's kernels restores the alias first. Here, in a fresh
    interpreter, NumPy is made to lack it, as 2.5 does."""
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "if hasattr(np, 'row_stack'):\n"
        "    del np.row_stack\n"
        "from refmoco.kernels import cuda as kernels\n"
        "import numba\n"
        "t = np.zeros(8, np.float32)\n"
        "ptx, _ = numba.cuda.compile_ptx(kernels._lerp_kernel(np.float32).py_func,\n"
        "    (numba.float32[::1], numba.float32[::1], numba.float32, numba.float32), cc=(8, 0))\n"
        "assert '.entry' in ptx\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


# -- the CuPy launcher (REFMOCO_CUDA_LAUNCHER=cupy): what it loads and what it passes -----------


def every_launch(kernels, dtype):
    """(name, kernel, arguments) of every launch refmoco makes, for one dtype, with a strided
    (non-contiguous) array among batch norm's (the channels of a channels-first input)."""
    strided = np.zeros((3, 6), dtype).T  # (6, 3), strides (itemsize, 6 * itemsize)
    rows, vec = np.zeros((6, 3), dtype), np.zeros(3, dtype)
    t = np.dtype(dtype).type
    return [("xent", kernels._xent_kernel(dtype), xent_args(dtype)),
            ("lerp", kernels._lerp_kernel(dtype), lerp_args(dtype)),
            ("relu_backward", kernels._relu_backward_kernel(dtype),
             (np.zeros(10, dtype), np.zeros(10, dtype), np.zeros(10, dtype))),
            ("sgd", kernels._sgd_kernel(dtype), sgd_args(dtype)),
            ("normalize", kernels._normalize_kernel(dtype), normalize_args(dtype)),
            ("normalize_backward", kernels._normalize_backward_kernel(dtype),
             normalize_backward_args(dtype)),
            ("sgd, no momentum", kernels._sgd_kernel(dtype),
             sgd_args(dtype)[:2] + (np.zeros(0, dtype),) + sgd_args(dtype)[3:]),
            ("im2col", kernels._im2col_kernel, im2col_args(dtype)),
            ("col2im", kernels._col2im_kernel, col2im_args(dtype)),
            ("bn_forward", kernels._bn_forward_kernel(dtype), bn_forward_args(dtype)),
            ("bn_forward strided", kernels._bn_forward_kernel(dtype),
             (strided, vec, vec, vec, vec, vec, rows, rows, False, t(1e-5), t(0.9), t(0.1),
              t(1.2), np.zeros(1, np.int64), False)),
            ("bn_backward", kernels._bn_backward_kernel(dtype), bn_backward_args(dtype))]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_launch_arguments_fill_each_kernels_ptx_parameters(kernels, dtype):
    """For every launch, the CuPy launcher's parameters (``param_format``: one ``struct`` code
    each, and as many values from ``param_values``) are as many, and as wide, as those of the
    PTX it loads (compiled for ``signature(args)``), and that PTX is one self-contained module:
    no external function for the loader to resolve."""
    for name, kernel, args in every_launch(kernels, dtype):
        ptx, _ = numba.cuda.compile_ptx(kernel.py_func, kernels.signature(args), cc=CC,
                                        **kernels.CUDA_OPTIONS)
        entry, widths = kernels.ptx_entry(ptx)
        codes = kernels.param_format(args)
        assert entry in ptx and len(widths) > len(args), name
        assert [struct.calcsize(c) for c in codes] == widths, name
        assert len(kernels.param_values(args)) == len(codes), name
        kernels.check_params(entry, widths, codes)  # does not raise
        assert not re.search(r"^\s*\.extern\s+\.func", ptx, re.M), name


def test_the_launcher_types_arguments_as_numba_does(kernels):
    """``signature`` gives Numba's own types for what refmoco passes (it cannot call
    ``numba.typeof`` on a CuPy array without a GPU): contiguous arrays "C", a strided one "A"."""
    args = (np.zeros(4, np.float32), np.zeros((2, 3)), np.zeros(8, np.float32)[::2], 3, True,
            0.5, np.float32(0.5))
    assert kernels.signature(args) == tuple(numba.typeof(a) for a in args)


def test_a_layout_that_does_not_fill_the_parameters_is_refused(kernels):
    """A numba-cuda whose kernel ABI differs is refused at load, not launched with misplaced
    arguments: one parameter short, or one of another width."""
    ptx, _ = numba.cuda.compile_ptx(kernels._lerp_kernel(np.float32).py_func,
                                    kernels.signature(lerp_args(np.float32)), cc=CC)
    entry, widths = kernels.ptx_entry(ptx)
    codes = kernels.param_format(lerp_args(np.float32))
    assert codes.endswith("f")
    with pytest.raises(RuntimeError, match="REFMOCO_CUDA_LAUNCHER=numba"):
        kernels.check_params(entry, widths, codes[:-1])
    with pytest.raises(RuntimeError, match="does not match"):
        kernels.check_params(entry, widths, codes[:-1] + "d")


def launch_args():
    """A C-contiguous and a strided array, and each kind of scalar refmoco passes."""
    return (np.zeros((3, 4), np.float32), np.zeros((4, 6))[:, ::2], 7, True, np.float32(0.25),
            np.float64(0.5), 0.75, np.zeros(5, np.float32))


def test_launch_arguments_are_what_numba_cuda_passes(kernels):
    """The values, in order, of numba-cuda's own argument marshalling (``_Kernel._prepare_args``,
    what its launch passes the driver). Its arrays arrive as device-memory views; a stand-in with
    the view's fields is given instead (no GPU here). Fails, rather than skips, if numba-cuda's
    marshalling changed: then ``param_values`` must be checked against it again."""
    import types

    from numba.cuda.dispatcher import _Kernel

    def as_device_view(a):
        view = types.SimpleNamespace(
            size=a.size, dtype=a.dtype, ptr=a.ctypes.data, shape=a.shape,
            _layout=types.SimpleNamespace(strides_in_bytes=a.strides))
        return types.SimpleNamespace(__cuda_memory__=True, _strided_memory_view_shim=view)

    args = launch_args()
    numba_cuda = []
    for ty, a in zip(kernels.signature(args), args):
        value = as_device_view(a) if isinstance(a, np.ndarray) else a
        _Kernel._prepare_args(types.SimpleNamespace(extensions=[]), ty, value, 0, [], numba_cuda)
    values = [getattr(v, "value", v) for v in numba_cuda]  # ctypes scalars to Python numbers
    ours = kernels.param_values(args)
    assert [type(v) is bool for v in values] == [isinstance(v, (bool, np.bool_)) for v in ours]
    assert values == ours


def test_launch_values_are_packed_where_the_driver_reads_them(kernels):
    """``ParamBuffer``: each value, read back from its address with its own ``struct`` code, is
    the value packed (float32 rounded as the kernel receives it), at an address aligned to its
    width, with no two values overlapping; refilling it for another launch rewrites them all."""
    import ctypes

    first = launch_args()
    second = (np.ones((3, 4), np.float32), np.ones((4, 6))[:, 1::2], -3, False, np.float32(1e-8),
              np.float64(-2.5), 1e300, np.ones(5, np.float32)[::-1])
    codes = kernels.param_format(first)
    assert kernels.param_format(second) == codes
    buffer = kernels.ParamBuffer(codes)
    for args in (first, second):
        buffer.fill(kernels.param_values(args))
        end = 0
        for code, address, value in zip(codes, buffer.addresses, kernels.param_values(args),
                                        strict=True):
            width = struct.calcsize(code)
            assert address % width == 0 and address >= end
            end = address + width
            (got,) = struct.unpack("@" + code, ctypes.string_at(address, width))
            want = np.float32(value) if code == "f" else value
            assert got == want, (code, value)
        assert end <= buffer.buffer.ctypes.data + buffer.buffer.nbytes


def test_an_unknown_launcher_is_refused_at_import():
    """``REFMOCO_CUDA_LAUNCHER`` names one of the two launchers, or the import says which."""
    import subprocess
    import sys

    env = dict(os.environ, REFMOCO_CUDA_LAUNCHER="numba-cuda")
    done = subprocess.run([sys.executable, "-c", "import refmoco.kernels.cuda"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    assert "REFMOCO_CUDA_LAUNCHER must be one of ('numba', 'cupy'), got 'numba-cuda'" in done.stderr


def test_the_cupy_launcher_hands_cupy_pointers_to_each_launchs_values(kernels, monkeypatch):
    """The launcher end to end with CuPy's side stood in for (no GPU here): the PTX it loads is
    the kernel's, NUL-terminated; the function is looked up by the PTX's entry name; each launch
    passes the grid and block and one pointer per PTX parameter, and at launch time those
    pointers hold that launch's values (decoded here by the PTX's widths, in numba-cuda's order:
    ``0, 0, size, itemsize, data, *shape, *strides`` per array). A kernel is compiled and loaded
    once per argument kinds and device."""
    import ctypes
    import sys
    import types

    loaded, launches = [], []

    class Module:
        def load(self, image):
            assert image.endswith(b"\0") and b".entry" in image
            loaded.append(image[:-1].decode())

        def get_function(self, name):
            _, widths = kernels.ptx_entry(loaded[-1])
            assert name == kernels.ptx_entry(loaded[-1])[0]

            def function(grid, block, pointers):
                raw = [ctypes.string_at(p.ptr, w) for p, w in zip(pointers, widths, strict=True)]
                launches.append((name, grid, block, raw))

            return function

    class CPointer:
        def __init__(self, ptr):
            self.ptr = ptr

    device = [0]
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDevice=lambda: device[0]),
        Device=lambda d: types.SimpleNamespace(compute_capability="80"),
        function=types.SimpleNamespace(Module=Module, CPointer=CPointer)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setitem(sys.modules, "cupy.cuda", fake.cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.function", fake.cuda.function)
    monkeypatch.setattr(kernels, "_FUNCTIONS", {})

    def decode(raw, args):
        """The launch's parameters back as values, by numba-cuda's layout."""
        out, it = [], iter(raw)
        for a in args:
            if isinstance(a, np.ndarray):
                n = 5 + 2 * a.ndim
                out.append(tuple(int.from_bytes(next(it), "little", signed=True)
                                 for _ in range(n)))
            else:
                b = next(it)
                code = {1: "?", 4: "f", 8: "q" if isinstance(a, int) else "d"}[len(b)]
                out.append(struct.unpack("<" + code, b)[0])
        return out

    def expected(args):
        return [(0, 0, a.size, a.itemsize, a.ctypes.data, *a.shape, *a.strides)
                if isinstance(a, np.ndarray) else a for a in args]

    kernel = kernels._lerp_kernel(np.float32)
    calls = [lerp_args(np.float32, size=9), lerp_args(np.float32, size=33),
             (np.zeros(12, np.float32)[::3], np.zeros(4, np.float32), np.float32(0.5),
              np.float32(0.25))]
    for args in calls:
        kernels._cupy_function(fake, kernel, args).launch(5, args)
    bn = bn_forward_args(np.float32)
    kernels._cupy_function(fake, kernels._bn_forward_kernel(np.float32), bn).launch(3, bn)
    device[0] = 1
    kernels._cupy_function(fake, kernel, calls[0]).launch(2, calls[0])
    # compiled and loaded: lerp contiguous, lerp strided, batch norm, lerp on the second device
    assert len(loaded) == 4
    for (name, grid, block, raw), args, blocks in zip(launches, [*calls, bn, calls[0]],
                                                      [5, 5, 5, 3, 2], strict=True):
        assert grid == (blocks,) and block == (kernels.THREADS,)
        assert decode(raw, args) == expected(args), name
