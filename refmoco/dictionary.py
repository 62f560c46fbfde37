"""MoCo's dictionary (a ring-buffer queue of keys) and the memory bank it is compared with.

Both hold their rows as a (rows, dim) array: a batch write into the queue is one or two
contiguous slices, never a roll or a concatenation of the whole buffer. Both can be saved and
restored exactly (rows, ids, pointer, random state), so a resumed run loses nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from typing import Any

import numpy as np

from ._checks import check_int, check_unit_interval
from .backend import (
    array_module,
    as_array,
    check_available,
    float_array,
    is_cupy_array,
    namespace_of,
    to_numpy,
)
from .losses.normalize import l2_normalize

_DTYPES = ("float32", "float64")


def _check_dtype(dtype: Any) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.name not in _DTYPES:
        raise ValueError(f"dtype: expected 'float32' or 'float64', got {dt.name!r}")
    return dt


def _check_backend(backend: Any) -> str:
    if backend not in ("numpy", "numba", "cupy"):
        raise ValueError(f"backend: expected 'numpy', 'numba' or 'cupy', got {backend!r}")
    check_available(backend)  # a missing Numba, or CuPy and a GPU: say what to install
    return backend


def _check_seed(seed: Any) -> int | None:
    """An integer >= 0, or None for fresh entropy (the generator's state is saved either way)."""
    return None if seed is None else check_int(seed, "seed", minimum=0)


def _finite_in(a: Any, dtype: np.dtype, xp: Any, name: str) -> Any:
    """``a`` in the store's ``dtype`` (a cast only when it differs), refused unless every value
    is finite there: checked after the cast, as 1e300 is inf in float32."""
    if a.dtype != dtype:
        with np.errstate(over="ignore"):  # an overflow is refused just below
            a = a.astype(dtype)
    if not bool(xp.isfinite(a).all()):
        raise ValueError(f"{name}: expected finite {dtype.name} values, got NaN or inf")
    return a


def check_ids(ids: Any, n: int, per: str) -> np.ndarray:
    """Sample ids as a host int64 array of shape ``(n,)``, one per ``per`` (key, sample): from
    any integer array (NumPy, CuPy, a list), else a ``TypeError`` / ``ValueError`` naming
    ``ids``; unsigned values beyond int64 are refused rather than wrapped."""
    ids = to_numpy(as_array(ids, "ids"))
    if ids.dtype.kind not in "iu":
        raise TypeError(f"ids: expected integers, got dtype {ids.dtype}")
    if ids.shape != (n,):
        raise ValueError(f"ids: expected shape ({n},) (one per {per}), got {ids.shape}")
    if ids.dtype.kind == "u" and n and ids.max() > np.iinfo(np.int64).max:
        raise ValueError("ids: expected values that fit in int64, got larger unsigned ones")
    return ids.astype(np.int64, copy=False)


def _random_unit_rows(rng: np.random.Generator, size: int, dim: int, dtype: np.dtype):
    """Standard normal rows, each L2-normalised (MoCo's queue initialisation), drawn on the
    host in float64 so that every dtype and backend starts from the same rows."""
    rows = rng.standard_normal((size, dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(dtype)


def _readonly(a):
    if isinstance(a, np.ndarray):
        v = a.view()
        v.flags.writeable = False
        return v
    return a  # CuPy arrays have no read-only flag


def rng_to_array(rng: np.random.Generator) -> np.ndarray:
    """A generator's state as a 0-d string array, storable in an ``.npz`` without pickle."""
    return np.array(json.dumps(rng.bit_generator.state))


def rng_from_array(state: Any) -> np.random.Generator:
    """A new generator in the state saved by :func:`rng_to_array`."""
    rng = np.random.default_rng()
    rng.bit_generator.state = json.loads(str(state))
    return rng


def _writer_alive(pid: int) -> bool:
    """Whether process ``pid`` may still be writing (it exists, or cannot be asked about)."""
    if pid == os.getpid():
        return True  # a thread of this process: its own except clause removes its file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process, or no way to tell: leave its file alone
        return True
    return True


def atomic_savez(path: str | os.PathLike, **arrays: Any) -> None:
    """Write an ``.npz`` file atomically: a crash mid-write leaves any old file intact.

    The data goes to ``.NAME.partial-PID-XXXX`` beside ``NAME`` and is then renamed over it. A
    partial file whose writing process no longer exists (one killed mid-write: nothing else
    could remove it) is removed by the next save of the same ``NAME``; a live writer's is left
    alone. The file keeps the permissions it had, or gets a new file's under the umask (the
    partial file is opened with mode 0o666, which the kernel masks, as ``open`` does).
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    prefix = f".{name}.partial-"
    for left in os.listdir(folder):
        if not left.startswith(prefix):
            continue
        pid = left[len(prefix):].split("-", 1)[0]  # .NAME.partial-PID-XXXX
        if pid.isdigit() and not _writer_alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, left))
    while True:
        tmp = os.path.join(folder, f"{prefix}{os.getpid()}-{secrets.token_hex(4)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:  # a name taken already: draw another
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            with contextlib.suppress(FileNotFoundError):
                os.chmod(tmp, os.stat(path).st_mode & 0o777)  # an existing file keeps its mode
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class Queue:
    r"""MoCo's FIFO dictionary of keys as a ring buffer.

    Parameters
    ----------
    size : int
        ``K``, the number of keys.
    dim : int
        ``C``, the key dimension.
    dtype : {"float32", "float64"}
    seed : int or None
        Seed of the initial keys (standard normal rows, each L2-normalised, as in MoCo); None
        draws fresh entropy (``state_dict`` still saves the generator, so a run resumes).
    backend : {"numpy", "numba", "cupy"}
        Where the buffer lives (``"cupy"``: on the GPU).

    Attributes
    ----------
    keys : ndarray of shape (size, dim)
        Read-only view of the buffer in storage order (what the loss uses: the order of the
        negatives does not change InfoNCE).
    ids : ndarray of int64, shape (size,)
        Id of the sample each row came from; -1 for the initial random rows.
    ptr : int
        The next row to be written.

    Notes
    -----
    ``enqueue`` of ``b`` rows behaves as if the rows were written one at a time: row ``j`` of the
    batch lands at ``(ptr + j) mod size`` and ``ptr`` advances by ``b mod size``. A batch larger
    than ``size`` therefore keeps its newest ``size`` rows. Unlike the official MoCo code, ``size``
    need not be a multiple of the batch size (MoCo asserts ``K % N == 0``).

    Examples
    --------
    >>> import numpy as np
    >>> from refmoco import Queue
    >>> queue = Queue(size=4, dim=2, seed=0)
    >>> queue.enqueue(np.eye(2, dtype=np.float32)[[0, 1, 0]], ids=[7, 8, 9])
    >>> queue.ptr, queue.ids.tolist()
    (3, [7, 8, 9, -1])
    """

    def __init__(self, size, dim, *, dtype="float32", seed=0, backend="numpy"):
        self.size = check_int(size, "size", minimum=1)
        self.dim = check_int(dim, "dim", minimum=1)
        self.dtype = _check_dtype(dtype)
        self.backend = _check_backend(backend)
        self.rng = np.random.default_rng(_check_seed(seed))
        init = _random_unit_rows(self.rng, self.size, self.dim, self.dtype)
        self._keys = array_module(backend).asarray(init)  # (K, C)
        self._ids = np.full(self.size, -1, dtype=np.int64)  # (K,), kept on the host
        self._ptr = 0

    @property
    def keys(self):
        return _readonly(self._keys)

    @property
    def ids(self) -> np.ndarray:
        return _readonly(self._ids)

    @property
    def ptr(self) -> int:
        return self._ptr

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"Queue(size={self.size}, dim={self.dim}, dtype={self.dtype.name}, ptr={self._ptr})"

    def _check_batch(self, keys, ids):
        keys = float_array(keys, "keys", ndim=2)
        if keys.shape[1] != self.dim:
            raise ValueError(f"keys: expected shape (b, {self.dim}), got {tuple(keys.shape)}")
        if is_cupy_array(keys) != (self.backend == "cupy"):
            where = "CuPy" if self.backend == "cupy" else "NumPy"
            raise TypeError(f"keys: this queue lives on backend={self.backend!r}: pass {where} arrays")
        keys = _finite_in(keys, self.dtype, self.xp, "keys")
        return keys, None if ids is None else check_ids(ids, keys.shape[0], "key")

    def enqueue(self, keys, ids=None) -> None:
        """Write a batch of keys (and their sample ids), oldest rows overwritten first.

        Parameters
        ----------
        keys : ndarray of shape (b, dim)
            Any ``b >= 0``; cast to the queue's dtype.
        ids : array of int of shape (b,), optional
            The sample each key came from (-1 when not given).

        Raises
        ------
        TypeError, ValueError
            Wrong dim, non-finite keys, ids of the wrong length or type. The queue is unchanged.
        """
        keys, ids = self._check_batch(keys, ids)
        b = keys.shape[0]
        if b == 0:
            return
        keep = min(b, self.size)  # a batch larger than the queue keeps its newest rows
        start = (self._ptr + b - keep) % self.size  # where the first kept row lands
        first = min(keep, self.size - start)  # rows before the wrap-around
        rows = keys[b - keep:]  # in the queue's dtype already
        if self.xp.may_share_memory(rows, self._keys):  # e.g. enqueue(queue.keys): read it first
            rows = rows.copy()
        ids = None if ids is None else ids[b - keep:]
        self._keys[start:start + first] = rows[:first]
        self._ids[start:start + first] = -1 if ids is None else ids[:first]  # -1: no sample id
        if first < keep:  # the batch wraps around the end of the buffer
            self._keys[: keep - first] = rows[first:]
            self._ids[: keep - first] = -1 if ids is None else ids[first:]
        self._ptr = (self._ptr + b) % self.size

    @property
    def xp(self):
        """The array module of the keys (``numpy``, or ``cupy`` on the GPU). A property, not a
        stored module, so that a queue can be deep-copied and pickled."""
        return namespace_of(self._keys)

    def ordered(self):
        """A (size, dim) copy of the keys, oldest first (the order a FIFO would give)."""
        return self.xp.concatenate([self._keys[self._ptr:], self._keys[: self._ptr]])

    def ordered_ids(self) -> np.ndarray:
        """The ids in the order of ``ordered()``."""
        return np.concatenate([self._ids[self._ptr:], self._ids[: self._ptr]])

    # -- saving and restoring -------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to restore the queue exactly: keys, ids, pointer, random state."""
        return {
            "keys": to_numpy(self._keys).copy(),
            "ids": self._ids.copy(),
            "ptr": np.int64(self._ptr),
            "rng_state": rng_to_array(self.rng),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``; everything is checked before anything changes."""
        missing = {"keys", "ids", "ptr", "rng_state"} - set(state)
        if missing:
            raise ValueError(f"state: missing entries {sorted(missing)}")
        keys = np.asarray(state["keys"])
        ids = np.asarray(state["ids"])
        ptr = check_int(state["ptr"], "state['ptr']", minimum=0)  # a float is refused, not cut
        if keys.shape != (self.size, self.dim):
            raise ValueError(
                f"state['keys']: expected shape ({self.size}, {self.dim}), got {keys.shape}"
            )
        if keys.dtype != self.dtype:
            raise ValueError(f"state['keys']: expected dtype {self.dtype}, got {keys.dtype}")
        if ids.shape != (self.size,) or ids.dtype.kind not in "iu":
            raise ValueError(f"state['ids']: expected ({self.size},) integers, got {ids.shape}")
        if not 0 <= ptr < self.size:
            raise ValueError(f"state['ptr']: expected an integer in [0, {self.size}), got {ptr}")
        if not np.isfinite(keys).all():  # what enqueue refuses, a restore refuses too
            raise ValueError("state['keys']: expected finite values, got NaN or inf")
        rng = rng_from_array(state["rng_state"])
        self._keys = self.xp.asarray(keys.copy())
        self._ids = ids.astype(np.int64).copy()
        self._ptr = ptr
        self.rng = rng

    def save(self, path) -> None:
        """Save to an ``.npz`` file, atomically."""
        atomic_savez(path, **self.state_dict())

    @classmethod
    def load(cls, path, *, backend="numpy") -> Queue:
        """A queue restored from a file written by ``save``."""
        with np.load(path, allow_pickle=False) as f:
            state = {name: f[name] for name in f.files}
        if "keys" not in state:
            raise ValueError(f"{path}: not a saved Queue (no 'keys' array)")
        size, dim = state["keys"].shape
        queue = cls(size, dim, dtype=state["keys"].dtype, backend=backend)
        queue.load_state_dict(state)
        return queue


class MemoryBank:
    r"""One L2-normalised feature row per training sample (Wu et al. 2018).

    Parameters
    ----------
    size : int
        Number of training samples (rows).
    dim : int
    momentum : float in [0, 1]
        Weight of the old row in ``update``; Wu et al. use 0.5.
    dtype : {"float32", "float64"}
    seed : int or None
        Seed of the initial rows and of the default sampling generator (None: fresh entropy).
    backend : {"numpy", "numba", "cupy"}

    Notes
    -----
    ``update(i, f)`` sets :math:`v_i \leftarrow \frac{m v_i + (1 - m) f}{\lVert m v_i + (1-m) f
    \rVert}`. Where that sum cancels to zero (a feature pointing opposite to its row, such as
    :math:`f = -v_i` with :math:`m = 1/2`), it has no direction: the row becomes the new feature's
    :math:`f / \lVert f \rVert` instead (the fresh observation), and stays as it was if
    :math:`f = 0` too, so that every row stays of unit norm. The negatives of a query are drawn
    uniformly, with replacement, from the other rows.

    Examples
    --------
    >>> import numpy as np
    >>> from refmoco import MemoryBank
    >>> bank = MemoryBank(10, 4, seed=0)
    >>> idx = bank.sample(np.array([3, 5]), num_negatives=6, rng=np.random.default_rng(1))
    >>> idx.shape, bool((idx[0] != 3).all() and (idx[1] != 5).all())
    ((2, 6), True)
    """

    def __init__(self, size, dim, *, momentum=0.5, dtype="float32", seed=0, backend="numpy"):
        self.size = check_int(size, "size", minimum=1)
        self.dim = check_int(dim, "dim", minimum=1)
        self.momentum = check_unit_interval(momentum, "momentum")
        self.dtype = _check_dtype(dtype)
        self.backend = _check_backend(backend)
        self.rng = np.random.default_rng(_check_seed(seed))
        self._bank = array_module(backend).asarray(
            _random_unit_rows(self.rng, self.size, self.dim, self.dtype))

    @property
    def bank(self):
        return _readonly(self._bank)

    @property
    def xp(self):
        """The array module of the rows (``numpy``, or ``cupy`` on the GPU); a property, so that
        a bank can be deep-copied and pickled."""
        return namespace_of(self._bank)

    def __len__(self) -> int:
        return self.size

    def check_rows(self, indices, name="indices", *, distinct=False) -> np.ndarray:
        """``indices`` as host int64 row numbers of this bank: a 1-d integer array with values in
        ``[0, size)`` (and no repeats if ``distinct``), else a TypeError / ValueError naming
        ``name``. What :meth:`update` (distinct) and :meth:`sample` check."""
        idx = to_numpy(as_array(indices, name))
        if idx.dtype.kind not in "iu":
            raise TypeError(f"{name}: expected integers, got dtype {idx.dtype}")
        if idx.ndim != 1:
            raise ValueError(f"{name}: expected a 1-d array, got shape {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.size):
            raise ValueError(f"{name}: expected integers in [0, {self.size})")
        if distinct and np.unique(idx).size != idx.size:
            raise ValueError(f"{name}: expected distinct rows (a repeated row's update is "
                             f"ambiguous)")
        return idx.astype(np.int64)

    def update(self, indices, feats) -> None:
        """Move rows ``indices`` towards ``feats`` and renormalise them.

        Row ``i`` becomes ``normalize(m * bank[i] + (1 - m) * feat)`` with ``m`` the momentum.
        A sum that cancels to zero has no direction: such a row becomes ``feat / ||feat||``, the
        fresh observation, or is left unchanged when ``feat`` is zero as well. Every row of the
        bank keeps unit norm (a sum that cancels only nearly is normalised like any other; its
        direction is then mostly rounding).

        Raises
        ------
        TypeError, ValueError
            Bad indices (out of range, repeated), feats of the wrong shape or non-finite. The
            bank is unchanged.
        """
        idx = self.check_rows(indices, distinct=True)
        feats = float_array(feats, "feats", ndim=2)
        if feats.shape != (idx.size, self.dim):
            raise ValueError(f"feats: expected shape ({idx.size}, {self.dim}), got {feats.shape}")
        if is_cupy_array(feats) != (self.backend == "cupy"):
            raise TypeError(f"feats: this bank lives on backend={self.backend!r}")
        feats = _finite_in(feats, self.dtype, self.xp, "feats")
        xp = self.xp
        m = self.dtype.type(self.momentum)
        old = self._bank[idx]  # (b, C)
        rows = m * old + (1 - m) * feats  # (b, C)
        # a sum that cancels exactly (feats = -old with m = 1/2, or feats = 0 with m = 0) has no
        # direction: the row takes the fresh feature's, or keeps its own if the feature is 0 too
        gone = (rows == 0).all(axis=1, keepdims=True)  # (b, 1)
        rows = xp.where(gone, xp.where((feats == 0).all(axis=1, keepdims=True), old, feats), rows)
        # each row is first scaled by a power of two (exact) to a largest entry in [0.5, 1): a
        # row of subnormal entries would otherwise be divided by a norm rounded to the subnormal
        # grid (2**-149 * [2, 1] gave [1, 0.5]), and a huge one's norm could overflow. A normal
        # row's result is bit for bit what it was unscaled. Every nonzero row gets unit norm.
        _, exponent = xp.frexp(xp.abs(rows).max(axis=1, keepdims=True))  # (b, 1); 0 for a 0 row
        rows = xp.ldexp(rows, -exponent)
        self._bank[idx] = l2_normalize(rows, eps=float(np.finfo(self.dtype).smallest_subnormal))[0]

    def sample(self, indices, num_negatives, rng=None) -> np.ndarray:
        """(len(indices), num_negatives) row indices drawn uniformly, never the query's own.

        Parameters
        ----------
        indices : array of int of shape (b,)
        num_negatives : int
        rng : numpy.random.Generator, optional
            Defaults to the bank's own generator (saved with the bank).
        """
        idx = self.check_rows(indices)
        m = check_int(num_negatives, "num_negatives", minimum=0)
        if self.size < 2:
            raise ValueError("size: sampling negatives needs a bank of at least 2 rows")
        rng = self.rng if rng is None else rng
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng: expected a numpy.random.Generator, got {type(rng).__name__}")
        draws = rng.integers(0, self.size - 1, size=(idx.size, m))  # uniform over size-1 rows
        return draws + (draws >= idx[:, None])  # skip the query's own row

    def state_dict(self) -> dict:
        return {
            "bank": to_numpy(self._bank).copy(),
            "momentum": np.float64(self.momentum),
            "rng_state": rng_to_array(self.rng),
        }

    def load_state_dict(self, state: dict) -> None:
        missing = {"bank", "momentum", "rng_state"} - set(state)
        if missing:
            raise ValueError(f"state: missing entries {sorted(missing)}")
        bank = np.asarray(state["bank"])
        if bank.shape != (self.size, self.dim) or bank.dtype != self.dtype:
            raise ValueError(
                f"state['bank']: expected ({self.size}, {self.dim}) {self.dtype}, "
                f"got {bank.shape} {bank.dtype}"
            )
        # every row a bank can hold has unit norm (its rows start so and update renormalises);
        # rounding leaves them within a few eps of 1
        norms = np.linalg.norm(bank.astype(np.float64), axis=1)
        if not np.all(np.abs(norms - 1) <= 64 * np.finfo(self.dtype).eps):  # False for nan too
            raise ValueError("state['bank']: expected finite rows of unit norm")
        momentum = check_unit_interval(state["momentum"], "state['momentum']")
        rng = rng_from_array(state["rng_state"])
        self._bank = self.xp.asarray(bank.copy())
        self.momentum = momentum
        self.rng = rng

    def save(self, path) -> None:
        atomic_savez(path, **self.state_dict())

    @classmethod
    def load(cls, path, *, backend="numpy") -> MemoryBank:
        with np.load(path, allow_pickle=False) as f:
            state = {name: f[name] for name in f.files}
        if "bank" not in state:
            raise ValueError(f"{path}: not a saved MemoryBank (no 'bank' array)")
        size, dim = state["bank"].shape
        bank = cls(size, dim, dtype=state["bank"].dtype, backend=backend)
        bank.load_state_dict(state)
        return bank
