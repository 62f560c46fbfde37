"""Official MoCo v1/v2 (facebookresearch/moco, ``moco/builder.py``) and MoCo v3
(facebookresearch/moco-v3, ``moco/builder.py``), reproduced exactly.

MoCo v1/v2 keep the queue as a ``(dim, K)`` buffer, one key per **column**, refuse a batch size
that does not divide ``K``, compute ``logits = cat([l_pos, l_neg], dim=1) / T`` with the
positive in column 0, and average the cross-entropy. MoCo v3 has no queue: it normalises inside
the loss, uses the other keys of the batch as negatives, and returns
``ctr(q1, k2) + ctr(q2, k1)`` with each ``ctr`` multiplied by ``2 T``.

References
----------
- He et al. Momentum Contrast for Unsupervised Visual Representation Learning. arXiv:1911.05722.
- Chen, Xie, He. An Empirical Study of Training Self-Supervised Vision Transformers.
  arXiv:2104.02057.
"""

from __future__ import annotations

import numpy as np

from .._checks import check_int, check_positive, check_same_dtype, check_wrt
from ..backend import float_array
from ..losses import LossOutput, info_nce_loss, l2_normalize


class MoCoQueue:
    r"""MoCo's queue as ``builder.py`` keeps it: a ``(dim, K)`` buffer and a pointer.

    Parameters
    ----------
    dim : int
        The key dimension ``C``.
    K : int
        The number of keys.
    dtype : {"float32", "float64"}
    seed : int
        Seed of the initial keys when ``initial`` is not given.
    initial : ndarray of shape (dim, K), optional
        The initial buffer (for instance a copy of a PyTorch model's ``queue``). By default
        standard normal columns, each L2-normalised, as ``randn(dim, K)`` then
        ``normalize(queue, dim=0)`` (NumPy's random numbers, not PyTorch's).

    Attributes
    ----------
    queue : ndarray of shape (dim, K)
        The buffer, one key per column (a read-only view).
    ptr : int
        The next column to be written.

    Notes
    -----
    ``enqueue(keys)`` is ``_dequeue_and_enqueue``: ``assert K % batch_size == 0``, then
    ``queue[:, ptr:ptr + batch_size] = keys.T`` and ``ptr = (ptr + batch_size) % K``. Because of
    the assert a write never crosses the end of the buffer; :class:`refmoco.Queue` accepts any
    batch size and wraps around, and agrees with this class on every batch size this class accepts
    (``Queue.keys == MoCoQueue.queue.T``).

    Examples
    --------
    >>> import numpy as np
    >>> from refmoco.conventions.moco import MoCoQueue
    >>> queue = MoCoQueue(dim=2, K=4, initial=np.zeros((2, 4)))
    >>> queue.enqueue(np.array([[1.0, 0.0], [0.0, 1.0]]))
    >>> queue.queue, queue.ptr
    (array([[1., 0., 0., 0.],
           [0., 1., 0., 0.]]), 2)
    """

    def __init__(self, dim, K, *, dtype="float64", seed=0, initial=None):
        self.dim = check_int(dim, "dim", minimum=1)
        self.K = check_int(K, "K", minimum=1)
        if initial is None:
            buf = np.random.default_rng(seed).standard_normal((self.dim, self.K))
            buf = (buf / np.maximum(np.linalg.norm(buf, axis=0), 1e-12)).astype(dtype)
        else:
            buf = np.array(float_array(initial, "initial"))  # a copy
            if buf.shape != (self.dim, self.K):
                raise ValueError(f"initial: expected shape ({self.dim}, {self.K}), got {buf.shape}")
        self._queue = buf  # (C, K)
        self.ptr = 0

    @property
    def queue(self) -> np.ndarray:
        view = self._queue.view()
        view.flags.writeable = False
        return view

    def enqueue(self, keys) -> None:
        """Write ``keys`` (N, C) into columns ``ptr .. ptr + N`` and advance the pointer.

        Raises
        ------
        AssertionError
            ``K % N != 0``, as the official code (``assert self.K % batch_size == 0``).
        ValueError
            Keys of the wrong dimension.
        """
        keys = float_array(keys, "keys", ndim=2)
        if keys.shape[1] != self.dim:
            raise ValueError(f"keys: expected shape (N, {self.dim}), got {tuple(keys.shape)}")
        batch_size = keys.shape[0]
        assert self.K % batch_size == 0, (
            f"MoCo asserts K % batch_size == 0; got K={self.K}, batch_size={batch_size}")
        self._queue[:, self.ptr:self.ptr + batch_size] = keys.T
        self.ptr = (self.ptr + batch_size) % self.K


