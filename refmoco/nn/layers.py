r"""Layers as stateless configuration objects, composed by ``Sequential``.

A layer holds only its hyper-parameters. Its parameters and buffers live outside it, in mappings
keyed by PyTorch's ``state_dict()`` names, and every call receives them::

    params = layer.init_params(rng, "float32")      # {"weight": ..., "bias": ...}
    buffers = layer.init_buffers("float32")         # {"running_mean": ...} for batch norm, else {}
    y, cache = layer.forward(params, buffers, x, train=True)
    dx, grads = layer.backward(params, cache, dy)   # grads: {"weight": dW, "bias": db}

``forward`` updates the buffers in place (batch norm's running statistics, in training only) and
changes nothing else; ``cache`` holds the arrays the backward needs. Inside a :class:`Sequential`
the names get PyTorch's dotted prefixes (``"0.weight"``, ``"backbone.1.running_mean"``).

Parameters and buffers may be NumPy or CuPy arrays: every op takes its array module from its
arrays, so a layer runs wherever its inputs live. ``init_params`` and ``init_buffers`` create
host (NumPy) arrays, drawn from a NumPy ``Generator`` so that a seed gives the same weights on
every backend; :meth:`refmoco.nn.Model.init` moves them to the device.

Initialisation follows PyTorch's defaults: weights and biases of ``Linear`` and ``Conv2d`` are
drawn from :math:`U(-1/\sqrt{\text{fan\_in}}, 1/\sqrt{\text{fan\_in}})` (``kaiming_uniform_`` with
``a = sqrt(5)`` gives exactly this bound), batch norm starts at weight 1, bias 0, running mean 0,
running variance 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from refmoco.losses import l2_normalize
from refmoco.nn import functional as F

FLOAT_DTYPES = ("float32", "float64")


def check_dtype(dtype: Any) -> np.dtype:
    """``np.dtype`` of ``"float32"`` or ``"float64"``; anything else is a ``ValueError``."""
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise ValueError(f"dtype: expected 'float32' or 'float64', got {dtype!r}") from exc
    if dt.name not in FLOAT_DTYPES:
        raise ValueError(f"dtype: expected 'float32' or 'float64', got {dtype!r}")
    return dt


def _check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_input(x: Any, ndims: tuple[int, ...], axis1: int | None, what: str) -> None:
    if x.ndim not in ndims:
        raise ValueError(
            f"x: {what} expects a {' or '.join(map(str, ndims))}-d input, got shape {x.shape}"
        )
    if axis1 is not None and x.shape[1] != axis1:
        raise ValueError(
            f"x: {what} expects {axis1} features/channels on axis 1, got shape {x.shape}"
        )


def _uniform(rng: np.random.Generator, bound: float, shape: tuple, dtype: np.dtype) -> np.ndarray:
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


class Layer:
    """A differentiable op with its hyper-parameters; subclasses override what they need."""

    buffer_names: tuple[str, ...] = ()

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter names and shapes, in PyTorch's order."""
        return {}

    def init_params(
        self, rng: np.random.Generator, dtype: Any = "float32"
    ) -> dict[str, np.ndarray]:
        """Fresh parameters drawn from ``rng`` as PyTorch's default initialisation does."""
        return {}

    def init_buffers(self, dtype: Any = "float32") -> dict[str, np.ndarray]:
        """Fresh buffers (state that is not trained by gradients)."""
        return {}

    def state_names(self) -> list[str]:
        """Every ``state_dict()`` name in PyTorch's order: parameters, then buffers."""
        return list(self.param_shapes()) + list(self.buffer_names)

    def forward(self, params: Mapping, buffers: Mapping, x: np.ndarray, *, train: bool = False,
                backend: str | None = None):
        """``(y, cache)``: the output, and what :meth:`backward` needs.

        Parameters
        ----------
        params, buffers : mapping of str to ndarray
            This layer's entries, by their local names (``"weight"``, ``"running_mean"``).
            Buffers are updated in place in training; nothing else is written.
        x : ndarray
        train : bool
        backend : {None, "numpy", "cupy", "numba"}
            ``None`` computes with the arrays' module (NumPy, or CuPy for arrays on the GPU);
            ``"numpy"`` and ``"cupy"`` name it (and must fit the arrays). ``"numba"`` runs the
            convolutions and batch norms with Numba kernels (the same function); the other
            layers are NumPy either way. The backward follows the forward.
        """
        raise NotImplementedError

    def backward(self, params: Mapping, cache: Any, dy: np.ndarray):
        """``(dx, grads)``: the input's gradient and ``{name: gradient}`` for every parameter."""
        raise NotImplementedError

    def backward_into(self, params: Mapping, cache: Any, dy: np.ndarray, grads: Mapping, *,
                      input_grad: bool = True):
        """:meth:`backward`, the parameter gradients written into ``grads[name]`` (arrays of
        the parameters' shapes and dtype: the named views of a FlatParams of gradients, say);
        returns ``dx``, or None when ``input_grad`` is false (then a layer may skip it).

        This default copies what :meth:`backward` returns; the layers with parameters compute
        their gradients into ``grads`` (no new arrays, no copies).
        """
        dx, g = self.backward(params, cache, dy)
        for name, value in g.items():
            grads[name][...] = value
        return dx if input_grad else None


