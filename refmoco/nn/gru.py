r"""A gated recurrent unit (GRU) with hand-written backpropagation through time.

The equations, gate order (r, z, n), parameter names and layouts are PyTorch's ``torch.nn.GRU``
(one layer, unidirectional, ``batch_first=True``), so weights copy across in both directions::

    layer = GRU(input_size=16, hidden_size=32)
    params = layer.init_params(rng, "float32")   # weight_ih_l0 (96, 16), weight_hh_l0 (96, 32),
                                                 # bias_ih_l0 (96,), bias_hh_l0 (96,)
    out, cache = layer.forward(params, {}, x)    # x: (N, T, 16) -> out: (N, T, 32)
    dx, grads = layer.backward(params, cache, dout)

The free functions :func:`gru_forward` / :func:`gru_backward` also take an initial state ``h0`` and
return its gradient; :func:`gru_cell_forward` / :func:`gru_cell_backward` are one time step.

Every function runs on NumPy or CuPy arrays, as the other layers of :mod:`refmoco.nn` do: the array
module ``xp`` is the weights' (:func:`refmoco.backend.namespace_of`), so on the GPU the same code
runs as cuBLAS products and CuPy elementwise kernels and every result stays on the device. An
argument on the other device is a ``TypeError`` naming it (nothing is copied behind the caller's
back). Only the loop over time steps runs on the host, as Python.

References
----------
- Cho et al. Learning Phrase Representations using RNN Encoder-Decoder. arXiv:1406.1078.
- van den Oord, Li, Vinyals. Representation Learning with Contrastive Predictive Coding.
  arXiv:1807.03748 (a GRU is CPC's autoregressive context model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from refmoco.backend import check_device, namespace_of
from refmoco.nn.functional import _check_backend
from refmoco.nn.layers import Layer, _check_positive_int, _uniform, check_dtype


def _sigmoid(a, xp=np):
    """``1 / (1 + exp(-a))`` as ``(1 + tanh(a / 2)) / 2``: no overflow for any ``a``."""
    return 0.5 * (1.0 + xp.tanh(0.5 * a))


def _placement(w, **arrays):
    """The array module of the weight ``w``; a ``TypeError`` naming any of ``arrays`` (``None``
    entries skipped) that lives on the other device. NumPy arrays with NumPy weights skip the
    checks (a user's loop calls the cell once per time step)."""
    xp = np if isinstance(w, np.ndarray) else namespace_of(w)
    for name, a in arrays.items():
        if a is not None and not (xp is np and isinstance(a, np.ndarray)):
            check_device(a, name, xp)
    return xp


class GRUCellCache(NamedTuple):
    x: np.ndarray  # (N, I)
    h: np.ndarray  # (N, H) the previous state
    r: np.ndarray  # (N, H) reset gate
    z: np.ndarray  # (N, H) update gate
    n: np.ndarray  # (N, H) candidate state
    hn: np.ndarray  # (N, H) W_hn h + b_hn, which the reset gate multiplies
    w_ih: np.ndarray  # (3H, I)
    w_hh: np.ndarray  # (3H, H)


def gru_cell_forward(x, h, w_ih, w_hh, b_ih, b_hh):
    r"""One GRU step, as ``torch.nn.GRUCell``.

    Parameters
    ----------
    x : ndarray of shape (N, I)
    h : ndarray of shape (N, H)
        The previous hidden state.
    w_ih : ndarray of shape (3H, I)
        Input weights of the gates r, z, n, stacked in that order (``weight_ih``).
    w_hh : ndarray of shape (3H, H)
        Recurrent weights, same order (``weight_hh``).
    b_ih, b_hh : ndarray of shape (3H,)

    Returns
    -------
    h_new : ndarray of shape (N, H)
    cache : GRUCellCache

    Notes
    -----
    With :math:`\sigma` the logistic function and :math:`\odot` the elementwise product,

    .. math::
        r &= \sigma(W_{ir} x + b_{ir} + W_{hr} h + b_{hr}) \\
        z &= \sigma(W_{iz} x + b_{iz} + W_{hz} h + b_{hz}) \\
        n &= \tanh(W_{in} x + b_{in} + r \odot (W_{hn} h + b_{hn})) \\
        h' &= (1 - z) \odot n + z \odot h
    """
    xp = _placement(w_ih, x=x, h=h, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)
    hs = h.shape[1]
    gi = x @ w_ih.T + b_ih  # (N, 3H)
    gh = h @ w_hh.T + b_hh  # (N, 3H)
    r = _sigmoid(gi[:, :hs] + gh[:, :hs], xp)  # (N, H)
    z = _sigmoid(gi[:, hs : 2 * hs] + gh[:, hs : 2 * hs], xp)  # (N, H)
    hn = gh[:, 2 * hs :]  # (N, H)
    n = xp.tanh(gi[:, 2 * hs :] + r * hn)  # (N, H)
    h_new = n + z * (h - n)  # (N, H): (1 - z) n + z h
    return h_new, GRUCellCache(x, h, r, z, n, hn, w_ih, w_hh)


def _cell_pre_backward(dh_new, h, r, z, n, hn, xp=np):
    """Gradients of the gates' pre-activations, ``(dgi, dgh, dh_direct)``, each (N, 3H) / (N, H).

    ``dgi`` is the gradient of ``W_ih x + b_ih``, ``dgh`` that of ``W_hh h + b_hh``;
    ``dh_direct = dh' * z`` is the part of ``dh`` that does not pass through ``W_hh``.
    """
    dn = dh_new * (1 - z)  # (N, H)
    dz = dh_new * (h - n)  # (N, H)
    da_n = dn * (1 - n * n)  # (N, H): through tanh
    dr = da_n * hn  # (N, H)
    da_r = dr * r * (1 - r)  # (N, H): through sigma
    da_z = dz * z * (1 - z)  # (N, H)
    dgi = xp.concatenate([da_r, da_z, da_n], axis=-1)  # (N, 3H)
    dgh = xp.concatenate([da_r, da_z, da_n * r], axis=-1)  # (N, 3H)
    return dgi, dgh, dh_new * z


def gru_cell_backward(dh_new, cache):
    r"""Gradients ``(dx, dh, dw_ih, dw_hh, db_ih, db_hh)`` of :func:`gru_cell_forward`.

    Notes
    -----
    With :math:`a_r, a_z, a_n` the pre-activations of the three gates and
    :math:`g_h = W_{hn} h + b_{hn}`:

    .. math::
        \partial n &= \partial h' \odot (1 - z), \quad
        \partial z = \partial h' \odot (h - n), \quad
        \partial a_n = \partial n \odot (1 - n^2) \\
        \partial a_r &= \partial a_n \odot g_h \odot r (1 - r), \quad
        \partial a_z = \partial z \odot z (1 - z) \\
        \partial(W_{ih}x + b_{ih}) &= [\partial a_r, \partial a_z, \partial a_n], \quad
        \partial(W_{hh}h + b_{hh}) = [\partial a_r, \partial a_z, \partial a_n \odot r] \\
        \partial h &= \partial h' \odot z + \partial(W_{hh}h + b_{hh})\, W_{hh}
    """
    x, h, r, z, n, hn, w_ih, w_hh = cache
    xp = _placement(w_ih, dh_new=dh_new)
    dgi, dgh, dh = _cell_pre_backward(dh_new, h, r, z, n, hn, xp)
    dx = dgi @ w_ih  # (N, I)
    dh = dh + dgh @ w_hh  # (N, H)
    return dx, dh, dgi.T @ x, dgh.T @ h, dgi.sum(axis=0), dgh.sum(axis=0)


class GRUCache(NamedTuple):
    x: np.ndarray  # (N, T, I)
    h_prev: np.ndarray  # (N, T, H) the state entering each step: h0, h_1, ..., h_{T-1}
    r: np.ndarray  # (N, T, H)
    z: np.ndarray  # (N, T, H)
    n: np.ndarray  # (N, T, H)
    hn: np.ndarray  # (N, T, H)
    w_ih: np.ndarray  # (3H, I)
    w_hh: np.ndarray  # (3H, H)


def gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh):
    r"""Run a GRU over a batch of sequences, as ``torch.nn.GRU(I, H, batch_first=True)``.

    Parameters
    ----------
    x : ndarray of shape (N, T, I)
    h0 : ndarray of shape (N, H) or None
        The initial state (zeros when None).
    w_ih : ndarray of shape (3H, I)
    w_hh : ndarray of shape (3H, H)
    b_ih, b_hh : ndarray of shape (3H,)

    Returns
    -------
    out : ndarray of shape (N, T, H)
        The hidden state after every step; ``out[:, -1]`` is PyTorch's ``h_n[0]``.
    cache : GRUCache

    Notes
    -----
    :math:`h_t = \mathrm{cell}(x_t, h_{t-1})` with the cell of :func:`gru_cell_forward`. The input
    projections :math:`W_{ih} x_t + b_{ih}` of all steps are one matrix product before the loop;
    only :math:`W_{hh} h_{t-1}` is computed step by step.
    """
    xp = _placement(w_ih, x=x, h0=h0, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)
    nb, t_len, _ = x.shape
    hs = w_hh.shape[1]
    h = xp.zeros((nb, hs), dtype=x.dtype) if h0 is None else h0
    gi = x @ w_ih.T + b_ih  # (N, T, 3H)
    out = xp.empty((nb, t_len, hs), dtype=x.dtype)
    h_prev, r, z, n, hn = (xp.empty_like(out) for _ in range(5))
    for t in range(t_len):
        gh = h @ w_hh.T + b_hh  # (N, 3H)
        h_prev[:, t] = h
        r[:, t] = _sigmoid(gi[:, t, :hs] + gh[:, :hs], xp)  # (N, H)
        z[:, t] = _sigmoid(gi[:, t, hs : 2 * hs] + gh[:, hs : 2 * hs], xp)  # (N, H)
        hn[:, t] = gh[:, 2 * hs :]  # (N, H)
        n[:, t] = xp.tanh(gi[:, t, 2 * hs :] + r[:, t] * hn[:, t])  # (N, H)
        h = out[:, t] = n[:, t] + z[:, t] * (h - n[:, t])  # (N, H)
    return out, GRUCache(x, h_prev, r, z, n, hn, w_ih, w_hh)


