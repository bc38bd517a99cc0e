"""Periodic reset (RDumb, Press et al., NeurIPS 2023): back to the source model every N steps.

RDumb resets every 1000 batches (``total_steps % 1000 == 0``); the counter restarts with the reset.
"""
from __future__ import annotations

from typing import Any

import torch

from streamtta.adapters.context import StepContext
from streamtta.adapters.guards.base import Guard


class PeriodicReset(Guard):
    """Fire after every ``every`` steps (batches)."""

    name = "periodic"

    def __init__(self, every: int = 1000) -> None:
        if int(every) != every or every < 1:
            raise ValueError(f"periodic reset 'every' must be a positive integer, got {every!r}")
        self.every = int(every)
        self._count = 0

    def after_step(self, adapter, ctx: StepContext, mask: torch.Tensor, updated: bool) -> bool:
        self._count += 1
        return self._count >= self.every

    def state_dict(self) -> dict[str, Any]:
        return {"count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._count = int(state.get("count", 0))
