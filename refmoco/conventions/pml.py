"""PyTorch Metric Learning's ``ContrastiveLoss``, ``NTXentLoss`` and ``CrossBatchMemory``
(pytorch-metric-learning 2.x, default distances and reducers), reproduced exactly.

The losses take class labels, not pairs: every two embeddings with equal labels form a positive
pair (an embedding with itself excluded), every two with different labels a negative pair.
Both losses normalise the embeddings inside (``LpDistance`` and ``CosineSimilarity`` default to
``normalize_embeddings=True``). ``CrossBatchMemory`` adds the batch to its memory **before**
computing the loss and then removes each embedding's comparison with its own copy.

References
----------
- Musgrave et al. PyTorch Metric Learning. arXiv:2008.09164. Code:
  ``losses/contrastive_loss.py``, ``losses/ntxent_loss.py``, ``losses/cross_batch_memory.py``,
  ``reducers/avg_non_zero_reducer.py``, ``utils/loss_and_miner_utils.py``.
- Hadsell, Chopra, LeCun. Dimensionality Reduction by Learning an Invariant Mapping. CVPR 2006.
"""

from __future__ import annotations

import numpy as np

from .._checks import check_int, check_positive, check_same_dtype, check_wrt
from ..backend import as_array, float_array, to_numpy
from ..losses import LossOutput, l2_normalize


def all_pairs_indices(labels, ref_labels=None):
    """``(a1, p, a2, n)``: positive pairs ``(a1[i], p[i])``, negative pairs ``(a2[j], n[j])``.

    As ``lmu.get_all_pairs_indices``: row-major order; without ``ref_labels`` an embedding is not
    its own positive.
    """
    labels = to_numpy(as_array(labels, "labels"))
    ref = labels if ref_labels is None else to_numpy(as_array(ref_labels, "ref_labels"))
    matches = labels[:, None] == ref[None, :]  # (N, M)
    diffs = ~matches
    if ref_labels is None:
        np.fill_diagonal(matches, False)
    return (*np.nonzero(matches), *np.nonzero(diffs))


def remove_self_comparisons(indices_tuple, curr_batch_idx, ref_size):
    """Drop the positive pairs of an embedding with its own memory slot (``CrossBatchMemory``).

    Follows ``lmu.not_self_comparisons`` line by line, including its arithmetic when the batch
    wraps around (``e <= s``): for a batch of one row ``s == e``, the offset 0 is moved to
    ``ref_size`` and the self comparison is **kept**.
    """
    a1, p, a2, n = indices_tuple
    s, e = int(curr_batch_idx[0]), int(curr_batch_idx[-1])
    curr = np.isin(p, curr_batch_idx)  # the positive is a row of the current batch
    offset = p[curr] - s  # its position in the batch
    if e <= s:
        offset[offset <= e - s] += ref_size
    keep = curr.copy()
    keep[np.nonzero(curr)[0][a1[curr] == offset]] = False
    keep |= ~curr
    return a1[keep], p[keep], a2, n


def _prepare(embeddings, labels, indices_tuple, ref_emb, ref_labels):
    emb = float_array(embeddings, "embeddings", ndim=2)
    ref = None if ref_emb is None else float_array(ref_emb, "ref_emb", ndim=2)
    dtype = check_same_dtype({"embeddings": emb, "ref_emb": ref})
    if ref is not None and ref.shape[1] != emb.shape[1]:
        raise ValueError(f"ref_emb: expected shape (M, {emb.shape[1]}), got {ref.shape}")
    if indices_tuple is None:
        if labels is None:
            raise ValueError("labels: required when indices_tuple is not given")
        own = ref is None or ref_labels is None
        pairs = all_pairs_indices(labels, None if own else ref_labels)
    else:
        pairs = tuple(np.asarray(to_numpy(as_array(i, "indices_tuple")), dtype=np.int64)
                      for i in indices_tuple)
        if len(pairs) != 4:
            raise ValueError("indices_tuple: expected (a1, p, a2, n) pairs")
    qn, back_q = l2_normalize(emb, axis=1)
    rn, back_r = (qn, back_q) if ref is None else l2_normalize(ref, axis=1)
    return dtype, pairs, qn, rn, back_q, back_r, ref is None


