"""Scorer registry: ``build_scorer(name, **kw)``.

>>> sorted(SCORERS)
['contrast', 'energy', 'fusion', 'knn', 'mahalanobis', 'msp', 'prototype']
>>> build_scorer("energy", temperature=2.0).temperature
2.0
"""
from __future__ import annotations

from typing import Any

from streamtta.detectors.ood.fusion import FusionScorer
from streamtta.detectors.ood.members import MEMBER_SCORERS, instantiate
from streamtta.detectors.ood.scorer import ThresholdedScorer

SCORERS: dict[str, type[ThresholdedScorer]] = {**MEMBER_SCORERS, "fusion": FusionScorer}

#: Name of the scorer the engine uses unless configured otherwise (``scorer.name = "default"``).
#: Which samples may feed adaptation is decided with a second scorer as well (``scorer.gate``,
#: default ``fusion``).
DEFAULT_SCORER = "contrast"


def build_scorer(name: str = DEFAULT_SCORER, **kw: Any) -> ThresholdedScorer:
    """Instantiate scorer ``name`` with hyperparameters ``kw``."""
    return instantiate(SCORERS, name, kw)
