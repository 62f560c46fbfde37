"""Which array module and which kernels run a call.

Every public function starts with ``be = resolve(backend, *arrays)``. The reference code is then
written once against ``be.xp`` (NumPy or CuPy); a hot operation has one visible branch to
``be.kernels`` (``None`` for the NumPy reference, Numba CPU kernels for ``"numba"``, Numba CUDA
kernels for ``"cupy"``).

CuPy arrays are recognised by their type's module, so ``import refmoco`` never imports CuPy or
Numba; they are imported the first time a backend that needs them is used.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

BACKENDS = ("numpy", "numba", "cupy")
# the dtypes the Numba and CUDA kernels compute in; anything else runs the NumPy reference code
KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class BackendUnavailableError(RuntimeError):
    """The requested backend is not installed or has no device."""


@dataclass(frozen=True)
class Backend:
    """A resolved backend: its ``name``, its array module ``xp`` and its fast ``kernels``."""

    name: str
    xp: ModuleType = field(repr=False)

    @property
    def kernels(self) -> Any:
        """The module of fast kernels, or ``None`` for the NumPy reference."""
        if self.name == "numba":
            return importlib.import_module("refmoco.kernels.cpu")
        if self.name == "cupy":
            return importlib.import_module("refmoco.kernels.cuda")
        return None


NUMPY = Backend("numpy", np)


def is_cupy_array(x: Any) -> bool:
    """True for a CuPy ndarray, checked without importing CuPy."""
    return type(x).__module__.split(".")[0] == "cupy" and "cupy" in sys.modules


def _on_gpu(x: Any) -> bool:
    """A CuPy array, or a tensor whose DLPack device is CUDA (a torch/JAX GPU tensor)."""
    if isinstance(x, np.ndarray):
        return False
    if is_cupy_array(x):
        return True
    device = getattr(x, "__dlpack_device__", None)
    if device is None:
        return False
    try:
        return int(device()[0]) in _CUDA_DEVICES
    except Exception:
        return False


_CUDA_DEVICES = (2, 3, 13)  # kDLCUDA, kDLCUDAHost, kDLCUDAManaged


def _is_torch_tensor(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _cupy() -> ModuleType:
    try:
        import cupy
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise BackendUnavailableError(
            "backend='cupy' needs CuPy and a CUDA GPU: pip install 'refmoco[gpu]' "
            "(CUDA 12; 'refmoco[gpu-cuda13]' for CUDA 13)"
        ) from exc
    if not cupy.is_available():  # pragma: no cover - depends on the machine
        raise BackendUnavailableError(
            "backend='cupy': CuPy is installed but no CUDA device is available"
        )
    return cupy


def _check_numba() -> None:
    try:
        import numba  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError(
            "backend='numba' needs Numba: pip install 'refmoco[numba]'"
        ) from exc


def as_array(x: Any, name: str) -> Any:
    """Return ``x`` as a NumPy or CuPy array, without a copy where the libraries allow.

    NumPy and CuPy arrays pass through. PyTorch/JAX tensors come in through DLPack: CPU tensors
    become NumPy arrays, CUDA tensors CuPy arrays. float16/bfloat16 tensors are widened to
    float32 (NumPy has no bfloat16). Anything else with ``__array__`` (lists, scalars) goes
    through ``np.asarray``.
    """
    if isinstance(x, np.ndarray) or is_cupy_array(x):
        return x
    if _is_torch_tensor(x):
        x = x.detach()
        if str(x.dtype) in ("torch.float16", "torch.bfloat16"):
            x = x.float()
        if x.device.type == "cuda":
            return _cupy().from_dlpack(x)
        return np.from_dlpack(x.contiguous())
    if hasattr(x, "__dlpack_device__") and hasattr(x, "__dlpack__"):
        device_type = int(x.__dlpack_device__()[0])
        if str(getattr(x, "dtype", "")) == "bfloat16":
            x = x.astype("float32")
        if device_type in _CUDA_DEVICES:
            return _cupy().from_dlpack(x)
        return np.from_dlpack(x)
    try:
        return np.asarray(x)
    except Exception as exc:
        raise TypeError(f"{name}: expected an array, got {type(x).__name__}") from exc


def float_array(x: Any, name: str, *, ndim: int | None = None) -> Any:
    """``as_array`` plus the float checks every float argument gets.

    Integer and boolean arrays are a ``TypeError`` (no silent conversion); float16 (and
    bfloat16) are computed in float32; float32 and float64 are kept as they are.
    """
    a = as_array(x, name)
    if a.dtype.kind == "f":
        if a.dtype.itemsize == 2:  # float16
            a = a.astype(np.float32)
    elif a.dtype.name == "bfloat16":  # ml_dtypes' bfloat16
        a = a.astype(np.float32)
    else:
        raise TypeError(f"{name}: expected a floating-point array, got dtype {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d array, got shape {tuple(a.shape)}")
    return a


def check_available(backend: str | None) -> None:
    """Raise :class:`BackendUnavailableError` (saying what to install) when ``backend`` is
    ``"numba"`` without Numba or ``"cupy"`` without CuPy and a GPU; other values pass."""
    if backend == "numba":
        _check_numba()
    elif backend == "cupy":
        _cupy()


def resolve(backend: str | None, *arrays: Any) -> Backend:
    """Resolve ``backend=`` against the arrays of a call.

    ``None`` infers from the arrays (CuPy arrays: ``"cupy"``, otherwise ``"numpy"``). An explicit
    backend is validated against the arrays: it never copies between host and device behind the
    caller's back, and NumPy and CuPy arrays are never mixed.
    """
    on_gpu = [_on_gpu(a) for a in arrays if a is not None]
    if any(on_gpu) and not all(on_gpu):
        raise TypeError("mixed NumPy and CuPy arrays in one call: move them to one device first")
    gpu = bool(on_gpu) and all(on_gpu)
    if backend is None:
        backend = "cupy" if gpu else "numpy"
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
    if backend == "cupy":
        cupy = _cupy()
        if on_gpu and not gpu:
            raise TypeError("backend='cupy' got NumPy arrays: pass CuPy arrays (cupy.asarray(x))")
        return Backend("cupy", cupy)
    if gpu:
        raise TypeError(
            f"backend={backend!r} got CuPy arrays: use backend='cupy' or move them to the host"
        )
    if backend == "numba":
        _check_numba()
        return Backend("numba", np)
    return NUMPY


def to_numpy(x: Any) -> np.ndarray:
    """Return ``x`` as a NumPy array (a device-to-host copy for CuPy arrays)."""
    if is_cupy_array(x):
        return x.get()
    return np.asarray(as_array(x, "x"))


def host_copy(x: Any) -> np.ndarray:
    """A NumPy copy of ``x`` (a device-to-host copy of a CuPy array; PyTorch/JAX tensors through
    :func:`to_numpy`): what state dicts and checkpoints store."""
    return x.get() if is_cupy_array(x) else np.array(to_numpy(x), copy=True)


def array_module(name: str) -> ModuleType:
    """The array module of a backend name (used by stateful objects such as ``Queue``)."""
    return _cupy() if name == "cupy" else np


# -- where an array lives: used by the stateful training code (refmoco.nn, optimizers, mechanisms)


def namespace_of(*arrays: Any) -> ModuleType:
    """The array module that computes on ``arrays``: CuPy for CuPy arrays, NumPy otherwise.

    Entries that are neither NumPy nor CuPy arrays (``None``, Python scalars) are ignored. NumPy
    and CuPy arrays together are a ``TypeError``: nothing is copied between host and device
    behind the caller's back.

    Examples
    --------
    >>> import numpy as np
    >>> namespace_of(np.ones(2), None, 1.5) is np
    True
    """
    gpu = host = False
    for a in arrays:
        if is_cupy_array(a):
            gpu = True
        elif isinstance(a, np.ndarray):
            host = True
    if gpu and host:
        raise TypeError("mixed NumPy and CuPy arrays: move them to one device first")
    return sys.modules["cupy"] if gpu else np


def backend_of(x: Any) -> str:
    """``"cupy"`` for a CuPy array, ``"numpy"`` for anything else (a host array)."""
    return "cupy" if is_cupy_array(x) else "numpy"


def check_device(x: Any, name: str, xp: ModuleType) -> None:
    """Raise a ``TypeError`` naming ``name`` unless ``x`` lives where ``xp`` computes.

    ``xp`` is NumPy (``x`` must be a host array) or CuPy (``x`` must be a CuPy array).
    """
    want_gpu = xp is not np
    if is_cupy_array(x) != want_gpu:
        got = f"{type(x).__module__.split('.')[0]}.{type(x).__name__}"
        if want_gpu:
            raise TypeError(f"{name}: expected a CuPy array (the model lives on the GPU), got "
                            f"{got}: move it with cupy.asarray(...)")
        raise TypeError(f"{name}: expected a NumPy array (the model lives on the host), got "
                        f"{got}: move it with refmoco.backend.to_numpy(...)")


def to_backend(x: Any, backend: str) -> Any:
    """``x`` where ``backend`` computes: a CuPy array for ``"cupy"``, a NumPy array otherwise.

    The explicit transfer (a data loader's host-to-device copy, a checkpoint's load): a copy
    only when the array moves; an array already there is returned as it is.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "cupy":
        return _cupy().asarray(as_array(x, "x"))
    return to_numpy(x)
