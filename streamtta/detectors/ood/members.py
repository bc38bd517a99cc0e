"""The single scorers: every registered scorer except the combinations built from them.

:class:`~streamtta.detectors.ood.fusion.FusionScorer` builds its components from this table, and the
full registry (:mod:`~streamtta.detectors.ood.registry`) adds the fusion scorer on top of it, so neither
of the two modules imports the other.

>>> sorted(MEMBER_SCORERS)
['contrast', 'energy', 'knn', 'mahalanobis', 'msp', 'prototype']
>>> build_member("energy", temperature=2.0).temperature
2.0
"""
from __future__ import annotations

from typing import Any, Mapping

from streamtta.detectors.ood.contrast import ContrastScorer
from streamtta.detectors.ood.energy import EnergyScorer
from streamtta.detectors.ood.knn import KNNScorer
from streamtta.detectors.ood.mahalanobis import MahalanobisScorer
from streamtta.detectors.ood.msp import MSPScorer
from streamtta.detectors.ood.prototype_scorer import PrototypeScorer
from streamtta.detectors.ood.scorer import ThresholdedScorer

MEMBER_SCORERS: dict[str, type[ThresholdedScorer]] = {
    "prototype": PrototypeScorer,
    "knn": KNNScorer,
    "energy": EnergyScorer,
    "msp": MSPScorer,
    "mahalanobis": MahalanobisScorer,
    "contrast": ContrastScorer,
}


def instantiate(table: Mapping[str, type[ThresholdedScorer]], name: str, kw: Mapping[str, Any]) -> ThresholdedScorer:
    """``table[name](**kw)``, with errors that name the scorer and its known alternatives."""
    if name not in table:
        raise ValueError(f"unknown OOD scorer {name!r}; known: {sorted(table)}")
    try:
        return table[name](**kw)
    except TypeError as e:
        raise ValueError(f"bad hyperparameters {dict(kw)!r} for scorer {name!r}: {e}") from e


def build_member(name: str, **kw: Any) -> ThresholdedScorer:
    """Instantiate single scorer ``name`` with hyperparameters ``kw``."""
    return instantiate(MEMBER_SCORERS, name, kw)