def moco_logits(q, k, queue, *, temperature=0.07):
    r"""The logits and labels of ``MoCo.forward``.

    Parameters
    ----------
    q, k : ndarray of shape (N, C)
        Normalised queries and keys (MoCo normalises them in ``forward``, before this point).
    queue : ndarray of shape (C, K)
        The queue buffer in MoCo's layout, one key per column.
    temperature : float
        ``T``; 0.07 in MoCo v1, 0.2 in MoCo v2.

    Returns
    -------
    logits : ndarray of shape (N, 1 + K)
        ``cat([q . k, q @ queue], dim=1) / T``: the positive in column 0.
    labels : ndarray of int64 of shape (N,)
        All zeros.

    Examples
    --------
    >>> import numpy as np
    >>> from refmoco.conventions.moco import moco_logits
    >>> logits, labels = moco_logits(np.eye(2), np.eye(2), np.zeros((2, 3)), temperature=0.5)
    >>> logits[:, 0], labels
    (array([2., 2.]), array([0, 0]))
    """
    q = float_array(q, "q", ndim=2)
    k = float_array(k, "k", ndim=2)
    queue = float_array(queue, "queue", ndim=2)
    check_same_dtype({"q": q, "k": k, "queue": queue})
    inv_t = q.dtype.type(1.0 / check_positive(temperature, "temperature"))
    l_pos = (q * k).sum(axis=1)[:, None]  # (N, 1): einsum("nc,nc->n")
    l_neg = q @ queue  # (N, K): einsum("nc,ck->nk")
    return np.concatenate([l_pos, l_neg], axis=1) * inv_t, np.zeros(len(q), dtype=np.int64)


def moco_loss(q, k, queue, *, temperature=0.07, wrt=None):
    r"""MoCo v1/v2's loss: ``CrossEntropyLoss()(logits, labels)`` of :func:`moco_logits`.

    Parameters
    ----------
    q, k : ndarray of shape (N, C)
        Normalised queries and keys.
    queue : ndarray of shape (C, K)
        MoCo's buffer layout, one key per column.
    temperature : float
    wrt : tuple of str, optional
        Subset of ``("q", "k", "queue")``; default all three. In MoCo only ``q`` receives a
        gradient: the keys come from ``torch.no_grad()`` and the queue is ``clone().detach()``ed.

    Returns
    -------
    LossOutput
        The mean loss and the gradients named in ``wrt`` (``grads["queue"]`` of shape (C, K)).

    Notes
    -----
    This is :func:`refmoco.info_nce_loss` with ``negatives = queue.T``:
    :math:`\ell_i = \log(e^{q_i\cdot k_i/T} + \sum_j e^{q_i\cdot n_j/T}) - q_i\cdot k_i/T`.

    Examples
    --------
    >>> import numpy as np
    >>> from refmoco.conventions.moco import moco_loss
    >>> out = moco_loss(np.eye(2), np.eye(2), np.zeros((2, 3)), temperature=1.0)
    >>> bool(np.isclose(float(out.loss), np.log(np.e + 3) - 1))
    True
    """
    wrt = check_wrt(wrt, ("q", "k", "queue"))
    queue = float_array(queue, "queue", ndim=2)
    inner = tuple("negatives" if w == "queue" else w for w in wrt)
    out = info_nce_loss(q, k, queue.T, temperature=temperature, wrt=inner)
    grads = {("queue" if n == "negatives" else n): (g.T if n == "negatives" else g)
             for n, g in out.grads.items()}
    return LossOutput(out.loss, grads)


def moco_v3_loss(q1, q2, k1, k2, *, temperature=1.0, wrt=None):
    r"""MoCo v3's symmetric loss, ``ctr(q1, k2) + ctr(q2, k1)``, on one process.

    Parameters
    ----------
    q1, q2 : ndarray of shape (N, C)
        The predictor's outputs for the two views (raw: normalised inside, as ``ctr_loss`` does).
    k1, k2 : ndarray of shape (N, C)
        The momentum encoder's outputs for the two views (raw).
    temperature : float
        ``T``; MoCo v3's default is 1.0 (0.2 in its ViT recipes).
    wrt : tuple of str, optional
        Subset of ``("q1", "q2", "k1", "k2")``; default all. In MoCo v3 the keys come from
        ``torch.no_grad()``: only ``q1`` and ``q2`` receive gradients there.

    Returns
    -------
    LossOutput

    Notes
    -----
    ``ctr(q, k) = 2 T * CrossEntropyLoss()(normalize(q) @ normalize(k).T / T, arange(N))``. With
    :math:`T = 1` the factor is 2; the scale makes the gradient's size independent of ``T``
    (the softmax gradient carries a :math:`1/T`).

    Examples
    --------
    >>> import numpy as np
    >>> from refmoco.conventions.moco import moco_v3_loss
    >>> x = np.eye(3)
    >>> out = moco_v3_loss(x, x, x, x, temperature=1.0)
    >>> bool(np.isclose(float(out.loss), 2 * 2 * (np.log(np.e + 2) - 1)))
    True
    """
    wrt = check_wrt(wrt, ("q1", "q2", "k1", "k2"))
    arrays = {name: float_array(a, name, ndim=2)
              for name, a in (("q1", q1), ("q2", q2), ("k1", k1), ("k2", k2))}
    dtype = check_same_dtype(arrays)
    t = check_positive(temperature, "temperature")
    normed = {name: l2_normalize(a, axis=1) for name, a in arrays.items()}  # (y, backward)
    scale = dtype.type(2.0 * t)
    loss = dtype.type(0)
    grads = {}
    for q_name, k_name in (("q1", "k2"), ("q2", "k1")):
        out = info_nce_loss(normed[q_name][0], normed[k_name][0], None, temperature=t)
        loss = loss + scale * out.loss
        for name, part in ((q_name, "q"), (k_name, "k")):
            if name in wrt:
                grads[name] = normed[name][1](scale * out.grads[part])  # through normalize
    return LossOutput(np.asarray(loss, dtype=dtype), {n: grads[n] for n in wrt})
