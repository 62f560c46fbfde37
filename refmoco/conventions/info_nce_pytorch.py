"""The ``info-nce-pytorch`` package's ``info_nce`` / ``InfoNCE`` (version 0.1.4), reproduced
exactly.

It normalises the query, the positive keys and the negative keys inside (``F.normalize``, the
same clamp as :func:`refmoco.l2_normalize`), its default temperature is 0.1, and it has three
modes: ``negative_mode="unpaired"`` with negatives ``(M, D)`` shared by every query (refmoco's
``(K, C)`` negatives), ``"paired"`` with ``(N, M, D)`` negatives, one set per query (refmoco's
``(N, M, C)``), and ``negative_keys=None``, where the other positive keys of the batch are the
negatives (refmoco's ``negatives=None``). On normalised inputs every mode equals
:func:`refmoco.info_nce_loss`.

References
----------
- info-nce-pytorch, ``info_nce/__init__.py``.
- van den Oord, Li, Vinyals. Representation Learning with Contrastive Predictive Coding.
  arXiv:1807.03748.
"""

from __future__ import annotations

import numpy as np

from .._checks import check_positive, check_same_dtype, check_wrt
from ..backend import float_array
from ..losses import LossOutput, info_nce_forward, info_nce_loss, l2_normalize

MODES = ("unpaired", "paired")


def info_nce(query, positive_key, negative_keys=None, *, temperature=0.1, reduction="mean",
             negative_mode="unpaired", wrt=None):
    r"""``info_nce(query, positive_key, negative_keys, temperature, reduction, negative_mode)``.

    Parameters
    ----------
    query, positive_key : ndarray of shape (N, D)
        Raw vectors (normalised inside).
    negative_keys : ndarray of shape (M, D) or (N, M, D), optional
        ``(M, D)`` with ``negative_mode="unpaired"``, ``(N, M, D)`` with ``"paired"``; ``None``
        for in-batch negatives.
    temperature : float
        The package's default is 0.1 (refmoco's is MoCo's 0.07).
    reduction : {"mean", "sum", "none"}
        ``"none"`` returns the ``(N,)`` per-query losses and no gradients (a vector has none).
    negative_mode : {"unpaired", "paired"}
    wrt : tuple of str, optional
        Subset of ``("query", "positive_key", "negative_keys")``; default all arrays given.

    Returns
    -------
    LossOutput

    Raises
    ------
    ValueError
        As the package: wrong number of dimensions for the mode, mismatched sizes.

    Notes
    -----
    With :math:`\hat x = x / \max(\lVert x\rVert, 10^{-12})`, the loss is
    ``info_nce_loss(q̂, k̂, n̂, temperature=T)``; the gradients are chained through the
    normalisation (:func:`refmoco.l2_normalize`'s ``backward``).

    Examples
    --------
    >>> import numpy as np
    >>> from refmoco.conventions.info_nce_pytorch import info_nce
    >>> q = np.array([[2.0, 0.0]]); k = np.array([[5.0, 0.0]]); n = np.array([[0.0, 3.0]])
    >>> out = info_nce(q, k, n, temperature=1.0)
    >>> bool(np.isclose(float(out.loss), np.log(np.e + 1) - 1))
    True
    """
    if negative_mode not in MODES:
        raise ValueError(f"negative_mode: expected 'unpaired' or 'paired', got {negative_mode!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    q = float_array(query, "query", ndim=2)
    k = float_array(positive_key, "positive_key", ndim=2)
    neg = None if negative_keys is None else float_array(negative_keys, "negative_keys")
    check_same_dtype({"query": q, "positive_key": k, "negative_keys": neg})
    if neg is not None:
        want = 2 if negative_mode == "unpaired" else 3
        if neg.ndim != want:
            raise ValueError(f"negative_keys: must have {want} dimensions if "
                             f"negative_mode == {negative_mode!r}")
    if len(q) != len(k):
        raise ValueError("positive_key: must have the same number of samples as query")
    if neg is not None and neg.ndim == 3 and len(neg) != len(q):
        raise ValueError("negative_keys: must have the same number of samples as query "
                         "if negative_mode == 'paired'")
    names = ("query", "positive_key") + (() if neg is None else ("negative_keys",))
    wrt = () if reduction == "none" else check_wrt(wrt, names)
    t = check_positive(temperature, "temperature")
    qn, back_q = l2_normalize(q, axis=-1)
    kn, back_k = l2_normalize(k, axis=-1)
    nn_, back_n = (None, None) if neg is None else l2_normalize(neg, axis=-1)
    if reduction == "none":
        losses, _ = info_nce_forward(qn, kn, nn_, t, np)
        return LossOutput(losses, {})
    inner = {"query": "q", "positive_key": "k", "negative_keys": "negatives"}
    out = info_nce_loss(qn, kn, nn_, temperature=t, reduction=reduction,
                        wrt=tuple(inner[w] for w in wrt))
    backs = {"query": back_q, "positive_key": back_k, "negative_keys": back_n}
    return LossOutput(out.loss, {w: backs[w](out.grads[inner[w]]) for w in wrt})

