"""SAR-style model recovery (Niu et al., ICLR 2023): reset when the entropy EMA gets too low.

After each update ``ema <- momentum * ema + (1 - momentum) * L`` (``ema = L`` after a reset),
where ``L`` is the mean entropy of the samples that fed the update. When ``ema < threshold``
the guard fires (SAR: momentum 0.9, threshold 0.2 nats). A very low entropy EMA is the
signature of collapse onto a few confident classes. Steps without an update leave the EMA as is.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from streamtta.adapters.context import StepContext
from streamtta.adapters.guards.base import Guard


class LossEMAReset(Guard):
    """Fire when the EMA of the updated samples' mean entropy falls below ``threshold``."""

    name = "sar-reset"

    def __init__(self, threshold: float = 0.2, momentum: float = 0.9) -> None:
        if threshold <= 0:
            raise ValueError(f"sar-reset threshold must be > 0 nats, got {threshold}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"sar-reset momentum must be in [0, 1), got {momentum}")
        self.threshold = float(threshold)
        self.momentum = float(momentum)
        self._ema: float | None = None

    def after_step(self, adapter, ctx: StepContext, mask: torch.Tensor, updated: bool) -> bool:
        if not updated or not bool(mask.any()):
            return False
        value = float(ctx.entropy[mask].mean())
        if not math.isfinite(value):
            return False
        self._ema = value if self._ema is None else self.momentum * self._ema + (1 - self.momentum) * value
        return self._ema < self.threshold

    @property
    def ema(self) -> float | None:
        return self._ema

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self._ema}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ema = state.get("ema")
