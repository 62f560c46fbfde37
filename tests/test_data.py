"""Datasets: stratified split, the bundled digits, the translated variant, user .npz files."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from refmoco.data import (
    Dataset,
    load_dataset,
    load_digits,
    load_npz,
    stratified_split,
    translated_digits,
)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    pytest.importorskip("sklearn")
    return load_digits(seed=0)


@pytest.fixture(scope="module")
def translated() -> Dataset:
    pytest.importorskip("sklearn")
    return translated_digits(seed=0)


# ---------------------------------------------------------------- stratified_split


@settings(deadline=None, max_examples=60)
@given(
    counts=st.lists(st.integers(1, 30), min_size=1, max_size=6),
    test_fraction=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_is_a_stratified_partition(counts, test_fraction, seed):
    labels = np.repeat(np.arange(len(counts)) * 3 + 1, counts)  # non-contiguous class ids
    assume(labels.size >= 2)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(labels)
    train, test = stratified_split(labels, test_fraction, seed)
    n = labels.size
    assert train.dtype == np.int64 and test.dtype == np.int64
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(n))
    assert len(test) == min(max(int(np.ceil(test_fraction * n)), 1), n - 1)
    for c in np.unique(labels):
        in_class = np.sum(labels == c)
        in_test = np.sum(labels[test] == c)
        assert abs(in_test - in_class * len(test) / n) < 1.0  # proportional to within one sample
    again = stratified_split(labels, test_fraction, seed)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], test)


def test_split_depends_on_the_seed():
    labels = np.repeat(np.arange(3), 20)
    a = stratified_split(labels, 0.3, seed=0)[1]
    b = stratified_split(labels, 0.3, seed=1)[1]
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(np.arange(10) % 2, fraction, 0)


def test_split_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels"):
        stratified_split(np.zeros((3, 2), dtype=int), 0.3, 0)
    with pytest.raises(ValueError, match="labels"):
        stratified_split(np.zeros(1, dtype=int), 0.3, 0)


# ---------------------------------------------------------------- digits


def test_digits_shapes_and_ranges(digits):
    assert digits.name == "digits"
    assert digits.x_train.shape == (1257, 1, 8, 8) and digits.x_test.shape == (540, 1, 8, 8)
    assert digits.y_train.shape == (1257,) and digits.y_test.shape == (540,)
    assert digits.x_train.dtype == np.float32 and digits.y_train.dtype == np.int64
    assert digits.x_train.min() >= 0 and digits.x_train.max() == 1.0
    # every pixel is a multiple of 1/16
    assert np.allclose(digits.x_train * 16, np.round(digits.x_train * 16))
    counts = np.bincount(np.concatenate([digits.y_train, digits.y_test]))
    test_counts = np.bincount(digits.y_test, minlength=10)
    assert np.all(np.abs(test_counts - counts * 540 / 1797) < 1)


def test_digits_split_is_fixed_by_seed(digits):
    again = load_digits(seed=0)
    assert np.array_equal(again.x_test, digits.x_test)
    assert np.array_equal(again.y_train, digits.y_train)
    other = load_digits(seed=1)
    assert not np.array_equal(other.y_test, digits.y_test)


def test_translated_digits_keep_each_digit(digits, translated):
    assert translated.name == "translated-digits"
    assert translated.x_train.shape == (1257, 1, 16, 16)
    assert translated.x_test.shape == (540, 1, 16, 16)
    assert translated.x_train.dtype == np.float32
    # same split, and each digit's pixels are all on the canvas
    assert np.array_equal(translated.y_train, digits.y_train)
    assert np.array_equal(translated.y_test, digits.y_test)
    np.testing.assert_allclose(
        translated.x_train.sum(axis=(1, 2, 3)), digits.x_train.sum(axis=(1, 2, 3)), rtol=1e-6
    )
    np.testing.assert_allclose(
        translated.x_test.sum(axis=(1, 2, 3)), digits.x_test.sum(axis=(1, 2, 3)), rtol=1e-6
    )
    # the 8x8 digit is found, unchanged, somewhere on the canvas
    canvas, digit = translated.x_test[0, 0], digits.x_test[0, 0]
    windows = np.lib.stride_tricks.sliding_window_view(canvas, (8, 8))  # (9, 9, 8, 8)
    assert np.any(np.all(windows == digit, axis=(2, 3)))


def test_translated_digits_positions_vary_and_are_fixed(translated):
    again = translated_digits(seed=0)
    assert np.array_equal(again.x_train, translated.x_train)
    rows = translated.x_train[:, 0].sum(axis=2)  # (N, 16): ink per canvas row
    first_row = np.argmax(rows > 0, axis=1)
    assert len(np.unique(first_row)) > 5


def test_translated_digits_rejects_small_canvas():
    with pytest.raises(ValueError, match="canvas"):
        translated_digits(canvas=7)


def test_load_dataset_dispatches(tmp_path, digits):
    assert np.array_equal(load_dataset("digits", 0).x_test, digits.x_test)
    assert load_dataset("translated-digits", 0).x_test.shape == (540, 1, 16, 16)
    path = tmp_path / "mine.npz"
    np.savez(path, images=np.zeros((4, 3, 3), np.float32), labels=np.array([0, 1, 0, 1]))
    assert load_dataset(path, 0).name == "mine"
    with pytest.raises(ValueError, match="name_or_path"):
        load_dataset("cifar", 0)


# ---------------------------------------------------------------- load_npz: good files


def _labels(n: int) -> np.ndarray:
    return np.arange(n) % 3


def test_npz_without_channel_axis_and_float(tmp_path):
    images = np.random.default_rng(0).uniform(size=(30, 5, 6))
    path = tmp_path / "flt.npz"
    np.savez(path, images=images, labels=_labels(30))
    ds = load_npz(path, seed=0)
    assert ds.name == "flt"
    assert ds.x_train.shape == (21, 1, 5, 6) and ds.x_test.shape == (9, 1, 5, 6)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    train, test = stratified_split(_labels(30), 0.3, 0)
    np.testing.assert_array_equal(ds.x_test[:, 0], images[test].astype(np.float32))
    np.testing.assert_array_equal(ds.y_train, _labels(30)[train])


def test_npz_uint8_is_scaled(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, size=(12, 2, 4, 4), dtype=np.uint8)
    images[0, 0, 0, 0] = 255
    path = tmp_path / "u8.npz"
    np.savez(path, images=images, labels=_labels(12).astype(np.uint8))
    ds = load_npz(path)
    everything = np.concatenate([ds.x_train, ds.x_test])
    assert everything.dtype == np.float32 and everything.shape == (12, 2, 4, 4)
    assert everything.max() == 1.0 and everything.min() >= 0.0
    np.testing.assert_allclose(
        np.sort(everything.ravel()), np.sort(images.ravel() / 255.0), rtol=1e-6
    )


def test_npz_with_train_mask(tmp_path):
    images = np.arange(10 * 4, dtype=np.float32).reshape(10, 1, 2, 2) / 40
    mask = np.array([True, False] * 5)
    path = tmp_path / "mask.npz"
    np.savez(path, images=images, labels=_labels(10), train=mask)
    ds = load_npz(path, seed=123)
    np.testing.assert_array_equal(ds.x_train, images[mask])
    np.testing.assert_array_equal(ds.x_test, images[~mask])
    np.testing.assert_array_equal(ds.y_test, _labels(10)[~mask])


# ---------------------------------------------------------------- load_npz: bad files


GOOD = {"images": np.zeros((6, 1, 3, 3), np.float32), "labels": np.array([0, 1, 2, 0, 1, 2])}


def _bad(tmp_path, **arrays):
    content = {**GOOD, **arrays}
    content = {k: v for k, v in content.items() if v is not None}
    path = tmp_path / "bad.npz"
    np.savez(path, **content)
    return path


@pytest.mark.parametrize(
    ("arrays", "error", "array_name"),
    [
        ({"images": None}, ValueError, "images"),
        ({"labels": None}, ValueError, "labels"),
        ({"images": np.zeros((6, 3), np.float32)}, ValueError, "images"),
        ({"images": np.zeros((6, 1, 1, 3, 3), np.float32)}, ValueError, "images"),
        (
            {"images": np.zeros((0, 1, 3, 3), np.float32), "labels": np.zeros(0, int)},
            ValueError,
            "images",
        ),
        ({"labels": np.array([0, 1, 2, 0, 1])}, ValueError, "labels"),
        ({"labels": np.zeros((6, 1), int)}, ValueError, "labels"),
        ({"labels": np.array([0.0, 1, 2, 0, 1, 2])}, TypeError, "labels"),
        ({"labels": np.array([0, 1, 2, 0, 1, -1])}, ValueError, "labels"),
        ({"images": np.full((6, 1, 3, 3), np.nan, np.float32)}, ValueError, "images"),
        ({"images": np.full((6, 3, 3), np.inf)}, ValueError, "images"),
        ({"images": np.full((6, 3, 3), "a")}, TypeError, "images"),
        ({"images": np.zeros((6, 1, 3, 3), np.int8) - 1}, ValueError, "images"),
        ({"train": np.array([1, 0, 1, 0, 1, 0])}, TypeError, "train"),
        ({"train": np.array([True, False, True])}, ValueError, "train"),
        ({"train": np.zeros(6, bool)}, ValueError, "train"),
        ({"train": np.ones(6, bool)}, ValueError, "train"),
        ({"labels": np.array([0, 1, 2, 0, 1, "x"], dtype=object)}, ValueError, "labels"),
        ({"images": np.zeros((6, 3, 3), dtype=object)}, ValueError, "images"),
    ],
    ids=[
        "no-images",
        "no-labels",
        "images-2d",
        "images-5d",
        "images-empty",
        "labels-length",
        "labels-2d",
        "labels-float",
        "labels-negative",
        "images-nan",
        "images-inf",
        "images-str",
        "images-negative-int",
        "mask-int",
        "mask-length",
        "mask-no-train",
        "mask-no-test",
        "labels-object",
        "images-object",
    ],
)
def test_npz_bad_arrays(tmp_path, arrays, error, array_name):
    path = _bad(tmp_path, **arrays)
    with pytest.raises(error, match=f"'{array_name}'") as info:
        load_npz(path)
    assert "bad.npz" in str(info.value)


def test_npz_one_sample_cannot_be_split(tmp_path):
    path = _bad(tmp_path, images=np.zeros((1, 2, 2), np.float32), labels=np.array([0]))
    with pytest.raises(ValueError, match="'images'.*split"):
        load_npz(path)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64])
def test_npz_signed_integer_images_are_refused(tmp_path, dtype):
    """0..127 in any signed dtype (int64: what np.array makes of a list of ints) is refused,
    not divided by the dtype's maximum (which for int64 would leave ~1e-17)."""
    images = np.random.default_rng(0).integers(0, 128, size=(6, 3, 3)).astype(dtype)
    path = _bad(tmp_path, images=images)
    with pytest.raises(ValueError, match="'images'") as info:
        load_npz(path)
    message = str(info.value)
    assert "bad.npz" in message and np.dtype(dtype).name in message
    assert "uint8" in message and "float" in message  # what to convert them to


