"""The adapter protocol: one object that owns a model and adapts it online, without labels."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
from torch import nn

from streamtta.types import StepOutput

#: A gate is called by :meth:`Adapter.step` after the pre-update forward pass with
#: ``(logits, features)`` and returns a bool tensor: True = the sample may feed adaptation.
#: The engine uses it to keep OOD-flagged samples out of every update.
Gate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Adapter(ABC):
    """Base class of every online adapter.

    Hyperparameters go to ``__init__``; everything that changes while streaming lives in
    :meth:`state_dict` so it can be checkpointed and restored bit-identically.
    """

    num_classes: int
    #: The adapted model (a deep copy of the module the adapter was built from).
    model: nn.Module

    @abstractmethod
    def step(self, x: torch.Tensor, gate: Gate | None = None) -> StepOutput:
        """Predict on ``x`` (pre-update logits and features), then adapt on the trusted samples."""

    @abstractmethod
    def reset(self) -> None:
        """Restore the state the adapter had when it was built (source model, fresh optimizer)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...

    def parameters_to_adapt(self) -> list[nn.Parameter]:
        """The parameters the adapter updates (for TTA methods here: the norm affine parameters).

        The meta re-adaptation helper restarts these from a meta-initialisation.
        """
        from streamtta.adapters.common import norm_affine_parameters

        return norm_affine_parameters(self.model)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, features)`` of the current model without adapting (used for calibration)."""
        raise NotImplementedError