def _finish(dtype, loss, dq, dr, back_q, back_r, same, wrt):
    """Map the gradients of the normalised embeddings back to the raw inputs."""
    if same:
        grads = {"embeddings": back_q(dq + dr)}
    else:
        grads = {"embeddings": back_q(dq), "ref_emb": back_r(dr)}
    names = check_wrt(wrt, tuple(grads))  # "ref_emb" only when it was given
    return LossOutput(np.asarray(loss, dtype=dtype), {w: grads[w] for w in names})


def contrastive_loss(embeddings, labels=None, *, pos_margin=0.0, neg_margin=1.0,
                     indices_tuple=None, ref_emb=None, ref_labels=None, wrt=None):
    r"""``ContrastiveLoss(pos_margin, neg_margin)(embeddings, labels, indices_tuple, ref_emb,
    ref_labels)``.

    Parameters
    ----------
    embeddings : ndarray of shape (N, D)
        Raw embeddings (normalised inside).
    labels : ndarray of int of shape (N,), optional
        Class labels; equal labels make positive pairs. Not needed with ``indices_tuple``.
    pos_margin, neg_margin : float
        pml's defaults 0 and 1.
    indices_tuple : tuple of 4 ndarrays of int, optional
        ``(a1, p, a2, n)``, the pairs to use instead of all pairs.
    ref_emb : ndarray of shape (M, D), optional
        Reference embeddings the anchors are compared with (default: ``embeddings``).
    ref_labels : ndarray of int of shape (M,), optional
    wrt : tuple of str, optional
        ``("embeddings",)`` and, with ``ref_emb``, ``"ref_emb"``; default all.

    Returns
    -------
    LossOutput

    Notes
    -----
    With :math:`d_{ap} = \lVert \hat x_a - \hat r_p\rVert_2` on normalised rows,

    .. math:: L = \operatorname{mean}_{\ne 0}\{[d_{ap} - m_+]_+\}
              + \operatorname{mean}_{\ne 0}\{[m_- - d_{an}]_+\}

    where :math:`\operatorname{mean}_{\ne 0}` averages over the terms that are non-zero
    (``AvgNonZeroReducer``; 0 when none is). The hinges are **not squared** and have no
    :math:`\tfrac12`, unlike :func:`refmoco.contrastive_loss`. When every index array of the pairs
    has at most one entry pml returns 0 (``GenericPairLoss.compute_loss``); so does this.

    The distances are exact. pml's ``torch.cdist`` is exact up to 25 rows on both sides; beyond
    that it goes through a matrix product, and coincident rows come out 0 or about 3e-4 (float32)
    apart by its rounding, so with ``pos_margin=0`` pml may count such a pair as a non-zero term
    where this does not (docs/conventions-reproduced.md).

    Examples
    --------
    >>> import numpy as np
    >>> from refmoco.conventions.pml import contrastive_loss
    >>> x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    >>> out = contrastive_loss(x, np.array([0, 0, 1]))
    >>> bool(np.isclose(float(out.loss), np.sqrt(2) + 1.0))   # positive sqrt(2); negative 1 - 0
    True
    """
    dtype, pairs, qn, rn, back_q, back_r, same = _prepare(embeddings, labels, indices_tuple,
                                                          ref_emb, ref_labels)
    dq, dr = np.zeros_like(qn), np.zeros_like(rn)
    loss = dtype.type(0)
    if not all(len(x) <= 1 for x in pairs):
        parts = ((pairs[0], pairs[1], dtype.type(pos_margin), 1),  # relu(d - m+)
                 (pairs[2], pairs[3], dtype.type(neg_margin), -1))  # relu(m- - d)
        for a, p, margin, sign in parts:
            diff = qn[a] - rn[p]  # (P, D)
            d = np.sqrt((diff * diff).sum(axis=1))  # (P,)
            hinge = np.maximum(sign * (d - margin), 0)  # (P,)
            nonzero = hinge > 0
            if not nonzero.any():
                continue
            loss = loss + hinge[nonzero].mean()
            coef = np.where(nonzero & (d > 0), sign / np.where(d > 0, d, 1), 0)  # (P,)
            g = (coef / dtype.type(nonzero.sum()))[:, None] * diff  # d(mean)/d(qn_a)
            np.add.at(dq, a, g)
            np.add.at(dr, p, -g)
    return _finish(dtype, loss, dq, dr, back_q, back_r, same, wrt)


