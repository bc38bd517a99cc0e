"""OOD scoring, prototype memory, shift detection, alerts and meta re-adaptation.

Polarity everywhere: higher OOD score = more out-of-distribution.

* scorers (:func:`build_scorer`, :data:`DEFAULT_SCORER`): ``contrast`` (default: kNN to the stream's
  own unknowns minus kNN to known samples), ``energy``, ``fusion`` (Mahalanobis + energy),
  ``prototype`` (FAISS prototype memory), ``knn``, ``mahalanobis``, ``msp``;
* :class:`PrototypeMemory` (FAISS ``IndexIDMap2(IndexFlatIP)``), :class:`StrongOODPool`,
  :class:`NovelClassDetector`;
* :class:`ShiftMonitor` (river ADWIN / PageHinkley / KSWIN on batch signals), :class:`OODBurstRule`;
* :class:`AlertPolicy` -> :class:`~streamtta.detectors.alerts.Alert`;
* :class:`OnsetLocator` (where inside a batch the stream changed);
* :mod:`streamtta.detectors.meta`: :func:`meta_train`, :class:`ReAdapter` (imported lazily): on a
  confirmed shift, the batch holding the change point is processed again in two parts (on by default,
  ``monitor.readapt``), and optionally the adaptable parameters restart from the meta-initialisation.
"""
from streamtta.detectors.alerts import Alert, AlertKind, OffsetRange, Severity, deterministic_id
from streamtta.detectors.base import OODScorer, ShiftDetector
from streamtta.detectors.events import (
    DeadLetterEvent,
    GuardResetEvent,
    NovelClusterEvent,
    OODBurstEvent,
    ShiftEvent,
)
from streamtta.detectors.index import FlatIPIndex
from streamtta.detectors.novelty import NovelClassDetector
from streamtta.detectors.onset import Onset, OnsetLocator
from streamtta.detectors.ood_contrast import ContrastScorer
from streamtta.detectors.ood_energy import EnergyScorer
from streamtta.detectors.ood_fusion import FusionScorer
from streamtta.detectors.ood_knn import KNNScorer
from streamtta.detectors.ood_mahalanobis import MahalanobisScorer
from streamtta.detectors.ood_msp import MSPScorer
from streamtta.detectors.ood_prototype import PrototypeScorer
from streamtta.detectors.policy import AlertPolicy
from streamtta.detectors.prototypes import PrototypeMemory
from streamtta.detectors.registry import DEFAULT_SCORER, SCORERS, build_scorer
from streamtta.detectors.scorer import ScoringGate, ThresholdedScorer
from streamtta.detectors.shift import OODBurstRule, ShiftMonitor, batch_signals
from streamtta.detectors.strong_ood import StrongOODPool
from streamtta.detectors.thresholds import OtsuThreshold, otsu_threshold, tpr_threshold

__all__ = [
    "Alert", "AlertKind", "OffsetRange", "Severity", "deterministic_id",
    "OODScorer", "ShiftDetector",
    "ShiftEvent", "OODBurstEvent", "NovelClusterEvent", "GuardResetEvent", "DeadLetterEvent",
    "FlatIPIndex", "PrototypeMemory", "StrongOODPool", "NovelClassDetector", "Onset", "OnsetLocator",
    "ThresholdedScorer", "ScoringGate",
    "PrototypeScorer", "KNNScorer", "ContrastScorer",
    "EnergyScorer", "MSPScorer", "MahalanobisScorer", "FusionScorer",
    "SCORERS", "DEFAULT_SCORER", "build_scorer",
    "OtsuThreshold", "otsu_threshold", "tpr_threshold",
    "ShiftMonitor", "OODBurstRule", "batch_signals",
    "AlertPolicy",
]
