"""Loop references transcribed from the papers, in float64, for the tests only.

Nothing here is vectorised or shared with refmoco: each function is the formula written out
term by term, so that it is an independent oracle for the library's array code. The last
section is no oracle: it bounds the rounding error of a result computed in a given dtype.
"""

import math

import numpy as np


def logsumexp(values):
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def dot(a, b):
    return sum(float(x) * float(y) for x, y in zip(a, b))


def reduce(terms, reduction):
    return sum(terms) / len(terms) if reduction == "mean" else sum(terms)


def softmax_cross_entropy(logits, labels, reduction="mean"):
    terms = [logsumexp(list(row)) - float(row[label]) for row, label in zip(logits, labels)]
    return reduce(terms, reduction)


def contrastive(x1, x2, y, margin, reduction="mean"):
    """Hadsell, Chopra, LeCun 2006, eq. (4) with the 1/2 factors; y = 0 similar."""
    terms = []
    for a, b, yi in zip(x1, x2, y):
        d = math.sqrt(sum((float(ai) - float(bi)) ** 2 for ai, bi in zip(a, b)))
        terms.append((1 - yi) * 0.5 * d * d + yi * 0.5 * max(0.0, margin - d) ** 2)
    return reduce(terms, reduction)


def info_nce(q, k, negatives, temperature, reduction="mean"):
    """MoCo eq. (1): -log exp(q.k+/T) / sum over {k+, negatives} of exp(q.k/T)."""
    terms = []
    n = len(q)
    for i in range(n):
        if negatives is None:  # in-batch: every key of the batch, the positive is k[i]
            logits = [dot(q[i], k[j]) / temperature for j in range(n)]
            terms.append(logsumexp(logits) - logits[i])
            continue
        negs = negatives if len(negatives.shape) == 2 else negatives[i]
        logits = [dot(q[i], k[i]) / temperature] + [dot(q[i], m) / temperature for m in negs]
        terms.append(logsumexp(logits) - logits[0])
    return reduce(terms, reduction)


def cpc(z, c, W, reduction="mean"):
    """CPC eq. (4) with f_k(x_{t+k}, c_t) = exp(z_{t+k}^T W_k c_t), negatives from the batch."""
    B, T, D = z.shape
    S, _, H = W.shape
    terms = []
    for s in range(1, S + 1):
        for t in range(T - s):
            for b in range(B):
                pred = [sum(float(W[s - 1, d, h]) * float(c[b, t, h]) for h in range(H))
                        for d in range(D)]
                scores = [dot(z[bp, t + s], pred) for bp in range(B)]
                terms.append(logsumexp(scores) - scores[b])
    return reduce(terms, reduction)


# -- not a reference: how far a rounded InfoNCE may lie from the exact one ------------------------


