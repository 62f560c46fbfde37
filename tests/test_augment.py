"""Augmentations: shapes and dtypes, reproducibility, and what each transform must preserve."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refmoco.augment import (
    Augment,
    gaussian_noise,
    intensity_jitter,
    random_resized_crop,
    random_translate,
    two_views,
)

DTYPES = [np.float32, np.float64]
shapes = st.tuples(st.integers(1, 5), st.integers(1, 3), st.integers(1, 9), st.integers(1, 9))
seeds = st.integers(0, 2**32 - 1)


def _images(shape, seed, dtype=np.float64):
    return np.random.default_rng(seed).uniform(size=shape).astype(dtype)


def _shift(image, dy, dx):
    """Naive zero-filled shift: out[i, j] = image[i - dy, j - dx]."""
    out = np.zeros_like(image)
    h, w = image.shape[-2:]
    for i, j in itertools.product(range(h), range(w)):
        if 0 <= i - dy < h and 0 <= j - dx < w:
            out[..., i, j] = image[..., i - dy, j - dx]
    return out


ALL = [
    lambda x, rng: random_translate(x, 2, rng),
    lambda x, rng: random_resized_crop(x, rng),
    lambda x, rng: intensity_jitter(x, rng),
    lambda x, rng: gaussian_noise(x, rng),
    Augment(),
    Augment(crop=True),
]
IDS = ["translate", "crop", "intensity", "noise", "augment", "augment-crop"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transform", ALL, ids=IDS)
@settings(deadline=None, max_examples=15)
@given(shape=shapes, seed=seeds)
def test_shape_dtype_and_reproducibility(transform, dtype, shape, seed):
    x = _images(shape, seed, dtype)
    x_before = x.copy()
    out = transform(x, np.random.default_rng(seed))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert np.all(np.isfinite(out))
    assert np.array_equal(x, x_before)  # the input is not modified
    np.testing.assert_array_equal(out, transform(x, np.random.default_rng(seed)))


@pytest.mark.parametrize("transform", ALL, ids=IDS)
def test_different_seeds_give_different_views(transform):
    x = _images((4, 1, 8, 8), 0)
    a = transform(x, np.random.default_rng(0))
    b = transform(x, np.random.default_rng(1))
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("transform", ALL, ids=IDS)
def test_global_rng_is_untouched(transform):
    # the legacy global RNG is read on purpose: the transforms must never draw from it
    state = np.random.get_state()[1].copy()  # noqa: NPY002
    transform(_images((2, 1, 8, 8), 0), np.random.default_rng(0))
    assert np.array_equal(np.random.get_state()[1], state)  # noqa: NPY002


def test_bad_inputs():
    rng = np.random.default_rng(0)
    with pytest.raises(TypeError, match="x"):
        random_translate(np.zeros((1, 1, 4, 4), np.int64), 1, rng)
    with pytest.raises(ValueError, match="x"):
        gaussian_noise(np.zeros((4, 4)), rng)
    with pytest.raises(TypeError, match="rng"):
        intensity_jitter(np.zeros((1, 1, 4, 4)), np.random.RandomState(0))
    with pytest.raises(ValueError, match="max_shift"):
        random_translate(np.zeros((1, 1, 4, 4)), -1, rng)
    with pytest.raises(ValueError, match="scale"):
        random_resized_crop(np.zeros((1, 1, 4, 4)), rng, scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="low, high"):
        intensity_jitter(np.zeros((1, 1, 4, 4)), rng, low=1.5, high=1.0)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_noise(np.zeros((1, 1, 4, 4)), rng, sigma=-1.0)


_X = np.ones((2, 1, 4, 4), np.float32)
BAD_PARAMETERS = [
    # (call, error, message start)
    (lambda rng: gaussian_noise(_X, rng, float("inf")), ValueError, "sigma"),
    (lambda rng: gaussian_noise(_X, rng, float("nan")), ValueError, "sigma"),
    (lambda rng: gaussian_noise(_X, rng, "a"), TypeError, "sigma"),
    (lambda rng: gaussian_noise(_X, rng, True), TypeError, "sigma"),
    (lambda rng: intensity_jitter(_X, rng, 0.5, float("inf")), ValueError, "low, high"),
    (lambda rng: intensity_jitter(_X, rng, float("nan"), 1.0), ValueError, "low, high"),
    (lambda rng: intensity_jitter(_X, rng, "0.5", 1.0), TypeError, "low, high"),
    (lambda rng: random_resized_crop(_X, rng, ratio=(1, float("inf"))), ValueError, "ratio"),
    (lambda rng: random_resized_crop(_X, rng, ratio=(0.0, 1.0)), ValueError, "ratio"),
    (lambda rng: random_resized_crop(_X, rng, ratio=(1.0,)), ValueError, "ratio"),
    (lambda rng: random_resized_crop(_X, rng, scale=(0.0, 1.0)), ValueError, "scale"),
    (lambda rng: random_resized_crop(_X, rng, scale=(0.5, 0.6, 0.7)), ValueError, "scale"),
    (lambda rng: random_resized_crop(_X, rng, scale=0.5), TypeError, "scale"),
    (lambda rng: random_resized_crop(_X, rng, scale="ab"), TypeError, "scale"),
    (lambda rng: random_translate(_X, float("inf"), rng), TypeError, "max_shift"),
    (lambda rng: random_translate(_X, 1.5, rng), TypeError, "max_shift"),
    (lambda rng: random_translate(_X, True, rng), TypeError, "max_shift"),
    (lambda rng: random_translate(_X, "1", rng), TypeError, "max_shift"),
]


@pytest.mark.parametrize(("call", "error", "name"), BAD_PARAMETERS)
def test_bad_parameters_are_refused_before_drawing(call, error, name):
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    with pytest.raises(error, match=f"^{name}: expected"):
        call(rng)
    assert rng.bit_generator.state == state  # the generator was not used


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"noise": float("inf")}, ValueError, "noise"),
        ({"noise": "0.1"}, TypeError, "noise"),
        ({"intensity": (0.6,)}, ValueError, "intensity"),
        ({"intensity": (0.6, 1.0, 1.4)}, ValueError, "intensity"),
        ({"intensity": (0.6, float("inf"))}, ValueError, "intensity"),
        ({"intensity": 0.6}, TypeError, "intensity"),
        ({"intensity": ("a", "b")}, TypeError, "intensity"),
        ({"translate": "a"}, TypeError, "translate"),
        ({"translate": float("nan")}, ValueError, "translate"),
        ({"translate": True}, TypeError, "translate"),
    ],
)
def test_augment_refuses_bad_settings(kwargs, error, name):
    with pytest.raises(error, match=f"^{name}: expected"):
        Augment(**kwargs)


def test_numpy_scalars_and_lists_are_accepted():
    x = _images((3, 1, 5, 5), 0)
    a = Augment(translate=np.float32(0.25), intensity=[0.5, 1.5], noise=np.float64(0.1))
    b = Augment(translate=0.25, intensity=(0.5, 1.5), noise=0.1)
    np.testing.assert_array_equal(a(x, np.random.default_rng(0)), b(x, np.random.default_rng(0)))
    np.testing.assert_array_equal(random_translate(x, np.int64(1), np.random.default_rng(0)),
                                  random_translate(x, 1, np.random.default_rng(0)))


# ---------------------------------------------------------------- random_translate


@settings(deadline=None, max_examples=40)
@given(shape=shapes, max_shift=st.integers(0, 4), seed=seeds)
def test_translate_is_a_zero_filled_shift(shape, max_shift, seed):
    x = _images(shape, seed) + 0.1  # strictly positive, so every pixel is distinguishable from fill
    out = random_translate(x, max_shift, np.random.default_rng(seed))
    shifts = range(-max_shift, max_shift + 1)
    for n in range(shape[0]):
        matches = [
            (dy, dx)
            for dy in shifts
            for dx in shifts
            if np.array_equal(out[n], _shift(x[n], dy, dx))
        ]
        assert matches, f"image {n} is not a shift of its input"


@settings(deadline=None, max_examples=40)
@given(max_shift=st.integers(0, 3), content=st.integers(1, 4), seed=seeds)
def test_translate_conserves_mass_inside_the_canvas(max_shift, content, seed):
    side = content + 2 * max_shift
    x = np.zeros((6, 2, side, side), np.float32)
    inner = slice(max_shift, max_shift + content)
    x[:, :, inner, inner] = np.random.default_rng(seed).uniform(size=(6, 2, content, content))
    out = random_translate(x, max_shift, np.random.default_rng(seed))
    np.testing.assert_allclose(out.sum(axis=(2, 3)), x.sum(axis=(2, 3)), rtol=1e-6)
    np.testing.assert_array_equal(np.sort(out, axis=None), np.sort(x, axis=None))


def test_translate_draws_every_shift_per_image():
    m = 2
    x = np.zeros((400, 1, 5, 5))
    x[:, 0, 2, 2] = 1.0  # one pixel at the centre
    out = random_translate(x, m, np.random.default_rng(0))
    rows, cols = np.nonzero(out[:, 0].sum(axis=2))[1], np.nonzero(out[:, 0].sum(axis=1))[1]
    seen = set(zip((rows - 2).tolist(), (cols - 2).tolist(), strict=True))
    assert seen == set(itertools.product(range(-m, m + 1), repeat=2))
    # channels of one image move together
    y = random_translate(np.repeat(x[:50], 3, axis=1), m, np.random.default_rng(1))
    assert np.array_equal(y[:, 0], y[:, 1]) and np.array_equal(y[:, 0], y[:, 2])


def test_translate_zero_is_identity():
    x = _images((3, 2, 4, 5), 0, np.float32)
    np.testing.assert_array_equal(random_translate(x, 0, np.random.default_rng(0)), x)


# ---------------------------------------------------------------- random_resized_crop


@settings(deadline=None, max_examples=20)
@given(shape=shapes, seed=seeds)
def test_crop_of_whole_image_is_identity(shape, seed):
    x = _images(shape, seed)
    out = random_resized_crop(x, np.random.default_rng(seed), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_allclose(out, x, rtol=1e-12, atol=1e-12)


@settings(deadline=None, max_examples=20)
@given(shape=shapes, seed=seeds, low=st.floats(0.1, 1.0))
def test_crop_interpolates_within_the_input(shape, seed, low):
    x = _images(shape, seed)
    out = random_resized_crop(x, np.random.default_rng(seed), scale=(low, 1.0))
    lo = x.min(axis=(2, 3), keepdims=True)
    hi = x.max(axis=(2, 3), keepdims=True)
    assert np.all(out >= lo - 1e-12) and np.all(out <= hi + 1e-12)
    constant = np.full(shape, 0.7)
    out = random_resized_crop(constant, np.random.default_rng(seed), scale=(low, 1.0))
    np.testing.assert_allclose(out, constant, rtol=1e-12)


def test_crop_magnifies_a_ramp():
    ramp = np.broadcast_to(np.arange(8.0), (5, 2, 8, 8))  # x[..., i, j] = j
    out = random_resized_crop(ramp, np.random.default_rng(0), scale=(0.25, 0.25), ratio=(1, 1))
    # a 4x4 box resized to 8x8 samples every half pixel: slope 1/2 away from the clamped border
    np.testing.assert_allclose(np.diff(out[..., 1:7], axis=-1), 0.5, rtol=1e-12)
    np.testing.assert_allclose(np.diff(out, axis=-2), 0.0, atol=1e-12)
    assert np.all(out.std(axis=(1, 2, 3)) > 0) and not np.allclose(out[0], out[1])


# ---------------------------------------------------------------- intensity and noise


@settings(deadline=None, max_examples=30)
@given(shape=shapes, seed=seeds, low=st.floats(0.0, 2.0, allow_subnormal=False),
       width=st.floats(0.0, 1.0, allow_subnormal=False))
def test_intensity_scales_each_image_by_one_factor(shape, seed, low, width):
    """A subnormal factor (low = 0, width ~ 5e-324) cannot be recovered as out / x to 1e-12:
    the strategies stay in the normal range (found by a saved example)."""
    x = _images(shape, seed) + 0.5
    out = intensity_jitter(x, np.random.default_rng(seed), low, low + width)
    factor = out / x
    per_image = factor.reshape(shape[0], -1)
    np.testing.assert_allclose(
        per_image, np.broadcast_to(per_image[:, :1], per_image.shape), rtol=1e-12
    )
    assert np.all(per_image >= low - 1e-12) and np.all(per_image <= low + width + 1e-12)


def test_intensity_factor_is_uniform():
    x = np.ones((20000, 1, 1, 1))
    f = intensity_jitter(x, np.random.default_rng(0), 0.6, 1.4).ravel()
    assert abs(f.mean() - 1.0) < 0.01
    assert abs(f.std() - 0.8 / np.sqrt(12)) < 0.01
    assert f.min() >= 0.6 and f.max() <= 1.4


@pytest.mark.parametrize("dtype", DTYPES)
def test_noise_statistics(dtype):
    x = np.full((50, 2, 16, 16), 0.5, dtype)
    sigma = 0.1
    noise = (gaussian_noise(x, np.random.default_rng(0), sigma) - x).astype(np.float64).ravel()
    n = noise.size
    assert abs(noise.mean()) < 5 * sigma / np.sqrt(n)
    assert abs(noise.std() / sigma - 1) < 5 / np.sqrt(2 * n)
    assert abs(np.mean(noise**4) / sigma**4 - 3) < 0.15  # Gaussian kurtosis
    assert abs(np.corrcoef(noise[:-1], noise[1:])[0, 1]) < 5 / np.sqrt(n)  # independent pixels


def test_noise_zero_is_identity():
    x = _images((2, 1, 3, 3), 0, np.float32)
    np.testing.assert_array_equal(gaussian_noise(x, np.random.default_rng(0), 0.0), x)


# ---------------------------------------------------------------- Augment and two_views


def test_augment_config():
    aug = Augment()
    assert (aug.translate, aug.crop, aug.intensity, aug.noise) == (0.125, False, (0.6, 1.4), 0.05)
    with pytest.raises(dataclasses.FrozenInstanceError):
        aug.noise = 0.1
    with pytest.raises(ValueError, match="translate"):
        Augment(translate=-0.1)
    with pytest.raises(ValueError, match="intensity"):
        Augment(intensity=(1.4, 0.6))
    with pytest.raises(ValueError, match="noise"):
        Augment(noise=-1.0)


def test_augment_with_everything_off_is_identity():
    x = _images((3, 1, 8, 8), 0, np.float32)
    aug = Augment(translate=0.0, crop=False, intensity=None, noise=0.0)
    np.testing.assert_array_equal(aug(x, np.random.default_rng(0)), x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_views_with_everything_off_are_new_arrays(dtype):
    x = _images((3, 1, 8, 8), 0, dtype)
    x_before = x.copy()
    aug = Augment(translate=0.0, crop=False, intensity=None, noise=0.0)
    view = aug(x, np.random.default_rng(0))
    q, k = two_views(x, aug, np.random.default_rng(0))
    for v in (view, q, k):
        assert v is not x and not np.shares_memory(v, x)
        assert v.dtype == dtype
        np.testing.assert_array_equal(v, x_before)
    assert q is not k and not np.shares_memory(q, k)
    q[0, 0, 0, 0] = 7.0  # writing into one view touches neither the data nor the other view
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(k, x_before)


def test_augment_translation_only_shifts_by_an_eighth():
    x = np.zeros((300, 1, 16, 16))
    x[:, 0, 8, 8] = 1.0
    out = Augment(intensity=None, noise=0.0)(x, np.random.default_rng(0))
    rows = np.nonzero(out[:, 0].sum(axis=2))[1] - 8
    assert set(rows.tolist()) == {-2, -1, 0, 1, 2}  # round(0.125 * 16) = 2 pixels


def test_two_views_are_independent_and_reproducible():
    x = _images((8, 1, 8, 8), 0, np.float32)
    q, k = two_views(x, Augment(), np.random.default_rng(0))
    assert q.shape == k.shape == x.shape and q.dtype == k.dtype == np.float32
    assert not np.array_equal(q, k)
    q2, k2 = two_views(x, Augment(), np.random.default_rng(0))
    np.testing.assert_array_equal(q, q2)
    np.testing.assert_array_equal(k, k2)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(q, Augment()(x, rng))
    np.testing.assert_array_equal(k, Augment()(x, rng))
