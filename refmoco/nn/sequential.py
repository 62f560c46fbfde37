"""Composition: :class:`Sequential`, named as ``torch.nn.Sequential`` names its children.

A parameter of a child is addressed by the dotted path PyTorch gives it (``"0.weight"``,
``"backbone.1.running_mean"``). Each child sees its own entries only, through a :class:`Scoped`
window on the caller's mappings (no copies: batch norm's in-place updates reach the caller).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from refmoco.nn.layers import Layer


class Scoped(Mapping):
    """The entries of ``mapping`` whose names start with ``prefix + "."``, without the prefix.

    A read-only window, not a copy: the arrays are the mapping's own, so in-place updates (batch
    norm's running statistics) reach the caller's buffers.
    """

    __slots__ = ("_mapping", "_prefix")

    def __init__(self, mapping: Mapping, prefix: str):
        self._mapping, self._prefix = mapping, prefix + "."

    def __getitem__(self, name: str) -> np.ndarray:
        return self._mapping[self._prefix + name]

    def __iter__(self) -> Iterator[str]:
        n = len(self._prefix)
        return (k[n:] for k in self._mapping if k.startswith(self._prefix))

    def __len__(self) -> int:
        return sum(1 for _ in self)


class Sequential(Layer):
    """Layers applied in order, named as ``torch.nn.Sequential`` names them.

    ``Sequential(a, b, c)`` names its children ``"0"``, ``"1"``, ``"2"``;
    ``Sequential(OrderedDict(backbone=..., head=...))`` uses the given names. Children may be
    Sequentials themselves; a parameter's name is the dotted path, e.g. ``"backbone.0.weight"``.

    ``forward`` returns ``(y, caches)`` with one cache per child, in order; ``backward`` returns
    ``(dx, grads)`` with ``grads`` keyed by the dotted names.
    """

    def __init__(self, *layers: Layer | Mapping[str, Layer]):
        if len(layers) == 1 and isinstance(layers[0], Mapping):
            items = list(layers[0].items())
        else:
            items = [(str(i), layer) for i, layer in enumerate(layers)]
        for name, layer in items:
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(
                    f"layers: a child's name must be a non-empty str without '.', got {name!r}"
                )
            if not isinstance(layer, Layer):
                raise ValueError(f"layers: child {name!r} is not a Layer: {layer!r}")
        self.layers: dict[str, Layer] = dict(items)

    def __repr__(self) -> str:
        inner = ",\n".join(
            f"  ({n}): " + repr(l).replace("\n", "\n  ") for n, l in self.layers.items()
        )
        return f"Sequential(\n{inner}\n)"

    def __getitem__(self, key: int | str) -> Layer:
        return list(self.layers.values())[key] if isinstance(key, int) else self.layers[key]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers.values())

    def param_shapes(self):
        return {
            f"{n}.{k}": s
            for n, layer in self.layers.items()
            for k, s in layer.param_shapes().items()
        }

    def init_params(self, rng, dtype="float32"):
        return {
            f"{n}.{k}": a
            for n, layer in self.layers.items()
            for k, a in layer.init_params(rng, dtype).items()
        }

    def init_buffers(self, dtype="float32"):
        return {
            f"{n}.{k}": a
            for n, layer in self.layers.items()
            for k, a in layer.init_buffers(dtype).items()
        }

    def state_names(self):
        return [f"{n}.{k}" for n, layer in self.layers.items() for k in layer.state_names()]

    @property
    def buffer_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(f"{n}.{k}" for n, layer in self.layers.items() for k in layer.buffer_names)

    def forward(self, params, buffers, x, *, train=False, backend=None):
        caches = []
        for name, layer in self.layers.items():
            x, cache = layer.forward(Scoped(params, name), Scoped(buffers, name), x, train=train,
                                     backend=backend)
            caches.append(cache)
        return x, tuple(caches)

    def backward(self, params, cache, dy):
        grads = {}
        for (name, layer), c in reversed(list(zip(self.layers.items(), cache, strict=True))):
            dy, g = layer.backward(Scoped(params, name), c, dy)
            grads.update({f"{name}.{k}": v for k, v in g.items()})
        return dy, grads

    def backward_into(self, params, cache, dy, grads, *, input_grad=True):
        steps = list(zip(self.layers.items(), cache, strict=True))
        first = 0  # without input_grad: the layers before the first with parameters are skipped
        if not input_grad:
            first = next((i for i, ((_, layer), _) in enumerate(steps) if layer.param_shapes()),
                         len(steps))
        for i in range(len(steps) - 1, first - 1, -1):
            (name, layer), c = steps[i]
            dy = layer.backward_into(Scoped(params, name), c, dy, Scoped(grads, name),
                                     input_grad=input_grad or i > first)
        return dy if input_grad else None
