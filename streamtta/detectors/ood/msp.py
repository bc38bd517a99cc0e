"""Maximum softmax probability baseline (Hendrycks & Gimpel 2017): score ``-max softmax``.

>>> import torch
>>> s = MSPScorer()
>>> s.score(None, torch.tensor([[5.0, 0.0], [0.1, 0.0]])).round(2).tolist()
[-0.99, -0.52]
"""
from __future__ import annotations

from typing import Any

import numpy as np

from streamtta.detectors.ood.scorer import ThresholdedScorer, to_tensor


class MSPScorer(ThresholdedScorer):
    """``-max_c softmax(logits)_c`` (higher = less confident = more OOD)."""

    name = "msp"

    def _fit(self, features: Any, logits: Any, labels: Any | None) -> None:
        if logits is None:
            raise ValueError("MSPScorer needs logits")

    def score(self, features: Any, logits: Any) -> np.ndarray:
        return (-to_tensor(logits).softmax(1).max(1).values).double().cpu().numpy()
