"""A strict stand-in for CuPy on the host, for the device tests (``test_cupy_training.py``,
``test_gru.py``, ``test_cpc.py``).

Its arrays (:class:`FakeDeviceArray`) are NumPy arrays in a box whose type lives in a module named
``cupy``, so refmoco treats them as device arrays; :class:`FakeCupy` is the module ``cupy`` that
computes on them (NumPy's functions, unboxed and boxed again). It refuses what CuPy refuses:
``np.asarray`` of a device array, host arrays inside device operations, a host array written
into a device array. It is stricter than CuPy in three places, so that device code stays
explicit: a NumPy function called on a device array (CuPy's ``__array_function__`` would run
CuPy's version), and a host array written through an integer-array index (CuPy copies it to the
device) are refused, and a host array written through a slice is a TypeError here where CuPy
raises a ValueError ("non-scalar numpy.ndarray cannot be used for fill"). So the generic ``xp``
code, the placement checks and every host/device transfer run without a GPU; what it cannot
exercise is CuPy's own numerics and kernels (CuPy compiles them with ``-ftz=true``: float32
subnormals flush to zero there, not here).

:func:`device_module` is the body of the ``xp`` fixtures: real CuPy for ``"cupy"`` (a GPU, else
a skip, or a failure under ``REFMOCO_REQUIRE_GPU=1``), the stand-in installed as
``sys.modules["cupy"]`` for ``"fake"``; :func:`assert_same` compares a device result with the
host reference (tolerances :data:`TOL`, relative to the scale of the reference).

Functions and array methods are NumPy's, handed out by name, but only the names and keyword
arguments that both CuPy 13.6 and 14.2 have (``cupy_api_13.json``, ``cupy_api_14.json``, written
by ``scripts/cupy_api.py``): a function or keyword that NumPy has and CuPy lacks fails here as it
would on a GPU. Integer-array
indices follow CuPy too: one out of range wraps around instead of raising (so validation must not
lean on ``IndexError``), and a write through repeated indices, whose winner CuPy leaves
undetermined, is refused.
"""

import json
import operator
import pathlib
import sys
import types

import numpy as np
from gpu import require_cupy

from refmoco.backend import to_numpy

# device results against the host reference: relative to the scale of the compared array
TOL = {np.dtype("float64"): 1e-10, np.dtype("float32"): 1e-5}



def _common(records):
    """What every recorded CuPy has: the names in all the records, each with the keywords all of
    them take (a list of names; null where any are taken; "attribute" for a non-function)."""
    api = {"cupy_version": " and ".join(r["cupy_version"] for r in records)}
    for where in ("cupy", "ndarray"):
        names = set.intersection(*(set(r[where]) for r in records))
        api[where] = {}
        for name in sorted(names):
            kinds = [r[where][name] for r in records]
            lists = [k for k in kinds if isinstance(k, list)]
            api[where][name] = sorted(set.intersection(*map(set, lists))) if lists else kinds[0]
    return api


# what CuPy 13 and 14 both have: {"cupy": {name: keywords}, "ndarray": {name: keywords}}
CUPY_API = _common([json.loads(path.read_text())
                    for path in sorted(pathlib.Path(__file__).parent.glob("cupy_api_*.json"))])


def device_module(kind, monkeypatch):
    """The device's array module for a test: ``kind`` is ``"cupy"`` (real CuPy on a GPU, else a
    skip) or ``"fake"`` (a fresh :class:`FakeCupy`, installed as ``sys.modules["cupy"]`` for the
    test's duration through ``monkeypatch``)."""
    if kind == "cupy":
        return require_cupy()
    fake = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    # l2_normalize (the mechanisms, the memory bank) dispatches device rows to a CUDA kernel:
    # here its reference on the host (tests/test_cuda_sim.py runs the kernel itself)
    from refmoco.kernels import cuda as kernels

    monkeypatch.setattr(kernels, "l2_normalize_rows", on_host_l2_normalize_rows)
    monkeypatch.setattr(kernels, "l2_normalize_rows_backward", on_host_l2_normalize_rows_backward)
    return fake


def assert_same(got, want, name, tol_scale=1.0):
    """``got`` (host or device) equals the host reference ``want`` within the dtype's tolerance
    relative to the scale of ``want``; same dtype and shape; integers and strings exactly."""
    got, want = to_numpy(got), np.asarray(want)
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype}, expected {want.dtype}"
    assert got.shape == want.shape, f"{name}: shape {got.shape}, expected {want.shape}"
    if want.dtype.kind != "f":
        np.testing.assert_array_equal(got, want, err_msg=name)
        return
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL[want.dtype] * tol_scale * scale,
                               err_msg=name)


