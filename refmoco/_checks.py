"""Argument checks shared by the public functions: each error names the argument."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

import numpy as np

REDUCTIONS = ("mean", "sum")


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
    return reduction


def _is_real_dtype(dtype: Any) -> bool:
    """An integer or floating dtype: NumPy's (NumPy, CuPy, JAX arrays) or PyTorch's."""
    try:
        return np.dtype(dtype).kind in "iuf"
    except TypeError:  # torch.dtype: not one NumPy knows
        return bool(getattr(dtype, "is_floating_point", False)) or str(dtype).startswith(
            ("torch.int", "torch.uint"))


def real_number(value: Any, name: str, expected: str = "a real number") -> float:
    """``value`` as a Python float, if it is a real number: a Python or NumPy int or float (or
    another ``numbers.Real``), or a 0-d array or tensor of an integer or float dtype.

    A ``bool`` (``True`` would silently be 1), a string (``"0.1"``, which ``float()`` would
    parse), a complex number or anything else is a ``TypeError`` naming the argument. The
    range is the caller's to check.
    """
    if isinstance(value, (bool, np.bool_, str, bytes)):
        ok = False
    elif isinstance(value, numbers.Real):
        ok = True
    else:  # a 0-d array or tensor (np.array(0.1), torch.tensor(0.1))
        ok = getattr(value, "shape", None) == () and _is_real_dtype(getattr(value, "dtype", None))
    if not ok:
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__} {value!r}")
    return float(value)


def check_positive(value: Any, name: str) -> float:
    """A finite, strictly positive Python float (see :func:`real_number` for the types)."""
    v = real_number(value, name, "a positive number")
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return v


def check_seed(value: Any, name: str = "seed") -> int:
    """A seed: an integer in ``[0, SEED_MAX]`` (scikit-learn's ``random_state`` refuses larger
    ones, and would only at the first linear probe, after a run has started)."""
    v = check_int(value, name, minimum=0)
    if v > SEED_MAX:
        raise ValueError(f"{name}: expected an integer <= {SEED_MAX} (2**32 - 1), got {v}")
    return v


def check_temperature(temperature: Any, dtype: Any = "float32") -> float:
    """A temperature as a float: finite, > 0, and with ``1 / temperature`` (the logits' scale)
    finite in ``dtype`` (below ~2.9e-39 it overflows float32, and every logit would be inf or
    NaN); a ``ValueError`` or ``TypeError`` naming ``temperature``."""
    t = check_positive(temperature, "temperature")
    dt = np.dtype(dtype)
    if dt.kind != "f" or dt.itemsize < 4:  # half inputs are computed in float32
        dt = np.dtype(np.float32)
    with np.errstate(over="ignore"):
        scale = dt.type(1.0 / t)
    if not np.isfinite(scale):
        smallest = 1.0 / float(np.finfo(dt).max)
        raise ValueError(f"temperature: expected a number > {smallest:.3g} (1 / temperature must "
                         f"be finite in {dt.name}), got {temperature!r}")
    return t


def check_finite(value: Any, name: str, *, lower: float = 0.0, upper: float = math.inf) -> float:
    """A finite Python float in ``[lower, upper]`` (see :func:`real_number` for the types): the
    rule of hyper-parameters (learning rates, momenta) and tolerances, where a NaN or an
    infinity would pass every comparison."""
    v = real_number(value, name)
    if not (math.isfinite(v) and lower <= v <= upper):
        bound = f"in [{lower:g}, {upper:g}]" if math.isfinite(upper) else f">= {lower:g}"
        raise ValueError(f"{name}: expected a finite number {bound}, got {value!r}")
    return v


def check_unit_interval(value: Any, name: str) -> float:
    """A Python float in [0, 1] (see :func:`real_number` for the types)."""
    v = real_number(value, name, "a number in [0, 1]")
    if not (0.0 <= v <= 1.0):
        raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
    return v


SEED_MAX = 2**32 - 1  # the largest random_state scikit-learn takes (the linear probes' seed)


def check_int(value: Any, name: str, *, minimum: int) -> int:
    """A Python int >= ``minimum`` from an int or an integer NumPy scalar or 0-d array (through
    ``operator.index``: a float, a bool or a 0-d float array such as ``np.array(2.5)`` is a
    TypeError, never truncated)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected an integer, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an integer, got {value!r}") from None
    if v < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {v}")
    return v


def check_wrt(wrt: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """Normalise ``wrt=`` to a tuple of argument names, all of them in ``allowed``."""
    if wrt is None:
        return allowed
    if isinstance(wrt, str):
        wrt = (wrt,)
    wrt = tuple(wrt)
    unknown = [w for w in wrt if w not in allowed]
    if unknown:
        raise ValueError(f"wrt: {unknown} not among the differentiable arguments {allowed}")
    return wrt


def check_same_dtype(arrays: dict[str, Any]) -> Any:
    """All float arguments of one call must share one dtype (no silent upcast)."""
    dtypes = {name: a.dtype for name, a in arrays.items() if a is not None}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{n}: {d}" for n, d in dtypes.items())
        raise TypeError(f"arguments must share one float dtype, got {listing}")
    return next(iter(dtypes.values()))


def check_same_device(value: Any, name: str, on_gpu: bool, others: str) -> None:
    """A non-float argument (labels, a pair's 0/1 ``y``, a cotangent ``dy``) must live where the
    call's float arrays ``others`` do (on the GPU when ``on_gpu``): NumPy and CuPy arrays are
    never mixed, and nothing is copied between host and device behind the caller's back. A
    Python list counts as host data. The error is ``resolve()``'s, naming the argument."""
    from .backend import _on_gpu

    here = _on_gpu(value)
    if here != on_gpu:
        what = f"a {type(value).__name__} on the GPU" if here else f"a host {type(value).__name__}"
        there = "CuPy (GPU) arrays" if on_gpu else "host (NumPy) arrays"
        move = "cupy.asarray(...)" if on_gpu else "refmoco.to_numpy(...)"
        raise TypeError(f"{name}: mixed NumPy and CuPy arrays in one call: {name} is {what}, "
                        f"the call's other arrays ({others}) are {there}; move it with {move}")
