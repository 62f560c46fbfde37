"""The GPU checks of scripts/gpu_check.sh without a GPU: the tests marked ``gpu`` and
``refmoco bench --only gpu``, run on the CuPy stand-in of the tests (tests/fake_cupy.py: NumPy
arrays that refuse what CuPy refuses) with the Numba CUDA kernels in Numba's CUDA simulator.

What it proves: the GPU tests, the bench's GPU groups and every ``backend="cupy"`` dispatch run
and agree with the references before device time is spent on them. What it cannot: CuPy's own
kernels and numerics, the real launch path (streams, ``__cuda_array_interface__``) and any timing
(the simulator is ~10^4 times slower than a GPU). PyTorch CUDA cases are left out without CUDA.

    python scripts/gpu_dryrun.py tests      # the 43 GPU tests: about 3.5 minutes on 2 cores
    python scripts/gpu_dryrun.py bench      # the GPU benchmark groups, once each: about 9 minutes
    python scripts/gpu_dryrun.py            # both
"""

import os
import sys
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


FAKE.cuda = types.SimpleNamespace(
    get_current_stream=_Stream,
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


def main(argv):
    import pytest

    from refmoco import bench

    install()
    what = argv or ["tests", "bench"]
    status = 0
    if "tests" in what:
        status |= pytest.main(["-q", "-p", "no:cacheprovider", "-m", "gpu", str(ROOT / "tests")])
    if "bench" in what:
        status |= bench.main(["--only", "gpu", "--quick", "--repeats", "1", "--inherit-env"])
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
