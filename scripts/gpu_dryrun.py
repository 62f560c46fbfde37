"""The GPU checks of scripts/gpu_check.sh without a GPU: the tests marked ``gpu`` and
``refmoco bench --only gpu``, run on the CuPy stand-in of the tests (tests/fake_cupy.py: NumPy
arrays that refuse what CuPy refuses) with the Numba CUDA kernels in Numba's CUDA simulator.

What it proves: the GPU tests, the bench's GPU groups and every ``backend="cupy"`` dispatch run
and agree with the references before device time is spent on them. What it cannot: CuPy's own
kernels and numerics, the real launch path (streams, DLPack views of CuPy arrays) and any timing
(the simulator is ~10^4 times slower than a GPU). PyTorch CUDA cases are left out without CUDA.
For ``tests`` and ``bench`` the kernels of batch norm and of the row normalisation are replaced
by the reference on the host (in the simulator they would take hours at those sizes;
tests/test_cuda_sim.py runs them).

    python scripts/gpu_dryrun.py tests      # the GPU tests: about 4 minutes on 2 cores
    python scripts/gpu_dryrun.py bench      # the GPU benchmark groups, once each: about 9 minutes
    python scripts/gpu_dryrun.py            # both
    python scripts/gpu_dryrun.py count      # device operations in one MoCo step (the bench's)

``count`` tallies, for one training step of each bench encoder and each way of launching the
Numba CUDA kernels (``REFMOCO_CUDA_LAUNCHER``: with CuPy's, ReLU's backward is one kernel), the
stand-in's device operations by name: each CuPy function, array method or operator call (in-place ones too), strided write
(``setitem``), gather (indexing with an array), copy of a host array to the device (``asarray``)
and Numba CUDA kernel launch. Views (``reshape``, ``transpose``, ``T``) launch nothing on a GPU, nor
does ``ascontiguousarray`` of an array that is contiguous already (nor ``reshape`` of one whose
strides allow a view; a ``reshape`` that copies is counted apart), nor ``may_share_memory`` (a
host-side bounds check); the total without them is what a GPU pays launches for
(docs/benchmarks.md quotes it). The row normalisation's kernels are counted but their work is
done by the reference on the host (in the simulator they take minutes at these sizes), and so
is batch norm's (the kernels' bodies written in NumPy: a step's values, not the kernels'). It also
counts the device-to-host reads (``float()``,
``bool()``, ``.get()``), each of which makes the host wait for the GPU.
"""

import collections
import os
import sys
import time
import types
from pathlib import Path

os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # before Numba is imported
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import fake_cupy  # noqa: E402
import gpu  # noqa: E402

from refmoco.kernels import cuda as kernels  # noqa: E402

FAKE = fake_cupy.FakeCupy()


class _Stream:  # what the bench's synchronisation needs of cupy.cuda
    def synchronize(self):
        pass


class _Event:  # what the bench's DeviceTimer needs: host clock times, everything done at once
    done = True

    def record(self, stream):
        self.at = time.perf_counter()

    def synchronize(self):
        pass


FAKE.cuda = types.SimpleNamespace(
    get_current_stream=_Stream, Event=_Event,
    get_elapsed_time=lambda start, end: (end.at - start.at) * 1e3,
    runtime=types.SimpleNamespace(getDeviceProperties=lambda i: {"name": b"CuPy stand-in"}))


def require_cupy():
    sys.modules["cupy"] = FAKE
    return FAKE


_launch = kernels._launch


def launch_on_payloads(kernel, blocks, *args):
    """The simulator computes on NumPy arrays: the stand-in's payloads, shared, so in-place
    kernels write into the device arrays."""
    return _launch(kernel, blocks, *(a._a if isinstance(a, fake_cupy.FakeDeviceArray) else a
                                     for a in args))


def install():
    sys.modules["cupy"] = FAKE
    gpu.require_cupy = require_cupy  # before the test modules import it
    kernels._launch = launch_on_payloads


