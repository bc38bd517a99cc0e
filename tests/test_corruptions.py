"""Image corruption library: shapes, determinism, severity monotonicity, vectorisation, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from streamtta.simulations.corruptions import (
    CORRUPTIONS,
    RANDOM_CORRUPTIONS,
    SEVERITY_PARAMS,
    available_corruptions,
    corrupt,
)
from streamtta.simulations.digits import load_digits_32

torch.set_num_threads(1)
ALL = available_corruptions()


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return load_digits_32().x_test[:120]


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    rng = np.random.default_rng(0)
    low = rng.random((6, 3, 8, 8), dtype=np.float32)
    return np.kron(low, np.ones((1, 1, 4, 4), dtype=np.float32))  # smooth-ish 32x32 colour images


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b) ** 2)))


def test_catalogue():
    assert len(CORRUPTIONS) == 10 and len(set(ALL)) == len(ALL)
    for name in ALL:
        assert len(SEVERITY_PARAMS[name]) == 5, name


@pytest.mark.parametrize("name", ALL)
def test_shape_range_and_determinism(name, digits, rgb):
    for x in (digits[:16], rgb):
        y = corrupt(x, name, 5, seed=3)
        assert y.shape == x.shape and y.dtype == np.float32
        assert y.min() >= 0.0 and y.max() <= 1.0
        assert not np.array_equal(y, x), f"{name} severity 5 left the images unchanged"
        np.testing.assert_array_equal(y, corrupt(x, name, 5, seed=3))
    # the input is never modified in place
    before = digits[:4].copy()
    corrupt(digits[:4], name, 3, seed=0)
    np.testing.assert_array_equal(before, digits[:4])


@pytest.mark.parametrize("name", ALL)
def test_seed_dependence(name, digits):
    a = corrupt(digits[:16], name, 4, seed=1)
    b = corrupt(digits[:16], name, 4, seed=2)
    if name in RANDOM_CORRUPTIONS:
        assert not np.array_equal(a, b), f"{name} ignores its seed"
    else:
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ALL)
def test_psnr_falls_with_severity(name, digits):
    values = [psnr(corrupt(digits, name, s, seed=7), digits) for s in range(1, 6)]
    assert all(np.diff(values) < 0), f"{name}: PSNR by severity {np.round(values, 2).tolist()} is not decreasing"


@pytest.mark.parametrize("name", [n for n in ALL if n not in RANDOM_CORRUPTIONS])
def test_vectorised_equals_per_image(name, digits):
    batch = corrupt(digits[:8], name, 5, seed=0)
    single = np.concatenate([corrupt(digits[i : i + 1], name, 5, seed=0) for i in range(8)])
    np.testing.assert_allclose(batch, single, atol=1e-6)


def test_noise_statistics(digits):
    mid = np.full((64, 1, 32, 32), 0.5, dtype=np.float32)
    g = corrupt(mid, "gaussian_noise", 5, seed=0) - 0.5
    assert abs(g.std() - SEVERITY_PARAMS["gaussian_noise"][4]) < 0.005
    imp = corrupt(mid, "impulse_noise", 5, seed=0)
    frac = np.mean(imp != 0.5)
    assert abs(frac - SEVERITY_PARAMS["impulse_noise"][4]) < 0.01
    # contrast keeps the per-image mean, shrinks the deviation by the factor
    c = corrupt(digits, "contrast", 5, seed=0)
    np.testing.assert_allclose(c.mean(axis=(2, 3)), digits.mean(axis=(2, 3)), atol=1e-5)


def test_brightness_keeps_hue(rgb):
    y = corrupt(rgb, "brightness", 2, seed=0)
    ratio_in = rgb[:, 0] / np.maximum(rgb[:, 1], 1e-3)
    ratio_out = y[:, 0] / np.maximum(y[:, 1], 1e-3)
    unclipped = (rgb.max(axis=1) + SEVERITY_PARAMS["brightness"][1] < 1.0) & (rgb.min(axis=1) > 0.05)
    np.testing.assert_allclose(ratio_in[unclipped], ratio_out[unclipped], rtol=1e-4)
    assert (y.max(axis=1) >= rgb.max(axis=1) - 1e-6).all()


def test_severity_zero_is_identity(digits):
    np.testing.assert_array_equal(corrupt(digits[:4], "fog", 0, seed=0), digits[:4])


def test_errors(digits):
    with pytest.raises(ValueError, match="unknown corruption 'snowfall'"):
        corrupt(digits, "snowfall", 3)
    with pytest.raises(ValueError, match="severity must be an integer in 1..5, got 6"):
        corrupt(digits, "fog", 6)
    with pytest.raises(ValueError, match="NCHW"):
        corrupt(np.zeros((2, 32, 32, 3), np.float32), "fog", 1)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        corrupt(np.zeros((32, 32), np.float32), "fog", 1)
