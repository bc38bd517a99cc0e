"""Open-set confidence-drop filter ("wisdom of crowds", Lee et al., ICCV 2023).

Let ``c0_b`` be the class the frozen source copy predicts for sample ``b`` and ``p0_b`` its
confidence. The sample is kept only if the adapted model's (pre-update) probability of that
class has not dropped: ``p_adapted[b, c0_b] - p0_b >= margin`` (``margin = 0`` is the paper's
rule; the ``ttavlm`` variant uses 0.05). Samples whose confidence falls under adaptation are
typically noisy or unknown-class ones.

>>> import torch
>>> from streamtta.adapters.context import StepContext
>>> src = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
>>> ctx = StepContext(x=torch.zeros(2, 1), logits=torch.tensor([[3.0, 0.0], [1.0, 0.0]]),
...                   features=torch.zeros(2, 1), num_classes=2, source_fn=lambda: src)
>>> ConfidenceDropFilter()(ctx, torch.ones(2, dtype=torch.bool)).tolist()
[True, False]
"""
from __future__ import annotations

import torch

from streamtta.adapters.context import StepContext
from streamtta.adapters.filters.base import Filter


class ConfidenceDropFilter(Filter):
    """Keep sample ``b`` iff ``p_adapted[b, c0] - p_source[b, c0] >= margin`` with ``c0 = argmax p_source[b]``."""

    name = "conf-drop"
    needs_source = True

    def __init__(self, margin: float = 0.0) -> None:
        if not -1.0 <= margin <= 1.0:
            raise ValueError(f"conf-drop margin is a probability difference in [-1, 1], got {margin}")
        self.margin = float(margin)

    def __call__(self, ctx: StepContext, mask: torch.Tensor) -> torch.Tensor:
        p0 = ctx.source_logits.softmax(dim=1)
        v0, c0 = p0.max(dim=1)
        v = ctx.probs.gather(1, c0.unsqueeze(1)).squeeze(1)
        return mask & (v - v0 >= self.margin)
