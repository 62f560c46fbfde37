"""The momentum (exponential moving average) update of MoCo's key encoder, and its schedule."""

from __future__ import annotations

import bisect
import math
from typing import Any

import numpy as np

from ._checks import check_int, check_unit_interval
from .backend import (
    _CUDA_DEVICES,
    KERNEL_DTYPES,
    _cupy,
    _is_torch_tensor,
    as_array,
    is_cupy_array,
    resolve,
)


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
    if t.size and any(stride == 0 and n > 1 for n, stride in zip(t.shape, t.strides)):
        raise ValueError(f"target{path}: its elements overlap (a stride of 0, as in an expanded "
                         f"tensor), so an update in place is ambiguous")
    return [(path, t, s)]


def _span(a: Any) -> tuple[int, int]:
    """The bytes ``[lo, hi)`` a NumPy array can touch, from its data pointer and strides."""
    lo = hi = a.__array_interface__["data"][0]
    if a.size == 0:
        return lo, lo
    for n, stride in zip(a.shape, a.strides):
        if stride > 0:
            hi += (n - 1) * stride
        else:
            lo += (n - 1) * stride
    return lo, hi + a.itemsize


def _owner(a: Any) -> Any:
    """The NumPy array that allocated ``a``'s memory, or None when something else holds it (a
    DLPack capsule, a buffer): then only the addresses can tell what ``a`` shares."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a if a.base is None else None


def _read_first(pairs: list, xp: Any) -> set[int]:
    """The pairs whose source may share memory with any target (its own, or one updated before
    it): their sources are copied before anything is written. NumPy: a source whose memory was
    allocated by another array than every target's shares nothing with them (the usual case,
    decided without addresses); the others are checked against the byte spans of all targets,
    sorted (O(L log L) for L leaves). CuPy: pair by pair."""
    if xp is not np:
        targets = [t for _, t, _ in pairs]
        return {i for i, (_, _, s) in enumerate(pairs)
                if any(xp.may_share_memory(s, t) for t in targets)}
    owners = [_owner(t) for _, t, _ in pairs]
    if all(o is not None for o in owners):
        allocations = {id(o) for o in owners}
        suspects = [i for i, (_, _, s) in enumerate(pairs)
                    if (o := _owner(s)) is None or id(o) in allocations]
    else:
        suspects = list(range(len(pairs)))
    if not suspects:
        return set()
    spans = sorted(_span(t) for _, t, _ in pairs)
    starts = [lo for lo, _ in spans]
    reach, top = [], 0  # reach[j]: the largest end among the first j + 1 spans
    for _, hi in spans:
        top = max(top, hi)
        reach.append(top)
    overlapping = set()
    for i in suspects:
        lo, hi = _span(pairs[i][2])
        j = bisect.bisect_left(starts, hi)  # the spans that start before the source ends
        if hi > lo and j and reach[j - 1] > lo:
            overlapping.add(i)
    return overlapping


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
    A dtype mismatch is allowed: the source is read in the target's dtype, except that float16
    and bfloat16 targets are computed in float32 and rounded once. A source that shares memory
    with any target (``source is target``, or ``[a, b]`` updated from ``[b, a]``) is read before
    anything is written. PyTorch and other DLPack tensors are updated in place, whatever their
    strides; a target whose memory cannot be shared (a list, a bfloat16 tensor) is a
    ``TypeError`` rather than a copy updated in silence, and one whose elements overlap (a
    stride of 0) a ``ValueError``.

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
    read_first = _read_first(pairs, be.xp)
    pairs = [(p, t, s.copy() if i in read_first else s) for i, (p, t, s) in enumerate(pairs)]
    for _, t, s in pairs:
        if t.dtype.itemsize == 2:  # float16 or bfloat16: in float32, rounded once into t
            m32, w32 = np.float32(m), np.float32(1.0 - m)
            t[...] = (t.astype(np.float32) * m32 + w32 * s.astype(np.float32)).astype(t.dtype)
        elif be.kernels is not None and t.dtype in KERNEL_DTYPES:
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
