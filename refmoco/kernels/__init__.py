"""The fast paths behind ``backend="numba"`` and ``backend="cupy"``: kernels, nothing else.

- :mod:`refmoco.kernels.cpu`: Numba CPU kernels on NumPy arrays (``backend="numba"``).
- :mod:`refmoco.kernels.cuda`: Numba CUDA kernels on CuPy arrays (``backend="cupy"``); they also
  run on NumPy arrays under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), which is how they
  are tested on machines without a GPU.

Both modules expose the same functions, called from one visible branch in the reference code
(``if be.kernels is not None: ...``):

- ``info_nce_queue(q, k, queue, temperature, reduction, wrt) -> (losses, grads)``: InfoNCE with a
  shared queue of negatives, forward and backward fused.
- ``momentum_update(target, source, m)``: ``target = m * target + (1 - m) * source`` in place.

``refmoco.backend`` imports them on first use: this package imports neither Numba nor CuPy.
"""


def check_sgd_buffers(p, g, buf, momentum) -> None:
    """What both ``sgd_step`` kernels require of their buffers: ``p``, ``g`` and ``buf`` (the
    momentum buffer; ``None`` allowed without momentum) contiguous, of ``p``'s dtype and shape."""
    for name, a in (("p", p), ("g", g), ("buf", buf)):
        if a is not None and not (a.flags.c_contiguous and a.dtype == p.dtype
                                  and a.shape == p.shape):
            raise ValueError(f"{name}: expected a contiguous {p.dtype} array of shape {p.shape}")
    if momentum and buf is None:
        raise ValueError("buf: a momentum buffer is required when momentum > 0")
