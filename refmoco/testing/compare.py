"""Check a PyTorch, JAX or NumPy implementation against refmoco over hypothesis-drawn inputs.

Each ``compare_*`` helper runs the user's code and a refmoco reference on inputs drawn by
hypothesis (``find``: a fixed seed, a bounded budget) and returns a :class:`ComparisonReport`
holding, on a mismatch, the **smallest** failing input and what differs: the loss, the gradient
w.r.t. which argument, the queue after which call, which parameter after the momentum update.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from .._checks import check_finite, check_int, check_positive
from ..backend import to_numpy
from ..conventions.references import queue_reference, resolve_reference
from ..losses import LossOutput, info_nce_loss
from ..momentum import momentum_update
from .gradcheck import assert_close

FRAMEWORKS = ("numpy", "torch", "jax")
_FLOATS = ("float16", "bfloat16", "float32", "float64")


def _raised(exc: Exception) -> str:
    return f"raised {type(exc).__name__}: {exc}"


class _UsageError(ValueError):
    """A wrong argument of a ``compare_*`` call found on a drawn input: raised to the caller,
    never reported as a difference of the user's code."""


class _HarnessError(Exception):
    """An error of the comparison itself (the reference, a conversion to the framework) on a
    drawn input: ``error`` is raised to the caller as it is, never blamed on the user's code."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def _harness(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``: code of the comparison, whose errors are the caller's."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        raise _HarnessError(exc) from exc


def _check_setup(framework, dtype, max_examples, seed, frameworks=FRAMEWORKS) -> str:
    """Validate the arguments every ``compare_*`` takes, before anything is drawn; the dtype's
    name. ``framework="jax"`` in float64 needs JAX's x64 mode."""
    if not isinstance(framework, str) or framework not in frameworks:
        raise ValueError(f"framework: expected one of {frameworks}, got {framework!r}")
    try:
        dt = np.dtype(dtype)
    except TypeError:  # "bfloat16" without ml_dtypes, "floaty"
        dt = None
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype: expected 'float32' or 'float64' (the dtype the inputs are "
                         f"drawn in), got {dtype!r}; compare float16/bfloat16 code in float32 "
                         "with a looser rtol=")
    check_int(max_examples, "max_examples", minimum=1)
    check_int(seed, "seed", minimum=0)
    if framework == "torch":
        import torch  # noqa: F401  (ImportError now, not on every drawn input)
    if framework == "jax":
        import jax
        if dt == np.float64 and not jax.config.jax_enable_x64:
            raise ValueError("framework='jax' with dtype='float64' needs jax.config.update("
                             "'jax_enable_x64', True) (or pass dtype='float32')")
    return dt.name


