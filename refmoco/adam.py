r"""Adam on flat parameter buffers, update for update as ``torch.optim.Adam``.

Like :class:`refmoco.optim.SGD`, :class:`Adam` works on whole flat arrays (such as
``FlatParams.flat``): one vectorised pass per step updates every parameter in place, and the state
is two (three with AMSGrad) flat buffers of the same size plus a step counter.

NumPy or CuPy arrays (parameters on the GPU) alike: the update is one reference code run by the
arrays' module, the moment buffers live with the parameters, ``state_dict()`` returns host
copies, and a loaded state follows the parameters to their device at the next step.

References
----------
- Kingma, Ba. Adam: A Method for Stochastic Optimization. arXiv:1412.6980.
- Reddi, Kale, Kumar. On the Convergence of Adam and Beyond (AMSGrad). ICLR 2018.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from refmoco._checks import check_finite
from refmoco.backend import host_copy, namespace_of
from refmoco.optim import _state_to, _step_arguments

_BUFFERS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class Adam:
    r"""Adam with L2 weight decay and optional AMSGrad, as ``torch.optim.Adam``.

    Parameters
    ----------
    lr : float
        Learning rate, >= 0 (overridable per step).
    betas : tuple of float
        :math:`(\beta_1, \beta_2)`, each in [0, 1).
    eps : float
        Added to the denominator, >= 0.
    weight_decay : float
        L2 penalty, >= 0, added to the gradient (PyTorch's ``Adam``, not ``AdamW``).
    amsgrad : bool
        Divide by the running maximum of the second moment (AMSGrad).

    Attributes
    ----------
    step_count : int
        Steps taken (PyTorch's ``state["step"]``).
    exp_avg, exp_avg_sq : ndarray of shape (P,) or None
        First and second moment estimates; ``None`` before the first step.
    max_exp_avg_sq : ndarray of shape (P,) or None
        Running maximum of ``exp_avg_sq`` (AMSGrad only).

    Notes
    -----
    With :math:`g_t` the gradient, :math:`\lambda` the weight decay and :math:`\eta` the
    learning rate, step :math:`t = 1, 2, \ldots` is

    .. math::
        d_t &= g_t + \lambda\,\theta_{t-1} \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, d_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2)\, d_t^2 \qquad (m_0 = v_0 = 0) \\
        \hat v_t &= \max(\hat v_{t-1}, v_t) \ \text{(AMSGrad)}, \quad \hat v_t = v_t
        \ \text{(otherwise)} \\
        \theta_t &= \theta_{t-1} - \frac{\eta}{1 - \beta_1^t}\,
        \frac{m_t}{\sqrt{\hat v_t} / \sqrt{1 - \beta_2^t} + \epsilon}

    which is PyTorch's order of operations: the bias corrections divide the step size and the
    square root of :math:`\hat v_t`, and :math:`\epsilon` is added after the correction.

    Examples
    --------
    >>> import numpy as np
    >>> p = np.array([1.0, -1.0]); g = np.array([0.3, -2.0])
    >>> opt = Adam(lr=0.1)
    >>> opt.step(p, g)
    >>> p  # the first step moves every entry by about lr, against the gradient's sign
    array([ 0.9, -0.9])
    """

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
    ):
        self.lr = check_finite(lr, "lr")
        try:
            b1, b2 = betas
        except (TypeError, ValueError) as exc:
            raise ValueError(f"betas: expected a pair of numbers, got {betas!r}") from exc
        b1, b2 = check_finite(b1, "betas[0]", upper=1.0), check_finite(b2, "betas[1]", upper=1.0)
        if b1 >= 1 or b2 >= 1:
            raise ValueError(f"betas: expected each in [0, 1), got {betas!r}")
        self.betas = (b1, b2)
        self.eps = check_finite(eps, "eps")
        self.weight_decay = check_finite(weight_decay, "weight_decay")
        self.amsgrad = bool(amsgrad)
        self.step_count = 0
        self.exp_avg: np.ndarray | None = None
        self.exp_avg_sq: np.ndarray | None = None
        self.max_exp_avg_sq: np.ndarray | None = None

    def __repr__(self) -> str:
        return (
            f"Adam(lr={self.lr}, betas={self.betas}, eps={self.eps}, "
            f"weight_decay={self.weight_decay}, amsgrad={self.amsgrad})"
        )

    def step(self, params: Any, grads: Any, lr: float | None = None) -> None:
        """Update ``params`` in place from ``grads``.

        Parameters
        ----------
        params : ndarray of shape (P,) or FlatParams
            Updated in place (a FlatParams' ``.flat`` is used).
        grads : ndarray of shape (P,) or FlatParams
            Same shape and dtype as ``params``; not modified.
        lr : float, optional
            This step's learning rate instead of ``self.lr`` (which is left as it is).

        Raises
        ------
        ValueError
            Mismatched shapes, state buffers of another size, or a bad ``lr``.
        TypeError
            Non-float arrays or mismatched dtypes.
        """
        p, g, lr = _step_arguments(params, grads, self.lr if lr is None else lr)
        xp = namespace_of(p)
        for k in _BUFFERS:  # a loaded state follows the parameters to their device
            setattr(self, k, _state_to(getattr(self, k), p))
        if self.exp_avg is None:
            self.exp_avg, self.exp_avg_sq = xp.zeros_like(p), xp.zeros_like(p)
            self.max_exp_avg_sq = xp.zeros_like(p) if self.amsgrad else None
        elif self.exp_avg.shape != p.shape or self.exp_avg.dtype != p.dtype:
            raise ValueError(
                f"params: shape {p.shape} {p.dtype} does not match the optimizer state "
                f"{self.exp_avg.shape} {self.exp_avg.dtype}"
            )
        b1, b2 = self.betas
        m, v = self.exp_avg, self.exp_avg_sq
        self.step_count += 1
        t = self.step_count
        d = g + self.weight_decay * p if self.weight_decay else g  # d_t
        w = p.dtype.type(1 - b1)  # m_t = b1 m + (1 - b1) d, as PyTorch's lerp(m, d, w) forms it:
        if w < 0.5:
            m += w * (d - m)  # m + w (d - m) for weights below 1/2,
        else:
            m[...] = d - (d - m) * (p.dtype.type(1) - w)  # d - (d - m)(1 - w) from 1/2 up
        v *= b2
        v += (1 - b2) * d * d  # v_t = b2 v + (1 - b2) d^2
        if self.amsgrad:
            xp.maximum(self.max_exp_avg_sq, v, out=self.max_exp_avg_sq)  # v-hat_t
            v = self.max_exp_avg_sq
        step_size = lr / (1 - b1**t)  # eta / (1 - b1^t)
        denom = xp.sqrt(v) / math.sqrt(1 - b2**t) + self.eps  # sqrt(v-hat / (1 - b2^t)) + eps
        p -= step_size * (m / denom)

    def state_dict(self) -> dict[str, Any]:
        """Hyper-parameters, step count and host (NumPy) copies of the moment buffers."""
        state: dict[str, Any] = {
            "lr": self.lr,
            "betas": self.betas,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "amsgrad": self.amsgrad,
            "step_count": self.step_count,
        }
        for k in _BUFFERS:
            buf = getattr(self, k)
            state[k] = None if buf is None else host_copy(buf)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (validated before anything changes).

        Raises
        ------
        ValueError
            Missing keys, a bad hyper-parameter or step count, or moment buffers that are not
            1-d float arrays of one shape and dtype (or that disagree with ``amsgrad``).
        """
        keys = ("lr", "betas", "eps", "weight_decay", "amsgrad", "step_count", *_BUFFERS)
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"state: missing key(s) {missing}")
        fresh = Adam(
            state["lr"], tuple(state["betas"]), state["eps"], state["weight_decay"],
            state["amsgrad"],
        )  # fmt: skip
        step_count = state["step_count"]
        if isinstance(step_count, bool) or int(step_count) != step_count or step_count < 0:
            raise ValueError(f"step_count: expected an integer >= 0, got {step_count!r}")
        bufs = {k: None if state[k] is None else host_copy(state[k]) for k in _BUFFERS}
        wanted = list(_BUFFERS if fresh.amsgrad else _BUFFERS[:2]) if step_count else []
        for k, buf in bufs.items():
            if (buf is None) == (k in wanted):
                raise ValueError(
                    f"{k}: expected {'an array' if k in wanted else 'None'} at step {step_count} "
                    f"with amsgrad={fresh.amsgrad}"
                )
        ref = bufs["exp_avg"]
        for k in wanted:
            buf = bufs[k]
            if buf.ndim != 1 or buf.dtype.kind != "f" or buf.shape != ref.shape:
                raise ValueError(
                    f"{k}: expected a 1-d float array like exp_avg, got {buf.dtype} {buf.shape}"
                )
            if buf.dtype != ref.dtype:
                raise ValueError(f"{k}: dtype {buf.dtype} differs from exp_avg's {ref.dtype}")
        self.__dict__.update(fresh.__dict__)
        self.step_count = int(step_count)
        for k, buf in bufs.items():
            setattr(self, k, buf)
