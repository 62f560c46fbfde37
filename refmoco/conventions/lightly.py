"""lightly's ``NTXentLoss`` and ``MemoryBankModule`` (lightly 1.5/1.6), reproduced exactly.

- ``NTXentLoss`` normalises ``out0`` and ``out1`` inside. Without a memory bank it is SimCLR's
  loss: ``2N`` rows (both views) of ``2N - 1`` logits each (a row's similarity with itself is
  removed), the other view of the same sample the target, averaged over the ``2N`` rows. With a
  bank it is MoCo's one-directional loss, ``out1`` the positive and the bank's rows the
  negatives; the bank is read **before** ``out1`` is added to it.
- ``MemoryBankModule`` stores ``(size, dim)`` rows and hands them out transposed,
  ``(dim, size)``, by default (``feature_dim_first=True``). At the end of the buffer it writes
  the rows that fit, **drops the rest of the batch** and resets its pointer to 0.

References
----------
- lightly: ``lightly/loss/ntx_ent_loss.py`` and ``lightly/models/modules/memory_bank.py``.
- Chen et al. A Simple Framework for Contrastive Learning of Visual Representations.
  arXiv:2002.05709.
"""

from __future__ import annotations

import numpy as np

from .._checks import check_int, check_positive, check_same_dtype, check_wrt
from ..backend import float_array
from ..losses import LossOutput, info_nce_loss, l2_normalize, softmax_cross_entropy


def ntxent_columns(n: int) -> np.ndarray:
    """The ``(2N, 2N - 1)`` indices into ``concat([out0, out1])`` of lightly's logits.

    Row ``i < N`` (view 0, sample ``i``) holds ``[out1_0 .. out1_{N-1}, out0_j for j != i]``;
    row ``N + i`` holds ``[out0_0 .. out0_{N-1}, out1_j for j != i]``; the target of both rows is
    column ``i``, the other view of sample ``i``.
    """
    cols = np.empty((2 * n, 2 * n - 1), dtype=np.int64)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        cols[i] = np.r_[np.arange(n, 2 * n), others]  # logits_01 then logits_00 without i
        cols[n + i] = np.r_[np.arange(n), np.add(others, n)]  # logits_10 then logits_11
    return cols


