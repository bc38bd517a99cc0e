"""Filter protocol: narrow the keep-mask of a batch before the update.

Filters are applied in order, AND-wise, after the caller's OOD gate: each receives the mask of
samples still kept and returns a new mask that is a subset of it. Stateful filters (e.g. EATA's
redundancy filter) update their state only with the samples they keep.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from streamtta.adapters.context import StepContext


class Filter(ABC):
    """Selects the samples allowed to feed the update."""

    name: str = "filter"
    #: True when the filter reads ``ctx.source_logits`` (the adapter then keeps a frozen source copy).
    needs_source: bool = False

    @abstractmethod
    def __call__(self, ctx: StepContext, mask: torch.Tensor) -> torch.Tensor:
        """Return the bool keep-mask ``(B,)``; must be a subset of ``mask``."""

    def reset(self) -> None:
        """Forget any running state."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"