def ntxent_loss(embeddings, labels=None, *, temperature=0.07, indices_tuple=None, ref_emb=None,
                ref_labels=None, wrt=None):
    r"""``NTXentLoss(temperature)(embeddings, labels, indices_tuple, ref_emb, ref_labels)``.

    Parameters
    ----------
    embeddings : ndarray of shape (N, D)
        Raw embeddings (normalised inside: ``CosineSimilarity``).
    labels : ndarray of int of shape (N,), optional
    temperature : float
        pml's default is 0.07.
    indices_tuple, ref_emb, ref_labels, wrt
        As in :func:`contrastive_loss`.

    Returns
    -------
    LossOutput

    Notes
    -----
    One term per **positive pair** :math:`(a, p)`, with :math:`s = \hat x_a \cdot \hat r / T`
    and the negatives :math:`n` of the same anchor :math:`a`:

    .. math:: \ell_{ap} = -\log\Big(\frac{e^{s_{ap}}}{e^{s_{ap}} + \sum_n e^{s_{an}}}
              + \epsilon_{\text{tiny}}\Big),
              \qquad L = \operatorname{mean}_{(a,p)} \ell_{ap}

    where :math:`\epsilon_{\text{tiny}}` is the dtype's smallest normal number, as pml adds it.
    An anchor with several positives contributes one term per positive, each with only itself
    as the positive in the denominator. No positive pair or no negative pair: a loss of 0.

    Examples
    --------
    >>> import numpy as np
    >>> from refmoco.conventions.pml import ntxent_loss
    >>> x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    >>> out = ntxent_loss(x, np.array([0, 0, 1]), temperature=1.0)
    >>> bool(np.isclose(float(out.loss), np.log(np.e + 1) - 1))
    True
    """
    dtype, pairs, qn, rn, back_q, back_r, same = _prepare(embeddings, labels, indices_tuple,
                                                          ref_emb, ref_labels)
    a1, p, a2, n = pairs
    dq, dr = np.zeros_like(qn), np.zeros_like(rn)
    loss = dtype.type(0)
    if not all(len(x) <= 1 for x in pairs) and len(a1) > 0 and len(a2) > 0:
        inv_t = dtype.type(1.0 / check_positive(temperature, "temperature"))
        pos = (qn[a1] * rn[p]).sum(axis=1) * inv_t  # (P,)
        neg = (qn[a2] * rn[n]).sum(axis=1) * inv_t  # (Q,)
        mine = a2[None, :] == a1[:, None]  # (P, Q): the negatives of each positive's anchor
        logits = np.where(mine, neg[None, :], -np.inf)  # (P, Q)
        top = np.maximum(pos, logits.max(axis=1))  # (P,)
        sumexp = np.exp(pos - top) + np.exp(logits - top[:, None]).sum(axis=1)  # (P,)
        lse = top + np.log(sumexp)  # (P,)
        ratio = np.exp(pos - lse)  # (P,) the softmax probability of the positive
        tiny = np.finfo(dtype).tiny
        loss = (-np.log(ratio + tiny)).mean()
        w = ratio / (ratio + tiny) / dtype.type(len(a1))  # (P,) d(loss)/d(-log ratio)
        dpos = -w * (1 - ratio) * inv_t  # (P,)
        dneg = (w[:, None] * np.exp(logits - lse[:, None])).sum(axis=0) * inv_t  # (Q,)
        for idx_q, idx_r, d in ((a1, p, dpos), (a2, n, dneg)):
            np.add.at(dq, idx_q, d[:, None] * rn[idx_r])
            np.add.at(dr, idx_r, d[:, None] * qn[idx_q])
    return _finish(dtype, loss, dq, dr, back_q, back_r, same, wrt)


