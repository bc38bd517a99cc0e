"""Scorer registry: ``build_scorer(name, **kw)``.

>>> sorted(SCORERS)
['contrast', 'energy', 'fusion', 'knn', 'mahalanobis', 'msp', 'prototype']
>>> build_scorer("energy", temperature=2.0).temperature
2.0
"""
from __future__ import annotations

from typing import Any

from streamtta.detectors.ood.contrast import ContrastScorer
from streamtta.detectors.ood.energy import EnergyScorer
from streamtta.detectors.ood.fusion import FusionScorer
from streamtta.detectors.ood.knn import KNNScorer
from streamtta.detectors.ood.mahalanobis import MahalanobisScorer
from streamtta.detectors.ood.msp import MSPScorer
from streamtta.detectors.ood.prototype_scorer import PrototypeScorer
from streamtta.detectors.ood.scorer import ThresholdedScorer

SCORERS: dict[str, type[ThresholdedScorer]] = {
    "prototype": PrototypeScorer,
    "knn": KNNScorer,
    "energy": EnergyScorer,
    "msp": MSPScorer,
    "mahalanobis": MahalanobisScorer,
    "fusion": FusionScorer,
    "contrast": ContrastScorer,
}

#: Name of the scorer the engine uses unless configured otherwise. Chosen on
#: ``digits-c-continual-openset`` seed 0 (seeds 1-3 are the reported ones) with the default adapter:
#: AUROC contrast 92.2 (92.9 with ``known_quantile=0.7``, the default since), energy 89.0, msp 89.1
#: (earlier, same seed: fusion (Mahalanobis + energy)
#: 85.1, prototype 83.0, knn 76.3, Mahalanobis 72.3). Scorers that compare with source features only
#: lose ground when the adapter's class-balanced statistics move the features; ``contrast`` also
#: compares with the stream's own recent known and unknown samples. Command:
#: ``streamtta bench simulations/digits-c-continual-openset.toml --methods default --seeds 0
#: --scorers contrast,energy,msp``.
#: Which samples may feed adaptation is decided with a second scorer as well (``scorer.gate``,
#: default ``fusion``): gating with fusion kept adaptation on track where energy alone let harmful
#: samples in (digits-c-long seed 1: 88.7% vs 85.3% accuracy).
DEFAULT_SCORER = "contrast"


def build_scorer(name: str = DEFAULT_SCORER, **kw: Any) -> ThresholdedScorer:
    """Instantiate scorer ``name`` with hyperparameters ``kw``."""
    if name not in SCORERS:
        raise ValueError(f"unknown OOD scorer {name!r}; known: {sorted(SCORERS)}")
    try:
        return SCORERS[name](**kw)
    except TypeError as e:
        raise ValueError(f"bad hyperparameters {kw!r} for scorer {name!r}: {e}") from e