def gru_backward(dout, cache, dh_last=None):
    r"""Backpropagation through time: gradients ``(dx, dh0, dw_ih, dw_hh, db_ih, db_hh)``.

    Parameters
    ----------
    dout : ndarray of shape (N, T, H)
        Gradient of the outputs of every step.
    cache : GRUCache
    dh_last : ndarray of shape (N, H), optional
        An extra gradient of the final state (PyTorch's ``h_n``).

    Returns
    -------
    dx : ndarray of shape (N, T, I)
    dh0 : ndarray of shape (N, H)
    dw_ih : ndarray of shape (3H, I)
    dw_hh : ndarray of shape (3H, H)
    db_ih, db_hh : ndarray of shape (3H,)

    Notes
    -----
    Going backwards from :math:`t = T`, the gradient reaching :math:`h_t` is
    :math:`\partial h_t = \partial\mathrm{out}_t + \partial h_t^{(t+1)}`, where the second term
    is what step :math:`t + 1` sends back through :math:`z \odot h` and :math:`W_{hh}` (see
    :func:`gru_cell_backward`). The pre-activation gradients of all steps are kept, and the
    weight gradients are sums over time, :math:`\partial W_{ih} = \sum_t \partial g^i_t{}^\top
    x_t` and :math:`\partial W_{hh} = \sum_t \partial g^h_t{}^\top h_{t-1}`, each one product.
    """
    x, h_prev, r, z, n, hn, w_ih, w_hh = cache
    xp = _placement(w_ih, dout=dout, dh_last=dh_last)
    t_len = x.shape[1]
    dgi = xp.empty(x.shape[:2] + (w_ih.shape[0],), dtype=dout.dtype)  # (N, T, 3H)
    dgh = xp.empty_like(dgi)  # (N, T, 3H)
    dh = xp.zeros_like(dout[:, 0]) if dh_last is None else dh_last  # (N, H)
    for t in reversed(range(t_len)):
        dh = dout[:, t] + dh  # (N, H): the output's gradient plus what step t + 1 sent back
        dgi[:, t], dgh[:, t], dh_direct = _cell_pre_backward(
            dh, h_prev[:, t], r[:, t], z[:, t], n[:, t], hn[:, t], xp
        )
        dh = dh_direct + dgh[:, t] @ w_hh  # (N, H): the gradient of h_{t-1}
    dx = dgi @ w_ih  # (N, T, I)
    dw_ih = dgi.reshape(-1, dgi.shape[2]).T @ x.reshape(-1, x.shape[2])  # (3H, I)
    dw_hh = dgh.reshape(-1, dgh.shape[2]).T @ h_prev.reshape(-1, h_prev.shape[2])  # (3H, H)
    return dx, dh, dw_ih, dw_hh, dgi.sum(axis=(0, 1)), dgh.sum(axis=(0, 1))


