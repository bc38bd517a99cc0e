"""EATA / ETA (Niu et al., ICML 2022) loss: entropy re-weighted by ``exp(E0 - H)``.

``loss = mean_{kept b} exp(E0 - H_b).detach() * H_b`` with the entropy margin ``E0`` (nats;
default ``0.4 * ln C``). The reliability (``H < E0``) and redundancy filters of EATA are separate
components (:mod:`streamtta.adapters.filters.entropy_margin`,
:mod:`streamtta.adapters.filters.redundancy`); the spec term ``eata`` adds all three. The
Fisher anti-forgetting term needs clean source data and is not included (i.e. this is ETA).

>>> import math, torch
>>> from streamtta.adapters.context import StepContext
>>> obj = WeightedEntropyObjective(num_classes=2)
>>> ctx = StepContext(x=torch.zeros(1, 1), logits=torch.zeros(1, 2), features=torch.zeros(1, 1), num_classes=2)
>>> H = math.log(2); round(float(obj.loss(ctx, torch.tensor([True]))), 5) == round(math.exp(0.4 * H - H) * H, 5)
True
"""
from __future__ import annotations

import math

import torch

from streamtta.adapters.common import softmax_entropy
from streamtta.adapters.context import StepContext
from streamtta.adapters.objectives.base import Objective


def default_e_margin(num_classes: int, factor: float = 0.4) -> float:
    """EATA's entropy margin ``factor * ln(num_classes)``."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return factor * math.log(num_classes)


class WeightedEntropyObjective(Objective):
    """EATA's sample-weighted entropy ``exp(E0 - H) * H`` averaged over kept samples."""

    name = "eata"

    def __init__(self, num_classes: int, e_margin: float | None = None) -> None:
        self.num_classes = int(num_classes)
        self.e_margin = default_e_margin(num_classes) if e_margin is None else float(e_margin)
        if self.e_margin <= 0:
            raise ValueError(f"e_margin must be > 0 nats, got {e_margin}")

    def loss(self, ctx: StepContext, mask: torch.Tensor) -> torch.Tensor:
        h = softmax_entropy(ctx.logits[mask])
        w = torch.exp(self.e_margin - h.detach())
        return (w * h).mean()
