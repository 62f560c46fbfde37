"""Finite-difference gradient checks and dtype-aware comparisons."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from .._checks import check_finite, check_int, check_positive
from ..backend import to_numpy


class GradCheck(NamedTuple):
    """The outcome of ``check_grad``: the worst relative error and one error per argument."""

    max_rel_error: float
    errors: dict  # argument name -> worst relative error seen for its gradient


def default_tolerance(dtype) -> float:
    """Relative tolerance for results computed in ``dtype``: ``1e-12`` for float64 (about 4500
    ulps), ``100 * eps`` (about 1.2e-5) for float32, and ``0.0`` for integer and
    boolean dtypes (they are compared exactly). Other dtypes (complex, object, strings) are a
    ``TypeError``, and so are ml_dtypes' bfloat16 and float8 types: ``assert_close`` compares
    them in float32, with float32's tolerance."""
    dt = _numeric_dtype(dtype, "dtype")
    if _is_ml_float(dt):
        raise TypeError(f"dtype: {dt.name} has no tolerance of its own: refmoco compares it in "
                        "float32 (default_tolerance('float32')); pass rtol= to accept more")
    if dt.kind in "iub":
        return 0.0
    return 1e-12 if dt == np.float64 else 100 * _eps(dt)


def _numeric_dtype(dtype, arg: str) -> np.dtype:
    """``dtype`` as a NumPy dtype of a real float, integer or boolean kind, else a TypeError."""
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"{arg}: not a NumPy dtype: {dtype!r}") from exc
    if dt.kind in "fiub" or _is_ml_float(dt):
        return dt
    if dt.kind == "c":
        raise TypeError(f"{arg}: complex dtype {dt.name} is not supported: compare the real "
                        "and imaginary parts (x.real, x.imag) separately")
    raise TypeError(f"{arg}: expected a real float, integer or boolean dtype, got {dt.name}")


def _is_ml_float(dt: np.dtype) -> bool:
    """ml_dtypes' floats (bfloat16, float8_*): NumPy arrays of kind 'V' that JAX uses."""
    return dt.kind == "V" and (dt.name.startswith("float") or dt.name == "bfloat16")


def _eps(dt: np.dtype) -> float:
    """The machine epsilon of a float dtype; 0 for integers and booleans (exact)."""
    return 0.0 if dt.kind in "iub" else float(np.finfo(dt).eps)


def rel_error(a, b, tiny: float = 1e-300) -> float:
    """``max|a - b| / max(max(|a| + |b|), tiny)``."""
    a = np.asarray(to_numpy(a), dtype=np.float64)
    b = np.asarray(to_numpy(b), dtype=np.float64)
    scale = float(np.max(np.abs(a) + np.abs(b), initial=0.0))
    return float(np.max(np.abs(a - b), initial=0.0)) / max(scale, tiny)


def _dtype_name(x) -> str | None:
    """The dtype of ``x`` as the caller made it, as a NumPy name: before ``to_numpy`` widens
    float16/bfloat16 tensors to float32. None for values without a dtype (lists, floats)."""
    dt = getattr(x, "dtype", None)
    if dt is None:
        return None
    if type(x).__module__.split(".")[0] == "torch":
        return str(dt).removeprefix("torch.")
    try:
        return np.dtype(dt).name
    except TypeError:
        return str(dt)


def _real_array(x, arg: str) -> tuple[np.ndarray, str]:
    """``x`` on the host as a NumPy array of a real float, integer or boolean dtype (ml_dtypes'
    floats widened to float32), with the name of the dtype it came in."""
    name = _dtype_name(x)
    if name is not None and name.startswith("complex"):
        _numeric_dtype(np.complex128, arg)  # the TypeError, before anything is converted
    a = to_numpy(x)
    _numeric_dtype(a.dtype, arg)
    if _is_ml_float(a.dtype):
        a = a.astype(np.float32)
    return a, name if name is not None else a.dtype.name