def test_npz_uint16_is_scaled_by_65535(tmp_path):
    images = np.array([0, 1, 257, 65535] * 9, dtype=np.uint16).reshape(6, 1, 2, 3)
    path = tmp_path / "u16.npz"
    np.savez(path, images=images, labels=_labels(6))
    ds = load_npz(path)
    everything = np.concatenate([ds.x_train, ds.x_test])
    assert everything.dtype == np.float32
    np.testing.assert_allclose(np.sort(everything.ravel()),
                               np.sort(images.ravel().astype(np.float64) / 65535), rtol=1e-6)


def test_npz_float_images_are_used_as_given(tmp_path):
    """Floats are not rescaled (not even 0..255 ones): the caller scales them into [0, 1]."""
    images = np.linspace(-1.0, 255.0, 6 * 9).reshape(6, 3, 3)
    path = tmp_path / "f.npz"
    np.savez(path, images=images, labels=_labels(6))
    ds = load_npz(path)
    np.testing.assert_array_equal(np.sort(np.concatenate([ds.x_train, ds.x_test]).ravel()),
                                  np.sort(images.astype(np.float32).ravel()))


def test_npz_bool_images_become_zero_and_one(tmp_path):
    images = np.arange(6 * 4).reshape(6, 2, 2) % 3 == 0
    path = tmp_path / "b.npz"
    np.savez(path, images=images, labels=_labels(6))
    ds = load_npz(path)
    everything = np.concatenate([ds.x_train, ds.x_test])
    assert everything.dtype == np.float32 and set(np.unique(everything)) == {0.0, 1.0}
    assert everything.sum() == images.sum()