# -- the stand-in ----------------------------------------------------------------------------------


def _unwrap(obj):
    """Device arrays to their NumPy payload; a host array inside a device operation is refused."""
    if isinstance(obj, FakeDeviceArray):
        return obj._a
    if isinstance(obj, np.ndarray):
        raise TypeError("fake cupy: Unsupported type <class 'numpy.ndarray'> (a host array in a "
                        "device operation)")
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _unwrap(v) for k, v in obj.items()}
    return obj


def _checked(where, name, obj):
    """``obj`` (NumPy's ``name``) if CuPy has ``where.name``; callables check their keywords."""
    if name not in CUPY_API[where]:
        raise AttributeError(f"fake cupy: CuPy {CUPY_API['cupy_version']} has no {where}.{name}")
    allowed = CUPY_API[where][name]
    if not callable(obj) or isinstance(obj, type) or not isinstance(allowed, list):
        return obj

    def checked(*args, **kwargs):
        extra = sorted(set(kwargs) - set(allowed))
        if extra:
            raise TypeError(f"fake cupy: {where}.{name} takes no keyword {extra} in CuPy "
                            f"{CUPY_API['cupy_version']} (it takes {allowed})")
        return obj(*args, **kwargs)

    return checked


def _index(idx, shape):
    """An index into an array of ``shape``: device or host integer arrays (CuPy copies host ones
    to the device); an integer array's out-of-range entries wrap around, as on CuPy."""
    if not isinstance(idx, tuple):
        return _index((idx,), shape)[0]
    idx = tuple(i._a if isinstance(i, FakeDeviceArray) else i for i in idx)
    arrays = [np.asarray(i) if isinstance(i, (np.ndarray, list)) else None for i in idx]
    if any(i is Ellipsis or i is None for i in idx) or any(
            a is not None and a.dtype.kind == "b" for a in arrays):
        return idx  # entry k is not axis k: left as NumPy indexes it
    return tuple(a % shape[axis] if a is not None and a.dtype.kind in "iu" and shape[axis] else i
                 for axis, (i, a) in enumerate(zip(idx, arrays, strict=True)))


def _repeats(idx):
    """Whether a write through ``idx`` hits one element twice through an integer array."""
    arrays = [np.asarray(i) for i in (idx if isinstance(idx, tuple) else (idx,))
              if isinstance(i, np.ndarray) and i.dtype.kind in "iu"]
    if not arrays:
        return False
    flat = np.broadcast_arrays(*arrays)
    keys = np.stack([a.ravel() for a in flat], axis=1)
    return len(np.unique(keys, axis=0)) != len(keys)


def _wrap(obj):
    """NumPy results back in the box; scalars become 0-d device arrays, as CuPy returns them."""
    if isinstance(obj, np.ndarray):
        return FakeDeviceArray(obj)
    if isinstance(obj, np.generic):
        return FakeDeviceArray(np.asarray(obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_wrap(o) for o in obj)
    return obj


def _call(f, args, kwargs):
    return _wrap(f(*_unwrap(args), **_unwrap(kwargs)))


def _on_device(f):
    """``f`` (a NumPy function or method) taking and returning boxed arrays."""
    return lambda *args, **kwargs: _call(f, args, kwargs)


class FakeDeviceArray:
    """A NumPy array that pretends to live on a GPU (its type's module is ``cupy._fake``)."""

    __slots__ = ("_a",)
    __hash__ = None

    def __init__(self, a):
        assert isinstance(a, np.ndarray)
        self._a = a

    # what CuPy refuses
    def __array__(self, *args, **kwargs):
        raise TypeError("fake cupy: Implicit conversion to a NumPy array is not allowed")

    def __array_function__(self, func, types, args, kwargs):
        raise TypeError(f"fake cupy: numpy.{func.__name__} called on a device array")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):  # NumPy scalars are fine
        return _call(getattr(ufunc, method), inputs, kwargs)

    # what CuPy has
    def get(self, stream=None):
        return self._a.copy()

    @property
    def flags(self):
        """CuPy's flags: ``c_contiguous``, ``f_contiguous``, ``owndata`` and no more (NumPy's
        ``writeable`` or ``aligned`` would fail on a GPU)."""
        f = self._a.flags
        return types.SimpleNamespace(c_contiguous=f.c_contiguous, f_contiguous=f.f_contiguous,
                                     owndata=f.owndata, fnc=f.fnc, forc=f.forc)

    def __getattr__(self, name):
        if name.startswith("__"):  # no __array_interface__ & co: no silent conversion
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if callable(attr):
            return _checked("ndarray", name, _on_device(attr))
        return _wrap(_checked("ndarray", name, attr))

    def __getitem__(self, idx):
        return _wrap(self._a[_index(idx, self._a.shape)])

    def __setitem__(self, idx, value):
        idx = _index(idx, self._a.shape)
        if _repeats(idx):
            raise ValueError("fake cupy: a write through repeated indices (CuPy leaves which "
                             "value lands undetermined)")
        self._a[idx] = _unwrap(value)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(row) for row in self._a)

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __bool__(self):
        return bool(self._a)

    def __repr__(self):
        return f"fake_device_array({self._a!r})"


