"""Training-time data augmentation of the image source models."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_affine(
    x: torch.Tensor,
    generator: torch.Generator,
    max_degrees: float = 10.0,
    max_shift: float = 0.1,
    scale: tuple[float, float] = (0.9, 1.1),
) -> torch.Tensor:
    """Random rotation / scale / shift per image (zero padding); ``max_shift`` is a fraction of
    the image size.

    >>> out = random_affine(torch.rand(3, 1, 8, 8), torch.Generator().manual_seed(0))
    >>> out.shape
    torch.Size([3, 1, 8, 8])
    """
    n = x.shape[0]
    u = torch.rand(n, 4, generator=generator) * 2 - 1
    ang = u[:, 0] * math.radians(max_degrees)
    s = (scale[0] + scale[1]) / 2 + u[:, 1] * (scale[1] - scale[0]) / 2
    tx, ty = u[:, 2] * 2 * max_shift, u[:, 3] * 2 * max_shift
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