def test_npz_wide_unsigned_images_warn(tmp_path):
    path = _bad(tmp_path, images=np.zeros((6, 3, 3), np.uint32))
    with pytest.warns(UserWarning, match="'images'.*uint32"):
        load_npz(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"this is not an archive", b"PK\x03\x04 truncated zip"],
    ids=["empty", "text", "truncated-zip"],
)
def test_npz_not_an_archive(tmp_path, content):
    path = tmp_path / "junk.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="junk.npz.*not a valid .npz"):
        load_npz(path)


@pytest.mark.parametrize(
    "member",
    [b"not an npy array", b"\x93NUMPY\x01\x00truncated header"],
    ids=["raw-bytes", "truncated-npy"],
)
def test_npz_corrupt_member(tmp_path, member):
    path = tmp_path / "corrupt.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("images.npy", member)
        archive.writestr("labels.npy", b"")
    with pytest.raises(ValueError, match="corrupt.npz.*'images'"):
        load_npz(path)


def test_npy_is_not_an_archive(tmp_path):
    path = tmp_path / "single.npy"
    np.save(path, np.zeros((3, 2, 2)))
    with pytest.raises(ValueError, match="single.npy.*not a valid .npz"):
        load_npz(path)


def test_npz_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.npz"):
        load_npz(tmp_path / "nothing.npz")
