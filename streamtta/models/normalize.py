"""Input normalisation as the first layer of a model.

Putting ``(x - mean) / std`` inside the network means every consumer (the Kafka engine, the
simulations, TorchScript exports) feeds raw inputs -- images in ``[0, 1]``, raw sensor rows -- and
can never forget or double-apply the normalisation.

>>> import torch
>>> norm = Normalize([0.5], [0.25])
>>> norm(torch.full((2, 1, 4, 4), 0.75)).unique().tolist()
[1.0]
>>> Normalize([1.0, 2.0], [1.0, 2.0])(torch.tensor([[3.0, 6.0]])).tolist()
[[2.0, 2.0]]
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """``(x - mean) / std`` over dimension 1 (channels for images, features for rows).

    ``mean`` and ``std`` are buffers, so they travel with the state dict and TorchScript exports.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(list(mean), dtype=torch.float32).flatten()
        std_t = torch.as_tensor(list(std), dtype=torch.float32).flatten()
        if mean_t.numel() == 0 or mean_t.shape != std_t.shape:
            raise ValueError(
                f"Normalize needs non-empty mean and std of equal length, got {mean_t.numel()} and {std_t.numel()}"
            )
        if bool((std_t <= 0).any()):
            raise ValueError(f"Normalize std must be > 0, got {std_t.tolist()}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)

    def extra_repr(self) -> str:
        return f"channels={self.mean.numel()}"
