"""Guard protocol: collapse protection that runs after every step.

A guard returning True from :meth:`Guard.after_step` asks the adapter for a full reset (model,
normalisation statistics, optimizer, filter and guard state back to how they were when the
adapter was built); the adapter then reports ``StepOutput.reset=True`` and ``info["guard"]``.
Guards that act continuously (EMA-to-source) return False.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from streamtta.adapters.base import Adapter
from streamtta.adapters.context import StepContext


class Guard(ABC):
    """Runs after each step; may request a reset."""

    name: str = "guard"

    def bind(self, adapter: Adapter) -> None:
        """Called once when the adapter is built (e.g. to capture the source parameters)."""

    @abstractmethod
    def after_step(
        self, adapter: Adapter, ctx: StepContext, mask: torch.Tensor, updated: bool
    ) -> bool:
        """``mask``: samples that fed the update; ``updated``: an optimizer step happened."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"
