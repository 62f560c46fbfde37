r"""Stochastic gradient descent on flat parameter buffers, and MoCo v2's cosine schedule.

:class:`SGD` follows ``torch.optim.SGD`` update for update. It works on whole flat arrays, such as
``FlatParams.flat`` (:mod:`refmoco.nn.params`): one vectorised pass per step updates every
parameter of a model in place, and the optimizer's state is one flat momentum buffer of the same
size plus a step counter.

The arrays may be NumPy or CuPy arrays (parameters on the GPU): the update is the same reference
code, run by the arrays' module, and the momentum buffer lives with the parameters.
``state_dict()`` returns it as a host copy (what a checkpoint stores); after ``load_state_dict``
it follows the parameters to their device at the next step, as ``torch.optim`` moves a loaded
state to its parameters' device.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._checks import check_finite
from .backend import (
    KERNEL_DTYPES,
    backend_of,
    check_available,
    host_copy,
    is_cupy_array,
    namespace_of,
    resolve,
    to_backend,
)

OPTIMIZER_BACKENDS = (None, "numpy", "numba", "cupy")


def _is_array(a: Any) -> bool:
    return isinstance(a, np.ndarray) or is_cupy_array(a)


def _flat(a: Any, name: str) -> Any:
    """The flat NumPy or CuPy array behind ``a`` (a ``FlatParams`` gives its ``.flat``)."""
    a = a if _is_array(a) else getattr(a, "flat", a)
    if not _is_array(a):
        raise TypeError(f"{name}: expected a NumPy or CuPy array or a FlatParams, got "
                        f"{type(a).__name__}")
    if a.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {a.dtype}")
    return a


def _state_to(buf: Any, p: Any) -> Any:
    """An optimizer state buffer moved to where the parameters ``p`` live (loaded state)."""
    if buf is None or is_cupy_array(buf) == is_cupy_array(p):
        return buf
    return to_backend(buf, backend_of(p))


def _step_arguments(params: Any, grads: Any, lr: Any) -> tuple[Any, Any, float]:
    """The flat arrays and learning rate of one optimizer step, checked: same shape, dtype and
    device (both NumPy or both CuPy arrays)."""
    p, g = _flat(params, "params"), _flat(grads, "grads")
    if is_cupy_array(p) != is_cupy_array(g):
        where = "CuPy (GPU)" if is_cupy_array(p) else "NumPy (host)"
        raise TypeError(f"grads: expected a {where} array like params, got "
                        f"{type(g).__module__.split('.')[0]}.{type(g).__name__}")
    if p.shape != g.shape:
        raise ValueError(f"grads: expected shape {p.shape} (as params), got {g.shape}")
    if p.dtype != g.dtype:
        raise TypeError(f"grads: expected dtype {p.dtype} (as params), got {g.dtype}")
    if not getattr(getattr(p, "flags", None), "writeable", True):  # before any state changes
        raise ValueError("params: the array is read-only")
    return p, g, check_finite(lr, "lr")


class SGD:
    r"""SGD with momentum, dampening, weight decay and Nesterov momentum, as ``torch.optim.SGD``.

    Parameters
    ----------
    lr : float
        Learning rate, >= 0 (overridable per step, e.g. by :func:`cosine_lr`).
    momentum : float
        >= 0.
    weight_decay : float
        L2 penalty, >= 0, added to the gradient.
    dampening : float
        In [0, 1].
    nesterov : bool
        Requires ``momentum > 0`` and ``dampening == 0`` (as PyTorch).
    backend : {None, "numpy", "numba", "cupy"}
        ``None``: the arrays' own (``"cupy"`` for CuPy arrays, else ``"numpy"``). ``"numba"``
        fuses the step into one Numba kernel pass over float32 or float64 NumPy arrays (bitwise
        the reference's update; any memory layout, through contiguous copies), and runs the
        reference update for other dtypes; ``"cupy"`` runs the reference update on CuPy arrays.
        A named backend must fit the arrays of every step (else a ``TypeError``).

    Attributes
    ----------
    step_count : int
        Steps taken.
    momentum_buffer : ndarray of shape (P,) or None
        One entry per parameter, where the parameters live; ``None`` until the first step with
        ``momentum > 0``.

    Notes
    -----
    With :math:`g_t` the gradient, :math:`\lambda` the weight decay, :math:`\mu` the momentum,
    :math:`\tau` the dampening and :math:`\eta` the learning rate, each step is

    .. math::
        d_t &= g_t + \lambda\,\theta_{t-1} \\
        b_t &= d_t \ \text{at the first step},\quad
               b_t = \mu\, b_{t-1} + (1 - \tau)\, d_t \ \text{afterwards} \\
        u_t &= d_t + \mu\, b_t \ \text{(Nesterov)},\quad u_t = b_t \ \text{(otherwise)} \\
        \theta_t &= \theta_{t-1} - \eta\, u_t

    and with :math:`\mu = 0`, :math:`u_t = d_t` (no buffer is kept).

    Examples
    --------
    >>> import numpy as np
    >>> p = np.array([1.0, 2.0]); g = np.array([0.5, -0.5])
    >>> opt = SGD(lr=0.1, momentum=0.9)
    >>> opt.step(p, g); opt.step(p, g)
    >>> p  # steps of 0.1 * 0.5, then 0.1 * (0.9 * 0.5 + 0.5)
    array([0.855, 2.145])
    """

    def __init__(
        self,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        *,
        backend: str | None = None,
    ):
        if backend not in OPTIMIZER_BACKENDS:
            raise ValueError(f"backend: expected None, 'numpy', 'numba' or 'cupy', got "
                             f"{backend!r}")
        check_available(backend)  # a missing Numba or CuPy says what to install, here
        self.backend = backend
        self.lr = check_finite(lr, "lr")
        self.momentum = check_finite(momentum, "momentum")
        self.weight_decay = check_finite(weight_decay, "weight_decay")
        self.dampening = check_finite(dampening, "dampening", upper=1.0)
        self.nesterov = bool(nesterov)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov: Nesterov momentum requires momentum > 0 and dampening = 0")
        self.step_count = 0
        self.momentum_buffer: np.ndarray | None = None

    def __repr__(self) -> str:
        return (
            f"SGD(lr={self.lr}, momentum={self.momentum}, weight_decay={self.weight_decay}, "
            f"dampening={self.dampening}, nesterov={self.nesterov})"
        )

    def _kernel_fits(self, p: Any) -> bool:
        """Whether the Numba kernel (CPU or CUDA) computes the reference's step on ``p`` (and its gradient,
        of the same dtype): a float32 or float64 array, and momentum and weight decay that stay
        nonzero in that dtype. The reference decides "momentum != 0" on the Python float; the
        kernel on its value in ``p``'s dtype (float32(1e-50) == 0): where the two disagree, or
        for float16 and longdouble, the reference runs. (Read-only ``p`` never gets here.)"""
        dtype = p.dtype
        if dtype not in KERNEL_DTYPES:
            return False
        return all(bool(v) == bool(dtype.type(v)) for v in (self.momentum, self.weight_decay))

    def step(self, params: Any, grads: Any, lr: float | None = None) -> None:
        """Update ``params`` in place from ``grads``.

        Parameters
        ----------
        params : ndarray of shape (P,) or FlatParams
            Updated in place (any shape works; a FlatParams' ``.flat`` is used). NumPy or CuPy.
        grads : ndarray of shape (P,) or FlatParams
            Same shape, dtype and device as ``params``; not modified.
        lr : float, optional
            This step's learning rate instead of ``self.lr`` (which is left as it is).

        Raises
        ------
        ValueError
            Mismatched shapes, a momentum buffer of another size, or a bad ``lr``.
        TypeError
            Non-float arrays, mismatched dtypes, NumPy and CuPy arrays together, or arrays that
            do not fit ``backend``.
        """
        p, g, lr = _step_arguments(params, grads, self.lr if lr is None else lr)
        if self.backend is not None and (self.backend == "cupy") != is_cupy_array(p):
            want = "CuPy" if self.backend == "cupy" else "NumPy"
            raise TypeError(f"params: SGD(backend={self.backend!r}) updates {want} arrays, got "
                            f"{type(p).__module__.split('.')[0]}.{type(p).__name__}")
        buf = self.momentum_buffer = _state_to(self.momentum_buffer, p)
        if buf is not None and (buf.shape != p.shape or buf.dtype != p.dtype):
            raise ValueError(
                f"params: shape {p.shape} {p.dtype} does not match the momentum buffer "
                f"{buf.shape} {buf.dtype}"
            )
        fast = "cupy" if is_cupy_array(p) else self.backend  # Numba CUDA or CPU kernels
        if fast in ("numba", "cupy") and self._kernel_fits(p):  # one fused pass over the buffers
            kernels = resolve(fast, p).kernels
            first = buf is None  # PyTorch: the first momentum buffer is the gradient itself
            if self.momentum and first:  # C order, as the reference's d.copy(); all written
                buf = self.momentum_buffer = namespace_of(p).empty(p.shape, p.dtype)
            # the kernel takes C-contiguous buffers: other layouts go through copies (bitwise
            # the same update, element by element)
            pc, gc = (a if a.flags.c_contiguous else a.copy() for a in (p, g))
            bc = None if not self.momentum else buf if buf.flags.c_contiguous else buf.copy()
            kernels.sgd_step(pc, gc, bc, lr, self.momentum, self.dampening, self.weight_decay,
                             self.nesterov, first_step=first)
            if pc is not p:
                p[...] = pc
            if bc is not None and bc is not buf:
                buf[...] = bc
            self.step_count += 1
            return
        d = g + self.weight_decay * p if self.weight_decay else g  # d_t
        if self.momentum:
            if buf is None:
                buf = self.momentum_buffer = d.copy()  # b_1 = d_1
            else:
                buf *= self.momentum
                # b_t = mu b_{t-1} + (1 - tau) d_t; without dampening (1 - tau) d_t is d_t
                buf += (1 - self.dampening) * d if self.dampening else d
            d = d + self.momentum * buf if self.nesterov else buf  # u_t
        p -= lr * d
        self.step_count += 1

    def state_dict(self) -> dict[str, Any]:
        """Hyper-parameters, step count and a host (NumPy) copy of the momentum buffer."""
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "dampening": self.dampening,
            "nesterov": self.nesterov,
            "step_count": self.step_count,
            "momentum_buffer": None
            if self.momentum_buffer is None
            else host_copy(self.momentum_buffer),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (validated before anything changes).

        The backend stays this optimizer's own. The momentum buffer is kept as a host copy
        (on the GPU with ``backend="cupy"``) and follows the parameters at the next step.
        """
        keys = ("lr", "momentum", "weight_decay", "dampening", "nesterov", "step_count")
        missing = [k for k in (*keys, "momentum_buffer") if k not in state]
        if missing:
            raise ValueError(f"state: missing key(s) {missing}")
        fresh = SGD(
            state["lr"],
            state["momentum"],
            state["weight_decay"],
            state["dampening"],
            state["nesterov"],
            backend=self.backend,
        )
        step_count = state["step_count"]
        if isinstance(step_count, bool) or int(step_count) != step_count or step_count < 0:
            raise ValueError(f"step_count: expected an integer >= 0, got {step_count!r}")
        buf = state["momentum_buffer"]
        if isinstance(buf, np.ndarray) and buf.dtype == object and buf.shape == ():
            buf = buf.item()  # None in a 0-d array
        if buf is not None and buf.size == 0:  # a mechanism's checkpoint stores None so
            buf = None  # (an .npz holds no object arrays without pickle)
        if buf is not None:
            buf = host_copy(buf)
            if buf.ndim != 1 or buf.dtype.kind != "f":
                raise ValueError(
                    f"momentum_buffer: expected a 1-d float array, got {buf.dtype} {buf.shape}"
                )
            if self.backend == "cupy":
                buf = to_backend(buf, "cupy")
        self.__dict__.update(fresh.__dict__)
        self.step_count = int(step_count)
        self.momentum_buffer = buf


def cosine_lr(step: int, total_steps: int, base_lr: float, final_lr: float = 0.0) -> float:
    r"""MoCo v2's half-cosine learning-rate decay from ``base_lr`` to ``final_lr``.

    Parameters
    ----------
    step : int
        In [0, total_steps] (MoCo v2 counts epochs; any unit works).
    total_steps : int
        > 0.
    base_lr, final_lr : float
        >= 0.

    Returns
    -------
    float

    Notes
    -----
    .. math:: \eta = \eta_\text{final} + (\eta_\text{base} - \eta_\text{final})\,
              \tfrac12\big(1 + \cos(\pi\, \text{step} / \text{total\_steps})\big)

    With ``final_lr = 0`` this is MoCo v2's ``lr *= 0.5 * (1 + cos(pi * epoch / epochs))``.

    Examples
    --------
    >>> cosine_lr(0, 100, 0.03), cosine_lr(50, 100, 0.03), cosine_lr(100, 100, 0.03)
    (0.03, 0.015, 0.0)
    """
    if isinstance(total_steps, bool) or int(total_steps) != total_steps or total_steps <= 0:
        raise ValueError(f"total_steps: expected an integer > 0, got {total_steps!r}")
    if not (0 <= step <= total_steps):
        raise ValueError(f"step: expected a number in [0, total_steps={total_steps}], got {step!r}")
    base_lr, final_lr = check_finite(base_lr, "base_lr"), check_finite(final_lr, "final_lr")
    return final_lr + (base_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
