"""The OOD scorer protocol (scikit-learn spirit): ``fit`` / ``score`` / ``partial_fit`` / ``recalibrate``.

Polarity: every scorer returns **higher = more OOD** (see :data:`streamtta.types.OOD_HIGHER_IS_MORE_OOD`).

Concrete scorers derive from :class:`streamtta.detectors.ood.scorer.ThresholdedScorer`, which adds the
hold-out calibration split, the optional adaptive (Otsu) threshold and re-calibration after a
re-adaptation.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch


class OODScorer(ABC):
    """Scores samples from ``(features, logits)``; higher = more OOD.

    ``fit`` calibrates on source (in-distribution) data and sets ``threshold`` so that 95% of the
    hold-out ID samples are accepted; ``partial_fit`` updates online state from samples the engine
    accepted as ID; ``recalibrate`` re-estimates state and threshold from recent trusted samples
    (called after a re-adaptation).
    """

    name: str = "scorer"
    threshold: float = float("inf")

    def fit(self, features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor | None = None) -> "OODScorer":
        scores = self.score(features, logits)
        self.threshold = float(np.quantile(scores, 0.95))
        return self

    @abstractmethod
    def score(self, features: torch.Tensor, logits: torch.Tensor) -> np.ndarray:
        ...

    def partial_fit(self, features: torch.Tensor, logits: torch.Tensor, accepted: torch.Tensor | None = None) -> None:
        return None

    def recalibrate(self, features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Re-estimate the threshold (and any state) from trusted recent ID samples."""
        scores = self.score(features, logits)
        self.threshold = float(np.quantile(scores, 0.95))

    def is_ood(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    def state_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.threshold = float(state["threshold"])