def ntxent_loss(out0, out1, negatives=None, *, temperature=0.5, wrt=None):
    r"""lightly's ``NTXentLoss(temperature)(out0, out1)``, with or without a memory bank.

    Parameters
    ----------
    out0, out1 : ndarray of shape (N, C)
        The two views' projections (raw: normalised inside).
    negatives : ndarray of shape (K, C), optional
        The memory bank's rows **before** this batch is added (lightly's bank returns them as
        ``(C, K)``: pass ``bank.T``). ``None``: no bank (SimCLR).
    temperature : float
        lightly's default is 0.5.
    wrt : tuple of str, optional
        Subset of ``("out0", "out1", "negatives")``; default all arrays given. lightly's bank is
        detached, so in lightly ``negatives`` receives no gradient.

    Returns
    -------
    LossOutput

    Notes
    -----
    Without a bank, with :math:`z = [\hat o_0; \hat o_1]` (normalised, :math:`2N` rows) and
    :math:`s_{ab} = z_a \cdot z_b / T`, row :math:`a` has the logits
    :math:`\{s_{ab} : b \ne a\}` and target :math:`b = a \pm N`:

    .. math:: L = \frac{1}{2N} \sum_{a=1}^{2N} \Big[\log \sum_{b \ne a} e^{s_{ab}} - s_{a, a \pm N}\Big]

    (``N = 1`` leaves one logit per row and a loss of 0). With a bank:
    ``info_nce_loss(normalize(out0), normalize(out1), negatives, temperature=T)``; ``negatives``
    is used as given (lightly stores normalised rows).

    Examples
    --------
    >>> import numpy as np
    >>> from refmoco.conventions.lightly import ntxent_loss
    >>> x = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> out = ntxent_loss(x, x, temperature=1.0)   # 3 logits per row: 1 (target), 0, 0
    >>> bool(np.isclose(float(out.loss), np.log(np.e + 2) - 1))
    True
    """
    out0 = float_array(out0, "out0", ndim=2)
    out1 = float_array(out1, "out1", ndim=2)
    if negatives is not None:
        negatives = float_array(negatives, "negatives", ndim=2)
    dtype = check_same_dtype({"out0": out0, "out1": out1, "negatives": negatives})
    if out0.shape != out1.shape:
        raise ValueError(f"out1: expected the shape of out0 {out0.shape}, got {out1.shape}")
    t = check_positive(temperature, "temperature")
    wrt = check_wrt(wrt, ("out0", "out1") if negatives is None else ("out0", "out1", "negatives"))
    z0, back0 = l2_normalize(out0, axis=1)
    z1, back1 = l2_normalize(out1, axis=1)
    if negatives is not None:  # MoCo's form: the positive, then the bank's rows
        inner = tuple({"out0": "q", "out1": "k"}.get(w, w) for w in wrt)
        out = info_nce_loss(z0, z1, negatives, temperature=t, wrt=inner)
        grads = {"out0": back0(out.grads["q"]) if "q" in out.grads else None,
                 "out1": back1(out.grads["k"]) if "k" in out.grads else None,
                 "negatives": out.grads.get("negatives")}
        return LossOutput(out.loss, {w: grads[w] for w in wrt})
    n = out0.shape[0]
    z = np.concatenate([z0, z1])  # (2N, C)
    sim = (z @ z.T) * dtype.type(1.0 / t)  # (2N, 2N)
    cols = ntxent_columns(n)  # (2N, 2N-1)
    rows = np.arange(2 * n)[:, None]
    labels = np.tile(np.arange(n), 2)  # the other view sits in column i of both blocks
    xent = softmax_cross_entropy(sim[rows, cols], labels, wrt=("logits",) if wrt else ())
    grads = {}
    if wrt:
        dsim = np.zeros_like(sim)
        dsim[rows, cols] = xent.grads["logits"] * dtype.type(1.0 / t)  # (2N, 2N)
        dz = (dsim + dsim.T) @ z  # (2N, C): sim is z z^T
        grads = {"out0": back0(dz[:n]), "out1": back1(dz[n:])}
    return LossOutput(xent.loss, {w: grads[w] for w in wrt})


