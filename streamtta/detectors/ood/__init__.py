"""OOD scoring: scorers, the FAISS prototype memory, thresholds and novel-class discovery.

Polarity everywhere: higher OOD score = more out-of-distribution.

* scorers (:func:`build_scorer`, :data:`DEFAULT_SCORER`): ``contrast`` (default: kNN to the stream's
  own unknowns minus kNN to known samples), ``energy``, ``fusion`` (Mahalanobis + energy),
  ``prototype`` (FAISS prototype memory), ``knn``, ``mahalanobis``, ``msp``;
* :class:`PrototypeMemory` (FAISS ``IndexIDMap2(IndexFlatIP)``), :class:`StrongOODPool`,
  :class:`NovelClassDetector`; Otsu / TPR thresholds.
"""
from streamtta.detectors.ood.base import OODScorer
from streamtta.detectors.ood.contrast import ContrastScorer
from streamtta.detectors.ood.energy import EnergyScorer
from streamtta.detectors.ood.fusion import FusionScorer
from streamtta.detectors.ood.index import FlatIPIndex
from streamtta.detectors.ood.knn import KNNScorer
from streamtta.detectors.ood.mahalanobis import MahalanobisScorer
from streamtta.detectors.ood.msp import MSPScorer
from streamtta.detectors.ood.novelty import NovelClassDetector
from streamtta.detectors.ood.prototype_scorer import PrototypeScorer
from streamtta.detectors.ood.prototypes import PrototypeMemory
from streamtta.detectors.ood.registry import DEFAULT_SCORER, SCORERS, build_scorer
from streamtta.detectors.ood.scorer import ThresholdedScorer, score_and_flag
from streamtta.detectors.ood.strong_ood import StrongOODPool
from streamtta.detectors.ood.thresholds import OtsuThreshold, otsu_threshold, tpr_threshold

__all__ = [
    "OODScorer", "ThresholdedScorer", "score_and_flag",
    "ContrastScorer", "EnergyScorer", "FusionScorer", "KNNScorer", "MahalanobisScorer", "MSPScorer",
    "PrototypeScorer", "SCORERS", "DEFAULT_SCORER", "build_scorer",
    "FlatIPIndex", "PrototypeMemory", "StrongOODPool", "NovelClassDetector",
    "OtsuThreshold", "otsu_threshold", "tpr_threshold",
]