def _binary(op, reflected=False):
    if reflected:
        return lambda self, other: _call(op, (other, self), {})
    return lambda self, other: _call(op, (self, other), {})


def _inplace(op):
    def method(self, other):
        op(self._a, _unwrap(other))
        return self

    return method


for _name, _op in [("add", operator.add), ("sub", operator.sub), ("mul", operator.mul),
                   ("truediv", operator.truediv), ("floordiv", operator.floordiv),
                   ("pow", operator.pow), ("matmul", operator.matmul), ("mod", operator.mod),
                   ("and", operator.and_), ("or", operator.or_), ("xor", operator.xor)]:
    setattr(FakeDeviceArray, f"__{_name}__", _binary(_op))
    setattr(FakeDeviceArray, f"__r{_name}__", _binary(_op, reflected=True))
    setattr(FakeDeviceArray, f"__i{_name}__", _inplace(getattr(operator, f"i{_name}")))
for _name in ("lt", "le", "gt", "ge", "eq", "ne"):
    setattr(FakeDeviceArray, f"__{_name}__", _binary(getattr(operator, _name)))
for _name in ("neg", "pos", "abs", "invert"):
    setattr(FakeDeviceArray, f"__{_name}__",
            (lambda op: lambda self: _call(op, (self,), {}))(getattr(operator, _name)))
FakeDeviceArray.__module__ = "cupy._fake"  # what refmoco.backend.is_cupy_array looks at


class FakeCupy(types.ModuleType):
    """The module ``cupy`` of the stand-in: NumPy's functions on boxed arrays."""

    ndarray = FakeDeviceArray

    def __init__(self):
        super().__init__("cupy")
        self.__version__ = f"{CUPY_API['cupy_version']} stand-in"

    @staticmethod
    def is_available():
        return True

    @staticmethod
    def asarray(a, dtype=None):
        if isinstance(a, FakeDeviceArray):
            return a if dtype is None else a.astype(dtype, copy=False)
        return FakeDeviceArray(np.array(a, dtype=dtype, copy=True))  # a host-to-device copy

    @staticmethod
    def array(a, dtype=None, copy=True):
        if isinstance(a, FakeDeviceArray):
            return FakeDeviceArray(np.array(a._a, dtype=dtype, copy=copy))
        return FakeDeviceArray(np.array(a, dtype=dtype, copy=True))

    @staticmethod
    def asnumpy(a):
        return a.get() if isinstance(a, FakeDeviceArray) else np.asarray(a)

    def __getattr__(self, name):
        obj = getattr(np, name)
        if isinstance(obj, types.ModuleType):  # no cupy.random, cupy.linalg & co in the training
            raise AttributeError(f"fake cupy: cupy.{name} is not provided")
        if isinstance(obj, type) or not callable(obj):  # dtypes (xp.int64), constants
            return _checked("cupy", name, obj)
        return _checked("cupy", name, _on_device(obj))


def on_host_info_nce(real, q, k, negatives=None, **kwargs):
    """The mechanisms' InfoNCE on the fake: the NumPy reference on the boxed arrays."""
    if not isinstance(q, FakeDeviceArray):  # a host run: as it is
        return real(q, k, negatives, **kwargs)
    kwargs["backend"] = "numpy"
    out = real(q._a, k._a, None if negatives is None else negatives._a, **kwargs)
    return type(out)(_wrap(np.asarray(out.loss)), {n: _wrap(g) for n, g in out.grads.items()})


