"""Tiny models and data shared by the re-adaptation and meta-training tests."""
import numpy as np
import torch
from torch import nn


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(6, 3)).eval()


def toy_data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.2
    # class patterns that survive global average pooling (a stripe's row would not)
    x[y == 0, 0, ::2, :] += 0.8  # horizontal stripes
    x[y == 1, 0, :, ::2] += 0.8  # vertical stripes
    x[y == 2, 0] += 0.4  # flat grey
    return x.clamp(0, 1), y


def noise(x, name, severity, seed):
    return np.clip(x + np.random.default_rng(seed).normal(0, 0.05 * severity, x.shape), 0, 1).astype(np.float32)
