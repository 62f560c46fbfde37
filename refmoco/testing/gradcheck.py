"""Finite-difference gradient checks and dtype-aware comparisons."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from ..backend import to_numpy


class GradCheck(NamedTuple):
    """The outcome of ``check_grad``: the worst relative error and one error per argument."""

    max_rel_error: float
    errors: dict  # argument name -> worst relative error seen for its gradient


def default_tolerance(dtype) -> float:
    """Relative tolerance for results computed in ``dtype``: ``1e-12`` for float64 (a few
    hundred ulps), ``100 * eps`` (about 1.2e-5) for float32."""
    dt = np.dtype(dtype)
    return 1e-12 if dt == np.float64 else 100 * float(np.finfo(dt).eps)


def rel_error(a, b, tiny: float = 1e-300) -> float:
    """``max|a - b| / max(max(|a| + |b|), tiny)``."""
    a = np.asarray(to_numpy(a), dtype=np.float64)
    b = np.asarray(to_numpy(b), dtype=np.float64)
    scale = float(np.max(np.abs(a) + np.abs(b), initial=0.0))
    return float(np.max(np.abs(a - b), initial=0.0)) / max(scale, tiny)


def assert_close(actual, expected, *, rtol: float | None = None, atol: float = 0.0,
                 check_dtype: bool = True, name: str = "value") -> None:
    """Assert two arrays agree within a tolerance chosen by their dtype.

    The comparison is ``|a - e| <= atol + rtol * max|e|`` elementwise, where the scale is the
    largest magnitude of ``expected`` (errors of sums and products are relative to the size of
    the terms, not of each entry). ``rtol`` defaults to ``default_tolerance`` of the less
    precise dtype. Shapes must match, and dtypes too when ``check_dtype``.
    """
    a, e = to_numpy(actual), to_numpy(expected)
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {a.shape} != expected {e.shape}")
    if check_dtype and a.dtype != e.dtype:
        raise AssertionError(f"{name}: dtype {a.dtype} != expected {e.dtype}")
    if rtol is None:
        worst = a.dtype if np.finfo(a.dtype).eps > np.finfo(e.dtype).eps else e.dtype
        rtol = default_tolerance(worst)
    a64, e64 = a.astype(np.float64), e.astype(np.float64)
    if not np.array_equal(np.isnan(a64), np.isnan(e64)):
        raise AssertionError(f"{name}: NaN in different places")
    scale = float(np.max(np.abs(e64), initial=0.0, where=~np.isnan(e64)))
    err = np.abs(a64 - e64)
    bad = err > atol + rtol * scale
    bad &= ~(np.isnan(a64) & np.isnan(e64))
    if bad.any():
        where = np.unravel_index(int(np.argmax(np.where(bad, err, -1))), a.shape)
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.size} entries differ; worst at {tuple(where)}: "
            f"{a64[where]!r} vs expected {e64[where]!r} (atol={atol}, rtol={rtol}, "
            f"scale={scale})"
        )


def _call(fun: Callable, inputs: dict):
    out = fun(**inputs)
    loss, grads = out[0], out[1]
    return float(to_numpy(loss)), grads


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
    wrt : iterable of str, optional
        The arguments to check; default every key of the returned ``grads``.
    mode : {"directional", "elementwise"}
        ``"directional"`` (JAX's ``check_vjp`` idea): for random tangents :math:`v`, compare
        :math:`\langle \nabla f, v\rangle` with :math:`(f(x + \epsilon v) - f(x - \epsilon v)) /
        2\epsilon`: two calls per direction, fit for large inputs. ``"elementwise"``: one
        central difference per entry, for small debugging cases.
    eps : float
        The finite-difference step.
    rtol : float
        The largest relative error accepted, measured as
        ``|analytic - numeric| / max(|analytic| + |numeric|, tiny)``.
    num_directions : int
        Random directions per argument in ``"directional"`` mode.
    seed : int
        Seed of the directions.
    tiny : float, optional
        Floor of the error's denominator, so that two near-zero derivatives agree. By default
        the round-off of a central difference divided by ``rtol``:
        ``10 * eps_float64 * max(|f(x)|, 1) / eps / rtol``. A derivative smaller than this is
        thus checked to an absolute error of ``rtol * tiny``, the precision finite differences
        can give it.
    raise_on_failure : bool
        Raise ``AssertionError`` naming the argument whose gradient is wrong.

    Returns
    -------
    GradCheck
        ``max_rel_error`` and the worst error per argument.

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
    x = {name: (np.array(to_numpy(v), dtype=np.float64)
                if _is_float_array(v) else v) for name, v in inputs.items()}
    f0, grads = _call(fun, x)
    if tiny is None:
        tiny = 10 * np.finfo(np.float64).eps * max(abs(f0), 1.0) / eps / rtol
    names = tuple(grads) if wrt is None else tuple(wrt)
    rng = np.random.default_rng(seed)
    errors = {}
    for name in names:
        if name not in grads:
            raise ValueError(f"wrt: fun returned no gradient for {name!r}")
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
            analytic = float(np.sum(g * v))
            worst = max(worst, abs(analytic - numeric) / max(abs(analytic) + abs(numeric), tiny))
        errors[name] = worst
    result = GradCheck(max(errors.values(), default=0.0), errors)
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
