"""Argument checks shared by the public functions: each error names the argument."""

from __future__ import annotations

import math
from typing import Any

REDUCTIONS = ("mean", "sum")


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
    return reduction


def check_positive(value: Any, name: str) -> float:
    """A finite, strictly positive Python float."""
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: expected a positive number, got {value!r}") from exc
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return v


def check_unit_interval(value: Any, name: str) -> float:
    """A Python float in [0, 1]."""
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: expected a number in [0, 1], got {value!r}") from exc
    if not (0.0 <= v <= 1.0):
        raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
    return v


def check_int(value: Any, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int,)) and not hasattr(value, "__index__"):
        raise TypeError(f"{name}: expected an integer, got {value!r}")
    v = int(value)
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