class CrossBatchMemory:
    r"""``CrossBatchMemory(loss, embedding_size, memory_size)``: a memory of past embeddings
    and labels, **filled before** the loss is computed.

    Parameters
    ----------
    loss : callable
        :func:`contrastive_loss`, :func:`ntxent_loss`, or a function of the same signature
        (with its hyper-parameters bound, e.g. ``functools.partial(ntxent_loss,
        temperature=0.1)``).
    embedding_size : int
    memory_size : int
        pml's default is 1024.

    Attributes
    ----------
    embedding_memory : ndarray of shape (memory_size, embedding_size)
        Starts as zeros; cast to the embeddings' dtype at every call, as pml does.
    label_memory : ndarray of int64 of shape (memory_size,)
    queue_idx : int
    has_been_filled : bool

    Notes
    -----
    A call with ``embeddings`` (b, D) and ``labels``: the rows go to slots
    ``(queue_idx + arange(b)) % memory_size``; the reference set is the filled part of the
    memory (all of it once it has wrapped); pairs are all (query, memory row) pairs by label;
    the pairs of each query with its own slot are removed (:func:`remove_self_comparisons`);
    then ``loss(embeddings, labels, pairs, memory, memory_labels)``. The memory holds detached
    copies: the gradient flows into ``embeddings`` as anchors only. With ``enqueue_mask`` (pml's
    MoCo-style use) the masked rows are enqueued, the others are the queries, and no self
    comparison is removed. Miners are not reproduced.

    Examples
    --------
    >>> import numpy as np
    >>> from refmoco.conventions.pml import CrossBatchMemory, contrastive_loss
    >>> memory = CrossBatchMemory(contrastive_loss, embedding_size=2, memory_size=4)
    >>> out = memory(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1]))
    >>> memory.queue_idx, sorted(out.grads)
    (2, ['embeddings'])
    """

    def __init__(self, loss, embedding_size, memory_size=1024):
        self.loss = loss
        self.embedding_size = check_int(embedding_size, "embedding_size", minimum=1)
        self.memory_size = check_int(memory_size, "memory_size", minimum=1)
        self.embedding_memory = np.zeros((self.memory_size, self.embedding_size), np.float32)
        self.label_memory = np.zeros(self.memory_size, dtype=np.int64)
        self.queue_idx = 0
        self.has_been_filled = False
        self.curr_batch_idx = np.zeros(0, dtype=np.int64)

    def add_to_memory(self, embeddings, labels) -> None:
        b = len(embeddings)
        self.curr_batch_idx = (self.queue_idx + np.arange(b)) % self.memory_size
        self.embedding_memory[self.curr_batch_idx] = embeddings
        self.label_memory[self.curr_batch_idx] = labels
        prev = self.queue_idx
        self.queue_idx = (self.queue_idx + b) % self.memory_size
        if not self.has_been_filled and self.queue_idx <= prev:
            self.has_been_filled = True

    def __call__(self, embeddings, labels, *, enqueue_mask=None) -> LossOutput:
        emb = float_array(embeddings, "embeddings", ndim=2)
        labels = to_numpy(as_array(labels, "labels")).astype(np.int64)
        if emb.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings: expected shape (b, {self.embedding_size}), "
                             f"got {emb.shape}")
        self.embedding_memory = self.embedding_memory.astype(emb.dtype)
        queries = np.ones(len(emb), dtype=bool)
        if enqueue_mask is not None:
            queries = ~to_numpy(as_array(enqueue_mask, "enqueue_mask")).astype(bool)
        elif len(emb) > self.memory_size:
            raise AssertionError("CrossBatchMemory: a batch larger than memory_size")
        to_queue = emb if enqueue_mask is None else emb[~queries]
        queue_labels = labels if enqueue_mask is None else labels[~queries]
        self.add_to_memory(to_queue, queue_labels)
        end = self.memory_size if self.has_been_filled else self.queue_idx
        e_mem, l_mem = self.embedding_memory[:end].copy(), self.label_memory[:end].copy()
        pairs = all_pairs_indices(labels[queries], l_mem)
        if enqueue_mask is None:
            pairs = remove_self_comparisons(pairs, self.curr_batch_idx, self.memory_size)
        out = self.loss(emb[queries], labels[queries], indices_tuple=pairs, ref_emb=e_mem,
                        ref_labels=l_mem, wrt=("embeddings",))
        grad = np.zeros_like(emb)  # the enqueued rows are detached: no gradient
        grad[queries] = out.grads["embeddings"]
        return LossOutput(out.loss, {"embeddings": grad})