def on_host_momentum_update(real, target, source, momentum, *, backend=None):
    """The mechanisms' EMA update on the fake: the NumPy reference, in place on the payload."""
    if not isinstance(target, FakeDeviceArray):  # a host run: as it is
        return real(target, source, momentum, backend=backend)
    real(target._a, source._a, momentum, backend="numpy")  # in place, on the shared payload
    return target


def on_host_relu_backward(dy, y):
    """ReLU's CUDA backward (``refmoco.kernels.cuda.relu_backward``) on the fake: the
    reference's product on the payloads, in ``dy``'s memory order, as the kernel writes it."""
    out = np.empty_like(dy._a)  # order "K": dy's memory order
    np.multiply(dy._a, y._a > 0, out=out)
    return _wrap(out)


def on_host_l2_normalize_rows(x, eps):
    """The CUDA row normalisation (``refmoco.kernels.cuda.l2_normalize_rows``) on the fake: the
    reference's arithmetic on the payload, with its per-row denominator and clamp."""
    from refmoco.losses.normalize import l2_norm

    norm = l2_norm(x._a, -1, np)[:, 0]
    clamped = norm < eps
    denom = np.where(clamped, x.dtype.type(eps), norm)
    return _wrap(x._a / denom[:, None]), _wrap(denom), _wrap(clamped)


def on_host_l2_normalize_rows_backward(y, dy, denom, clamped):
    """Its backward on the fake: the reference's arithmetic on the payloads."""
    radial = (y._a * dy._a).sum(axis=1, keepdims=True)
    c, d = clamped._a[:, None], denom._a[:, None]
    return _wrap(np.where(c, dy._a, dy._a - y._a * radial) / d)


def on_host_sgd_step(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """The CUDA SGD step (``refmoco.kernels.cuda.sgd_step``) on the fake: the reference's step
    (:class:`refmoco.optim.SGD` on NumPy) on the payloads, in place."""
    from refmoco.optim import SGD

    opt = SGD(lr, momentum=momentum, weight_decay=weight_decay, dampening=dampening,
              nesterov=nesterov, backend="numpy")
    opt.momentum_buffer = None if first_step or buf is None else buf._a
    opt.step(p._a, g._a)
    if momentum and first_step:
        buf._a[...] = opt.momentum_buffer


def on_host_im2col(x, kh, kw, s, p, ho, wo):
    """The CUDA im2col (``refmoco.kernels.cuda.im2col``) on the fake: the reference's gather on
    the payload (the kernel itself runs in the simulator tests)."""
    from refmoco.nn import functional as F

    return FakeDeviceArray(np.ascontiguousarray(F._im2col(x._a, kh, kw, s, p, ho, wo)))


def on_host_col2im(dcols, h, w, s, p):
    """The CUDA col2im on the fake: the reference's scatter on the payload."""
    from refmoco.nn import functional as F

    return FakeDeviceArray(np.ascontiguousarray(F._col2im(dcols._a, h, w, s, p)))


def on_host_batch_norm_forward(x, gamma, beta, running_mean, running_var, *, train, momentum=0.1,
                               eps=1e-5, num_batches_tracked=None):
    """The CUDA batch-norm forward on the fake: the reference on the payloads (the running
    statistics and the counter updated in place, as the kernel does), its cache boxed for the
    device."""
    from refmoco.nn import functional as F

    counter = num_batches_tracked
    counter = counter._a if isinstance(counter, FakeDeviceArray) else counter
    y, cache = F.batch_norm_forward(x._a, gamma._a, beta._a, running_mean._a, running_var._a,
                                    train=train, momentum=momentum, eps=eps, backend="numpy",
                                    num_batches_tracked=counter)
    return _wrap(y), cache._replace(x_hat=_wrap(cache.x_hat), inv_std=_wrap(cache.inv_std),
                                    gamma=_wrap(cache.gamma), backend="cupy")


def on_host_batch_norm_backward(dy, cache, out=None):
    """The CUDA batch-norm backward on the fake: the reference on the payloads (``out``:
    device arrays, written through their payloads)."""
    from refmoco.nn import functional as F

    host = cache._replace(x_hat=cache.x_hat._a, inv_std=cache.inv_std._a, gamma=cache.gamma._a,
                          backend="numpy")
    out = None if out is None else tuple(a._a for a in out)
    return tuple(_wrap(g) for g in F.batch_norm_backward(dy._a, host, out))
