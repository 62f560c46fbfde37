"""Every parameter of a model as a named view into one flat buffer.

One contiguous 1-D array ``flat`` holds all the parameters, one after the other in
``state_dict()`` order; ``params["backbone.0.weight"]`` is a reshaped view of its slice. Whole-model
operations (the momentum update of the key encoder, an optimizer step, zeroing the gradients) are
then one vectorised pass over ``flat``, while the layers read their own named arrays.

Gradients and optimizer state use the same layout (:meth:`FlatParams.zeros_like`), so that
``params.flat``, ``grads.flat`` and a momentum buffer line up entry for entry.

``p.copy()``, ``copy.deepcopy(p)`` (PyTorch's way to make a key encoder) and a pickle round trip
all give a FlatParams whose named arrays are views of its own new buffer, so an update written
to the copy's ``flat`` is what its layers read; ``copy.copy(p)`` shares ``p``'s buffer.

Batch-norm running statistics are buffers, not parameters: they are kept apart, in a plain dict
(see :mod:`refmoco.nn.models`), so no momentum update or optimizer step ever touches them.

The buffer is a NumPy array (host) or a CuPy array (GPU), and the named arrays are views of the
same kind. :meth:`FlatParams.to` moves a FlatParams between them; ``zeros_like`` and ``copy`` stay
where the original lives. ``state_dict()`` always returns host NumPy copies (what a checkpoint
stores) and ``load_state_dict`` accepts host or device arrays, copying them to where the buffer
lives: a checkpoint saved on one backend loads on any other.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from copy import deepcopy
from typing import Any

import numpy as np

from refmoco.backend import (
    BACKENDS,
    as_array,
    backend_of,
    host_copy,
    is_cupy_array,
    namespace_of,
    to_backend,
    to_numpy,
)
from refmoco.nn.layers import check_dtype


def flat_size(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """The number of entries of a flat buffer holding arrays of these shapes."""
    return sum(int(np.prod(s, dtype=np.int64)) for s in shapes.values())


class FlatParams(Mapping):
    """Named parameter arrays that are views into one 1-D buffer.

    Parameters
    ----------
    shapes : mapping of str to tuple of int
        Names and shapes, in order (the order of the slices in ``flat``).
    dtype : {"float32", "float64"}
    flat : ndarray of shape (size,), optional
        An existing buffer to view (shared, not copied): a NumPy array, or a CuPy array for
        parameters on the GPU. Host zeros when omitted.

    Attributes
    ----------
    flat : ndarray of shape (size,)
        The buffer. Writing into it writes the named arrays, and the other way round.
    shapes : dict of str to tuple of int
    dtype : numpy.dtype
    size : int
        The total number of parameters.
    xp : module
        The buffer's array module: ``numpy``, or ``cupy`` on the GPU.
    backend : str
        ``"cupy"`` when the buffer is a CuPy array, ``"numpy"`` otherwise.

    Examples
    --------
    >>> p = FlatParams({"0.weight": (2, 3), "0.bias": (2,)}, "float64")
    >>> p["0.bias"][:] = 1.0
    >>> p.flat
    array([0., 0., 0., 0., 0., 0., 1., 1.])
    >>> g = p.zeros_like()   # the same layout, for gradients
    >>> list(g) == list(p)
    True
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], dtype: Any = "float32", *, flat=None):
        self.dtype = check_dtype(dtype)
        self.shapes = {str(k): tuple(int(n) for n in s) for k, s in shapes.items()}
        self.size = flat_size(self.shapes)
        if flat is None:
            flat = np.zeros(self.size, self.dtype)
        elif not (
            (isinstance(flat, np.ndarray) or is_cupy_array(flat))
            and flat.shape == (self.size,)
            and flat.dtype == self.dtype
        ):
            raise ValueError(
                f"flat: expected a 1-d {self.dtype} ndarray of size {self.size}, "
                f"got {type(flat).__name__} {getattr(flat, 'dtype', '')} {getattr(flat, 'shape', '')}"
            )
        elif not flat.flags.c_contiguous:
            raise ValueError("flat: expected a contiguous array")
        self.flat = flat
        self._views: dict[str, np.ndarray] = {}
        offset = 0
        for name, shape in self.shapes.items():
            n = int(np.prod(shape, dtype=np.int64))
            self._views[name] = flat[offset : offset + n].reshape(shape)
            offset += n

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], dtype: Any = None) -> FlatParams:
        """A new buffer holding copies of ``arrays`` (dtype: ``dtype``, else the first array's).

        The buffer lives where the arrays live (on the GPU for CuPy arrays); NumPy and CuPy
        arrays together are a ``TypeError``.
        """
        arrays = {k: as_array(v, k) for k, v in arrays.items()}
        xp = namespace_of(*arrays.values())
        if dtype is None:
            dtype = next(iter(arrays.values())).dtype if arrays else "float32"
        dtype = check_dtype(dtype)
        shapes = {k: tuple(a.shape) for k, a in arrays.items()}
        p = cls(shapes, dtype, flat=xp.empty(flat_size(shapes), dtype=dtype))
        p.load_state_dict(arrays)
        return p

    # --- where the buffer lives ----------------------------------------------------------------
    @property
    def xp(self):
        """The array module of the buffer (``numpy``, or ``cupy`` on the GPU)."""
        return namespace_of(self.flat)

    @property
    def backend(self) -> str:
        """``"cupy"`` for a buffer on the GPU, ``"numpy"`` for one on the host."""
        return backend_of(self.flat)

    def to(self, backend: str) -> FlatParams:
        """These parameters where ``backend`` computes: on the GPU for ``"cupy"``, on the host
        for ``"numpy"`` and ``"numba"``.

        Returns ``self`` when the buffer is already there, else a new FlatParams holding a copy
        (one transfer of the whole flat buffer).

        Raises
        ------
        ValueError
            An unknown backend.
        refmoco.backend.BackendUnavailableError
            ``"cupy"`` without CuPy or without a GPU.
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        if (backend == "cupy") == is_cupy_array(self.flat):
            return self
        return FlatParams(self.shapes, self.dtype, flat=to_backend(self.flat, backend))

    # --- Mapping ---------------------------------------------------------------------------
    def __getitem__(self, name: str) -> np.ndarray:
        return self._views[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._views)

    def __len__(self) -> int:
        return len(self._views)

    def __repr__(self) -> str:
        return f"FlatParams({len(self)} arrays, {self.size} {self.dtype} values)"

    # --- same layout -------------------------------------------------------------------------
    def zeros_like(self) -> FlatParams:
        """A new, zero-filled FlatParams with the same names, shapes, dtype, offsets and device."""
        return FlatParams(self.shapes, self.dtype, flat=self.xp.zeros(self.size, dtype=self.dtype))

    def copy(self) -> FlatParams:
        """A new FlatParams with a copy of the buffer (on the same device)."""
        return FlatParams(self.shapes, self.dtype, flat=self.flat.copy())

    # --- copy, deepcopy, pickle ------------------------------------------------------------
    # The state is the layout and the one buffer, never the named arrays: rebuilding from it
    # (``__init__``, as ``copy`` does) makes the named arrays views of the restored buffer. A
    # pickled or deep-copied FlatParams whose named arrays were separate copies would let an
    # optimizer step or momentum update (which write ``.flat``) leave the arrays a forward pass
    # reads unchanged. ``copy.copy`` gives a FlatParams sharing this buffer (new views of it).
    def __getstate__(self) -> dict:
        return {"shapes": self.shapes, "dtype": self.dtype, "flat": self.flat}

    def __setstate__(self, state: dict) -> None:
        # Also reads the __dict__ pickled before this method existed (its extra keys ignored).
        FlatParams.__init__(self, state["shapes"], state["dtype"], flat=state["flat"])

    def __deepcopy__(self, memo: dict) -> FlatParams:
        new = FlatParams.__new__(type(self))
        memo[id(self)] = new
        flat = deepcopy(self.flat, memo)  # the memo's copy if ``.flat`` was copied already
        new.__setstate__({"shapes": self.shapes, "dtype": self.dtype, "flat": flat})
        for name, view in self._views.items():  # a named array copied later, alongside, is
            memo.setdefault(id(view), new._views[name])  # the view of the new buffer
        return new

    def same_layout(self, other: Any) -> bool:
        """True when ``other`` is a FlatParams with the same names, shapes and dtype, in order
        (wherever it lives: see :attr:`backend`)."""
        return (
            isinstance(other, FlatParams)
            and other.dtype == self.dtype
            and list(other.shapes.items()) == list(self.shapes.items())
        )

    # --- state dict --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """A ``{name: array}`` dict of host NumPy copies (safe to keep while training goes on;
        parameters on the GPU are copied to the host, as a checkpoint stores them)."""
        if isinstance(self.flat, np.ndarray):
            return {k: v.copy() for k, v in self._views.items()}
        host = FlatParams(self.shapes, self.dtype, flat=host_copy(self.flat))  # one transfer
        return dict(host.items())  # views of that fresh host copy

    def load_state_dict(self, state_dict: Mapping[str, Any], *, strict: bool = True) -> None:
        """Copy ``state_dict``'s arrays (NumPy or CuPy arrays, PyTorch tensors) into the buffer.

        Everything is checked before anything is written: on an error the parameters are left
        as they were. Arrays are copied to where the buffer lives (host to GPU, or back), and
        cast to its dtype.

        Parameters
        ----------
        state_dict : mapping of str to array
        strict : bool
            When false, names that are not parameters (such as the batch-norm buffers of a
            PyTorch ``state_dict()``) are ignored instead of being an error.

        Raises
        ------
        ValueError
            A parameter missing from ``state_dict``, an unexpected name (if ``strict``), or an
            array whose shape differs; the message names the key.
        TypeError
            A non-floating-point array for a parameter.
        """
        missing = [k for k in self._views if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict: missing parameter(s) {missing}")
        unexpected = [k for k in state_dict if k not in self._views]
        if strict and unexpected:
            raise ValueError(f"state_dict: unexpected key(s) {unexpected}")
        arrays = {k: as_array(state_dict[k], k) for k in self._views}
        for k, a in arrays.items():
            if a.shape != self.shapes[k]:
                raise ValueError(
                    f"state_dict[{k!r}]: expected shape {self.shapes[k]}, got {a.shape}"
                )
            if a.dtype.kind != "f":
                raise TypeError(
                    f"state_dict[{k!r}]: expected a floating-point array, got {a.dtype}"
                )
        gpu = is_cupy_array(self.flat)
        for k, a in arrays.items():
            if is_cupy_array(a) != gpu:  # the explicit transfer of a load
                a = to_backend(a, "cupy") if gpu else to_numpy(a)
            self._views[k][...] = a