def block_kernels_on_host():
    """Batch norm's kernels, and the row normalisation's, loop over a whole channel or row in
    each simulated thread: at the sizes of the GPU tests and the bench, an hour and more in the
    simulator. For those, the reference runs on the payloads instead (tests/test_cuda_sim.py
    runs the kernels themselves; ``count`` runs them, once)."""
    kernels.batch_norm_forward = fake_cupy.on_host_batch_norm_forward
    kernels.batch_norm_backward = fake_cupy.on_host_batch_norm_backward
    kernels.l2_normalize_rows = fake_cupy.on_host_l2_normalize_rows
    kernels.l2_normalize_rows_backward = fake_cupy.on_host_l2_normalize_rows_backward



def count_step_ops():
    """Device operations in the second MoCo step of each bench encoder, by name."""
    import numpy as np

    from refmoco.bench import _refmoco_moco_step, _step_specs

    counts = collections.Counter()
    call, setitem = fake_cupy._call, fake_cupy.FakeDeviceArray.__setitem__

    def counted_call(f, args, kwargs):
        name = getattr(f, "__name__", repr(f))
        if name == "ascontiguousarray":  # a view when it is contiguous already, else a copy
            a = args[0]._a if isinstance(args[0], fake_cupy.FakeDeviceArray) else args[0]
            dtype = kwargs.get("dtype", args[1] if len(args) > 1 else None)
            if not (a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype)):
                name = "ascontiguousarray (copies)"
        if name == "reshape":  # a view, or a copy of an array that is not contiguous enough
            source = getattr(f, "__self__", None)
            source = source if isinstance(source, np.ndarray) else args[0]
            source = source._a if isinstance(source, fake_cupy.FakeDeviceArray) else source
            out = call(f, args, kwargs)
            counts["reshape" if np.may_share_memory(out._a, source) else "reshape (copies)"] += 1
            return out
        counts[name] += 1
        return call(f, args, kwargs)

    def counted_setitem(self, idx, value):
        counts["setitem"] += 1
        return setitem(self, idx, value)

    def counted_launch(kernel, blocks, *args):
        counts["numba-cuda kernel"] += 1
        if kernel in normalizing:  # in the simulator: minutes at the bench's sizes
            return normalizing[kernel](*args)
        return launch_on_payloads(kernel, blocks, *args)

    def normalize_rows(x, y, denom, clamped, eps):  # the kernel's body, by the reference
        for out, ref in zip((y, denom, clamped), fake_cupy.on_host_l2_normalize_rows(x, eps)):
            out._a[...] = ref._a

    def normalize_rows_backward(y, dy, denom, clamped, dx):
        dx._a[...] = fake_cupy.on_host_l2_normalize_rows_backward(y, dy, denom, clamped)._a

    def bn_forward(x, gamma, beta, running_mean, running_var, inv_std, x_hat, y, train, eps,
                   keep, rate, unbias, counter, count):  # the kernel's body, in NumPy
        x, gamma, beta, rm, rv, inv_std, x_hat, y, counter = (
            a._a for a in (x, gamma, beta, running_mean, running_var, inv_std, x_hat, y, counter))
        if count:
            counter[0] += 1
        if train:
            mean64 = x.mean(axis=0, dtype=np.float64)
            var64 = ((x - mean64) ** 2).mean(axis=0)
            mean, var = mean64.astype(x.dtype), var64.astype(x.dtype)
            rm[...], rv[...] = rm * keep + rate * mean, rv * keep + rate * var * unbias
        else:
            mean, var = rm, rv
        inv_std[...] = 1 / np.sqrt(var + eps)
        x_hat[...] = (x - mean) * inv_std
        y[...] = gamma * x_hat + beta

    def bn_backward(dy, x_hat, gamma, inv_std, dx, dgamma, dbeta, train):
        dy, x_hat, gamma, inv_std, dx, dgamma, dbeta = (
            a._a for a in (dy, x_hat, gamma, inv_std, dx, dgamma, dbeta))
        m = dy.shape[0]
        sg, sb = (dy * x_hat).sum(axis=0, dtype=np.float64), dy.sum(axis=0, dtype=np.float64)
        dgamma[...], dbeta[...] = sg, sb
        if train:
            dx[...] = gamma * inv_std * (dy - sb / m - x_hat * (sg / m))
        else:
            dx[...] = dy * gamma * inv_std

    def relu_backward(dy, y, dx):
        dx._a[...] = dy._a * (y._a > 0)

    # in the simulator these take minutes at the bench's sizes: their work by NumPy instead
    normalizing = {}
    for t in (np.float32, np.float64):
        normalizing.update({kernels._normalize_kernel(t): normalize_rows,
                            kernels._normalize_backward_kernel(t): normalize_rows_backward,
                            kernels._bn_forward_kernel(t): bn_forward,
                            kernels._bn_backward_kernel(t): bn_backward,
                            kernels._relu_backward_kernel(t): relu_backward})

    def counted(label, method):  # a launch that does not go through fake_cupy._call
        def run(*args, **kwargs):
            counts[label] += 1
            return method(*args, **kwargs)

        return run

    getitem, asarray = fake_cupy.FakeDeviceArray.__getitem__, FAKE.asarray

    def counted_getitem(self, idx):  # a gather when the index holds arrays; a view otherwise
        parts = idx if isinstance(idx, tuple) else (idx,)
        if any(isinstance(i, (np.ndarray, list, fake_cupy.FakeDeviceArray)) for i in parts):
            counts["getitem (gathers)"] += 1
        return getitem(self, idx)

    def counted_asarray(a, *args, **kwargs):  # a host array: a copy to the device
        if not isinstance(a, fake_cupy.FakeDeviceArray):
            counts["asarray (host to device)"] += 1
        return asarray(a, *args, **kwargs)

    def counted_sync(name):  # a device-to-host read: the host waits for the GPU
        method = getattr(fake_cupy.FakeDeviceArray, name)

        def read(self, *args, **kwargs):
            counts[f"{name} (synchronises)"] += 1
            return method(self, *args, **kwargs)

        return read

    fake_cupy._call = counted_call
    fake_cupy.FakeDeviceArray.__setitem__ = counted_setitem
    fake_cupy.FakeDeviceArray.__getitem__ = counted_getitem
    FAKE.asarray = counted_asarray
    for op in ("add", "sub", "mul", "truediv", "floordiv", "pow", "matmul", "mod", "and", "or",
               "xor"):
        name = f"__i{op}__"
        setattr(fake_cupy.FakeDeviceArray, name,
                counted(f"{name} (in place)", getattr(fake_cupy.FakeDeviceArray, name)))
    for name in ("get", "__float__", "__int__", "__bool__"):
        setattr(fake_cupy.FakeDeviceArray, name, counted_sync(name))
    kernels._launch = counted_launch
    views = ("reshape", "transpose", "moveaxis", "ascontiguousarray", "T",  # no launch
             "may_share_memory")
    launcher_before = kernels.LAUNCHER
    for name, encoder, shape in _step_specs():
        rng, n = np.random.default_rng(0), 256
        xq, xk = (FAKE.asarray(rng.random((n, *shape), dtype=np.float32)) for _ in range(2))
        step = _refmoco_moco_step(encoder, "cupy", xq, xk, 4096, 0.1, 0.99, 0.03)  # a first step
        for launcher in kernels.LAUNCHERS:  # what dispatches on it: ReLU's backward kernel
            kernels.LAUNCHER = launcher
            counts.clear()
            step()
            syncs = sum(v for k, v in counts.items() if k.endswith("(synchronises)"))
            launches = sum(v for k, v in counts.items() if k not in views) - syncs
            print(f"{name}, {launcher} launch: {sum(counts.values()) - syncs} device operations, "
                  f"{launches} without views; {syncs} device-to-host reads")
            print("  " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
        kernels.LAUNCHER = launcher_before
    return 0


def main(argv):
    import pytest

    from refmoco import bench

    install()
    what = argv or ["tests", "bench"]
    if "count" in what:
        return count_step_ops()
    block_kernels_on_host()
    status = 0
    if "tests" in what:
        status |= pytest.main(["-q", "-p", "no:cacheprovider", "-m", "gpu", str(ROOT / "tests")])
    if "bench" in what:
        status |= bench.main(["--only", "gpu", "--quick", "--repeats", "1", "--inherit-env"])
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
