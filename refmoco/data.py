"""Datasets for the demo: scikit-learn's bundled digits, a translated variant, and user ``.npz`` files.

Every loader returns a :class:`Dataset` of float32 images ``(N, C, H, W)`` and int64 labels,
already split into train and test. The bundled digits are in ``[0, 1]``; an ``.npz`` file's
unsigned integer images are divided by their dtype's maximum (uint8: 255), so they are in
``[0, 1]`` too, while its float images are used as given (checked finite, not rescaled): the
trainer's augmentations assume roughly ``[0, 1]`` (their additive Gaussian noise has sigma 0.05
by default). Signed integer images are refused (see :func:`load_npz`). Splits are stratified and fixed by ``seed``, so
two runs with the same seed see the same images in the same split.

scikit-learn (the ``demo`` extra) is imported only when the digits are loaded.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

DATASETS = ("digits", "translated-digits")


class Dataset(NamedTuple):
    """Images and labels split into train and test.

    Attributes
    ----------
    x_train : ndarray of shape (N_train, C, H, W), float32 (in [0, 1] except float .npz images,
        which are used as given)
    y_train : ndarray of shape (N_train,), int64
    x_test : ndarray of shape (N_test, C, H, W), float32 (as ``x_train``)
    y_test : ndarray of shape (N_test,), int64
    name : str
        ``"digits"``, ``"translated-digits"`` or the stem of the ``.npz`` file.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str


def _check_fraction(test_fraction: float) -> float:
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction: expected a value in (0, 1), got {test_fraction!r}")
    return float(test_fraction)


