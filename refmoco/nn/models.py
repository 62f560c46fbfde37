r"""Models: a network plus its parameter layout, and MoCo's two small encoders.

A :class:`Model` owns no arrays. It creates them (``init``), and every call takes them::

    model = mlp_encoder()
    params, buffers = model.init(np.random.default_rng(0), "float32")
    z, cache = model.forward(params, buffers, x, train=True)   # updates BN running stats
    dx, grads = model.backward(params, cache, dz)              # grads: FlatParams like params

``params`` is a :class:`~refmoco.nn.params.FlatParams` (all parameters as views into one flat
buffer, keyed by PyTorch's ``state_dict()`` names); ``buffers`` is a plain dict of the batch-norm
running statistics, kept apart so that optimizers and momentum updates never touch them.

On the GPU, ``model.init(rng, dtype, backend="cupy")`` (or ``model.to(params, buffers, "cupy")``)
puts the parameters and buffers on the device as CuPy arrays; every call then takes CuPy inputs
and returns CuPy arrays, computed by the same reference code with ``xp = cupy``. The backend of a
call follows the parameters (``backend=None``); a NumPy input for a model on the GPU, or the
reverse, is a ``TypeError`` naming the argument, never a silent copy. ``state_dict`` returns host
NumPy copies and ``load_state_dict`` copies into wherever the model lives.

An :class:`Encoder` is ``Sequential(OrderedDict(backbone=..., head=...))``: the backbone gives the
features ``h`` (what MoCo's linear protocol trains a classifier on), the projection head maps them
to ``z`` (what the contrastive loss sees, after L2 normalisation). ``forward_features`` returns
both from one pass; ``backward_features`` takes the gradient of ``z`` and, optionally, of ``h``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from refmoco.backend import (
    BACKENDS,
    as_array,
    backend_of,
    check_device,
    float_array,
    host_copy,
    namespace_of,
    to_backend,
    to_numpy,
)
from refmoco.nn.layers import (
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Flatten,
    GlobalAvgPool2d,
    Layer,
    Linear,
    ReLU,
    check_dtype,
)
from refmoco.nn.params import FlatParams, flat_size
from refmoco.nn.sequential import Scoped, Sequential


class ModelCache(NamedTuple):
    net: tuple  # the network's cache: one entry per child layer
    out_shape: tuple  # shape of the output


class EncoderCache(NamedTuple):
    net: tuple  # (backbone cache, head cache)
    out_shape: tuple  # shape of z, the head's output
    feature_shape: tuple  # shape of h, the backbone's output


def _params_dtype(params: Mapping) -> np.dtype | None:
    """The parameters' dtype (``None`` for a network without parameters)."""
    if isinstance(params, FlatParams):
        return params.dtype
    return next(iter(params.values())).dtype if len(params) else None


def _params_xp(params: Mapping):
    """The parameters' array module (``None`` for a network without parameters)."""
    if isinstance(params, FlatParams):
        return params.xp
    for v in params.values():
        return namespace_of(v)
    return None


def _cast(a: Any, name: str, dtype: np.dtype | None, xp) -> Any:
    """``a`` as an array of the parameters' dtype on the parameters' device (integer input is
    a TypeError, and so is an array on the other device: no silent copy)."""
    a = float_array(a, name)
    if xp is not None:  # None: a network without parameters runs wherever its input lives
        check_device(a, name, xp)
    return a if dtype is None or a.dtype == dtype else a.astype(dtype)


def _placement(params: Mapping, buffers: Mapping, x: Any, backend: Any):
    """``(backend, xp)`` of a forward pass: where the parameters live, checked against
    ``backend`` (a ValueError) and the buffers (a TypeError naming the buffer)."""
    if backend not in (None, *BACKENDS):
        raise ValueError(f"backend: expected None, 'numpy', 'numba' or 'cupy', got {backend!r}")
    xp = _params_xp(params)
    if xp is None:  # no parameters: the input decides
        xp = namespace_of(as_array(x, "x"))
    gpu = xp is not np
    if backend is None:
        backend = "cupy" if gpu else "numpy"
    elif (backend == "cupy") != gpu:
        where = "CuPy arrays (on the GPU)" if gpu else "NumPy arrays (on the host)"
        raise ValueError(
            f"backend: {backend!r} does not fit the parameters, which are {where}: pass "
            f"backend={'cupy' if gpu else 'numpy'!r}, or move the model with "
            f"model.to(params, buffers, {backend!r})"
        )
    for k, v in buffers.items():
        check_device(v, f"buffers[{k!r}]", xp)
    return backend, xp