def assert_close(actual, expected, *, rtol: float | None = None, atol: float = 0.0,
                 scale: float | None = None, check_dtype: bool = True,
                 name: str = "value") -> None:
    """Assert two arrays agree within a tolerance chosen by their dtype.

    The comparison is ``|a - e| <= atol + rtol * max(max|e|, scale)`` elementwise, where
    ``max|e|`` is the largest magnitude of the **finite** entries of ``expected`` (errors of sums
    and products are relative to the size of the terms, not of each entry). ``rtol`` defaults
    to ``default_tolerance`` of the less precise dtype, as the arrays came in (a float16 tensor,
    compared in float32, has float16's tolerance). Shapes must match, and dtypes too when
    ``check_dtype`` (a float16 tensor is float16 there too).

    ``scale`` is for results that are **smaller than the terms they were computed from** (a
    cancellation), whose round-off follows the terms, not the result: an InfoNCE loss near 0 is
    a difference of logits of size up to ``1/T``, and a gradient entry ``(p - 1) / (N T)`` near
    0 comes from terms of size ``1/(N T)`` (unit rows, mean over ``N``). Pass the size of those
    terms (``scale=1/T`` for the loss, ``scale=1/(N*T)`` for its gradients): ``rtol`` then holds
    relative to them. It never loosens a comparison of results as large as their terms.

    Non-finite entries must match exactly: NaN where ``expected`` has NaN (two NaNs agree),
    ``inf`` and ``-inf`` where it has the same infinity; any other entry facing a non-finite one
    differs. Integer and boolean arrays are compared exactly (in integer arithmetic) unless
    ``rtol`` or ``atol`` are given. Complex and other non-real arrays are a ``TypeError``
    naming the argument; a negative or non-finite ``rtol`` / ``atol`` / ``scale`` a
    ``ValueError``.

    A difference is an ``AssertionError`` saying how many entries differ and showing the worst
    (the first non-finite mismatch, if any).
    """
    a, a_dtype = _real_array(actual, "actual")
    e, e_dtype = _real_array(expected, "expected")
    atol = check_finite(atol, "atol")
    floor = 0.0 if scale is None else check_finite(scale, "scale")
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {a.shape} != expected {e.shape}")
    if check_dtype and a_dtype != e_dtype:
        raise AssertionError(f"{name}: dtype {a_dtype} != expected {e_dtype}")
    if rtol is None:
        a_tol, e_tol = _tolerance_dtype(a, a_dtype), _tolerance_dtype(e, e_dtype)
        rtol = default_tolerance(a_tol if _eps(a_tol) > _eps(e_tol) else e_tol)
    rtol = check_finite(rtol, "rtol")
    if a.dtype.kind in "iub" and e.dtype.kind in "iub":
        bad, err, scale, shown = _integer_errors(a, e, atol, rtol, floor)
    else:
        bad, err, scale, shown = _float_errors(a, e, atol, rtol, floor)
    if bad.any():
        where = tuple(int(i) for i in np.unravel_index(int(np.argmax(np.where(bad, err, -1))),
                                                       a.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.size} entries differ; worst at {where}: "
            f"{shown[0][where]!r} vs expected {shown[1][where]!r} (atol={atol}, rtol={rtol}, "
            f"scale={scale})"
        )


def _tolerance_dtype(a: np.ndarray, came_in: str) -> np.dtype:
    """The dtype whose default tolerance applies: float16 as it came in (a float16 tensor
    arrives widened to float32), else the dtype compared (bfloat16 and float8: float32)."""
    return np.dtype(np.float16) if came_in == "float16" else a.dtype


def _float_errors(a, e, atol, rtol, floor=0.0):
    """(differs, error (inf for a non-finite mismatch), scale, the arrays to show) in float64."""
    a64, e64 = a.astype(np.float64), e.astype(np.float64)
    finite = np.isfinite(a64) & np.isfinite(e64)
    scale = max(float(np.max(np.abs(e64), initial=0.0, where=np.isfinite(e64))), floor)
    with np.errstate(over="ignore", invalid="ignore"):
        err = np.where(finite, np.abs(np.where(finite, a64, 0.0) - np.where(finite, e64, 0.0)),
                       0.0)
    same = (a64 == e64) | (np.isnan(a64) & np.isnan(e64))
    nonfinite = ~finite & ~same
    bad = (finite & (err > atol + rtol * scale)) | nonfinite
    return bad, np.where(nonfinite, np.inf, err), scale, (a64, e64)


def _integer_errors(a, e, atol, rtol, floor=0.0):
    """The same for two integer/boolean arrays, in exact integer arithmetic (Python ints)."""
    bad = np.asarray(a != e)
    err = np.zeros(a.shape)
    scale = max(int(e.max()), -int(e.min())) if e.size else 0  # max|e|, exact (no abs overflow)
    scale = scale if scale >= floor else floor
    if bad.any():
        idx = np.nonzero(bad)
        diff = [abs(int(x) - int(y)) for x, y in zip(a[idx], e[idx])]
        bound = atol + rtol * scale
        bad[idx] = [d > bound for d in diff]  # int > float compares exactly
        err[idx] = [float(d) for d in diff]
    return bad, err, scale, (a, e)


