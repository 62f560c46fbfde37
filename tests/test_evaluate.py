"""Evaluation: kNN monitor and alignment/uniformity against naive loops, linear probe, baselines."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refmoco.evaluate import (
    alignment,
    knn_accuracy,
    linear_probe_accuracy,
    pixel_baseline,
    uniformity,
)

seeds = st.integers(0, 2**32 - 1)


# ---------------------------------------------------------------- naive references


def naive_knn_accuracy(train, train_labels, test, test_labels, k, temperature):
    """InstDisc / MoCo kNN monitor with explicit loops."""

    def unit(v):
        norm = math.sqrt(sum(a * a for a in v))
        return [a / norm for a in v]

    train = [unit(row) for row in train.tolist()]
    correct = 0
    for row, label in zip(test.tolist(), test_labels.tolist(), strict=True):
        q = unit(row)
        sims = [
            (sum(a * b for a, b in zip(q, t, strict=True)), y)
            for t, y in zip(train, train_labels.tolist(), strict=True)
        ]
        sims.sort(key=lambda s: -s[0])
        scores = {}
        for sim, y in sims[:k]:
            scores[y] = scores.get(y, 0.0) + math.exp(sim / temperature)
        best = max(sorted(scores), key=lambda c: scores[c])  # first (smallest) class on a tie
        correct += best == label
    return correct / len(test_labels)


def naive_alignment(x, y, alpha):
    total = 0.0
    for a, b in zip(x.tolist(), y.tolist(), strict=True):
        na, nb = math.sqrt(sum(v * v for v in a)), math.sqrt(sum(v * v for v in b))
        total += math.sqrt(sum((u / na - v / nb) ** 2 for u, v in zip(a, b, strict=True))) ** alpha
    return total / len(x)


def naive_uniformity(x, t):
    rows = [[v / math.sqrt(sum(u * u for u in r)) for v in r] for r in x.tolist()]
    total, pairs = 0.0, 0
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            sq = sum((a - b) ** 2 for a, b in zip(rows[i], rows[j], strict=True))
            total += math.exp(-t * sq)
            pairs += 1
    return math.log(total / pairs)


# ---------------------------------------------------------------- kNN


@settings(deadline=None, max_examples=60)
@given(
    n_train=st.integers(1, 15),
    n_test=st.integers(1, 8),
    dim=st.integers(2, 5),
    n_classes=st.integers(1, 4),
    k=st.integers(1, 20),
    temperature=st.floats(0.05, 1.0),
    chunk_size=st.integers(1, 4),
    seed=seeds,
)
def test_knn_matches_naive_loop(n_train, n_test, dim, n_classes, k, temperature, chunk_size, seed):
    rng = np.random.default_rng(seed)
    train = rng.standard_normal((n_train, dim))
    test = rng.standard_normal((n_test, dim))
    train_labels = rng.integers(0, n_classes, n_train)
    test_labels = rng.integers(0, n_classes, n_test)
    expected = naive_knn_accuracy(train, train_labels, test, test_labels, k, temperature)
    got = knn_accuracy(
        train, train_labels, test, test_labels, k, temperature, chunk_size=chunk_size
    )
    assert isinstance(got, float)
    assert got == expected


def test_knn_on_separable_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    train_labels = np.repeat([3, 7, 42], 20)  # arbitrary label values
    test_labels = np.repeat([3, 7, 42], 5)
    train = centres[np.repeat([0, 1, 2], 20)] + 0.05 * rng.standard_normal((60, 3))
    test = centres[np.repeat([0, 1, 2], 5)] + 0.05 * rng.standard_normal((15, 3))
    assert knn_accuracy(train, train_labels, test, test_labels, k=5) == 1.0
    assert knn_accuracy(train, train_labels, test, np.roll(test_labels, 5), k=5) == 0.0
    # k larger than the training set: all 60 vote, the near cluster's weights dominate
    assert knn_accuracy(train, train_labels, test, test_labels, k=200) == 1.0
    # cosine similarity: rescaling rows changes nothing
    scale = rng.uniform(0.1, 10.0, size=(60, 1))
    assert knn_accuracy(train * scale, train_labels, test, test_labels, k=5) == 1.0


def test_knn_cold_temperature_is_nearest_neighbour():
    rng = np.random.default_rng(1)
    train, test = rng.standard_normal((50, 4)), rng.standard_normal((30, 4))
    train_labels, test_labels = rng.integers(0, 5, 50), rng.integers(0, 5, 30)
    one_nn = knn_accuracy(train, train_labels, test, test_labels, k=1)
    assert knn_accuracy(train, train_labels, test, test_labels, k=50, temperature=1e-4) == one_nn


def test_knn_float32_features():
    rng = np.random.default_rng(3)
    train, test = rng.standard_normal((40, 5)), rng.standard_normal((20, 5))
    train_labels, test_labels = rng.integers(0, 4, 40), rng.integers(0, 4, 20)
    expected = naive_knn_accuracy(train, train_labels, test, test_labels, 10, 0.1)
    got = knn_accuracy(
        train.astype(np.float32), train_labels, test.astype(np.float32), test_labels, k=10
    )
    assert got == expected


def test_knn_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    train, test = rng.standard_normal((20, 3)), rng.standard_normal((10, 3))
    train_labels, test_labels = rng.integers(0, 3, 20), rng.integers(0, 3, 10)
    expected = knn_accuracy(train, train_labels, test, test_labels, k=5)
    got = knn_accuracy(
        torch.from_numpy(train),
        torch.from_numpy(train_labels),
        torch.from_numpy(test),
        torch.from_numpy(test_labels),
        k=5,
    )
    assert got == expected


def test_knn_rejects_bad_arguments():
    f, y = np.ones((4, 2)), np.zeros(4, int)
    with pytest.raises(TypeError, match="train_features"):
        knn_accuracy(np.ones((4, 2), int), y, f, y)
    with pytest.raises(ValueError, match="test_features"):
        knn_accuracy(f, y, np.ones((4, 3)), y)
    with pytest.raises(ValueError, match="test_features"):
        knn_accuracy(f, y, np.ones(4), y)
    with pytest.raises(ValueError, match="train_labels"):
        knn_accuracy(f, np.zeros(3, int), f, y)
    with pytest.raises(TypeError, match="test_labels"):
        knn_accuracy(f, y, f, np.zeros(4))
    with pytest.raises(ValueError, match="train_features"):
        knn_accuracy(np.full((4, 2), np.nan), y, f, y)
    with pytest.raises(ValueError, match="k"):
        knn_accuracy(f, y, f, y, k=0)
    with pytest.raises(ValueError, match="temperature"):
        knn_accuracy(f, y, f, y, temperature=0.0)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"k": True}, TypeError, "k"),  # a bool is not the integer 1
        ({"k": 2.5}, TypeError, "k"),
        ({"k": "5"}, TypeError, "k"),
        ({"k": -1}, ValueError, "k"),
        ({"temperature": "0.1"}, TypeError, "temperature"),
        ({"temperature": True}, TypeError, "temperature"),
        ({"temperature": math.inf}, ValueError, "temperature"),
        ({"temperature": math.nan}, ValueError, "temperature"),
        ({"temperature": -0.1}, ValueError, "temperature"),
        ({"chunk_size": 2.0}, TypeError, "chunk_size"),
        ({"chunk_size": np.float64(4.0)}, TypeError, "chunk_size"),
        ({"chunk_size": True}, TypeError, "chunk_size"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"chunk_size": -1}, ValueError, "chunk_size"),
    ],
)
def test_knn_rejects_bad_numeric_arguments(kwargs, error, name):
    f = np.random.default_rng(0).standard_normal((10, 3))
    y = np.arange(10) % 2
    with pytest.raises(error, match=rf"^{name}: expected"):
        knn_accuracy(f, y, f, y, **{"k": 3, **kwargs})


def test_knn_accepts_numpy_integers_for_k_and_chunk_size():
    rng = np.random.default_rng(1)
    train, test = rng.standard_normal((12, 3)), rng.standard_normal((5, 3))
    train_labels, test_labels = rng.integers(0, 3, 12), rng.integers(0, 3, 5)
    expected = naive_knn_accuracy(train, train_labels, test, test_labels, 4, 0.5)
    got = knn_accuracy(train, train_labels, test, test_labels, k=np.int64(4),
                       temperature=np.float32(0.5), chunk_size=np.int32(2))
    assert got == expected


# ---------------------------------------------------------------- alignment and uniformity


@settings(deadline=None, max_examples=60)
@given(n=st.integers(1, 12), dim=st.integers(1, 5), alpha=st.floats(0.5, 4.0), seed=seeds)
def test_alignment_matches_naive_loop(n, dim, alpha, seed):
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((n, dim)), rng.standard_normal((n, dim))
    expected = naive_alignment(x, y, alpha)
    assert math.isclose(alignment(x, y, alpha), expected, rel_tol=1e-12, abs_tol=1e-14)
    assert 0.0 <= alignment(x, y, alpha) <= 2.0**alpha * (1 + 1e-12)


@settings(deadline=None, max_examples=60)
@given(
    n=st.integers(2, 12),
    dim=st.integers(1, 5),
    t=st.floats(0.1, 5.0),
    chunk_size=st.integers(1, 5),
    seed=seeds,
)
def test_uniformity_matches_naive_loop(n, dim, t, chunk_size, seed):
    x = np.random.default_rng(seed).standard_normal((n, dim))
    expected = naive_uniformity(x, t)
    got = uniformity(x, t, chunk_size=chunk_size)
    assert math.isclose(got, expected, rel_tol=1e-10, abs_tol=1e-12)
    assert -4 * t - 1e-12 <= got <= 1e-12


def test_alignment_and_uniformity_closed_forms():
    x = np.array([[3.0, 0.0], [0.0, 0.5]])
    assert alignment(x, x) == 0.0
    assert math.isclose(alignment(x, -x), 4.0)  # antipodal pairs: ||2 x_i||^2 = 4
    assert math.isclose(alignment(x, -x, alpha=1), 2.0)
    # one pair at squared distance 2: exactly -2 t, even where exp(-2 t) underflows
    assert math.isclose(uniformity(x, t=2), -4.0)
    assert math.isclose(uniformity(x, t=1000.0), -2000.0)
    # identical points: every pair at distance 0
    assert math.isclose(uniformity(np.ones((5, 3)), t=2), 0.0, abs_tol=1e-12)
    # normalize=False on unit rows agrees with normalize=True
    unit = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert uniformity(5 * unit) == uniformity(unit, normalize=False)
    assert alignment(5 * unit, unit) == alignment(unit, unit, normalize=False) == 0.0


def test_alignment_uniformity_reject_bad_arguments():
    with pytest.raises(ValueError, match="y"):
        alignment(np.ones((3, 2)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="alpha"):
        alignment(np.ones((3, 2)), np.ones((3, 2)), alpha=0)
    with pytest.raises(ValueError, match="x"):
        uniformity(np.ones((1, 2)))
    with pytest.raises(ValueError, match="t"):
        uniformity(np.ones((3, 2)), t=-1.0)
    with pytest.raises(TypeError, match="x"):
        uniformity(np.ones((3, 2), int))


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"chunk_size": -1}, ValueError, "chunk_size"),  # was a silent -inf
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"chunk_size": 2.5}, TypeError, "chunk_size"),
        ({"chunk_size": True}, TypeError, "chunk_size"),
        ({"t": "2"}, TypeError, "t"),
        ({"t": True}, TypeError, "t"),
        ({"t": math.inf}, ValueError, "t"),
        ({"t": math.nan}, ValueError, "t"),
    ],
)
def test_uniformity_rejects_bad_numeric_arguments(kwargs, error, name):
    x = np.random.default_rng(0).standard_normal((6, 3))
    with pytest.raises(error, match=rf"^{name}: expected"):
        uniformity(x, **kwargs)


@pytest.mark.parametrize(
    ("alpha", "error"),
    [("2", TypeError), (True, TypeError), (math.inf, ValueError), (math.nan, ValueError)],
)
def test_alignment_rejects_bad_alpha(alpha, error):
    x = np.random.default_rng(0).standard_normal((6, 3))
    with pytest.raises(error, match=r"^alpha: expected"):
        alignment(x, -x, alpha)


# ---------------------------------------------------------------- linear probe and baseline


def test_linear_probe_on_separable_data():
    pytest.importorskip("sklearn")
    rng = np.random.default_rng(0)
    train_labels, test_labels = rng.integers(0, 3, 90), rng.integers(0, 3, 30)
    centres = 5.0 * np.eye(3, 4)
    train = centres[train_labels] + 0.3 * rng.standard_normal((90, 4))
    test = centres[test_labels] + 0.3 * rng.standard_normal((30, 4))
    train[:, 3] = test[:, 3] = 2.0  # a constant feature must not divide by zero
    got = linear_probe_accuracy(train, train_labels, test, test_labels)
    assert isinstance(got, float) and got == 1.0
    assert linear_probe_accuracy(train, train_labels, test, (test_labels + 1) % 3) == 0.0


def test_linear_probe_matches_sklearn_pipeline():
    pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    train, test = rng.standard_normal((80, 6)), rng.standard_normal((40, 6))
    train_labels = (train[:, 0] + 0.5 * rng.standard_normal(80) > 0).astype(int) + (train[:, 1] > 0)
    test_labels = (test[:, 0] > 0).astype(int) + (test[:, 1] > 0)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=0))
    expected = model.fit(train, train_labels).score(test, test_labels)
    assert linear_probe_accuracy(train, train_labels, test, test_labels) == pytest.approx(expected)


def test_linear_probe_needs_two_classes():
    f = np.ones((4, 2))
    with pytest.raises(ValueError, match="train_labels"):
        linear_probe_accuracy(f, np.zeros(4, int), f, np.zeros(4, int))


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"C": "1.0"}, TypeError, "C"),
        ({"C": 0.0}, ValueError, "C"),
        ({"C": math.inf}, ValueError, "C"),
        ({"max_iter": 10.5}, TypeError, "max_iter"),
        ({"max_iter": 0}, ValueError, "max_iter"),
        ({"max_iter": True}, TypeError, "max_iter"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"seed": True}, TypeError, "seed"),
        ({"seed": 2**32}, ValueError, "seed"),  # scikit-learn's random_state stops at 2**32 - 1
    ],
)
def test_linear_probe_rejects_bad_numeric_arguments(kwargs, error, name):
    f = np.random.default_rng(0).standard_normal((8, 2))
    y = np.arange(8) % 2
    with pytest.raises(error, match=rf"^{name}: expected"):
        linear_probe_accuracy(f, y, f, y, **kwargs)


@pytest.mark.parametrize(
    ("name", "knn_range", "linear_range"),
    [("digits", (0.9, 1.0), (0.93, 1.0)), ("translated-digits", (0.45, 0.7), (0.0, 0.3))],
)
def test_pixel_baseline(name, knn_range, linear_range):
    pytest.importorskip("sklearn")
    from refmoco.data import load_dataset

    scores = pixel_baseline(load_dataset(name, seed=0))
    assert set(scores) == {"knn_accuracy", "linear_accuracy"}
    assert knn_range[0] <= scores["knn_accuracy"] <= knn_range[1]
    assert linear_range[0] <= scores["linear_accuracy"] <= linear_range[1]