class Model:
    """A network (a :class:`~refmoco.nn.layers.Layer`, usually a ``Sequential``) with its layout.

    Parameters
    ----------
    net : Layer
    """

    def __init__(self, net: Layer):
        if not isinstance(net, Layer):
            raise ValueError(f"net: expected a Layer, got {type(net).__name__}")
        self.net = net

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.net!r})"

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter names (PyTorch's ``state_dict()`` names) and shapes, in order."""
        return self.net.param_shapes()

    @property
    def buffer_names(self) -> tuple[str, ...]:
        """Names of the buffers (batch-norm running statistics and batch counters)."""
        return tuple(self.net.buffer_names)

    def init(self, rng: np.random.Generator, dtype: Any = "float32", *,
             backend: str = "numpy") -> tuple[FlatParams, dict]:
        """Fresh parameters and buffers, initialised as PyTorch initialises the same modules.

        Parameters
        ----------
        rng : numpy.random.Generator
            Every random draw comes from it, on the host, so that a seed gives the same weights
            on every backend.
        dtype : {"float32", "float64"}
        backend : {"numpy", "numba", "cupy"}
            Where the arrays live: the host, or the GPU for ``"cupy"`` (CuPy arrays; the host
            draws are copied there once).

        Returns
        -------
        params : FlatParams
        buffers : dict of str to ndarray
        """
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng: expected a numpy.random.Generator, got {type(rng).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        dt = check_dtype(dtype)
        params = FlatParams(self.param_shapes(), dt)
        params.load_state_dict(self.net.init_params(rng, dt))
        return self.to(params, self.net.init_buffers(dt), backend)

    def to(self, params: FlatParams, buffers: Mapping, backend: str) -> tuple[FlatParams, dict]:
        """``(params, buffers)`` where ``backend`` computes: CuPy arrays on the GPU for
        ``"cupy"``, NumPy arrays on the host for ``"numpy"`` and ``"numba"``.

        Arrays that move are copied (the originals are left as they are); arrays already there
        are returned as they are (``params`` itself, the same buffer arrays in a new dict).
        """
        if not isinstance(params, FlatParams):
            raise TypeError(f"params: expected a FlatParams, got {type(params).__name__}")
        params = params.to(backend)
        return params, {k: to_backend(v, backend) for k, v in buffers.items()}

    def forward(self, params: Mapping, buffers: Mapping, x: Any, *, train: bool,
                backend: str | None = None):
        """Run the network.

        Parameters
        ----------
        params : FlatParams or mapping of str to ndarray
        buffers : mapping of str to ndarray
            Updated in place when ``train`` (batch-norm running statistics).
        x : ndarray
            Cast to the parameters' dtype. On the parameters' device: NumPy for a model on the
            host, CuPy for a model on the GPU (else a ``TypeError``).
        train : bool
            Batch statistics and running-statistics updates (True) or running statistics (False).
        backend : {None, "numpy", "numba", "cupy"}
            ``None``: where the parameters live (``"cupy"`` for CuPy parameters, else
            ``"numpy"``); a named backend must fit them (else a ``ValueError``). ``"numba"``:
            convolutions and batch norms as Numba kernels (the same function); the backward of
            this pass runs on the same backend.

        Returns
        -------
        out : ndarray
        cache : ModelCache
            Everything :meth:`backward` needs.
        """
        backend, xp = _placement(params, buffers, x, backend)
        x = _cast(x, "x", _params_dtype(params), xp)
        out, cache = self.net.forward(params, buffers, x, train=bool(train), backend=backend)
        return out, ModelCache(cache, out.shape)

    def backward(
        self,
        params: Mapping,
        cache,
        dout: Any,
        *,
        grads: FlatParams | None = None,
        accumulate: bool = False,
        input_grad: bool = True,
    ):
        """Backpropagate ``dout`` through the pass that produced ``cache``.

        Parameters
        ----------
        params : FlatParams or mapping of str to ndarray
            The parameters the forward pass used.
        cache : ModelCache
        dout : ndarray, shape of the output
        grads : FlatParams, optional
            Where to write the parameter gradients (a new FlatParams when omitted).
        accumulate : bool
            Add to ``grads`` instead of overwriting it (two passes through one network).
        input_grad : bool
            Whether to compute ``dx``. Training needs only the parameters' gradients: without
            ``dx``, the layers before the first one with parameters are skipped and that one
            computes no input gradient (the first convolution's col2im, say), as autograd does
            for an input that does not require a gradient.

        Returns
        -------
        dx : ndarray, shape of the input, or None without ``input_grad``
        grads : FlatParams

        The layers compute the gradients into the views of ``grads`` (of a new buffer when
        ``grads`` is omitted, or when they are added to it): no gradient array is made and
        copied per parameter.
        """
        dtype, xp = _params_dtype(params), _params_xp(params)
        dout = self._check_grad(dout, "dout", cache.out_shape, dtype, xp)
        target = self._target(grads, accumulate, dtype, xp, params)
        dx = self.net.backward_into(params, cache.net, dout, target, input_grad=bool(input_grad))
        return dx, self._finish(grads, target)

    @staticmethod
    def _check_grad(d: Any, name: str, shape: tuple, dtype: np.dtype, xp) -> Any:
        d = _cast(d, name, dtype, xp)
        if d.shape != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(d.shape)}")
        return d

    def _target(self, grads: Any, accumulate: bool, dtype, xp, params: Mapping) -> FlatParams:
        """Where the layers write the gradients: ``grads`` itself (checked first), or a new
        buffer when there is no ``grads`` or they are to be added to it."""
        if grads is not None:
            self._check_grads(grads, dtype, xp, params)
            if not accumulate:
                return grads
        shapes, xp = self.param_shapes(), np if xp is None else xp
        dtype = np.dtype("float32") if dtype is None else dtype  # no parameters: empty
        return FlatParams(shapes, dtype, flat=xp.zeros(flat_size(shapes), dtype))  # unwritten: 0

    @staticmethod
    def _finish(grads: FlatParams | None, target: FlatParams) -> FlatParams:
        """The gradients the layers wrote into ``target``, added to ``grads`` when it is another
        buffer (accumulation: one pass over the whole buffer)."""
        if grads is None or grads is target:
            return target
        grads.flat += target.flat
        return grads

    def _check_grads(self, grads: Any, dtype, xp, params: Mapping) -> None:
        """``grads`` must be a FlatParams of the model's layout and dtype, where the
        parameters are, and apart from the parameters (the gradients are written while the
        parameters are still read). Checked before anything is written into it."""
        if not (
            isinstance(grads, FlatParams)
            and list(grads.shapes.items()) == list(self.param_shapes().items())
            and (dtype is None or grads.dtype == dtype)
        ):
            raise ValueError(
                "grads: expected a FlatParams with the model's layout and dtype "
                "(params.zeros_like())"
            )
        if xp is not None:
            check_device(grads.flat, "grads", xp)
        if isinstance(params, FlatParams) and xp.may_share_memory(grads.flat, params.flat):
            raise ValueError("grads: shares memory with params; expected a buffer of its own "
                             "(params.zeros_like())")

    # --- state dicts (PyTorch-compatible) ----------------------------------------------------
    def state_dict(self, params: Mapping, buffers: Mapping) -> dict[str, np.ndarray]:
        """Parameters and buffers as one ``{name: array}`` dict of host NumPy copies, in
        PyTorch's order (arrays on the GPU are copied to the host).

        ``torch_module.load_state_dict({k: torch.from_numpy(v) for k, v in d.items()})`` loads it
        into the same architecture built from ``torch.nn.Sequential``.
        """
        merged = {**params, **buffers}
        return {k: host_copy(merged[k]) for k in self.net.state_names()}

    def load_state_dict(
        self, params: FlatParams, buffers: dict, state_dict: Mapping, *, strict: bool = True
    ) -> None:
        """Load a ``state_dict`` (NumPy or CuPy arrays, PyTorch tensors) into ``params`` and
        ``buffers``, copying each array to where its destination lives (host or GPU).

        Every parameter and buffer must be present with its shape; names that are neither are an
        error when ``strict``. All is checked before anything is written.

        Raises
        ------
        ValueError
            Missing, unexpected (if ``strict``) or mis-shaped entries; the message names the key.
        TypeError
            ``params`` is not a FlatParams, a parameter's array is not floating-point, or a
            buffer's holds what its dtype cannot (strings, complex numbers; a float for an
            integer count).
        """
        if not isinstance(params, FlatParams):
            raise TypeError(f"params: expected a FlatParams, got {type(params).__name__}")
        names = set(self.net.state_names())
        unexpected = [k for k in state_dict if k not in names]
        if strict and unexpected:
            raise ValueError(f"state_dict: unexpected key(s) {unexpected}")
        new_buffers = {}
        for k in self.buffer_names:
            if k not in state_dict:
                raise ValueError(f"state_dict: missing buffer {k!r}")
            a = to_numpy(as_array(state_dict[k], k))
            if a.shape != tuple(buffers[k].shape):
                raise ValueError(
                    f"state_dict[{k!r}]: expected shape {tuple(buffers[k].shape)}, got {a.shape}"
                )
            dest = np.dtype(buffers[k].dtype)
            kinds, what = ("fiu", "real numbers") if dest.kind == "f" else ("iu", "integers")
            if a.dtype.kind not in kinds:  # a string, complex or object buffer: refused here
                raise TypeError(f"state_dict[{k!r}]: expected {what} for a {dest} buffer, got "
                                f"dtype {a.dtype}")
            new_buffers[k] = a.astype(dest)  # cast before anything is written
        params.load_state_dict(state_dict, strict=False)  # checks everything before writing
        for k, a in new_buffers.items():
            buffers[k][...] = to_backend(a, backend_of(buffers[k]))


class Encoder(Model):
    """``Sequential(OrderedDict(backbone=backbone, head=head))`` with access to the features.

    Parameter names start with ``"backbone."`` or ``"head."``.

    Attributes
    ----------
    backbone, head : Sequential
    feature_dim : int or None
        Width of the features ``h`` (the head's first ``Linear`` input).
    out_dim : int or None
        Width of the output ``z`` (the head's last ``Linear`` output).
    """

    def __init__(self, backbone: Layer, head: Layer):
        super().__init__(Sequential(OrderedDict(backbone=backbone, head=head)))
        self.backbone, self.head = backbone, head
        layers = list(head) if isinstance(head, Sequential) else [head]
        linears = [layer for layer in layers if isinstance(layer, Linear)]
        self.feature_dim = linears[0].in_features if linears else None
        self.out_dim = linears[-1].out_features if linears else None

    def forward(self, params, buffers, x, *, train, backend=None):
        """As :meth:`Model.forward`; the cache is an :class:`EncoderCache`."""
        z, _, cache = self.forward_features(params, buffers, x, train=train, backend=backend)
        return z, cache

    def forward_features(self, params: Mapping, buffers: Mapping, x: Any, *, train: bool,
                         backend: str | None = None):
        """One pass that returns the head's output and the backbone's features (``train`` and
        ``backend`` as in :meth:`Model.forward`).

        Returns
        -------
        z : ndarray of shape (N, out_dim)
            The projection head's output.
        h : ndarray of shape (N, feature_dim)
            The backbone's output, the head's input.
        cache : EncoderCache
            For :meth:`backward_features` (or :meth:`backward`).
        """
        backend, xp = _placement(params, buffers, x, backend)
        x = _cast(x, "x", _params_dtype(params), xp)
        train = bool(train)
        h, c_backbone = self.backbone.forward(
            Scoped(params, "backbone"), Scoped(buffers, "backbone"), x, train=train,
            backend=backend,
        )
        z, c_head = self.head.forward(
            Scoped(params, "head"), Scoped(buffers, "head"), h, train=train, backend=backend
        )
        return z, h, EncoderCache((c_backbone, c_head), z.shape, h.shape)

    def backward_features(
        self,
        params: Mapping,
        cache: EncoderCache,
        dz: Any,
        dh: Any = None,
        *,
        grads: FlatParams | None = None,
        accumulate: bool = False,
        input_grad: bool = True,
    ):
        """Backpropagate the gradient of ``z`` and, optionally, a gradient of ``h``.

        The backbone receives ``dh + (gradient of z through the head)``.

        Parameters
        ----------
        params : FlatParams or mapping
        cache : EncoderCache
        dz : ndarray of shape (N, out_dim)
        dh : ndarray of shape (N, feature_dim), optional
        grads, accumulate, input_grad
            As in :meth:`Model.backward`.

        Returns
        -------
        dx : ndarray, shape of the input, or None without ``input_grad``
        grads : FlatParams
        """
        dtype, xp = _params_dtype(params), _params_xp(params)
        dz = self._check_grad(dz, "dz", cache.out_shape, dtype, xp)
        if dh is not None:
            dh = self._check_grad(dh, "dh", cache.feature_shape, dtype, xp)
        return self._backward(params, cache, dz, dh, grads, accumulate, input_grad, dtype, xp)

    def backward(self, params, cache, dout, *, grads=None, accumulate=False, input_grad=True):
        """As :meth:`Model.backward`: ``backward_features`` with ``dh=None``."""
        dtype, xp = _params_dtype(params), _params_xp(params)
        dout = self._check_grad(dout, "dout", cache.out_shape, dtype, xp)
        return self._backward(params, cache, dout, None, grads, accumulate, input_grad, dtype, xp)

    def _backward(self, params, cache, dz, dh, grads, accumulate, input_grad, dtype, xp):
        """:meth:`backward_features` of checked gradients (``dh`` may be None)."""
        c_backbone, c_head = cache.net
        target = self._target(grads, accumulate, dtype, xp, params)
        dh_head = self.head.backward_into(Scoped(params, "head"), c_head, dz,
                                          Scoped(target, "head"))
        if dh is not None:
            dh_head = dh_head + dh
        dx = self.backbone.backward_into(Scoped(params, "backbone"), c_backbone, dh_head,
                                         Scoped(target, "backbone"), input_grad=bool(input_grad))
        return dx, self._finish(grads, target)


def _head(feature_dim: int, out_dim: int) -> Sequential:
    """MoCo v2's projection head: Linear(feat, feat) -> ReLU -> Linear(feat, out_dim)."""
    return Sequential(Linear(feature_dim, feature_dim), ReLU(), Linear(feature_dim, out_dim))


def mlp_encoder(
    in_features: int = 64, hidden: int = 256, feat_dim: int = 256, out_dim: int = 128
) -> Encoder:
    """A two-layer MLP backbone with MoCo v2's projection head.

    backbone: Flatten, Linear(in_features, hidden), BatchNorm1d, ReLU, Linear(hidden, feat_dim),
    BatchNorm1d, ReLU; head: Linear(feat_dim, feat_dim), ReLU, Linear(feat_dim, out_dim). Every
    layer has PyTorch's default ``bias=True``.

    PyTorch equivalent (same ``state_dict()`` names)::

        nn.Sequential(OrderedDict(
            backbone=nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(),
                                   nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU()),
            head=nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 128))))

    Input (N, in_features) or anything that flattens to it, such as (N, 1, 8, 8).
    """
    backbone = Sequential(
        Flatten(),
        Linear(in_features, hidden), BatchNorm1d(hidden), ReLU(),
        Linear(hidden, feat_dim), BatchNorm1d(feat_dim), ReLU(),
    )  # fmt: skip
    return Encoder(backbone, _head(feat_dim, out_dim))


def cnn_encoder(
    in_channels: int = 1, widths: tuple[int, ...] = (32, 64, 64), out_dim: int = 128
) -> Encoder:
    """A small CNN backbone with MoCo v2's projection head.

    backbone: for each width, Conv2d 3x3 (padding 1; stride 1 for the first, 2 for the others),
    BatchNorm2d, ReLU; then the mean over H and W. head: Linear(widths[-1], widths[-1]), ReLU,
    Linear(widths[-1], out_dim). Every layer has PyTorch's default ``bias=True``.

    PyTorch equivalent of the default (same ``state_dict()`` names)::

        nn.Sequential(OrderedDict(
            backbone=nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten()),
            head=nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 128))))

    Input (N, in_channels, H, W); an 8x8 image gives 8x8, 4x4, 2x2 feature maps.
    """
    if len(widths) == 0:
        raise ValueError("widths: expected at least one width")
    layers: list[Layer] = []
    c_in = in_channels
    for i, width in enumerate(widths):
        layers += [
            Conv2d(c_in, width, 3, stride=1 if i == 0 else 2, padding=1),
            BatchNorm2d(width),
            ReLU(),
        ]
        c_in = width
    layers.append(GlobalAvgPool2d())
    return Encoder(Sequential(*layers), _head(widths[-1], out_dim))
