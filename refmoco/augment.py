"""Augmentations for small images, drawn from a passed ``np.random.Generator``.

MoCo learns by making two random views of each image agree. For 8x8 digits the views come from
small translations (optionally a random resized crop), an intensity change and Gaussian noise; no
flips, since a mirrored digit is another symbol. Every function takes a batch ``x`` of shape
(N, C, H, W), draws one independent set of random parameters per image from ``rng`` (never from the
global NumPy RNG), and returns a new array of the same shape and dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from refmoco._checks import check_finite, check_int, real_number


def _check_images(x: np.ndarray, name: str = "x") -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"{name}: expected shape (N, C, H, W), got {x.shape}")
    return x


def _check_rng(rng: np.random.Generator) -> None:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected a np.random.Generator, got {type(rng).__name__}")


def _check_range(
    pair: Any, name: str, lower: float, upper: float = math.inf, *, open_lower: bool = False
) -> tuple[float, float]:
    """A pair ``(low, high)`` of finite real numbers with ``lower <= low <= high <= upper``
    (``lower < low`` when ``open_lower``), as Python floats."""
    if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__"):
        raise TypeError(f"{name}: expected a pair (low, high) of numbers, got {pair!r}")
    if len(pair) != 2:
        raise ValueError(f"{name}: expected a pair (low, high) of 2 numbers, got {pair!r}")
    low, high = (real_number(v, name, "a pair (low, high) of real numbers") for v in pair)
    above = lower < low if open_lower else lower <= low
    if not (math.isfinite(low) and math.isfinite(high) and above and low <= high <= upper):
        first = f"{lower} {'<' if open_lower else '<='} low <= high"
        bound = f"{first} <= {upper}" if math.isfinite(upper) else f"{first}, both finite"
        raise ValueError(f"{name}: expected {bound}, got {pair!r}")
    return low, high


def random_translate(x: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Shift each image by a random integer offset, filling with zeros (no wrap-around).

    Image n is moved down by ``dy_n`` and right by ``dx_n`` pixels, both uniform integers in
    ``[-max_shift, max_shift]``: ``out[n, :, i, j] = x[n, :, i - dy_n, j - dx_n]``, zero where that
    falls outside the image.

    Parameters
    ----------
    x : ndarray of shape (N, C, H, W), float
    max_shift : int
        Largest shift in pixels along each axis, an integer >= 0.
    rng : np.random.Generator

    Returns
    -------
    ndarray of shape (N, C, H, W), dtype of ``x``

    Examples
    --------
    >>> x = np.zeros((1, 1, 4, 4), np.float32); x[0, 0, 1, 1] = 1
    >>> random_translate(x, 1, np.random.default_rng(0)).sum()
    np.float32(1.0)
    """
    x = _check_images(x)
    _check_rng(rng)
    m = check_int(max_shift, "max_shift", minimum=0)
    n, _, h, w = x.shape
    dy = rng.integers(-m, m, size=n, endpoint=True)  # (N,)
    dx = rng.integers(-m, m, size=n, endpoint=True)  # (N,)
    padded = np.pad(x, ((0, 0), (0, 0), (m, m), (m, m)))  # (N, C, H + 2m, W + 2m)
    rows = np.arange(h)[None, :] - dy[:, None] + m  # (N, H) rows of `padded` to read
    cols = np.arange(w)[None, :] - dx[:, None] + m  # (N, W)
    out = np.take_along_axis(padded, rows[:, None, :, None], axis=2)  # (N, C, H, W + 2m)
    return np.take_along_axis(out, cols[:, None, None, :], axis=3)  # (N, C, H, W)


def _bilinear_weights(start: np.ndarray, length: np.ndarray, size: int, dtype) -> np.ndarray:
    """Rows that resample the window [start, start + length) of an axis of ``size`` pixels.

    Output pixel i samples the input at ``start + (i + 0.5) * length / size - 0.5`` (pixel-centre
    coordinates, like ``align_corners=False``), linearly between its two neighbours, clamped at
    the border. Returns R of shape (N, size, size) with ``out = R @ in`` along that axis.
    """
    n = start.shape[0]
    pos = start[:, None] + (np.arange(size)[None, :] + 0.5) * (length[:, None] / size) - 0.5
    pos = np.clip(pos, 0.0, size - 1.0)  # (N, size)
    lo = np.floor(pos).astype(np.int64)  # (N, size)
    hi = np.minimum(lo + 1, size - 1)  # (N, size)
    frac = pos - lo  # (N, size)
    weights = np.zeros((n, size, size))
    batch = np.arange(n)[:, None]
    out_idx = np.arange(size)[None, :]
    np.add.at(weights, (batch, out_idx, lo), 1.0 - frac)
    np.add.at(weights, (batch, out_idx, hi), frac)
    return weights.astype(dtype)


