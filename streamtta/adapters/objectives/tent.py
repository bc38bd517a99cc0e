"""TENT (Wang et al., ICLR 2021): minimise the mean prediction entropy of the kept samples.

``diversity_weight`` > 0 subtracts ``diversity_weight * H(mean_b softmax(z_b))`` (the marginal-
entropy term of the open-set "wisdom of crowds" reimplementations; 0 = plain TENT).

>>> import torch
>>> from streamtta.adapters.context import StepContext
>>> ctx = StepContext(x=torch.zeros(2, 1), logits=torch.tensor([[0.0, 0.0], [5.0, 0.0]]),
...                   features=torch.zeros(2, 1), num_classes=2)
>>> round(float(EntropyObjective().loss(ctx, torch.tensor([True, False]))), 4)  # ln 2
0.6931
"""
from __future__ import annotations

import torch

from streamtta.adapters.common import softmax_entropy
from streamtta.adapters.context import StepContext
from streamtta.adapters.objectives.base import Objective


class EntropyObjective(Objective):
    """Mean softmax entropy over the kept samples (TENT)."""

    name = "tent"

    def __init__(self, diversity_weight: float = 0.0) -> None:
        if diversity_weight < 0:
            raise ValueError(f"diversity_weight must be >= 0, got {diversity_weight}")
        self.diversity_weight = float(diversity_weight)

    def loss(self, ctx: StepContext, mask: torch.Tensor) -> torch.Tensor:
        z = ctx.logits[mask]
        loss = softmax_entropy(z).mean()
        if self.diversity_weight > 0:
            pbar = z.softmax(dim=1).mean(dim=0)
            loss = loss + self.diversity_weight * (pbar * torch.log(pbar + 1e-8)).sum()
        return loss
