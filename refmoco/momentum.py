"""The momentum (exponential moving average) update of MoCo's key encoder, and its schedule."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._checks import check_int, check_unit_interval
from .backend import _CUDA_DEVICES, _cupy, _is_torch_tensor, as_array, is_cupy_array, resolve

_HALF = ("float16", "bfloat16")  # computed in float32, rounded once into the target


def _in_place(x: Any, name: str) -> Any:
    """``x`` as a NumPy or CuPy array that shares its memory, so that writing into it updates
    ``x``: NumPy and CuPy arrays as they are, tensors through DLPack (any strides). Anything
    that cannot be shared so (a list, a bfloat16 tensor, which NumPy cannot import) is a
    ``TypeError``: updating a copy would leave ``x`` as it was without a word."""
    if isinstance(x, np.ndarray) or is_cupy_array(x):
        return x
    if not (hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__")):
        raise TypeError(f"{name}: expected a writeable float array, got {type(x).__name__}")
    if _is_torch_tensor(x):
        x = x.detach()
    if str(getattr(x, "dtype", "")).endswith("bfloat16"):
        raise TypeError(f"{name}: a bfloat16 {type(x).__name__} cannot be updated in place (NumPy "
                        "and CuPy cannot import bfloat16 through DLPack); keep the key encoder in "
                        "float32 or float16, or pass an ml_dtypes.bfloat16 NumPy array")
    on_gpu = int(x.__dlpack_device__()[0]) in _CUDA_DEVICES
    try:
        return _cupy().from_dlpack(x) if on_gpu else np.from_dlpack(x)
    except (BufferError, TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name}: the memory of this {type(x).__name__} cannot be shared through "
                        f"DLPack, so it cannot be updated in place ({exc})") from exc


def _is_float(a: Any) -> bool:
    return a.dtype.kind == "f" or a.dtype.name == "bfloat16"  # ml_dtypes' bfloat16: kind "V"


def _leaves(target: Any, source: Any, path: str) -> list[tuple[str, Any, Any]]:
    """Pair the arrays of ``target`` and ``source`` (array, list, tuple or dict), checking
    structure, shapes and dtypes before anything is written."""
    if isinstance(target, dict):
        if not isinstance(source, dict) or set(target) != set(source):
            raise ValueError(f"source{path}: expected a dict with the keys of target")
        pairs = []
        for key in target:
            pairs += _leaves(target[key], source[key], f"{path}[{key!r}]")
        return pairs
    if isinstance(target, (list, tuple)):
        if not isinstance(source, (list, tuple)) or len(source) != len(target):
            raise ValueError(f"source{path}: expected a list/tuple of length {len(target)}")
        pairs = []
        for i, (t, s) in enumerate(zip(target, source)):
            pairs += _leaves(t, s, f"{path}[{i}]")
        return pairs
    t = _in_place(target, f"target{path}")
    s = as_array(source, f"source{path}")
    if not _is_float(t):
        raise TypeError(f"target{path}: expected a floating-point array, got dtype {t.dtype}")
    if not _is_float(s):
        raise TypeError(f"source{path}: expected a floating-point array, got dtype {s.dtype}")
    if t.shape != s.shape:
        raise ValueError(f"source{path}: expected shape {tuple(t.shape)}, got {tuple(s.shape)}")
    if not getattr(getattr(t, "flags", None), "writeable", True):  # CuPy arrays have no flag
        raise ValueError(f"target{path}: the array is read-only")
    return [(path, t, s)]


def momentum_update(target, source, momentum, *, backend=None):
    r"""In place, ``target = momentum * target + (1 - momentum) * source``.

    MoCo's key encoder follows the query encoder this way, with ``momentum = 0.999``.

    Parameters
    ----------
    target : ndarray, or list / tuple / dict of ndarrays
        Updated in place (the key encoder's parameters).
    source : same structure and shapes as ``target``
        Read only (the query encoder's parameters).
    momentum : float in [0, 1]
        1 keeps ``target``; 0 copies ``source``.
    backend : {None, "numpy", "numba", "cupy"}

    Returns
    -------
    target : ndarray, or list / tuple / dict of ndarrays
        The same object that was passed in, updated in place.

    Raises
    ------
    ValueError
        ``momentum`` outside [0, 1], mismatched structure or shapes, a read-only target.
    TypeError
        Non-float arrays, a target that is not an array.
        Every check runs before anything is written: a rejected call changes nothing.

    Notes
    -----
    .. math:: \theta_k \leftarrow m\,\theta_k + (1 - m)\,\theta_q

    No gradient flows through this update: the key encoder is never trained by backpropagation.
    A dtype mismatch is allowed (the source is read in the target's dtype). float16 and bfloat16
    targets are computed in float32 and rounded once. A source that shares memory with its
    target (even ``source is target``) is read before anything is written. PyTorch and other
    DLPack tensors are updated in place, whatever their strides; a target whose memory cannot be
    shared (a list, a bfloat16 tensor) is a ``TypeError`` rather than a copy updated in silence.

    Examples
    --------
    >>> import numpy as np, refmoco
    >>> t = {"w": np.zeros(3)}; s = {"w": np.ones(3)}
    >>> refmoco.momentum_update(t, s, 0.9)["w"]
    array([0.1, 0.1, 0.1])
    """
    m = check_unit_interval(momentum, "momentum")
    pairs = _leaves(target, source, "")
    be = resolve(backend, *(t for _, t, _ in pairs), *(s for _, _, s in pairs))
    for _, t, s in pairs:
        xp = be.xp
        if xp.may_share_memory(t, s):  # source is target, or overlaps it: read it first
            s = s.copy()
        if t.dtype.name in _HALF:  # in float32, rounded once into the target
            m32, w32 = np.float32(m), np.float32(1.0 - m)
            t[...] = (t.astype(np.float32) * m32 + w32 * s.astype(np.float32)).astype(t.dtype)
        elif be.kernels is not None:
            be.kernels.momentum_update(t, s, m)  # one fused pass over memory
        else:
            t *= t.dtype.type(m)
            t += t.dtype.type(1.0 - m) * s.astype(t.dtype, copy=False)
    return target


def cosine_momentum(step, total_steps, base=0.99, final=1.0):
    r"""The momentum at ``step``: from ``base`` up to ``final`` along a half cosine.

    Used by BYOL and MoCo v3: :math:`m = f - (f - b)\,\tfrac12\,(1 + \cos(\pi\,s / S))`.

    Parameters
    ----------
    step : int in [0, total_steps]
    total_steps : int > 0
    base, final : float in [0, 1]

    Examples
    --------
    >>> from refmoco import cosine_momentum
    >>> cosine_momentum(0, 100), cosine_momentum(100, 100)
    (0.99, 1.0)
    """
    total = check_int(total_steps, "total_steps", minimum=1)
    s = check_int(step, "step", minimum=0)
    if s > total:
        raise ValueError(f"step: expected an integer in [0, total_steps={total}], got {s}")
    b = check_unit_interval(base, "base")
    f = check_unit_interval(final, "final")
    return f - (f - b) * (1.0 + math.cos(math.pi * s / total)) / 2.0
