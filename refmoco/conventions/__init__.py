"""Exact NumPy reproductions of other libraries' contrastive losses, queues and memories.

Each module reproduces one codebase's semantics as its code computes them (shapes, where the
inputs are normalised, the order of operations, the reduction, quirks included), with gradients,
so that a user of that library can check their code against refmoco without first translating
conventions by hand. ``docs/conventions-reproduced.md`` lists every difference from refmoco's own
functions and the source lines each reproduction follows.

- :mod:`~refmoco.conventions.moco`: official MoCo v1/v2 (``(dim, K)`` queue, its ``K % N``
  assert, ``cat([l_pos, l_neg]) / T``) and MoCo v3 (symmetric, in-batch, scaled by ``2T``).
- :mod:`~refmoco.conventions.lightly`: lightly's ``NTXentLoss`` (``2N`` rows of ``2N - 1`` logits
  without a bank) and its ``MemoryBankModule``, which drops the part of a batch that overflows.
- :mod:`~refmoco.conventions.pml`: PyTorch Metric Learning's ``ContrastiveLoss`` (unsquared
  hinges, averaged over the non-zero terms), ``NTXentLoss`` and ``CrossBatchMemory`` (which
  enqueues before the loss).
- :mod:`~refmoco.conventions.info_nce_pytorch`: the ``info-nce-pytorch`` package's ``info_nce``.
- :mod:`~refmoco.conventions.cpc`: CPC as in the paper, as in jefflai108's ``CDCK2`` and as in
  facebookresearch's ``CPC_audio``.
- :mod:`~refmoco.conventions.margin`: the margin loss with 1 = similar (TensorFlow Addons, Caffe).

Everything here imports NumPy and refmoco only.
"""

from . import cpc, info_nce_pytorch, lightly, margin, moco, pml

__all__ = ["cpc", "info_nce_pytorch", "lightly", "margin", "moco", "pml"]