_NAMES = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")


@dataclass(frozen=True)
class GRU(Layer):
    r"""One-layer GRU over (N, T, input_size) sequences, as ``torch.nn.GRU(..., batch_first=True)``.

    The initial state is zero; the output is the state after every step, (N, T, hidden_size).
    Parameters ``weight_ih_l0`` (3H, I), ``weight_hh_l0`` (3H, H), ``bias_ih_l0`` (3H,),
    ``bias_hh_l0`` (3H,), gates stacked in the order r, z, n; all initialised from
    :math:`U(-1/\sqrt{H}, 1/\sqrt{H})` as PyTorch does. See :func:`gru_forward`.

    ``init_params`` draws host arrays; with CuPy parameters and input the layer runs on the GPU
    (``backend=None`` follows the arrays; ``"numba"`` is the NumPy code).

    Examples
    --------
    >>> import numpy as np
    >>> layer = GRU(3, 4)
    >>> params = layer.init_params(np.random.default_rng(0), "float64")
    >>> x = np.random.default_rng(1).standard_normal((2, 5, 3))
    >>> out, cache = layer.forward(params, {}, x)
    >>> dx, grads = layer.backward(params, cache, np.ones_like(out))
    >>> out.shape, dx.shape, sorted(grads) == sorted(params)
    ((2, 5, 4), (2, 5, 3), True)
    """

    input_size: int
    hidden_size: int

    def __post_init__(self):
        _check_positive_int(self.input_size, "input_size")
        _check_positive_int(self.hidden_size, "hidden_size")

    def param_shapes(self):
        g, i, h = 3 * self.hidden_size, self.input_size, self.hidden_size
        return dict(zip(_NAMES, [(g, i), (g, h), (g,), (g,)], strict=True))

    def init_params(self, rng, dtype="float32"):
        dt, bound = check_dtype(dtype), 1 / math.sqrt(self.hidden_size)
        return {k: _uniform(rng, bound, s, dt) for k, s in self.param_shapes().items()}

    def forward(self, params, buffers, x, *, train=False, backend=None):
        _check_backend(backend, x)  # None, "numpy", "numba" (the same code) or "cupy"
        if x.ndim != 3 or x.shape[2] != self.input_size:
            raise ValueError(
                f"x: GRU expects shape (N, T, {self.input_size}), got {tuple(x.shape)}"
            )
        return gru_forward(x, None, *(params[k] for k in _NAMES))

    def backward(self, params, cache, dy):
        dx, _, *grads = gru_backward(dy, cache)
        return dx, dict(zip(_NAMES, grads, strict=True))
