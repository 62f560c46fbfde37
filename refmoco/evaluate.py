"""How good are the features? kNN monitor, linear probe, alignment and uniformity.

- :func:`knn_accuracy`: the weighted kNN classifier MoCo's CIFAR demo uses to monitor training
  (from Wu et al. 2018, InstDisc).
- :func:`linear_probe_accuracy`: MoCo's linear protocol, a logistic regression on frozen features
  (scikit-learn, the ``demo`` extra, imported when called).
- :func:`alignment`, :func:`uniformity`: Wang & Isola (2020), arXiv:2005.10242.
- :func:`pixel_baseline`: both accuracies on raw pixels, the floor a learned encoder must beat.

Features may be any array the rest of refmoco accepts (NumPy, CuPy, CPU/CUDA tensors); they are
copied to the host and evaluated in float64; the scores come back as Python floats.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refmoco._checks import check_int, check_positive, check_seed
from refmoco.backend import to_numpy


def _features(x: Any, name: str) -> np.ndarray:
    a = to_numpy(x)
    if a.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name}: expected shape (N, D), got {a.shape}")
    if a.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one row, got shape {a.shape}")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: holds NaN or infinite values")
    return a


def _labels(y: Any, n: int, name: str) -> np.ndarray:
    a = to_numpy(y)
    if a.dtype.kind not in "iub":
        raise TypeError(f"{name}: expected integer labels, got dtype {a.dtype}")
    if a.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},) to match the features, got {a.shape}")
    return a.astype(np.int64)


def _check_pair(train: Any, train_y: Any, test: Any, test_y: Any) -> tuple[np.ndarray, ...]:
    f_train = _features(train, "train_features")
    f_test = _features(test, "test_features")
    if f_train.shape[1] != f_test.shape[1]:
        raise ValueError(
            f"test_features: expected {f_train.shape[1]} columns like train_features, "
            f"got {f_test.shape[1]}"
        )
    y_train = _labels(train_y, f_train.shape[0], "train_labels")
    y_test = _labels(test_y, f_test.shape[0], "test_labels")
    return f_train, y_train, f_test, y_test


def _normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x`` divided by ``max(||x_i||, eps)``."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def knn_accuracy(
    train_features: Any,
    train_labels: Any,
    test_features: Any,
    test_labels: Any,
    k: int = 200,
    temperature: float = 0.1,
    *,
    chunk_size: int = 1024,
) -> float:
    """Weighted k-nearest-neighbour accuracy, as MoCo's kNN monitor computes it.

    Parameters
    ----------
    train_features : array of shape (N_train, D)
    train_labels : array of shape (N_train,), integers
    test_features : array of shape (N_test, D)
    test_labels : array of shape (N_test,), integers
    k : int
        Number of neighbours, an integer >= 1; ``min(k, N_train)`` are used.
    temperature : float
        Softness of the vote weights, a finite real number > 0.
    chunk_size : int
        Test rows scored at once, an integer >= 1 (memory is ``chunk_size * N_train`` floats).

    Returns
    -------
    float
        Fraction of test samples whose predicted class equals their label, in [0, 1].

    Notes
    -----
    With rows L2-normalised, the similarity is :math:`s_{ij} = \\hat q_i \\cdot \\hat t_j`. Test
    sample i votes with its k most similar training samples :math:`N_k(i)`:

    .. math:: \\hat y_i = \\arg\\max_c \\sum_{j \\in N_k(i)} e^{s_{ij} / \\tau} [y_j = c]

    The weights are computed as :math:`e^{(s_{ij} - \\max_j s_{ij}) / \\tau}` (the same argmax,
    no overflow for small :math:`\\tau`). A tie between classes goes to the smallest label; which
    neighbours are kept when similarities tie at the k-th place is unspecified.

    References
    ----------
    Wu et al., "Unsupervised feature learning via non-parametric instance discrimination", 2018.
    He et al., MoCo, arXiv:1911.05722 (the kNN monitor of the official CIFAR-10 demo).

    Examples
    --------
    >>> f = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> knn_accuracy(f, np.array([0, 1]), f, np.array([0, 1]), k=1)
    1.0
    """
    k = check_int(k, "k", minimum=1)
    temperature = check_positive(temperature, "temperature")
    chunk_size = check_int(chunk_size, "chunk_size", minimum=1)
    f_train, y_train, f_test, y_test = _check_pair(
        train_features, train_labels, test_features, test_labels
    )
    k = min(k, f_train.shape[0])
    classes, y_index = np.unique(y_train, return_inverse=True)  # (K,), (N_train,)
    f_train = _normalize(f_train)  # (N_train, D)
    f_test = _normalize(f_test)  # (N_test, D)

    correct = 0
    for start in range(0, f_test.shape[0], chunk_size):
        sim = f_test[start : start + chunk_size] @ f_train.T  # (B, N_train)
        if k < sim.shape[1]:
            top = np.argpartition(-sim, k - 1, axis=1)[:, :k]  # (B, k)
        else:
            top = np.broadcast_to(np.arange(k), sim.shape)  # (B, k)
        top_sim = np.take_along_axis(sim, top, axis=1)  # (B, k)
        weight = np.exp((top_sim - top_sim.max(axis=1, keepdims=True)) / temperature)  # (B, k)
        votes = np.zeros((sim.shape[0], classes.size))  # (B, K)
        np.add.at(votes, (np.arange(sim.shape[0])[:, None], y_index[top]), weight)
        predicted = classes[np.argmax(votes, axis=1)]  # (B,)
        correct += int(np.sum(predicted == y_test[start : start + chunk_size]))
    return correct / f_test.shape[0]


def linear_probe_accuracy(
    train_features: Any,
    train_labels: Any,
    test_features: Any,
    test_labels: Any,
    seed: int = 0,
    *,
    C: float = 1.0,
    max_iter: int = 1000,
) -> float:
    """Test accuracy of a logistic regression trained on frozen features (linear protocol).

    Features are standardised with the training mean and standard deviation (a constant feature
    is only centred), then scikit-learn's ``LogisticRegression`` (L2, lbfgs, softmax over the
    classes) is fitted on the training split and scored on the test split.

    Parameters
    ----------
    train_features : array of shape (N_train, D)
    train_labels : array of shape (N_train,), integers, at least two classes
    test_features : array of shape (N_test, D)
    test_labels : array of shape (N_test,), integers
    seed : int
        ``random_state`` of the classifier, an integer >= 0.
    C : float
        Inverse regularisation strength, a finite real number > 0.
    max_iter : int
        Iterations of lbfgs, an integer >= 1.

    Returns
    -------
    float
        Test accuracy in [0, 1].

    Raises
    ------
    ImportError
        If scikit-learn is not installed.
    ValueError
        On bad shapes, fewer than two classes in ``train_labels``, or ``seed``, ``C`` or
        ``max_iter`` out of range.
    TypeError
        On non-float features, non-integer labels, or ``seed``, ``C``, ``max_iter`` of the
        wrong type (a ``bool`` or a string is refused).

    References
    ----------
    He et al., MoCo, arXiv:1911.05722, section 4.1 (linear classification protocol).
    """
    seed = check_seed(seed)
    C = check_positive(C, "C")
    max_iter = check_int(max_iter, "max_iter", minimum=1)
    f_train, y_train, f_test, y_test = _check_pair(
        train_features, train_labels, test_features, test_labels
    )
    if np.unique(y_train).size < 2:
        raise ValueError("train_labels: a linear probe needs at least two classes")
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as exc:
        raise ImportError(
            "linear_probe_accuracy needs scikit-learn: pip install 'refmoco[demo]'"
        ) from exc
    mean = f_train.mean(axis=0)  # (D,)
    std = f_train.std(axis=0)  # (D,)
    std = np.where(std > 0, std, 1.0)
    clf = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, random_state=seed)
    clf.fit((f_train - mean) / std, y_train)
    return float(np.mean(clf.predict((f_test - mean) / std) == y_test))


def alignment(x: Any, y: Any, alpha: float = 2, *, normalize: bool = True) -> float:
    """Mean distance between positive pairs: ``mean_i ||x_i - y_i||^alpha`` (lower is better).

    Parameters
    ----------
    x, y : array of shape (N, D)
        Row i of ``x`` and row i of ``y`` are two views of the same sample.
    alpha : float
        Exponent, a finite real number > 0.
    normalize : bool
        L2-normalise the rows first (Wang & Isola's definition is on the unit sphere).

    Returns
    -------
    float
        In [0, 2**alpha] for normalised rows.

    References
    ----------
    Wang & Isola, "Understanding contrastive representation learning through alignment and
    uniformity on the hypersphere", ICML 2020, arXiv:2005.10242.
    """
    alpha = check_positive(alpha, "alpha")
    a, b = _features(x, "x"), _features(y, "y")
    if a.shape != b.shape:
        raise ValueError(f"y: expected shape {a.shape} like x, got {b.shape}")
    if normalize:
        a, b = _normalize(a), _normalize(b)
    return float(np.mean(np.linalg.norm(a - b, axis=1) ** alpha))


def uniformity(x: Any, t: float = 2, *, normalize: bool = True, chunk_size: int = 1024) -> float:
    """How evenly the rows spread: ``log mean_{i<j} exp(-t ||x_i - x_j||^2)`` (lower is better).

    Parameters
    ----------
    x : array of shape (N, D), N >= 2
    t : float
        Scale of the Gaussian potential, a finite real number > 0.
    normalize : bool
        L2-normalise the rows first.
    chunk_size : int
        Rows processed at once, an integer >= 1 (memory is ``chunk_size * N`` floats).

    Returns
    -------
    float
        In [-4 t, 0] for normalised rows.

    Notes
    -----
    Over the :math:`P = N(N-1)/2` pairs, with :math:`v_{ij} = -t \\|x_i - x_j\\|^2`:

    .. math:: \\log \\frac{1}{P} \\sum_{i<j} e^{v_{ij}} = m + \\log \\sum_{i<j} e^{v_{ij} - m} - \\log P

    with :math:`m = \\max v_{ij}` (a running log-sum-exp over the chunks), so large ``t`` does not
    underflow to ``log 0``.

    References
    ----------
    Wang & Isola, ICML 2020, arXiv:2005.10242.
    """
    t = check_positive(t, "t")
    chunk_size = check_int(chunk_size, "chunk_size", minimum=1)
    a = _features(x, "x")
    n = a.shape[0]
    if n < 2:
        raise ValueError(f"x: uniformity needs at least 2 rows, got {n}")
    if normalize:
        a = _normalize(a)
    sq_norm = np.sum(a * a, axis=1)  # (N,)
    running_max, running_sum = -np.inf, 0.0
    for start in range(0, n - 1, chunk_size):
        rows = np.arange(start, min(start + chunk_size, n - 1))  # (B,)
        sq_dist = sq_norm[rows, None] + sq_norm[None, :] - 2.0 * (a[rows] @ a.T)  # (B, N)
        v = -t * np.maximum(sq_dist, 0.0)  # (B, N)
        v = v[rows[:, None] < np.arange(n)[None, :]]  # pairs i < j, flattened
        chunk_max = max(running_max, float(v.max()))
        running_sum = running_sum * np.exp(running_max - chunk_max) + np.sum(np.exp(v - chunk_max))
        running_max = chunk_max
    n_pairs = n * (n - 1) / 2
    return float(running_max + np.log(running_sum) - np.log(n_pairs))


def pixel_baseline(dataset: Any) -> dict[str, float]:
    """kNN and linear-probe accuracy on the raw, flattened pixels of a dataset.

    Parameters
    ----------
    dataset : refmoco.data.Dataset
        Anything with ``x_train`` (N_train, C, H, W), ``y_train``, ``x_test``, ``y_test``.

    Returns
    -------
    dict
        ``{"knn_accuracy": float, "linear_accuracy": float}`` on the test split, with the default
        settings of :func:`knn_accuracy` and :func:`linear_probe_accuracy`.

    Examples
    --------
    >>> from refmoco.data import load_digits
    >>> pixel_baseline(load_digits())["knn_accuracy"] > 0.9
    True
    """
    train = to_numpy(dataset.x_train).reshape(len(dataset.x_train), -1)  # (N_train, C*H*W)
    test = to_numpy(dataset.x_test).reshape(len(dataset.x_test), -1)  # (N_test, C*H*W)
    return {
        "knn_accuracy": knn_accuracy(train, dataset.y_train, test, dataset.y_test),
        "linear_accuracy": linear_probe_accuracy(train, dataset.y_train, test, dataset.y_test),
    }
