"""EATA's redundancy filter: skip samples whose prediction resembles the recent average.

State ``m`` is a moving average of the kept samples' probability vectors (``None`` at first).
A sample is kept iff ``|cos(m, p_b)| < d_margin``; afterwards ``m <- momentum * m +
(1 - momentum) * mean_{kept} p_b`` (or ``m = mean_{kept} p_b`` on the first batch, when every
sample passes). ``d_margin`` = 0.05 for ImageNet in EATA, 0.4 for CIFAR-10 in the
test-time-adaptation benchmark (the default here).

>>> import torch
>>> from streamtta.adapters.context import StepContext
>>> f = RedundancyFilter(d_margin=0.5)
>>> mk = lambda z: StepContext(x=torch.zeros(len(z), 1), logits=torch.tensor(z), features=torch.zeros(len(z), 1), num_classes=2)
>>> f(mk([[9.0, 0.0]]), torch.ones(1, dtype=torch.bool)).tolist()  # first batch: kept, m = (1, 0)
[True]
>>> f(mk([[9.0, 0.0], [0.0, 9.0]]), torch.ones(2, dtype=torch.bool)).tolist()  # same class again is redundant
[False, True]
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from streamtta.adapters.context import StepContext
from streamtta.adapters.filters.base import Filter


class RedundancyFilter(Filter):
    """Keep sample ``b`` iff ``|cos(m, p_b)| < d_margin`` (``m``: EMA of kept probability vectors)."""

    name = "redundancy"

    def __init__(self, d_margin: float = 0.4, momentum: float = 0.9) -> None:
        if not 0.0 < d_margin <= 1.0:
            raise ValueError(f"d_margin is a cosine threshold in (0, 1], got {d_margin}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.d_margin = float(d_margin)
        self.momentum = float(momentum)
        self._m: torch.Tensor | None = None

    def __call__(self, ctx: StepContext, mask: torch.Tensor) -> torch.Tensor:
        p = ctx.probs
        if self._m is None:
            keep = mask.clone()
            if bool(keep.any()):
                self._m = p[keep].mean(dim=0)
            return keep
        cos = F.cosine_similarity(self._m.unsqueeze(0).to(p), p, dim=1)
        keep = mask & (cos.abs() < self.d_margin)
        if bool(keep.any()):
            self._m = self.momentum * self._m + (1 - self.momentum) * p[keep].mean(dim=0)
        return keep

    def reset(self) -> None:
        self._m = None

    def state_dict(self) -> dict[str, Any]:
        return {"m": None if self._m is None else self._m.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        m = state.get("m")
        self._m = None if m is None else m.detach().clone()