def _targets(grads: Mapping, bias: bool) -> tuple:
    """``(weight's, bias's)`` arrays of ``grads`` to compute the gradients into (None: no bias;
    the gradient of the bias then goes to a new array that nobody reads)."""
    return grads["weight"], (grads["bias"] if bias else None)


@dataclass(frozen=True)
class Linear(Layer):
    """``y = x W^T + b``: (N, in_features) -> (N, out_features); see ``functional.linear_forward``.

    Parameters: ``weight`` (out_features, in_features), ``bias`` (out_features,) if ``bias``.
    """

    in_features: int
    out_features: int
    bias: bool = True

    def __post_init__(self):
        _check_positive_int(self.in_features, "in_features")
        _check_positive_int(self.out_features, "out_features")

    def param_shapes(self):
        shapes = {"weight": (self.out_features, self.in_features)}
        if self.bias:
            shapes["bias"] = (self.out_features,)
        return shapes

    def init_params(self, rng, dtype="float32"):
        dt, bound = check_dtype(dtype), 1 / math.sqrt(self.in_features)
        return {k: _uniform(rng, bound, s, dt) for k, s in self.param_shapes().items()}

    def forward(self, params, buffers, x, *, train=False, backend=None):
        _check_input(x, (2,), self.in_features, "Linear")
        return F.linear_forward(x, params["weight"], params["bias"] if self.bias else None)

    def backward(self, params, cache, dy):
        dx, dw, db = F.linear_backward(dy, cache)
        return dx, ({"weight": dw, "bias": db} if self.bias else {"weight": dw})

    def backward_into(self, params, cache, dy, grads, *, input_grad=True):
        return F.linear_backward(dy, cache, out=_targets(grads, self.bias),
                                 input_grad=input_grad)[0]


@dataclass(frozen=True)
class Conv2d(Layer):
    """2-d convolution of NCHW input, as ``torch.nn.Conv2d``; see ``functional.conv2d_forward``.

    Parameters: ``weight`` (out_channels, in_channels, kh, kw), ``bias`` (out_channels,) if
    ``bias``. ``kernel_size`` is an int or a pair ``(kh, kw)``; ``stride`` and ``padding`` are ints.
    """

    in_channels: int
    out_channels: int
    kernel_size: int | tuple[int, int]
    stride: int = 1
    padding: int = 0
    bias: bool = True

    def __post_init__(self):
        _check_positive_int(self.in_channels, "in_channels")
        _check_positive_int(self.out_channels, "out_channels")
        ks = self.kernel_size
        ks = (ks, ks) if isinstance(ks, (int, np.integer)) else tuple(ks)
        if len(ks) != 2:
            raise ValueError(f"kernel_size: expected an int or a pair, got {self.kernel_size!r}")
        for k in ks:
            _check_positive_int(k, "kernel_size")
        object.__setattr__(self, "kernel_size", (int(ks[0]), int(ks[1])))
        _check_positive_int(self.stride, "stride")
        _check_positive_int(self.padding, "padding", minimum=0)

    def param_shapes(self):
        shapes = {"weight": (self.out_channels, self.in_channels) + self.kernel_size}
        if self.bias:
            shapes["bias"] = (self.out_channels,)
        return shapes

    def init_params(self, rng, dtype="float32"):
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        dt, bound = check_dtype(dtype), 1 / math.sqrt(fan_in)
        return {k: _uniform(rng, bound, s, dt) for k, s in self.param_shapes().items()}

    def forward(self, params, buffers, x, *, train=False, backend=None):
        _check_input(x, (4,), self.in_channels, "Conv2d")
        kh, kw = self.kernel_size
        if x.shape[2] + 2 * self.padding < kh or x.shape[3] + 2 * self.padding < kw:
            raise ValueError(
                f"x: image {x.shape[2:]} (padded) is smaller than the kernel {(kh, kw)}"
            )
        b = params["bias"] if self.bias else None
        return F.conv2d_forward(x, params["weight"], b, stride=self.stride, padding=self.padding,
                                backend=backend)

    def backward(self, params, cache, dy):
        dx, dw, db = F.conv2d_backward(dy, cache)
        return dx, ({"weight": dw, "bias": db} if self.bias else {"weight": dw})

    def backward_into(self, params, cache, dy, grads, *, input_grad=True):
        return F.conv2d_backward(dy, cache, out=_targets(grads, self.bias),
                                 input_grad=input_grad)[0]


