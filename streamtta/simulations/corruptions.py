"""Image corruptions in the style of CIFAR-10-C, vectorised over a batch of small images.

Inputs are ``(N, C, H, W)`` float32 arrays in ``[0, 1]`` with ``C`` = 1 (grey) or 3 (RGB); the
output has the same shape and dtype and is clipped to ``[0, 1]``. Every corruption has five
severities whose parameters follow the CIFAR-10-C recipe (tuned for 32x32 images); see
:data:`SEVERITY_PARAMS`. Randomness comes only from a numpy ``Generator`` built from ``seed``, so the
same ``(x, name, severity, seed)`` always gives the same result.

>>> import numpy as np
>>> from streamtta.simulations.corruptions import corrupt, CORRUPTIONS
>>> x = np.full((2, 1, 32, 32), 0.5, dtype=np.float32)
>>> y = corrupt(x, "gaussian_noise", 5, seed=0)
>>> y.shape, y.dtype.name, bool((y >= 0).all() and (y <= 1).all())
((2, 1, 32, 32), 'float32', True)
>>> bool(np.array_equal(y, corrupt(x, "gaussian_noise", 5, seed=0)))
True
>>> len(CORRUPTIONS)
10
"""
from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

SeedLike = int | np.random.Generator | np.random.SeedSequence | None

#: The ten corruptions used by ``domains = "all"``, in the usual ImageNet-C order.
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "motion_blur",
    "fog",
    "brightness",
    "contrast",
    "pixelate",
    "jpeg_compression",
)

#: Further corruptions offered by :func:`corrupt` but not part of ``"all"``.
EXTRA_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur")

#: Per-severity parameters (index 0 = severity 1), CIFAR-10-C scale.
SEVERITY_PARAMS: dict[str, tuple[Any, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # noise std
    "shot_noise": (500.0, 250.0, 100.0, 75.0, 50.0),  # photons per unit intensity
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # fraction of salt-and-pepper pixels
    "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),  # multiplicative noise std
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)),  # disk radius, alias sigma
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # sigma in pixels
    "motion_blur": ((10, 1.0), (10, 1.5), (10, 2.0), (10, 2.5), (12, 3.0)),  # radius, sigma
    "fog": ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75)),  # strength, roughness decay
    "brightness": (0.05, 0.10, 0.15, 0.20, 0.30),  # added to the HSV value channel
    "contrast": (0.75, 0.50, 0.40, 0.30, 0.15),  # factor towards the channel mean
    "pixelate": (0.95, 0.90, 0.85, 0.75, 0.65),  # downscale factor
    "jpeg_compression": (80, 65, 58, 50, 40),  # JPEG quality
}


def _rng(seed: SeedLike) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def _check(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got shape {x.shape}")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got {x.shape[1]} (shape {x.shape}); is the layout NCHW?")
    return x.astype(np.float32, copy=False)


# -- convolution helpers ---------------------------------------------------------------------------
def _conv_same(x: np.ndarray, kernel: np.ndarray, pad_mode: str = "reflect") -> np.ndarray:
    """Filter every channel of ``x`` (N, C, H, W) with ``kernel`` (k, k) or per-image (N, k, k)."""
    n, c, h, w = x.shape
    k = np.asarray(kernel, dtype=np.float32)
    if k.ndim == 2:
        k = np.broadcast_to(k, (n,) + k.shape)
    kh, kw = k.shape[1:]
    ph, pw = kh // 2, kw // 2
    with torch.no_grad():
        t = torch.from_numpy(np.array(x, dtype=np.float32, order="C")).reshape(1, n * c, h, w)
        t = F.pad(t, (pw, pw, ph, ph), mode=pad_mode)
        weight = torch.from_numpy(np.array(k, order="C")).repeat_interleave(c, dim=0).unsqueeze(1)
        out = F.conv2d(t, weight, groups=n * c)
    return out.reshape(n, c, h, w).numpy()


def _gauss1d(sigma: float, radius: int) -> np.ndarray:
    i = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-(i**2) / (2.0 * sigma**2))
    return g / g.sum()


def _disk_kernel(radius: float, alias_sigma: float) -> np.ndarray:
    r = int(np.ceil(radius)) + 1
    ax = np.arange(-r, r + 1)
    xx, yy = np.meshgrid(ax, ax)
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float64)
    disk /= disk.sum()
    g = _gauss1d(alias_sigma, 1)  # 3x3 anti-aliasing of the hard disk edge
    disk = np.apply_along_axis(lambda v: np.convolve(v, g, mode="same"), 0, disk)
    disk = np.apply_along_axis(lambda v: np.convolve(v, g, mode="same"), 1, disk)
    return disk / disk.sum()


