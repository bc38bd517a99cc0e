"""Objective protocol: a label-free loss over the samples that passed every filter."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from streamtta.adapters.context import StepContext


class Objective(ABC):
    """A differentiable, label-free loss. ``loss`` gets the context and the keep-mask (>= 1 True)."""

    name: str = "objective"

    @abstractmethod
    def loss(self, ctx: StepContext, mask: torch.Tensor) -> torch.Tensor:
        """Scalar loss over ``ctx.logits[mask]`` (carrying gradients)."""

    def reset(self) -> None:
        """Forget any running state."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"
