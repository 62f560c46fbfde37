"""Encoders for MoCo in NumPy, with hand-written backward passes.

Layers are stateless configuration objects (:mod:`refmoco.nn.layers`) built on forward/backward
pairs of free functions (:mod:`refmoco.nn.functional`); parameters are a
:class:`~refmoco.nn.params.FlatParams` (named views into one flat buffer) whose names are PyTorch's
``state_dict()`` names for the same ``torch.nn.Sequential``; :mod:`refmoco.nn.models` ties them
together and builds MoCo's two small encoders.

Examples
--------
>>> import numpy as np
>>> from refmoco.nn import mlp_encoder
>>> model = mlp_encoder(in_features=64, hidden=32, feat_dim=16, out_dim=8)
>>> params, buffers = model.init(np.random.default_rng(0), "float32")
>>> x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
>>> z, h, cache = model.forward_features(params, buffers, x, train=True)
>>> z.shape, h.shape, z.dtype
((4, 8), (4, 16), dtype('float32'))
>>> dx, grads = model.backward(params, cache, np.ones_like(z))
>>> grads["head.2.bias"]
array([4., 4., 4., 4., 4., 4., 4., 4.], dtype=float32)
"""

from refmoco.nn.gru import GRU
from refmoco.nn.layers import (
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Flatten,
    GlobalAvgPool2d,
    L2Normalize,
    Layer,
    Linear,
    ReLU,
)
from refmoco.nn.models import Encoder, EncoderCache, Model, ModelCache, cnn_encoder, mlp_encoder
from refmoco.nn.params import FlatParams
from refmoco.nn.sequential import Sequential

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "Conv2d",
    "Encoder",
    "EncoderCache",
    "FlatParams",
    "Flatten",
    "GRU",
    "GlobalAvgPool2d",
    "L2Normalize",
    "Layer",
    "Linear",
    "Model",
    "ModelCache",
    "ReLU",
    "Sequential",
    "cnn_encoder",
    "mlp_encoder",
]