@dataclass(frozen=True)
class _BatchNorm(Layer):
    num_features: int
    eps: float = 1e-5
    momentum: float = 0.1

    buffer_names = ("running_mean", "running_var", "num_batches_tracked")
    _ndims = (2, 3, 4)

    def __post_init__(self):
        _check_positive_int(self.num_features, "num_features")
        if not self.eps > 0:
            raise ValueError(f"eps: expected a number > 0, got {self.eps!r}")
        if not 0 <= self.momentum <= 1:
            raise ValueError(f"momentum: expected a number in [0, 1], got {self.momentum!r}")

    def param_shapes(self):
        return {"weight": (self.num_features,), "bias": (self.num_features,)}

    def init_params(self, rng, dtype="float32"):
        dt = check_dtype(dtype)
        return {"weight": np.ones(self.num_features, dt), "bias": np.zeros(self.num_features, dt)}

    def init_buffers(self, dtype="float32"):
        dt = check_dtype(dtype)
        return {
            "running_mean": np.zeros(self.num_features, dt),
            "running_var": np.ones(self.num_features, dt),
            "num_batches_tracked": np.zeros((), np.int64),  # a 0-d int64, as PyTorch's
        }

    def forward(self, params, buffers, x, *, train=False, backend=None):
        _check_input(x, self._ndims, self.num_features, type(self).__name__)
        return F.batch_norm_forward(
            x, params["weight"], params["bias"], buffers["running_mean"], buffers["running_var"],
            train=train, momentum=self.momentum, eps=self.eps, backend=backend,
            num_batches_tracked=buffers["num_batches_tracked"],  # the caller's, counted in place
        )  # fmt: skip

    def backward(self, params, cache, dy):
        dx, dgamma, dbeta = F.batch_norm_backward(dy, cache)
        return dx, {"weight": dgamma, "bias": dbeta}

    def backward_into(self, params, cache, dy, grads, *, input_grad=True):
        dx = F.batch_norm_backward(dy, cache, out=_targets(grads, True))[0]  # one pass for all
        return dx if input_grad else None


@dataclass(frozen=True)
class BatchNorm1d(_BatchNorm):
    """Batch norm of (N, C) or (N, C, L) input, as ``torch.nn.BatchNorm1d``.

    Parameters ``weight``, ``bias`` (C,); buffers ``running_mean``, ``running_var`` (C,) and
    ``num_batches_tracked`` (0-d int64). ``train=True`` normalises with the batch statistics and
    updates the running ones (variance unbiased); ``train=False`` uses the running ones. See
    ``functional.batch_norm_forward``.
    """

    _ndims = (2, 3)


@dataclass(frozen=True)
class BatchNorm2d(_BatchNorm):
    """Batch norm of (N, C, H, W) input, as ``torch.nn.BatchNorm2d``; see :class:`BatchNorm1d`."""

    _ndims = (4,)


@dataclass(frozen=True)
class ReLU(Layer):
    """``y = max(x, 0)``, any shape."""

    def forward(self, params, buffers, x, *, train=False, backend=None):
        return F.relu_forward(x, backend=backend)

    def backward(self, params, cache, dy):
        return F.relu_backward(dy, cache), {}


@dataclass(frozen=True)
class Flatten(Layer):
    """(N, d1, d2, ...) -> (N, d1 * d2 * ...), as ``torch.nn.Flatten()``."""

    def forward(self, params, buffers, x, *, train=False, backend=None):
        return x.reshape(x.shape[0], -1), x.shape

    def backward(self, params, cache, dy):
        return dy.reshape(cache), {}


@dataclass(frozen=True)
class GlobalAvgPool2d(Layer):
    """Mean over H and W: (N, C, H, W) -> (N, C).

    PyTorch writes it as two modules, ``nn.AdaptiveAvgPool2d(1), nn.Flatten()``; neither has
    parameters, so the names of the layers before it agree.
    """

    def forward(self, params, buffers, x, *, train=False, backend=None):
        _check_input(x, (4,), None, "GlobalAvgPool2d")
        return F.global_avg_pool_forward(x)

    def backward(self, params, cache, dy):
        return F.global_avg_pool_backward(dy, cache), {}


class L2NormalizeCache(NamedTuple):
    x: np.ndarray  # the input; the backward recomputes the norm from it


@dataclass(frozen=True)
class L2Normalize(Layer):
    """``y = x / max(||x||, eps)`` along ``axis``, by :func:`refmoco.losses.l2_normalize`.

    PyTorch's ``torch.nn.functional.normalize(x, dim=axis, eps=eps)``. The cache keeps the input
    only; the backward recomputes the norm (cheap next to the layers before it).
    """

    axis: int = -1
    eps: float = 1e-12

    def forward(self, params, buffers, x, *, train=False, backend=None):
        y, _ = l2_normalize(x, axis=self.axis, eps=self.eps)
        return y, L2NormalizeCache(x)

    def backward(self, params, cache, dy):
        _, backward = l2_normalize(cache.x, axis=self.axis, eps=self.eps)
        return backward(dy), {}
