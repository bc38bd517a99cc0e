"""EATA's reliability filter: keep samples whose prediction entropy is below ``E0`` (nats).

``E0`` defaults to ``0.4 * ln C`` (EATA's ``e_margin``).

>>> import torch
>>> from streamtta.adapters.context import StepContext
>>> ctx = StepContext(x=torch.zeros(2, 1), logits=torch.tensor([[9.0, 0.0], [0.0, 0.0]]),
...                   features=torch.zeros(2, 1), num_classes=2)
>>> EntropyMarginFilter(num_classes=2)(ctx, torch.ones(2, dtype=torch.bool)).tolist()
[True, False]
"""
from __future__ import annotations

import torch

from streamtta.adapters.context import StepContext
from streamtta.adapters.filters.base import Filter
from streamtta.adapters.objectives.eata import default_e_margin


class EntropyMarginFilter(Filter):
    """Keep sample ``b`` iff ``H_b < e_margin``."""

    name = "ent-margin"

    def __init__(self, num_classes: int, e_margin: float | None = None) -> None:
        self.num_classes = int(num_classes)
        self.e_margin = default_e_margin(num_classes) if e_margin is None else float(e_margin)
        if self.e_margin <= 0:
            raise ValueError(f"e_margin must be > 0 nats, got {e_margin}")

    def __call__(self, ctx: StepContext, mask: torch.Tensor) -> torch.Tensor:
        return mask & (ctx.entropy < self.e_margin)
