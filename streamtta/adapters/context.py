"""Per-step context handed to filters, objectives and guards."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from streamtta.adapters.common import softmax_entropy


@dataclass
class StepContext:
    """What one :meth:`Adapter.step` knows about its batch.

    ``logits`` come from the adapted model's pre-update forward (they carry gradients when an
    objective is configured); ``probs``/``entropy``/``source_logits`` are detached and computed
    lazily (``source_logits`` runs the frozen source copy only if some component asks for it).
    """

    x: torch.Tensor
    logits: torch.Tensor
    features: torch.Tensor
    num_classes: int
    source_fn: Callable[[], torch.Tensor] | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return int(self.logits.shape[0])

    @property
    def probs(self) -> torch.Tensor:
        if "probs" not in self._cache:
            self._cache["probs"] = self.logits.detach().softmax(dim=1)
        return self._cache["probs"]

    @property
    def entropy(self) -> torch.Tensor:
        if "entropy" not in self._cache:
            self._cache["entropy"] = softmax_entropy(self.logits.detach())
        return self._cache["entropy"]

    @property
    def source_logits(self) -> torch.Tensor:
        """Logits of the frozen source copy on the same batch (no gradient)."""
        if "source_logits" not in self._cache:
            if self.source_fn is None:
                raise RuntimeError("this adapter keeps no frozen source copy; a component asked for source_logits")
            with torch.no_grad():
                self._cache["source_logits"] = self.source_fn().detach()
        return self._cache["source_logits"]

    @property
    def has_source(self) -> bool:
        return "source_logits" in self._cache
