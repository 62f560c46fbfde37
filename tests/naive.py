"""Loop references transcribed from the papers, in float64, for the tests only.

Nothing here is vectorised or shared with refmoco: each function is the formula written out
term by term, so that it is an independent oracle for the library's array code.
"""

import math


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