def _motion_kernels(radius: int, sigma: float, angles_deg: np.ndarray) -> np.ndarray:
    """One-sided Gaussian streak of ``2*radius+1`` taps along each angle -> (N, k, k)."""
    taps = np.arange(2 * radius + 1, dtype=np.float64)
    weights = np.exp(-(taps**2) / (2.0 * sigma**2))
    keep = weights >= 1e-3 * weights[0]
    taps, weights = taps[keep], weights[keep] / weights[keep].sum()
    reach = int(taps[-1])
    size = 2 * reach + 1
    theta = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    dy = np.rint(np.outer(np.sin(theta), taps)).astype(int) + reach
    dx = np.rint(np.outer(np.cos(theta), taps)).astype(int) + reach
    kernels = np.zeros((len(theta), size, size))
    rows = np.repeat(np.arange(len(theta)), len(taps))
    np.add.at(kernels, (rows, dy.ravel(), dx.ravel()), np.tile(weights, len(theta)))
    return kernels


def _plasma(n: int, size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square fractal noise, one ``size x size`` map per image, normalised to [0, 1].

    The random displacement shrinks by ``decay**2`` per octave: a larger ``decay`` gives smoother haze.
    """
    m = 1 << int(np.ceil(np.log2(max(size, 2))))
    a = np.zeros((n, m, m))
    step, amp = m, 1.0
    while step >= 2:
        half = step // 2
        corners = a[:, 0::step, 0::step]
        centre = (corners + np.roll(corners, -1, 1) + np.roll(corners, -1, 2) + np.roll(np.roll(corners, -1, 1), -1, 2)) / 4
        a[:, half::step, half::step] = centre + amp * rng.uniform(-1, 1, centre.shape)
        centres = a[:, half::step, half::step]
        top = (corners + np.roll(corners, -1, 2) + np.roll(centres, 1, 1) + centres) / 4
        a[:, 0::step, half::step] = top + amp * rng.uniform(-1, 1, top.shape)
        left = (corners + np.roll(corners, -1, 1) + np.roll(centres, 1, 2) + centres) / 4
        a[:, half::step, 0::step] = left + amp * rng.uniform(-1, 1, left.shape)
        step, amp = half, amp / decay**2
    a = a[:, :size, :size]
    lo = a.min(axis=(1, 2), keepdims=True)
    hi = a.max(axis=(1, 2), keepdims=True)
    return (a - lo) / np.maximum(hi - lo, 1e-12)


# -- the corruptions -----------------------------------------------------------------------------
def gaussian_noise(x: np.ndarray, severity: int = 1, seed: SeedLike = None) -> np.ndarray:
    """Additive white Gaussian noise."""
    x = _check(x)
    c = _param("gaussian_noise", severity)
    return x + _rng(seed).normal(0.0, c, size=x.shape).astype(np.float32)


def shot_noise(x: np.ndarray, severity: int = 1, seed: SeedLike = None) -> np.ndarray:
    """Poisson (photon-counting) noise."""
    x = _check(x)
    c = _param("shot_noise", severity)
    lam = np.clip(x, 0.0, 1.0).astype(np.float64) * c
    return (_rng(seed).poisson(lam) / c).astype(np.float32)


def impulse_noise(x: np.ndarray, severity: int = 1, seed: SeedLike = None) -> np.ndarray:
    """Salt-and-pepper noise on a fraction of the pixel values (channels independently)."""
    x = _check(x)
    c = _param("impulse_noise", severity)
    rng = _rng(seed)
    hit = rng.random(x.shape) < c
    salt = rng.random(x.shape) < 0.5
    out = x.copy()
    out[hit & salt] = 1.0
    out[hit & ~salt] = 0.0
    return out


def speckle_noise(x: np.ndarray, severity: int = 1, seed: SeedLike = None) -> np.ndarray:
    """Multiplicative Gaussian noise."""
    x = _check(x)
    c = _param("speckle_noise", severity)
    return x + x * _rng(seed).normal(0.0, c, size=x.shape).astype(np.float32)


def defocus_blur(x: np.ndarray, severity: int = 1, seed: SeedLike = None) -> np.ndarray:
    """Blur with an anti-aliased disk (out-of-focus lens)."""
    x = _check(x)
    radius, alias = _param("defocus_blur", severity)
    return _conv_same(x, _disk_kernel(radius, alias), "reflect")


def gaussian_blur(x: np.ndarray, severity: int = 1, seed: SeedLike = None) -> np.ndarray:
    """Isotropic Gaussian blur."""
    x = _check(x)
    sigma = _param("gaussian_blur", severity)
    g = _gauss1d(sigma, max(1, int(np.ceil(3 * sigma))))
    return _conv_same(x, np.outer(g, g), "reflect")


def motion_blur(x: np.ndarray, severity: int = 1, seed: SeedLike = None) -> np.ndarray:
    """One-sided Gaussian streak at a random angle in [-45, 45] degrees per image."""
    x = _check(x)
    radius, sigma = _param("motion_blur", severity)
    angles = _rng(seed).uniform(-45.0, 45.0, size=len(x))
    return _conv_same(x, _motion_kernels(int(radius), float(sigma), angles), "replicate")


def fog(x: np.ndarray, severity: int = 1, seed: SeedLike = None) -> np.ndarray:
    """Haze: add fractal (plasma) noise, then rescale so the brightest value is kept."""
    x = _check(x)
    strength, decay = _param("fog", severity)
    n, _, h, w = x.shape
    haze = _plasma(n, max(h, w), decay, _rng(seed))[:, None, :h, :w]
    peak = x.max(axis=(1, 2, 3), keepdims=True)
    out = (x + strength * haze) * peak / (peak + strength)
    return out.astype(np.float32)


def brightness(x: np.ndarray, severity: int = 1, seed: SeedLike = None) -> np.ndarray:
    """Raise the HSV value channel by a constant (hue and saturation kept)."""
    x = _check(x)
    c = _param("brightness", severity)
    v = x.max(axis=1, keepdims=True)
    v_new = np.clip(v + c, 0.0, 1.0)
    scale = np.divide(v_new, v, out=np.zeros_like(v), where=v > 0)
    return np.where(v > 0, x * scale, v_new).astype(np.float32)


def contrast(x: np.ndarray, severity: int = 1, seed: SeedLike = None) -> np.ndarray:
    """Shrink every channel towards its per-image mean."""
    x = _check(x)
    c = _param("contrast", severity)
    mean = x.mean(axis=(2, 3), keepdims=True)
    return (x - mean) * c + mean


def _box_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Exact box-filter resampling matrix (n_out, n_in): overlap of each output cell with each input cell."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    lo = np.maximum(edges[:-1, None], np.arange(n_in)[None, :])
    hi = np.minimum(edges[1:, None], np.arange(1, n_in + 1)[None, :])
    m = np.clip(hi - lo, 0.0, None)
    return m / m.sum(axis=1, keepdims=True)


def pixelate(x: np.ndarray, severity: int = 1, seed: SeedLike = None) -> np.ndarray:
    """Box-filter downscale by a factor, then box-filter upscale back to the original size."""
    x = _check(x)
    c = _param("pixelate", severity)
    h, w = x.shape[2:]
    sh, sw = max(1, int(h * c)), max(1, int(w * c))
    mh = (_box_matrix(h, sh) @ _box_matrix(sh, h)).astype(np.float32)
    mw = (_box_matrix(w, sw) @ _box_matrix(sw, w)).astype(np.float32)
    return np.einsum("ij,ncjk,lk->ncil", mh, x, mw, optimize=True)


def jpeg_compression(x: np.ndarray, severity: int = 1, seed: SeedLike = None) -> np.ndarray:
    """Round-trip through Pillow's JPEG encoder at a low quality."""
    from PIL import Image

    x = _check(x)
    quality = int(_param("jpeg_compression", severity))
    u8 = np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
    out = np.empty_like(x)
    for i in range(len(u8)):
        img = u8[i, 0] if u8.shape[1] == 1 else u8[i].transpose(1, 2, 0)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        dec = np.asarray(Image.open(buf), dtype=np.float32) / 255.0
        out[i] = dec[None] if u8.shape[1] == 1 else dec.transpose(2, 0, 1)
    return out


_FUNCS: dict[str, Callable[..., np.ndarray]] = {
    f.__name__: f
    for f in (
        gaussian_noise, shot_noise, impulse_noise, speckle_noise, defocus_blur, gaussian_blur,
        motion_blur, fog, brightness, contrast, pixelate, jpeg_compression,
    )
}

#: Corruptions whose output depends on the seed.
RANDOM_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "motion_blur", "fog",
)


def available_corruptions() -> tuple[str, ...]:
    """Every name accepted by :func:`corrupt`."""
    return CORRUPTIONS + EXTRA_CORRUPTIONS


def _param(name: str, severity: int) -> Any:
    sev = int(severity)
    if sev != severity or not 1 <= sev <= 5:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r} (corruption {name!r})")
    return SEVERITY_PARAMS[name][sev - 1]


def corrupt(x: np.ndarray, name: str, severity: int, seed: SeedLike = 0) -> np.ndarray:
    """Apply corruption ``name`` at ``severity`` (1..5; 0 = identity) to ``(N, C, H, W)`` images.

    Returns a new float32 array clipped to ``[0, 1]``; deterministic for a given ``seed``.
    """
    if name not in _FUNCS:
        raise ValueError(f"unknown corruption {name!r}; available: {list(available_corruptions())}")
    x = _check(x)
    if severity == 0:
        return np.clip(x, 0.0, 1.0).astype(np.float32, copy=True)
    out = _FUNCS[name](x, severity, seed)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


__all__ = ["CORRUPTIONS", "EXTRA_CORRUPTIONS", "RANDOM_CORRUPTIONS", "SEVERITY_PARAMS", "available_corruptions", "corrupt"] + list(_FUNCS)