def _check_choice(value, name, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def _fresh(example):
    """A deep copy of a drawn example: every run of the user's code and of the reference gets
    arrays of its own (the code may write to them; hypothesis runs the smallest one again)."""
    if isinstance(example, dict):
        return {k: _fresh(v) for k, v in example.items()}
    if isinstance(example, (list, tuple)):
        return type(example)(_fresh(v) for v in example)
    return example.copy() if isinstance(example, np.ndarray) else example


def _modified(passed, drawn) -> str | None:
    """How the array handed to the user's code (``passed``) changed from the values drawn, or
    None when it holds them still."""
    if passed is None or drawn is None:
        return None
    now = _host(passed)
    if now.shape != drawn.shape:
        return f"shape {drawn.shape} -> {now.shape}"
    if np.array_equal(now, drawn, equal_nan=_is_float(drawn)):
        return None
    return f"max |change| = {np.max(np.abs(now.astype(float) - drawn.astype(float))):.6g}"


def _written(what: str, passed, drawn) -> Difference | None:
    """A Difference when the user's code wrote to an input it was given."""
    change = _modified(passed, drawn)
    return None if change is None else Difference(what, (
        f"the call modified it in place ({change}); the reference uses the values drawn: "
        "work on a copy (x = x / n, not x /= n)"))


# -- interop ------------------------------------------------------------------------------------
def to_framework(x, framework: str, *, requires_grad: bool = False):
    """A NumPy array as a fresh ``framework`` array (a copy: the user's code may write to it)."""
    if framework == "numpy" or x is None:
        return None if x is None else np.array(x)
    if framework == "torch":
        import torch
        t = torch.from_numpy(np.array(x))
        return t.requires_grad_() if requires_grad and t.is_floating_point() else t
    if framework == "jax":
        import jax
        import jax.numpy as jnp
        if np.asarray(x).dtype == np.float64 and not jax.config.jax_enable_x64:
            raise ValueError("framework='jax' in float64 needs jax.config.update("
                             "'jax_enable_x64', True) (or pass dtype='float32')")
        return jnp.asarray(x)
    raise ValueError(f"framework: expected one of {FRAMEWORKS}, got {framework!r}")


def like(result, reference):
    """Hand a refmoco result back as ``reference``'s array type, device and float dtype.

    Parameters
    ----------
    result : ndarray, LossOutput, or a dict / list / tuple of them
    reference : torch.Tensor, JAX array, CuPy or NumPy array
        An input of the call; floating results are cast to its dtype when it is floating.

    Examples
    --------
    >>> import torch, refmoco
    >>> from refmoco.testing import like
    >>> q = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    >>> out = like(refmoco.info_nce_loss(q, q, None), q)
    >>> type(out.loss).__name__, out.grads["q"].dtype
    ('Tensor', torch.float32)
    """
    if isinstance(result, LossOutput):
        return LossOutput(like(result.loss, reference), like(result.grads, reference))
    if isinstance(result, (dict, list, tuple)):
        items = result.items() if isinstance(result, dict) else enumerate(result)
        out = {k: like(v, reference) for k, v in items}
        return out if isinstance(result, dict) else type(result)(out.values())
    if getattr(reference, "dtype", None) is None:
        raise TypeError("reference: expected an array (NumPy, CuPy, PyTorch or JAX) to take the "
                        f"type, device and dtype of, got {type(reference).__name__}")
    module = type(reference).__module__.split(".")[0]
    cast = str(reference.dtype).replace("torch.", "") in _FLOATS
    if module == "cupy":
        import cupy
        out = cupy.asarray(result)
    else:
        out = np.array(to_numpy(result))  # a writeable host copy (CuPy results are fetched)
    if module == "torch":
        import torch
        out = torch.from_numpy(out).to(reference.device)
        return out.to(reference.dtype) if cast and out.is_floating_point() else out
    if module in ("jax", "jaxlib"):
        import jax
        out = jax.device_put(out, next(iter(reference.devices())))
    return out.astype(reference.dtype) if cast and out.dtype.kind == "f" else out


def _host(x) -> np.ndarray:
    """Any array (a torch tensor that requires grad, a JAX array, a float) as NumPy."""
    return np.asarray(to_numpy(x))


# -- the report ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Difference:
    """``what`` differs (``"loss"``, ``"gradient w.r.t. 'k'"``, ...) and how (``detail``)."""

    what: str
    detail: str


@dataclass
class ComparisonReport:
    """What was compared (``reference``), how many inputs were tried (``examples``), what
    differs (``difference``, None when all agree) and the smallest failing ``inputs``."""

    reference: str
    examples: int
    difference: Difference | None = None
    inputs: dict | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.difference is None

    def __str__(self) -> str:
        if self.ok:
            return f"{self.reference}: all {self.examples} examples agree"
        lines = [f"{self.reference} disagrees: {self.difference.what} "
                 f"(smallest failing input, {self.examples} tried)",
                 f"  {self.difference.detail}", "  input:"]
        with np.printoptions(precision=6, suppress=True, threshold=60):
            for name, value in (self.inputs or {}).items():
                text = repr(value).replace("\n", "\n" + " " * (6 + len(name)))
                lines.append(f"    {name} = {text}")
        return "\n".join(lines)

    def raise_if_failed(self) -> ComparisonReport:
        if not self.ok:
            raise AssertionError(str(self))
        return self


def _search(name, strategy, check, *, max_examples, seed, raise_on_failure) -> ComparisonReport:
    """Run ``check`` (None = agree, else a Difference) on drawn inputs; shrink a failure.

    Each run gets a fresh copy of the example, so that code which writes to its inputs cannot
    change what a later run (the smallest example's, again) sees."""
    from hypothesis.errors import Flaky

    from .strategies import find_failure

    count, last = [0], [None]

    def safe(example):
        try:
            return check(_fresh(example))
        except (_UsageError, _HarnessError):  # the call to compare_* is wrong, not the user's code
            raise
        except Exception as exc:  # the user's code raised: that is a difference too
            return Difference("the call", _raised(exc))

    def fails(example) -> bool:
        count[0] += 1
        diff = safe(example)
        if diff is not None:
            last[0] = diff
        return diff is not None

    try:
        smallest = find_failure(strategy, fails, max_examples=max_examples, seed=seed)
        report = ComparisonReport(name, count[0])
        if smallest is not None:
            diff = safe(smallest)
            if diff is None:  # it failed during the search: never a pass
                diff = Difference(last[0].what, f"{last[0].detail} (on this input during the "
                                  "search; it agreed when run again: the result depends on "
                                  "more than the inputs)")
            report = ComparisonReport(name, count[0], diff, smallest)
    except Flaky:  # hypothesis saw a failure that did not happen again: never a pass
        report = ComparisonReport(name, count[0], Difference("the call", (
            f"not reproducible: {last[0].what} differed ({last[0].detail}) on an input that "
            "agreed when run again; the result depends on more than the inputs")))
    except _UsageError as exc:
        raise ValueError(str(exc)) from None
    except _HarnessError as exc:
        raise exc.error from None
    if report.examples == 0:
        raise ValueError("inputs: the strategy drew no example, so nothing was compared")
    return report.raise_if_failed() if raise_on_failure else report


def _differs(what, actual, expected, dtype, rtol) -> Difference | None:
    """``|actual - expected| <= rtol * (1 + max|expected|)``: relative, but never to a scale
    below 1 (a loss near 0 is a difference of terms of size ~1/T, and is only that accurate)."""
    got, want = _host(actual), _host(expected)
    try:
        assert_close(got, want, rtol=rtol, atol=rtol, check_dtype=False, name="got")
    except AssertionError as exc:
        if got.shape == want.shape == ():
            return Difference(what, f"got {float(got)!r}, expected {float(want)!r}")
        return Difference(what, str(exc))
    return None


def _rtol(rtol, dtype):
    if rtol is None:
        return 1e-10 if np.dtype(dtype) == np.float64 else 1e-4
    return check_finite(rtol, "rtol")  # assert_close's rule: NaN or inf would accept anything


def _check_wrt(wrt, ref) -> tuple | None:
    """``wrt=`` as a tuple of the reference's argument names (a single name may be a str);
    a name it does not take is a ValueError, never a silently skipped gradient."""
    if wrt is None:
        return None
    wrt = (wrt,) if isinstance(wrt, str) else tuple(wrt)
    unknown = [w for w in wrt if w not in ref.args]
    if unknown:
        raise ValueError(f"wrt: {unknown} not among the arguments of {ref.name!r}: "
                         f"{list(ref.args)}")
    return wrt


# -- losses -------------------------------------------------------------------------------------
def _inputs_for(values, names, wrt, framework) -> list:
    """Fresh ``framework`` arrays of ``values`` for the user's code (those in ``wrt`` requiring
    grad in PyTorch); a conversion error is the caller's."""
    grad = bool(wrt) and framework == "torch"
    return _harness(lambda: [to_framework(v, framework, requires_grad=grad and n in wrt)
                             for n, v in zip(names, values)])


def _value_and_grads(user_fn, xs, names, wrt, framework):
    """The loss of ``user_fn(*xs)`` and its gradients w.r.t. the ``wrt`` names (None: none)."""
    if not wrt:  # the value only
        return user_fn(*xs), {}
    if framework == "numpy":
        out = user_fn(*xs)
        if not (isinstance(out, (tuple, list)) and len(out) >= 2 and isinstance(out[1], Mapping)):
            raise TypeError("with framework='numpy' the function must return (loss, grads), "
                            f"grads a dict by argument name; got {type(out).__name__}")
        return out[0], {n: out[1].get(n) for n in wrt}
    if framework == "torch":
        import torch
        loss = user_fn(*xs)
        leaves = [x for n, x in zip(names, xs) if n in wrt]
        got = (torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad
               else [None] * len(leaves))
        return loss, dict(zip([n for n in names if n in wrt], got))
    import jax
    argnums = tuple(i for i, n in enumerate(names) if n in wrt)
    loss, got = jax.value_and_grad(user_fn, argnums)(*xs)
    return loss, dict(zip([names[i] for i in argnums], got))


def _gradient_differs(what, got, expected, dtype, rtol) -> Difference | None:
    """``_differs`` for a gradient; None (no gradient reaches the argument) is zero, and says so
    when a gradient was expected."""
    if got is None:
        want = _host(expected)
        if _differs(what, np.zeros_like(want), want, dtype, rtol) is None:
            return None
        return Difference(what, "none reaches it (autograd gave None, or grads has no entry): "
                                f"expected max |g| = {np.abs(want).max():.6g}")
    return _differs(what, got, expected, dtype, rtol)


def _check_params(ref, params) -> None:
    """Each keyword of ``params`` must be a hyper-parameter the reference takes: a misspelled
    one is a TypeError here, not an error blamed on the user's code."""
    try:
        sig = inspect.signature(ref.fn)
    except (TypeError, ValueError):  # a builtin without a signature: the reference will say
        return
    kinds = {p.kind for p in sig.parameters.values()}
    taken = [n for n in sig.parameters if n not in ref.args]
    for name in params:
        if name in ref.args:
            raise TypeError(f"{name}: an input the comparison draws, not a hyper-parameter")
        if name not in sig.parameters and inspect.Parameter.VAR_KEYWORD not in kinds:
            raise TypeError(f"{name}: not a hyper-parameter of the reference {ref.name!r} "
                            f"(it takes {taken})")


def compare_loss(user_fn: Callable, reference: str | Callable = "info_nce", *, inputs=None,
                 args=None, framework="numpy", dtype="float64", rtol=None, max_examples=50,
                 seed=0, raise_on_failure=True, **params) -> ComparisonReport:
    """Compare the value of ``user_fn`` with a refmoco reference on drawn inputs.

    Parameters
    ----------
    user_fn : callable
        Called with the reference's arrays positionally, as ``framework`` arrays
        (``user_fn(q, k, negatives)`` for ``"info_nce"``); returns a scalar.
    reference : str or callable
        A name of :data:`refmoco.conventions.references.REFERENCES` (``"info_nce"``, ``"moco"``,
        ``"moco_v3"``, ``"lightly.ntxent"``, ``"pml.ntxent"``, ...), or a function returning a
        ``LossOutput`` (then ``inputs`` and ``args`` are required).
    inputs : hypothesis strategy, optional
        For a callable ``reference`` only: draws dicts of its keyword arguments, NumPy arrays
        in the dtype you want compared (they reach ``user_fn`` as ``framework`` arrays, and
        ``dtype`` then only sets the default ``rtol``). A named reference brings its own
        inputs: passing these with it is a ``ValueError``.
    args : sequence of str, optional
        For a callable ``reference`` only: the keys of those dicts that ``user_fn`` receives,
        positionally, in this order.
    framework : {"numpy", "torch", "jax"}
        Each call gets fresh arrays; code that writes to one (``x /= norm``) is a difference
        (``difference.what`` is ``"input 'x'"``): the reference is computed from the values
        drawn.
    dtype : {"float64", "float32"}
        The dtype the inputs are drawn in (another is a ``ValueError``). ``framework="jax"``
        in float64 needs ``jax.config.update("jax_enable_x64", True)``.
    rtol : float, optional
        Default 1e-10 in float64, 1e-4 in float32 (two implementations round differently); a
        finite number >= 0.
    max_examples, seed : int
        Hypothesis' budget of generated inputs, and the seed of its choices.
    raise_on_failure : bool
        Raise ``AssertionError(str(report))`` on a mismatch.
    **params
        The reference's hyper-parameters (``temperature=0.2``); ``user_fn`` must use the same.

    Returns
    -------
    ComparisonReport

    Raises
    ------
    ValueError, TypeError
        A wrong argument of this call, naming it: an unknown ``framework`` or ``dtype``, a
        hyper-parameter the reference does not take (``TypeError``) or refuses
        (``temperature=-1``), ``max_examples < 1``. Errors of the reference itself on a drawn
        input are raised as they are; only errors of ``user_fn`` are reported as differences.

    Examples
    --------
    >>> import numpy as np
    >>> from refmoco.testing import compare_loss
    >>> def my_loss(q, k, queue):                      # a NumPy InfoNCE with T = 0.1
    ...     logits = np.concatenate([(q * k).sum(1, keepdims=True), q @ queue.T], 1) / 0.1
    ...     top = logits.max(1, keepdims=True)
    ...     return np.mean(top[:, 0] + np.log(np.exp(logits - top).sum(1)) - logits[:, 0])
    >>> compare_loss(my_loss, "info_nce", temperature=0.1, max_examples=20).ok
    True
    """
    return compare_loss_and_grad(user_fn, reference, wrt=(), inputs=inputs, args=args,
                                 framework=framework, dtype=dtype, rtol=rtol,
                                 max_examples=max_examples, seed=seed,
                                 raise_on_failure=raise_on_failure, **params)


def compare_loss_and_grad(user_fn: Callable, reference: str | Callable = "info_nce", *,
                          wrt=None, inputs=None, args=None, stop_gradient=None,
                          framework="torch", dtype="float64", rtol=None, max_examples=50,
                          seed=0, raise_on_failure=True, **params) -> ComparisonReport:
    """Compare a loss **and its autograd gradients** with a refmoco reference.

    ``user_fn`` is as in :func:`compare_loss`; with ``framework="torch"`` its gradients come from
    ``torch.autograd.grad``, with ``"jax"`` from ``jax.value_and_grad``, and with ``"numpy"`` it
    returns ``(loss, grads)``, ``grads`` a dict by argument name. ``wrt`` (default: every float
    argument; a str is one name) names the gradients checked: a name the reference does not
    take (``"negatives"`` for ``"moco"``, whose argument is ``"queue"``), or an argument that
    is not a float array (labels), is a ``ValueError``, never a gradient silently left
    unchecked; ``wrt=()`` compares the loss only. A gradient that is None (or missing from
    ``grads``) is none, a difference where the reference's is not zero. An argument under a
    stop-gradient in the reference (MoCo's keys and queue; ``stop_gradient=`` for a callable
    reference, names of ``args``) must receive **none**.
    The other parameters are those of :func:`compare_loss`. ``difference.what`` is ``"loss"`` or
    ``"gradient w.r.t. 'name'"``.
    """
    if isinstance(stop_gradient, str):
        stop_gradient = (stop_gradient,)
    dtype = _check_setup(framework, dtype, max_examples, seed)
    ref = resolve_reference(reference, inputs, args, stop_gradient)
    rtol = _rtol(rtol, dtype)
    wrt = _check_wrt(wrt, ref)
    unknown = [a for a in ref.stop_gradient if a not in ref.args]
    if unknown:
        raise ValueError(f"stop_gradient: {unknown} not among args {list(ref.args)}")
    _check_params(ref, params)

    def check(ex):
        for a in wrt or ():  # named explicitly: a gradient is expected (None: optional, absent)
            if ex.get(a) is not None and not _is_float(ex[a]):
                raise _UsageError(f"wrt: {a!r} is not a float argument of {ref.name!r} "
                                  f"(dtype {np.asarray(ex[a]).dtype}): it has no gradient")
        expected = _harness(ref.fn, **_fresh(ex), **params)
        names = [a for a in ref.args if wrt is None or a in wrt]
        names = [a for a in names if ex[a] is not None and _is_float(ex[a])]
        values = [ex[a] for a in ref.args]
        xs = _inputs_for(values, ref.args, names, framework)
        loss, grads = _value_and_grads(user_fn, xs, ref.args, names, framework)
        for a, x, v in zip(ref.args, xs, values):
            diff = _written(f"input {a!r}", x, v)
            if diff is not None:
                return diff
        diff = _differs("loss", loss, expected.loss, dtype, rtol)
        for n in names:
            if diff is not None:
                break
            if n in ref.stop_gradient:
                g = np.zeros_like(ex[n]) if grads[n] is None else _host(grads[n])
                if np.any(g != 0):
                    diff = Difference(f"gradient w.r.t. {n!r}", (
                        f"expected none ({ref.why}: detach it), got max |g| = "
                        f"{np.abs(g).max():.6g}"))
            else:
                diff = _gradient_differs(f"gradient w.r.t. {n!r}", grads[n], expected.grads[n],
                                         dtype, rtol)
        return diff

    return _search(ref.name, ref.inputs(dtype, params), check, max_examples=max_examples,
                   seed=seed, raise_on_failure=raise_on_failure)


def _is_float(x) -> bool:
    return np.asarray(x).dtype.kind == "f"


# -- state: the queue, the momentum update, a whole MoCo step -----------------------------------
def compare_queue(make_queue: Callable, *, semantics="refmoco", enqueue=None, read=None,
                  layout="rows", framework="torch", dtype="float64", max_examples=50, seed=0,
                  raise_on_failure=True) -> ComparisonReport:
    """Compare a queue's contents after every enqueue with a reference queue.

    ``make_queue(initial)`` returns a new queue holding ``initial``, a (K, C) framework array
    (one key per row; (C, K) with ``layout="columns"``, MoCo's buffer). ``enqueue(queue, keys)``
    (default ``queue.enqueue(keys)``) adds a (b, C) batch; ``read(queue)`` (default
    ``queue.keys``) returns the buffer in storage order. ``semantics`` picks the reference:
    ``"refmoco"`` (:class:`refmoco.Queue`: any batch size, wraps around), ``"moco"`` (batch sizes
    that divide K, one per run) or ``"lightly"`` (drops what overflows). ``difference.what`` is ``"queue
    contents after call i (enqueue of b rows)"``.
    """
    from .strategies import queue_scenarios

    dtype = _check_setup(framework, dtype, max_examples, seed)
    _check_choice(semantics, "semantics", ("refmoco", "moco", "lightly"))
    _check_choice(layout, "layout", ("rows", "columns"))
    enqueue = enqueue or (lambda q, keys: q.enqueue(keys))
    read = read or (lambda q: q.keys)
    flip = (lambda a: a.T) if layout == "columns" else (lambda a: a)

    def check(ex):
        ref = _harness(queue_reference, semantics, ex["initial"])
        user = make_queue(_harness(to_framework, flip(ex["initial"]), framework))
        for i, keys in enumerate(ex["batches"], 1):
            what = f"call {i} (enqueue of {len(keys)} rows)"
            batch = _harness(to_framework, keys, framework)
            try:
                enqueue(user, batch)
            except Exception as exc:
                return Difference(what, _raised(exc))
            _harness(ref.enqueue, keys)
            detail = ref.differs(flip(_host(read(user))))
            if detail:
                return Difference(f"queue contents after {what}", detail)
        return None

    return _search(f"queue ({semantics})", queue_scenarios(semantics, dtype=dtype), check,
                   max_examples=max_examples, seed=seed, raise_on_failure=raise_on_failure)


def compare_momentum(user_fn: Callable, *, framework="torch", dtype="float64", rtol=None,
                     max_examples=50, seed=0, raise_on_failure=True) -> ComparisonReport:
    """Compare a momentum (EMA) update with :func:`refmoco.momentum_update`.

    ``user_fn(target, source, m)`` gets two dicts of framework arrays (the key and the query
    encoder's parameters) and either updates the **arrays** of ``target`` in place (returning
    None or ``target``), as a PyTorch model needs, or returns a new dict of the new parameters
    (JAX: ``target`` itself with its entries rebound counts as such a dict). The expected
    result is ``m * target + (1 - m) * source``. In place, the arrays
    passed in are what is compared: rebinding ``target[name]`` to a new tensor leaves the
    model's parameter as it was, and is reported. Writing to ``source`` (the query encoder) is
    a difference too.
    """
    from .strategies import momentum_inputs

    dtype = _check_setup(framework, dtype, max_examples, seed)
    rtol = _rtol(rtol, dtype)

    def check(ex):
        target, source, m = ex["target"], ex["source"], ex["m"]
        user_t = _harness(lambda: {k: to_framework(v, framework) for k, v in target.items()})
        user_s = _harness(lambda: {k: to_framework(v, framework) for k, v in source.items()})
        params_t, params_s = dict(user_t), dict(user_s)  # the arrays a model would hold
        out = user_fn(user_t, user_s, m)
        # JAX arrays cannot be written: whatever dict comes back (target itself, its entries
        # rebound, included) holds the new parameters. Other frameworks' models hold the arrays
        # passed in, so returning target (or None) means those arrays must have been updated.
        in_place = out is None or (out is user_t and framework != "jax")
        if not (in_place or isinstance(out, Mapping)):
            return Difference("the returned value", "expected None (an update in place) or a "
                              f"dict of the new parameters, got {type(out).__name__}")
        got = params_t if in_place else out
        want = _harness(momentum_update, _fresh(target), source, m)
        for name in target:
            what = f"parameter {name!r} after the update with m={m!r}"
            if name not in got:
                return Difference(what, "missing from the returned parameters")
            diff = _differs(what, got[name], want[name], dtype, rtol)
            if diff is not None:
                if in_place and user_t.get(name) is not params_t[name]:
                    diff = Difference(what, (
                        f"{diff.detail}; target[{name!r}] was rebound to a new array and the "
                        "array passed in (the model's parameter) was not updated: write into "
                        "it (p.mul_(m).add_(q, alpha=1 - m)) or return the new parameters"))
                return diff
        for name in source:
            change = _modified(params_s[name], source[name])
            if change is not None:
                return Difference(f"source parameter {name!r}", "the update wrote to the query "
                                  f"encoder's parameter ({change}); it must only read it")
        return None

    return _search("momentum_update", momentum_inputs(dtype=dtype), check,
                   max_examples=max_examples, seed=seed, raise_on_failure=raise_on_failure)


def compare_moco_step(make_step: Callable, *, temperature=0.07, read=None, layout="rows",
                      framework="torch", dtype="float64", rtol=None, max_examples=30, seed=0,
                      raise_on_failure=True) -> ComparisonReport:
    """Compare a stateful MoCo loss-and-enqueue step with refmoco, call after call.

    ``make_step(initial)`` returns an object ``step`` holding the queue ``initial`` (K, C) (or
    (C, K) with ``layout="columns"``); ``step(q, k)`` returns the loss of normalised queries and
    keys (N, C) and enqueues ``k``; ``read(step)`` returns its buffer (default ``step.queue``).
    For each call the loss, the gradient w.r.t. ``q``, the absence of a gradient w.r.t. ``k``
    (MoCo's keys are under ``no_grad``), and the queue afterwards are compared with
    ``info_nce_loss(q, k, queue_before)`` then ``Queue.enqueue(k)`` of the keys drawn (a step
    that writes to its ``q`` or ``k`` is a difference: ``"call i: input 'k'"``). Frameworks:
    ``"torch"``, or ``"numpy"`` with ``step`` returning ``(loss, {"q": dq, "k": dk})``.
    """
    from .strategies import moco_step_scenarios

    dtype = _check_setup(framework, dtype, max_examples, seed, frameworks=("torch", "numpy"))
    _check_choice(layout, "layout", ("rows", "columns"))
    temperature = check_positive(temperature, "temperature")
    read = read or (lambda s: s.queue)
    flip = (lambda a: a.T) if layout == "columns" else (lambda a: a)
    rtol = _rtol(rtol, dtype)

    def check(ex):
        queue = _harness(queue_reference, "refmoco", ex["initial"])
        step = make_step(_harness(to_framework, flip(ex["initial"]), framework))
        for i, (q, k) in enumerate(zip(ex["q"], ex["k"]), 1):
            want = _harness(info_nce_loss, q, k, queue.rows(), temperature=temperature,
                            wrt=("q",))
            xs = _inputs_for([q, k], ("q", "k"), ("q", "k"), framework)
            try:
                loss, grads = _value_and_grads(step, xs, ("q", "k"), ("q", "k"), framework)
            except Exception as exc:
                return Difference(f"call {i}", _raised(exc))
            for name, x, drawn in zip(("q", "k"), xs, (q, k)):
                diff = _written(f"call {i}: input {name!r}", x, drawn)
                if diff is not None:
                    return diff
            diff = _differs(f"call {i}: loss", loss, want.loss, dtype, rtol)
            if diff is None:
                diff = _gradient_differs(f"call {i}: gradient w.r.t. 'q'", grads["q"],
                                         want.grads["q"], dtype, rtol)
            if diff is not None:
                return diff
            if grads["k"] is not None and np.any(_host(grads["k"]) != 0):
                return Difference(f"call {i}: gradient w.r.t. 'k'", (
                    "expected none (MoCo computes the keys under torch.no_grad()), got max "
                    f"|g| = {np.abs(_host(grads['k'])).max():.6g}"))
            _harness(queue.enqueue, k)  # the keys drawn, whatever the step did to its copy
            detail = queue.differs(flip(_host(read(step))))
            if detail:
                return Difference(f"call {i}: queue contents afterwards", detail)
        return None

    return _search("MoCo step", moco_step_scenarios(dtype=dtype), check,
                   max_examples=max_examples, seed=seed, raise_on_failure=raise_on_failure)