def stratified_split(
    labels: np.ndarray, test_fraction: float = 0.3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into train and test with the class proportions of ``labels``.

    The test set holds ``ceil(test_fraction * N)`` samples (scikit-learn's ``train_test_split``
    convention). Class c contributes ``floor(test_fraction_eff * N_c)`` of them, and the samples
    still missing go one each to the classes with the largest remainders (ties: lower class
    first), so the proportions are kept as closely as integers allow. Inside each class the test
    samples are drawn at random from ``seed``.

    Parameters
    ----------
    labels : ndarray of shape (N,), integers
        Class of each sample.
    test_fraction : float
        Fraction of the samples in the test split, in (0, 1).
    seed : int
        Seed of the ``np.random.default_rng`` that shuffles each class.

    Returns
    -------
    train_idx : ndarray of shape (N - N_test,), int64
        Sorted indices of the training samples.
    test_idx : ndarray of shape (N_test,), int64
        Sorted indices of the test samples.

    Raises
    ------
    ValueError
        If ``labels`` is not 1-d, has fewer than two samples, or ``test_fraction`` is not in (0, 1).

    Examples
    --------
    >>> train, test = stratified_split(np.array([0, 0, 0, 1, 1, 1]), 0.5, seed=0)
    >>> len(train), len(test)
    (3, 3)
    """
    labels = np.asarray(labels)
    test_fraction = _check_fraction(test_fraction)
    if labels.ndim != 1:
        raise ValueError(f"labels: expected a 1-d array, got shape {labels.shape}")
    n = labels.shape[0]
    if n < 2:
        raise ValueError(f"labels: need at least 2 samples to split, got {n}")
    n_test = min(max(int(np.ceil(test_fraction * n)), 1), n - 1)

    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota = counts * (n_test / n)  # (K,) ideal test samples per class
    per_class = np.floor(quota).astype(np.int64)  # (K,)
    by_remainder = np.argsort(-(quota - per_class), kind="stable")  # (K,)
    per_class[by_remainder[: n_test - per_class.sum()]] += 1

    rng = np.random.default_rng(seed)
    test_parts = []
    for c in range(len(classes)):
        members = np.flatnonzero(inverse == c)
        test_parts.append(rng.permutation(members)[: per_class[c]])
    is_test = np.zeros(n, dtype=bool)
    is_test[np.concatenate(test_parts)] = True
    return np.flatnonzero(~is_test).astype(np.int64), np.flatnonzero(is_test).astype(np.int64)


def _split(
    images: np.ndarray,
    labels: np.ndarray,
    train: np.ndarray | None,
    name: str,
    seed: int,
    test_fraction: float,
) -> Dataset:
    if train is None:
        train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    else:
        train_idx, test_idx = np.flatnonzero(train), np.flatnonzero(~train)
    return Dataset(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], name)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 bundled 8x8 digits as float32 (N, 1, 8, 8) in [0, 1] and int64 labels."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as exc:
        raise ImportError(
            "the digits dataset comes with scikit-learn: pip install 'refmoco[demo]'"
        ) from exc
    bunch = sklearn_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]  # (N, 1, 8, 8)
    return images, bunch.target.astype(np.int64)


def load_digits(seed: int = 0, test_fraction: float = 0.3) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits, split into train and test.

    Parameters
    ----------
    seed : int
        Seed of the stratified split.
    test_fraction : float
        Fraction of the 1797 images in the test split (0.3 gives 1257 train / 540 test).

    Returns
    -------
    Dataset
        Images of shape (N, 1, 8, 8), pixel values 0..16 divided by 16.

    Examples
    --------
    >>> ds = load_digits()
    >>> ds.x_train.shape, ds.x_test.shape
    ((1257, 1, 8, 8), (540, 1, 8, 8))
    """
    images, labels = _digits_arrays()
    return _split(images, labels, None, "digits", seed, test_fraction)


def translated_digits(seed: int = 0, canvas: int = 16, test_fraction: float = 0.3) -> Dataset:
    """The harder variant: each digit pasted at a random position on a zero ``canvas`` square.

    The positions are drawn once from ``seed`` (from a stream separate from the split's), so the
    dataset is fixed; the split is the same as :func:`load_digits` with the same seed. A digit is
    never cut: its top-left corner is uniform in ``[0, canvas - 8]`` along each axis.

    Parameters
    ----------
    seed : int
        Seed of the positions and of the stratified split.
    canvas : int
        Side of the square canvas, at least 8.
    test_fraction : float
        Fraction of the images in the test split.

    Returns
    -------
    Dataset
        Images of shape (N, 1, canvas, canvas).

    Raises
    ------
    ValueError
        If ``canvas`` is smaller than 8.
    """
    if int(canvas) != canvas or canvas < 8:
        raise ValueError(f"canvas: expected an integer >= 8, got {canvas!r}")
    canvas = int(canvas)
    digits, labels = _digits_arrays()
    n = digits.shape[0]
    rng = np.random.default_rng([seed, 1])
    top = rng.integers(0, canvas - 8, size=n, endpoint=True)  # (N,)
    left = rng.integers(0, canvas - 8, size=n, endpoint=True)  # (N,)
    images = np.zeros((n, 1, canvas, canvas), dtype=np.float32)
    for i in range(n):
        images[i, :, top[i] : top[i] + 8, left[i] : left[i] + 8] = digits[i]
    return _split(images, labels, None, "translated-digits", seed, test_fraction)


def _read_array(archive: np.lib.npyio.NpzFile, key: str, path: str) -> np.ndarray:
    if key not in archive.files:
        raise ValueError(
            f"{path}: missing array {key!r} (the file holds {sorted(archive.files)}); "
            "expected 'images' (N, C, H, W) or (N, H, W), 'labels' (N,) and optionally 'train' (N,)"
        )
    try:
        array = archive[key]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        if "allow_pickle" in str(exc):  # object arrays need pickle, which is never allowed here
            raise ValueError(
                f"{path}: array {key!r} is an object array (it would need pickle to load); "
                "save plain numeric arrays"
            ) from exc
        raise ValueError(f"{path}: array {key!r} is corrupt ({exc})") from exc
    if not isinstance(array, np.ndarray):  # NumPy hands back the raw bytes of a non-.npy member
        raise ValueError(f"{path}: array {key!r} is not a .npy array inside the archive")
    return array


def _read_npz(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The raw ``images``, ``labels`` and optional ``train`` arrays of an ``.npz`` file."""
    not_npz = f"{path}: not a valid .npz file (save one with np.savez)"
    with open(path, "rb") as handle:  # closed here even when NumPy fails half-way
        try:
            archive = np.load(handle, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(not_npz) from exc
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError(f"{not_npz}: it holds a single .npy array")
        with archive:
            images = _read_array(archive, "images", path)
            labels = _read_array(archive, "labels", path)
            train = _read_array(archive, "train", path) if "train" in archive.files else None
    return images, labels, train


def _check_images(images: np.ndarray, path: str) -> np.ndarray:
    if images.ndim == 3:
        images = images[:, None, :, :]
    if images.ndim != 4:
        raise ValueError(
            f"{path}: array 'images' must be (N, C, H, W) or (N, H, W), got shape {images.shape}"
        )
    if 0 in images.shape:
        raise ValueError(f"{path}: array 'images' is empty, shape {images.shape}")
    kind = images.dtype.kind
    if kind == "b":
        return images.astype(np.float32)
    if kind == "i":  # int64 is NumPy's default for np.array(list): its max would scale to ~0
        raise ValueError(
            f"{path}: array 'images' has the signed integer dtype {images.dtype}, whose scale "
            f"is unknown; convert it before saving: to uint8 if it holds 0..255 "
            f"(images.astype(np.uint8)), uint16 for 0..65535, or to floats in [0, 1]"
        )
    if kind == "u":
        dtype_max = np.iinfo(images.dtype).max
        if images.dtype.itemsize > 2:
            warnings.warn(
                f"{path}: integer array 'images' of dtype {images.dtype} is scaled by its dtype "
                f"max {dtype_max}; save uint8/uint16 images, or floats in [0, 1]",
                UserWarning,
                stacklevel=3,
            )
        return (images / dtype_max).astype(np.float32)
    if kind != "f":
        raise TypeError(
            f"{path}: array 'images' must hold unsigned integers, booleans or floats, got dtype "
            f"{images.dtype}"
        )
    images = images.astype(np.float32)
    if not np.isfinite(images).all():
        raise ValueError(f"{path}: array 'images' holds NaN or infinite values")
    return images


def load_npz(path: str | os.PathLike, seed: int = 0, test_fraction: float = 0.3) -> Dataset:
    """Load the user's own images from an ``.npz`` file (``refmoco train --data FILE.npz``).

    Parameters
    ----------
    path : str or PathLike
        An ``.npz`` archive (``np.savez``) with the arrays

        - ``images``: (N, C, H, W) or (N, H, W) (one channel). Unsigned integer images are
          divided by their dtype's maximum (uint8: 255, uint16: 65535; uint32 and uint64 too,
          with a warning); boolean images become 0 and 1; float images are used as given, in
          float32 (the augmentations assume roughly [0, 1]). Signed integer images are refused:
          their scale is unknown (an int64 array holding 0..255, NumPy's default for
          ``np.array(list)``, divided by its dtype's maximum would be ~3e-17).
        - ``labels``: (N,) non-negative integer classes, used for evaluation only.
        - ``train`` (optional): (N,) boolean mask, True for training samples. Without it a
          stratified split is made from ``seed``.
    seed : int
        Seed of the stratified split (unused when the file has a ``train`` mask).
    test_fraction : float
        Fraction of the samples in the test split (unused with a ``train`` mask).

    Returns
    -------
    Dataset
        Named after the file's stem.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not a valid ``.npz`` archive, an array is missing, has the wrong number of
        dimensions or length, holds NaN/inf images, signed integer images or negative labels, is
        an object array, or a split would be empty. The message names the file and the array.
    TypeError
        If ``labels`` are not integers, ``train`` is not boolean, or ``images`` are not
        integers, booleans or floats.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    images, labels, train = _read_npz(path)
    images = _check_images(images, path)
    n = images.shape[0]
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(
            f"{path}: array 'labels' must have shape ({n},) to match 'images', got {labels.shape}"
        )
    if labels.dtype.kind not in "iu":
        raise TypeError(f"{path}: array 'labels' must hold integers, got dtype {labels.dtype}")
    if labels.min() < 0:
        raise ValueError(f"{path}: array 'labels' must be non-negative class indices")
    labels = labels.astype(np.int64)
    if train is not None:
        if train.dtype != np.bool_:
            raise TypeError(
                f"{path}: array 'train' must be a boolean mask, got dtype {train.dtype}"
            )
        if train.shape != (n,):
            raise ValueError(
                f"{path}: array 'train' must have shape ({n},) to match 'images', got {train.shape}"
            )
        if not train.any() or train.all():
            which = "train" if not train.any() else "test"
            raise ValueError(f"{path}: array 'train' leaves the {which} split empty")
    elif n < 2:
        raise ValueError(f"{path}: array 'images' has {n} sample; need 2 to split train and test")
    return _split(images, labels, train, Path(path).stem, seed, test_fraction)


def load_dataset(
    name_or_path: str | os.PathLike, seed: int = 0, test_fraction: float = 0.3
) -> Dataset:
    """Load ``"digits"``, ``"translated-digits"`` or an ``.npz`` file by path.

    Parameters
    ----------
    name_or_path : str or PathLike
        A name from ``DATASETS`` or the path of an ``.npz`` file (see :func:`load_npz`).
    seed : int
        Seed of the split (and of the translated digits' positions).
    test_fraction : float
        Fraction of the samples in the test split.

    Returns
    -------
    Dataset

    Raises
    ------
    ValueError
        If ``name_or_path`` is neither a known name nor a path to an existing file.
    """
    if name_or_path == "digits":
        return load_digits(seed, test_fraction)
    if name_or_path == "translated-digits":
        return translated_digits(seed, test_fraction=test_fraction)
    path = os.fspath(name_or_path)
    if path.endswith(".npz") or os.path.isfile(path):
        return load_npz(path, seed, test_fraction)
    raise ValueError(
        f"name_or_path: expected one of {DATASETS} or the path of an .npz file, got {path!r}"
    )
