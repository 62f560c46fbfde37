"""The PyTorch twin of a ``refmoco.nn`` model: the same layers, so the same ``state_dict()``
names, with the same weights. Used to check refmoco against autograd (and the other way round).
PyTorch is imported when these functions are called, never at import time."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


def to_torch(layer: Any):
    """The ``torch.nn`` module of a ``refmoco.nn`` layer (untrained; copy weights with
    :func:`torch_twin`). ``GlobalAvgPool2d`` becomes a mean over H and W, as refmoco's."""
    import torch

    from ..nn import (
        BatchNorm1d,
        BatchNorm2d,
        Conv2d,
        Flatten,
        GlobalAvgPool2d,
        Linear,
        ReLU,
        Sequential,
    )

    class GlobalAvgPool(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    if isinstance(layer, Sequential):
        return torch.nn.Sequential(*[to_torch(child) for child in layer])
    if isinstance(layer, Linear):
        return torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias)
    if isinstance(layer, Conv2d):
        return torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                               stride=layer.stride, padding=layer.padding, bias=layer.bias)
    if isinstance(layer, BatchNorm1d):
        return torch.nn.BatchNorm1d(layer.num_features, eps=layer.eps, momentum=layer.momentum)
    if isinstance(layer, BatchNorm2d):
        return torch.nn.BatchNorm2d(layer.num_features, eps=layer.eps, momentum=layer.momentum)
    if isinstance(layer, ReLU):
        return torch.nn.ReLU()
    if isinstance(layer, Flatten):
        return torch.nn.Flatten()
    if isinstance(layer, GlobalAvgPool2d):
        return GlobalAvgPool()
    raise TypeError(f"layer: no PyTorch twin for {type(layer).__name__}")


def torch_twin(encoder: Any, params: Any, buffers: Any):
    """``torch.nn.Sequential(OrderedDict(backbone=..., head=...))`` of a refmoco ``Encoder``,
    loaded with ``params`` and ``buffers`` (in their dtype).

    Examples
    --------
    >>> import numpy as np
    >>> from refmoco.nn import mlp_encoder
    >>> from refmoco.testing.torch_models import torch_twin
    >>> enc = mlp_encoder(in_features=4, hidden=8, feat_dim=8, out_dim=2)
    >>> params, buffers = enc.init(np.random.default_rng(0), "float64")
    >>> net = torch_twin(enc, params, buffers)  # doctest: +SKIP
    """
    import numpy as np
    import torch

    net = torch.nn.Sequential(OrderedDict(backbone=to_torch(encoder.backbone),
                                          head=to_torch(encoder.head)))
    state = {k: torch.as_tensor(np.array(v)) for k, v in {**params, **buffers}.items()}
    net = net.to(state[next(iter(params))].dtype)
    net.load_state_dict(state)
    return net