def _call(fun: Callable, inputs: dict):
    out = fun(**inputs)
    if not (isinstance(out, (tuple, list)) and len(out) >= 2):
        raise TypeError(f"fun: expected it to return (loss, grads), got {type(out).__name__}")
    loss, grads = out[0], out[1]
    if not isinstance(grads, Mapping):
        raise TypeError("fun: expected grads (the second value it returns) to be a dict by "
                        f"argument name, got {type(grads).__name__}")
    value = np.asarray(to_numpy(loss))
    if value.size != 1:
        raise TypeError(f"fun: returned a loss of shape {value.shape}; the gradient check "
                        "needs a scalar (reduce it, e.g. .sum() or .mean())")
    return float(value.reshape(())), grads


def check_grad(fun: Callable, inputs: dict, *, wrt=None, mode: str = "directional",
               eps: float = 1e-6, rtol: float = 1e-6, num_directions: int = 3, seed: int = 0,
               tiny: float | None = None, raise_on_failure: bool = True) -> GradCheck:
    r"""Check the gradients returned by ``fun`` against central finite differences in float64.

    Parameters
    ----------
    fun : callable
        ``fun(**inputs)`` returns ``(loss, grads)`` (a ``LossOutput`` works), with ``grads`` a
        dict from argument name to the gradient of the scalar ``loss``.
    inputs : dict
        Keyword arguments of ``fun``. Float arrays are copied to float64; other values (labels,
        hyper-parameters) are passed as they are.
    wrt : str or iterable of str, optional
        The arguments to check (float arrays of ``inputs`` that ``grads`` holds); default every
        key of the returned ``grads``. Nothing to check (``wrt=()``, or no gradients returned)
        is a ``ValueError``, not a pass.
    mode : {"directional", "elementwise"}
        ``"directional"`` (JAX's ``check_vjp`` idea): for random tangents :math:`v`, compare
        :math:`\langle \nabla f, v\rangle` with :math:`(f(x + \epsilon v) - f(x - \epsilon v)) /
        2\epsilon`: two calls per direction, fit for large inputs. ``"elementwise"``: one
        central difference per entry, for small debugging cases.
    eps : float
        The finite-difference step.
    rtol : float
        The largest relative error accepted, in (0, 1), measured as
        ``|analytic - numeric| / max(|analytic| + |numeric|, tiny)``. That error never exceeds
        1, so ``rtol >= 1`` would accept any gradient and is refused. A NaN or infinite
        gradient or finite difference counts as an infinite error, and a loss that is not
        finite at ``inputs`` fails the check (``max_rel_error`` is ``inf``).
    num_directions : int
        Random directions per argument in ``"directional"`` mode.
    seed : int
        Seed of the directions.
    tiny : float, optional
        Floor of the error's denominator, so that two near-zero derivatives agree. By default
        the round-off of a central difference divided by ``rtol``:
        ``10 * eps_float64 * max(|f(x)|, 1) / eps / rtol``. A derivative smaller than this is
        thus checked to an absolute error of ``rtol * tiny``, the precision finite differences
        can give it. A ``tiny`` with ``rtol * tiny >= max(|f(x)|, 1)`` would accept errors as
        large as the loss itself in every derivative, and is refused.
    raise_on_failure : bool
        Raise ``AssertionError`` naming the argument whose gradient is wrong.

    Returns
    -------
    GradCheck
        ``max_rel_error`` and the worst error per argument.

    Raises
    ------
    ValueError
        ``eps``, ``rtol`` or ``tiny`` not finite and positive, ``rtol >= 1``, a ``tiny`` that
        accepts errors of the loss's size, ``num_directions`` below 1 (a zero or infinite one
        would make every error vanish), or nothing to check.
    TypeError
        ``fun`` does not return ``(loss, grads)`` with a scalar ``loss`` and a dict ``grads``.
    AssertionError
        A gradient is wrong, None, or of the wrong shape (None and shape: whatever
        ``raise_on_failure``).

    Examples
    --------
    >>> import numpy as np, refmoco
    >>> from refmoco.testing import check_grad
    >>> rng = np.random.default_rng(0)
    >>> q, k = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    >>> report = check_grad(refmoco.info_nce_loss, {"q": q, "k": k, "temperature": 0.5})
    >>> report.max_rel_error < 1e-6
    True
    """
    if mode not in ("directional", "elementwise"):
        raise ValueError(f"mode: expected 'directional' or 'elementwise', got {mode!r}")
    eps, rtol = check_positive(eps, "eps"), check_positive(rtol, "rtol")
    if rtol >= 1:
        raise ValueError(f"rtol: expected a number < 1, got {rtol!r}: the relative error never "
                         "exceeds 1, so this accepts any gradient")
    if tiny is not None:
        tiny = check_positive(tiny, "tiny")
    if mode == "directional":
        num_directions = check_int(num_directions, "num_directions", minimum=1)
    if isinstance(wrt, str):
        wrt = (wrt,)
    x = {name: (np.array(to_numpy(v), dtype=np.float64)
                if _is_float_array(v) else v) for name, v in inputs.items()}
    f0, grads = _call(fun, x)
    names = tuple(grads) if wrt is None else tuple(wrt)
    if not names:
        raise ValueError("wrt: nothing to check (empty)" if wrt is not None else
                         "fun: returned no gradients, so there is nothing to check")
    for name in names:
        if name not in grads:
            raise ValueError(f"wrt: fun returned no gradient for {name!r}")
        if name not in x or not isinstance(x[name], np.ndarray):
            raise ValueError(f"wrt: {name!r} is not a float array of inputs "
                             f"(inputs: {sorted(inputs)})")
    if not math.isfinite(f0):
        if raise_on_failure:
            raise AssertionError(f"gradient check failed: fun returned a loss of {f0!r} at "
                                 "inputs; its gradients cannot be checked there")
        return GradCheck(math.inf, dict.fromkeys(names, math.inf))
    if tiny is None:
        tiny = 10 * float(np.finfo(np.float64).eps) * max(abs(f0), 1.0) / eps / rtol
    elif rtol * tiny >= max(abs(f0), 1.0):
        raise ValueError(f"tiny: {tiny!r} accepts any derivative error up to rtol * tiny = "
                         f"{rtol * tiny:.3g}, as large as the loss (|f| = {abs(f0):.3g}): "
                         "expected rtol * tiny < max(|f(x)|, 1)")
    rng = np.random.default_rng(seed)
    errors = {}
    for name in names:
        if grads[name] is None:
            raise AssertionError(f"grads[{name!r}]: None, no gradient (is the loss computed "
                                 f"from {name!r}?)")
        g = np.asarray(to_numpy(grads[name]), dtype=np.float64)
        if g.shape != x[name].shape:
            raise AssertionError(f"grads[{name!r}]: shape {g.shape} != input {x[name].shape}")
        if mode == "directional":
            directions = [rng.standard_normal(g.shape) for _ in range(num_directions)]
        else:
            directions = [_unit(g.shape, i) for i in range(g.size)]
        worst = 0.0
        for v in directions:
            numeric = _central_difference(fun, x, name, v, eps)
            with np.errstate(invalid="ignore", over="ignore"):  # inf * 0: NaN, a failure
                analytic = float(np.sum(g * v))
            err = abs(analytic - numeric) / max(abs(analytic) + abs(numeric), tiny)
            worst = max(worst, err if err == err else math.inf)  # NaN: a failure, not a pass
        errors[name] = worst
    result = GradCheck(max(errors.values()), errors)
    if raise_on_failure and result.max_rel_error > rtol:
        bad = {k: v for k, v in errors.items() if v > rtol}
        raise AssertionError(f"gradient check failed (rtol={rtol}): relative errors {bad}")
    return result


def _is_float_array(v: Any) -> bool:
    if isinstance(v, (float, int, bool)) or v is None:
        return False
    try:
        return to_numpy(v).dtype.kind == "f"
    except Exception:
        return False


def _unit(shape, i):
    e = np.zeros(int(np.prod(shape)))
    e[i] = 1.0
    return e.reshape(shape)


def _central_difference(fun, x, name, v, eps):
    plus = dict(x, **{name: x[name] + eps * v})
    minus = dict(x, **{name: x[name] - eps * v})
    return (_call(fun, plus)[0] - _call(fun, minus)[0]) / (2 * eps)