def info_nce_rounding_bound(q, k, negatives, temperature, reduction, dtype):
    """``(loss bound, {name: bound per entry})``: how far InfoNCE computed in ``dtype`` from
    these inputs may lie from the exact result (first-order rounding analysis, in float64).

    Not an oracle (the values come from the float64 reference); the bounds weigh every term of a
    result by the softmax weight it actually carries, so they stay far below the gradient
    (a bound that took every weight as 1 exceeded the gradient itself at small temperatures).

    With ``u`` the unit roundoff of ``dtype``, per query ``i`` the candidates ``x_ij``
    (``j < M``; ``y_ij = 1`` at the positive), ``l_ij = q_i . x_ij / T`` and ``p = softmax(l)``:

    1. a logit is a dot product of C terms, scaled by 1/T and shifted by the row maximum:
       ``|dl_ij| <= d_i = (C + 2) u L_i``, ``L_i = max_j |q_i| . |x_ij| / T``;
    2. logits off by at most ``d_i`` move each ``p_ij``, and each ``1 - p_ij`` (the sum of the
       others), by a factor within ``exp(+-2 d_i)``: ``|dp_ij| <= min(p_ij, 1 - p_ij) expm1(2 d_i)``
       (no error from logits where the softmax is one-hot, however large they are);
    3. the log-sum-exp ``m_i + log s_i`` is rounded at its magnitude: all of row i's weights by the
       factor ``min(u |lse_i|, log s_i)``, and ``log s_i <= (1 - p_max) / p_max``;
    4. every other rounding (exp, the division, the product with ``x``, the sums over M
       candidates and over N queries, the rescalings of a blocked sum) at most ``M + N + 4``
       roundings on a term's way: ``(M + N + 4) u (p_ij + y_ij)`` per weight.

    A gradient entry ``s / T sum (p - y) x`` (``s`` the reduction's scale) is then off by at most
    ``s / T sum w |x|``, ``w`` the weight's bound; ``tiny (M + N + 1) max(1, |x|)`` more covers
    terms below the normal range (flushed to zero). A loss term ``(m_i - l_i0) + log s_i`` is off
    by at most ``2 d_i + (M + N + 4) u (1 + loss_i)``.
    """
    u = float(np.finfo(dtype).eps) / 2
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    n, c = q.shape
    aq, ak = np.abs(q), np.abs(k)
    t = float(temperature)
    if negatives is None:  # in-batch: every key, the positive on the diagonal
        logits, sizes, y = q @ k.T / t, aq @ ak.T / t, np.eye(n)
    else:
        neg = np.asarray(negatives, np.float64)
        an = np.abs(neg)
        if neg.ndim == 2:
            ln, sn = q @ neg.T / t, aq @ an.T / t
        else:
            ln, sn = np.einsum("ic,imc->im", q, neg) / t, np.einsum("ic,imc->im", aq, an) / t
        logits = np.concatenate([(q * k).sum(1, keepdims=True) / t, ln], axis=1)
        sizes = np.concatenate([(aq * ak).sum(1, keepdims=True) / t, sn], axis=1)
        y = np.zeros_like(logits)
        y[:, 0] = 1
    m = logits.shape[1]
    s = 1.0 if reduction == "sum" else 1.0 / max(n, 1)
    rho = (m + n + 4) * u
    if n == 0:  # no terms: exact zeros
        empty = {"q": q, "k": k} if negatives is None else {"q": q, "k": k, "negatives": neg}
        return 0.0, {name: np.zeros(a.shape) for name, a in empty.items()}
    d = (c + 2) * u * sizes.max(axis=1)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    total = e.sum(axis=1, keepdims=True)
    p = e / total
    rows, top = np.arange(n), p.argmax(axis=1)
    rest = np.where(np.arange(m) == top[:, None], 0.0, e).sum(axis=1) / total[:, 0]
    others = 1 - p  # exact enough except at the largest weight, where it is the sum of the rest
    others[rows, top] = rest
    lse = logits.max(axis=1) + np.log(total[:, 0])
    lse_err = np.minimum(u * np.abs(lse), rest / p[rows, top])
    w = (np.minimum(p, others) * np.expm1(np.minimum(2 * d, 700))[:, None]
         + p * lse_err[:, None] + rho * (p + y))
    if negatives is None:
        grads = {"q": w @ ak, "k": w.T @ aq}
    else:
        grads = {"k": w[:, :1] * aq}
        if neg.ndim == 2:
            grads["q"] = w[:, :1] * ak + w[:, 1:] @ an
            grads["negatives"] = w[:, 1:].T @ aq
        else:
            grads["q"] = w[:, :1] * ak + np.einsum("im,imc->ic", w[:, 1:], an)
            grads["negatives"] = w[:, 1:, None] * aq[:, None, :]
    inputs = (q, k) if negatives is None else (q, k, neg)
    big = max([1.0] + [float(np.abs(a).max(initial=0)) for a in inputs])
    floor = float(np.finfo(dtype).tiny) * (m + n + 1) * big
    losses = lse - logits[y.astype(bool)]
    loss_bound = s * float(np.sum(2 * d + rho * (1 + np.abs(losses))))
    return loss_bound, {name: (g + floor) * s / t for name, g in grads.items()}
