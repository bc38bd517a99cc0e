"""Clean scikit-learn digits (real handwriting) as 1x32x32 float images in [0, 1].

The 8x8 images are bilinearly upsampled to 32x32 so the CIFAR-style backbones and the
corruption library work on them unchanged. The train/test split is fixed by seed and stratified.

>>> from streamtta.simulations.digits import load_digits_32
>>> d = load_digits_32()
>>> d.x_train.shape[1:], d.x_train.dtype.name, sorted(set(d.y_train.tolist()))[:3]
((1, 32, 32), 'float32', [0, 1, 2])
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 32
NUM_CLASSES = 10


@dataclass(frozen=True)
class DigitsSplit:
    x_train: np.ndarray  # (N, 1, 32, 32) float32 in [0, 1]
    y_train: np.ndarray  # (N,) int64
    x_test: np.ndarray
    y_test: np.ndarray


def upsample(images8: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """(N, 8, 8) digits with values 0..16 -> (N, 1, size, size) float32 in [0, 1]."""
    t = torch.from_numpy(np.asarray(images8, dtype=np.float32) / 16.0).unsqueeze(1)
    up = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return up.clamp_(0.0, 1.0).numpy()


@lru_cache(maxsize=4)
def load_digits_32(test_fraction: float = 0.3, seed: int = 0) -> DigitsSplit:
    """Load and split the 1,797 digits once (cached); the split depends only on ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = upsample(d.images)
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return DigitsSplit(xtr, ytr, xte, yte)
