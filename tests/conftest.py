import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    print_blob=True,
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=60)
settings.register_profile("thorough", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(scope="module")
def torch():
    """PyTorch on one thread for the tests of a module (they skip without PyTorch): at these
    sizes its thread pool only fights NumPy's BLAS threads (20x slower on a busy 2-core machine)."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_torch_thread(torch):
    """The ``torch`` fixture, for modules that hold PyTorch in a module-level name."""
    return torch


@pytest.fixture
def without_numba(monkeypatch):
    """``import numba`` fails for the test's duration, as on a machine without Numba."""
    import builtins

    real_import = builtins.__import__

    def no_numba(name, *args, **kwargs):
        if name == "numba" or name.startswith("numba."):
            raise ImportError("no numba")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_numba)


@pytest.fixture
def read_only_folder(tmp_path):
    """An empty folder whose mode (0o555) forbids making files in it; skipped where this process
    may write there anyway (root, whose capabilities override the mode: ``os.geteuid() == 0``
    unless they were dropped). Made writable again afterwards, so that it can be removed."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("this process writes a read-only folder anyway (root): permissions are "
                        "not enforced")
        yield folder
    finally:
        folder.chmod(0o755)