def random_resized_crop(
    x: np.ndarray,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.6, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """Crop a random box from each image and resize it back to H x W, bilinearly.

    As torchvision's ``RandomResizedCrop``, simplified: the box covers a fraction ``s ~ U(scale)``
    of the image area with aspect ratio ``r`` log-uniform in ``ratio`` (height ``sqrt(s r) H``,
    width ``sqrt(s / r) W``, clipped to the image), at a uniform position inside the image. The box
    is continuous (no rounding to whole pixels) and there is no retry loop.

    Parameters
    ----------
    x : ndarray of shape (N, C, H, W), float
    rng : np.random.Generator
    scale : (float, float)
        Range of the box's area as a fraction of the image, ``0 < low <= high <= 1``.
    ratio : (float, float)
        Range of the box's height / width (log-uniform), ``0 < low <= high``, both finite.

    Returns
    -------
    ndarray of shape (N, C, H, W), dtype of ``x``

    Notes
    -----
    With ``scale=(1, 1)`` and ``ratio=(1, 1)`` the output equals the input.
    """
    x = _check_images(x)
    _check_rng(rng)
    s_low, s_high = _check_range(scale, "scale", 0.0, 1.0, open_lower=True)
    r_low, r_high = _check_range(ratio, "ratio", 0.0, open_lower=True)
    n, _, h, w = x.shape
    area = rng.uniform(s_low, s_high, size=n)  # (N,)
    aspect = np.exp(rng.uniform(np.log(r_low), np.log(r_high), size=n))  # (N,)
    box_h = np.minimum(np.sqrt(area * aspect) * h, h)  # (N,)
    box_w = np.minimum(np.sqrt(area / aspect) * w, w)  # (N,)
    top = rng.uniform(0.0, 1.0, size=n) * (h - box_h)  # (N,)
    left = rng.uniform(0.0, 1.0, size=n) * (w - box_w)  # (N,)
    rows = _bilinear_weights(top, box_h, h, x.dtype)  # (N, H, H)
    cols = _bilinear_weights(left, box_w, w, x.dtype)  # (N, W, W)
    return np.einsum("nih,nchw,njw->ncij", rows, x, cols)  # (N, C, H, W)


def intensity_jitter(
    x: np.ndarray, rng: np.random.Generator, low: float = 0.6, high: float = 1.4
) -> np.ndarray:
    """Multiply each image by its own factor drawn from U[low, high] (no clipping).

    Parameters
    ----------
    x : ndarray of shape (N, C, H, W), float
    rng : np.random.Generator
    low, high : float
        Range of the factor, ``0 <= low <= high``, both finite.

    Returns
    -------
    ndarray of shape (N, C, H, W), dtype of ``x``
    """
    x = _check_images(x)
    _check_rng(rng)
    low, high = _check_range((low, high), "low, high", 0.0)
    factor = rng.uniform(low, high, size=x.shape[0]).astype(x.dtype)  # (N,)
    return x * factor[:, None, None, None]


def gaussian_noise(x: np.ndarray, rng: np.random.Generator, sigma: float = 0.05) -> np.ndarray:
    """Add independent N(0, sigma^2) noise to every pixel (no clipping).

    Parameters
    ----------
    x : ndarray of shape (N, C, H, W), float
    rng : np.random.Generator
    sigma : float
        Standard deviation of the noise, a finite number >= 0.

    Returns
    -------
    ndarray of shape (N, C, H, W), dtype of ``x``
    """
    x = _check_images(x)
    _check_rng(rng)
    sigma = check_finite(sigma, "sigma")
    noise = sigma * rng.standard_normal(x.shape)  # (N, C, H, W), float64
    return (x + noise).astype(x.dtype)


@dataclass(frozen=True)
class Augment:
    """The recipe of one random view: ``view = Augment()(x, rng)``.

    Applied in this order: random resized crop (if ``crop``), translation, intensity jitter,
    Gaussian noise. A step is skipped when its setting is off (``translate=0``, ``crop=False``,
    ``intensity=None``, ``noise=0``).

    Attributes
    ----------
    translate : float
        Largest shift as a fraction of the image height, in [0, 1]: ``round(translate * H)``
        pixels along each axis (0.125 is +-1 pixel on 8x8 digits, +-2 on a 16x16 canvas).
    crop : bool
        Whether to apply :func:`random_resized_crop` with its default scale and ratio.
    intensity : (float, float) or None
        Range of the per-image intensity factor, ``0 <= low <= high``, both finite.
    noise : float
        Standard deviation of the additive Gaussian noise, a finite number >= 0.
    """

    translate: float = 0.125
    crop: bool = False
    intensity: tuple[float, float] | None = (0.6, 1.4)
    noise: float = 0.05

    def __post_init__(self) -> None:
        check_finite(self.translate, "translate", upper=1.0)
        if self.intensity is not None:
            _check_range(self.intensity, "intensity", 0.0)
        check_finite(self.noise, "noise")

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One random view of each image of ``x`` (N, C, H, W): a new array of the same shape
        and dtype, even when every step is off (then a copy of ``x``)."""
        x = original = _check_images(x)
        _check_rng(rng)
        if self.crop:
            x = random_resized_crop(x, rng)
        max_shift = round(self.translate * x.shape[2])
        if max_shift > 0:
            x = random_translate(x, max_shift, rng)
        if self.intensity is not None:
            x = intensity_jitter(x, rng, *self.intensity)
        if self.noise > 0:
            x = gaussian_noise(x, rng, self.noise)
        return x.copy() if x is original else x


def two_views(
    x: np.ndarray, aug: Augment, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Two independent random views of every image, as MoCo's query and key.

    Parameters
    ----------
    x : ndarray of shape (N, C, H, W), float
    aug : Augment (or any callable ``aug(x, rng)``)
    rng : np.random.Generator
        Both views are drawn from it, one after the other.

    Returns
    -------
    view_q, view_k : ndarray of shape (N, C, H, W), dtype of ``x``
        With an :class:`Augment`, two new arrays that share no memory with ``x`` or with each
        other (also when every step is off).

    Examples
    --------
    >>> x = np.zeros((2, 1, 8, 8), np.float32)
    >>> q, k = two_views(x, Augment(), np.random.default_rng(0))
    >>> q.shape, k.dtype
    ((2, 1, 8, 8), dtype('float32'))
    """
    return aug(x, rng), aug(x, rng)