class MemoryBankModule:
    r"""lightly's ``MemoryBankModule(size=(size, dim))``: a FIFO that drops overflow.

    Parameters
    ----------
    size : int
        Number of rows (``0`` disables the bank, as in lightly).
    dim : int
    feature_dim_first : bool
        ``forward`` returns the bank as ``(dim, size)`` when True (lightly's default), as
        ``(size, dim)`` otherwise.
    dtype : {"float32", "float64"}
        lightly's buffer is float32.
    seed : int
        Seed of the initial rows when ``initial`` is not given.
    initial : ndarray of shape (size, dim), optional
        The initial rows (for instance a copy of a lightly module's ``bank``). By default
        standard normal rows, each L2-normalised (NumPy's random numbers, not PyTorch's).

    Attributes
    ----------
    bank : ndarray of shape (size, dim)
        The rows in storage order (a read-only view).
    ptr : int

    Notes
    -----
    ``enqueue(batch)`` is ``_dequeue_and_enqueue``: if ``ptr + b >= size`` it writes
    ``batch[:size - ptr]`` into rows ``ptr..size`` and sets ``ptr = 0`` (the remaining
    ``b - (size - ptr)`` rows are lost); otherwise it writes all ``b`` rows and advances ``ptr``.
    :class:`refmoco.Queue` wraps the overflow around to the start instead, so the two hold
    different rows after the first wrap unless ``size`` is a multiple of the batch size.

    Examples
    --------
    >>> import numpy as np
    >>> from refmoco.conventions.lightly import MemoryBankModule
    >>> bank = MemoryBankModule(3, 1, initial=np.zeros((3, 1)))
    >>> bank.enqueue(np.array([[1.0], [2.0]])); bank.enqueue(np.array([[3.0], [4.0]]))
    >>> bank.bank.ravel(), bank.ptr   # 4.0 was dropped
    (array([1., 2., 3.]), 0)
    """

    def __init__(self, size, dim, *, feature_dim_first=True, dtype="float32", seed=0,
                 initial=None):
        self.size = check_int(size, "size", minimum=0)
        self.dim = check_int(dim, "dim", minimum=1)
        self.feature_dim_first = bool(feature_dim_first)
        if initial is None:
            rows = np.random.default_rng(seed).standard_normal((self.size, self.dim))
            rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
            initial = rows.astype(dtype)
        self._bank = np.array(float_array(initial, "initial"))  # (size, dim), a copy
        if self._bank.shape != (self.size, self.dim):
            raise ValueError(f"initial: expected shape ({self.size}, {self.dim}), "
                             f"got {self._bank.shape}")
        self.ptr = 0

    @property
    def bank(self) -> np.ndarray:
        view = self._bank.view()
        view.flags.writeable = False
        return view

    def forward(self, output, update=False):
        """``(output, bank before the update)``, and enqueue ``output`` when ``update``.

        Returns ``(output, None)`` for a bank of size 0. The bank is a copy, ``(dim, size)``
        when ``feature_dim_first``.
        """
        if self.size == 0:
            return output, None
        bank = self._bank.copy()
        if update:
            self.enqueue(output)
        return output, (bank.T if self.feature_dim_first else bank)

    def enqueue(self, batch) -> None:
        """Write ``batch`` (b, dim) at ``ptr``; at the end of the buffer drop what overflows."""
        batch = float_array(batch, "batch", ndim=2)
        if batch.shape[1] != self.dim:
            raise ValueError(f"batch: expected shape (b, {self.dim}), got {tuple(batch.shape)}")
        b, ptr = batch.shape[0], self.ptr
        if ptr + b >= self.size:
            self._bank[ptr:] = batch[: self.size - ptr]
            self.ptr = 0
        else:
            self._bank[ptr:ptr + b] = batch
            self.ptr = ptr + b


class NTXentLoss:
    r"""lightly's ``NTXentLoss(temperature, memory_bank_size=(size, dim))`` with its state.

    Parameters
    ----------
    temperature : float
    memory_bank_size : int or tuple of int
        ``0`` (no bank) or ``(size, dim)``.
    initial : ndarray of shape (size, dim), optional
        The bank's initial rows (see :class:`MemoryBankModule`).

    Notes
    -----
    A call normalises both views, reads the bank, then (when ``update``, which lightly sets to
    ``out0.requires_grad``) enqueues the **normalised** ``out1``, and computes the loss against
    the bank as it was: MoCo's order.

    Examples
    --------
    >>> import numpy as np
    >>> from refmoco.conventions.lightly import NTXentLoss
    >>> loss_fn = NTXentLoss(0.5, memory_bank_size=(4, 2), initial=np.zeros((4, 2)))
    >>> out = loss_fn(np.array([[3.0, 4.0]]), np.array([[3.0, 4.0]]))
    >>> loss_fn.memory_bank.bank[0]
    array([0.6, 0.8])
    """

    def __init__(self, temperature=0.5, memory_bank_size=0, *, initial=None):
        self.temperature = check_positive(temperature, "temperature")
        if isinstance(memory_bank_size, int):
            if memory_bank_size != 0:
                raise ValueError("memory_bank_size: expected 0 or a (size, dim) tuple")
            self.memory_bank = MemoryBankModule(0, 1)
        else:
            size, dim = memory_bank_size
            dtype = "float32" if initial is None else float_array(initial, "initial").dtype
            self.memory_bank = MemoryBankModule(size, dim, initial=initial, dtype=dtype)

    def __call__(self, out0, out1, *, update=True, wrt=None) -> LossOutput:
        """The loss of ``(out0, out1)``; ``update`` enqueues ``normalize(out1)`` afterwards."""
        z1, _ = l2_normalize(float_array(out1, "out1", ndim=2), axis=1)
        _, bank = self.memory_bank.forward(z1, update=update)
        negatives = None if bank is None else (bank.T if self.memory_bank.feature_dim_first
                                               else bank)
        return ntxent_loss(out0, out1, negatives, temperature=self.temperature, wrt=wrt)
