"""Energy score (Liu et al., NeurIPS 2020): ``E(x) = -T * logsumexp(logits / T)``.

Higher energy = more OOD, so the score is the energy itself.

>>> import torch
>>> s = EnergyScorer().fit(torch.zeros(50, 2), torch.randn(50, 3) * 0.1 + torch.tensor([8.0, 0, 0]))
>>> s.score(None, torch.tensor([[9.0, 0, 0], [0.1, 0.0, 0.2]])).argmax().item()
1
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from streamtta.detectors.ood.scorer import ThresholdedScorer, to_tensor


class EnergyScorer(ThresholdedScorer):
    """Logit-based energy score; ``temperature`` is ``T``."""

    name = "energy"

    def __init__(self, temperature: float = 1.0, **kw: Any) -> None:
        super().__init__(**kw)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def _fit(self, features: Any, logits: Any, labels: Any | None) -> None:
        if logits is None:
            raise ValueError("EnergyScorer needs logits")

    def score(self, features: Any, logits: Any) -> np.ndarray:
        t = self.temperature
        return (-t * torch.logsumexp(to_tensor(logits) / t, dim=1)).double().cpu().numpy()
