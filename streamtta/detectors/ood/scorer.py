"""Shared machinery of the OOD scorers: hold-out calibration, adaptive threshold, feature centring.

:class:`ThresholdedScorer.fit` splits the source data it is given: the state (prototypes, class
means, reservoir) is built on one part and the threshold is set at ``tpr`` (95% ID-TPR) on the
held-out part, so the threshold is not biased low by scoring the very samples the state was built
from. ``threshold_mode="otsu"`` swaps in OWTTT's adaptive Otsu threshold over a queue of recent
scores (fed by :meth:`ThresholdedScorer.score_and_flag` / :meth:`observe`).

:meth:`ThresholdedScorer.for_stream` copies a fitted scorer for one stream: what the source fit fixed
for good (the contrast scorer's source memory, the Mahalanobis precision matrix, ...) is shared,
read-only, by every copy and left out of the copies' ``state_dict``; the online state is the copy's own.
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from streamtta.detectors.ood.base import OODScorer
from streamtta.detectors.ood.state import array_state, tensor_state
from streamtta.detectors.ood.thresholds import OtsuThreshold, tpr_threshold

THRESHOLD_MODES = ("tpr", "otsu")


def to_numpy(x: Any, dtype: Any = np.float32) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        x = x.float().numpy() if x.is_floating_point() else x.numpy()
    return np.asarray(x, dtype=dtype)


def to_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().float()
    return torch.as_tensor(np.asarray(x, dtype=np.float32))


def softmax_np(logits: Any) -> np.ndarray:
    z = to_numpy(logits, np.float64)
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


class ThresholdedScorer(OODScorer):
    """Base class of the concrete scorers (hyperparameters shared by all of them).

    Parameters
    ----------
    tpr
        Fraction of hold-out ID samples that the calibrated threshold accepts.
    threshold_mode
        ``"tpr"`` (fixed, calibrated) or ``"otsu"`` (adaptive over recent scores).
    calib_fraction
        Fraction of the data given to :meth:`fit` / :meth:`recalibrate` held out for the
        threshold (0 = use all of it for both, biased).
    otsu_queue, otsu_min_fill
        Queue length and warm-up of the adaptive threshold.
    seed
        Seed of the calibration split.
    """

    name = "thresholded"
    #: state keys of what the source fit fixes for good: shared by :meth:`for_stream` copies and left
    #: out of their ``state_dict`` (the attributes behind them come from :meth:`_fixed_objects`)
    fixed_keys: tuple[str, ...] = ()

    def __init__(self, tpr: float = 0.95, threshold_mode: str = "tpr", calib_fraction: float = 0.2,
                 otsu_queue: int = 512, otsu_min_fill: int = 64, seed: int = 0) -> None:
        if not 0.0 < tpr < 1.0:
            raise ValueError(f"tpr must be in (0, 1), got {tpr}")
        if threshold_mode not in THRESHOLD_MODES:
            raise ValueError(f"threshold_mode must be one of {THRESHOLD_MODES}, got {threshold_mode!r}")
        if not 0.0 <= calib_fraction < 1.0:
            raise ValueError(f"calib_fraction must be in [0, 1), got {calib_fraction}")
        self.tpr = float(tpr)
        self.threshold_mode = threshold_mode
        self.calib_fraction = float(calib_fraction)
        self.seed = int(seed)
        self.calibrated_threshold = float("inf")
        self.otsu = OtsuThreshold(queue_size=otsu_queue, min_fill=otsu_min_fill)
        self.fitted = False
        #: True for a :meth:`for_stream` copy whose fixed parts are still the shared ones
        self.shares_fixed = False

    # -- hooks for subclasses ------------------------------------------------------------
    def _fit(self, features: Any, logits: Any, labels: Any | None) -> None:
        """Build the scorer's state from ID source data (stateless scorers: nothing)."""

    def _refit(self, features: Any, logits: Any, labels: Any | None) -> None:
        """Re-estimate state from recent trusted samples (default: keep the state)."""

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _fixed_objects(self) -> list[Any]:
        """The objects behind :attr:`fixed_keys` (never changed in place once fitted)."""
        return []

    # -- per-stream copies ---------------------------------------------------------------
    def for_stream(self) -> ThresholdedScorer:
        """A copy for one stream: its online state is its own, the fixed source parts are shared
        (read-only) with this scorer and every other copy, and its ``state_dict`` leaves them out."""
        memo: dict[int, Any] = {id(o): o for o in self._fixed_objects() if o is not None}
        other = copy.deepcopy(self, memo)
        other._mark_shared(bool(memo))
        return other

    def _mark_shared(self, shared: bool) -> None:
        self.shares_fixed = shared and self.fitted

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        return None

    # -- threshold -----------------------------------------------------------------------
    @property
    def threshold(self) -> float:  # type: ignore[override]
        if self.threshold_mode == "otsu":
            return float(self.otsu.value)
        return float(self.calibrated_threshold)

    @threshold.setter
    def threshold(self, value: float) -> None:
        self.calibrated_threshold = float(value)
        self.otsu.fallback = float(value)
        if len(self.otsu.queue) < self.otsu.min_fill:
            self.otsu.value = float(value)

    def _split(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        idx = np.random.default_rng(self.seed).permutation(n)
        n_cal = int(round(self.calib_fraction * n))
        if n_cal < 20 or n - n_cal < 20:
            return idx, idx
        return idx[n_cal:], idx[:n_cal]

    @staticmethod
    def _take(x: Any, idx: np.ndarray) -> Any:
        if x is None:
            return None
        if isinstance(x, torch.Tensor):
            return x[torch.as_tensor(idx, device=x.device)]
        return np.asarray(x)[idx]

    def fit(self, features: Any, logits: Any, labels: Any | None = None) -> "ThresholdedScorer":
        """Build state on source ID data and calibrate the threshold on a held-out part of it."""
        n = len(features)
        if n == 0:
            raise ValueError(f"{type(self).__name__}.fit got zero samples")
        if logits is not None and len(logits) != n:
            raise ValueError(f"{n} feature rows but {len(logits)} logit rows")
        build, cal = self._split(n)
        self._mark_shared(False)  # a new source fit is this scorer's own
        self._fit(self._take(features, build), self._take(logits, build), self._take(labels, build))
        self.fitted = True
        self.calibrate(self._take(features, cal), self._take(logits, cal))
        self.otsu.reset()
        self.otsu.value = self.calibrated_threshold
        return self

    def calibrate(self, features: Any, logits: Any) -> float:
        """Set the threshold at ``tpr`` of the scores of ID samples ``(features, logits)``."""
        self.threshold = tpr_threshold(self.score(features, logits), self.tpr)
        return self.calibrated_threshold

    def recalibrate(self, features: Any, logits: Any, labels: Any | None = None) -> None:
        """Re-estimate state and threshold from recent trusted (ID-accepted) samples.

        ``labels`` default to the argmax of ``logits`` (pseudo-labels). The adaptive queue is
        cleared so the Otsu threshold restarts from the new calibrated value.
        """
        n = len(features)
        if n == 0:
            raise ValueError("recalibrate got zero samples")
        build, cal = self._split(n)
        self._refit(self._take(features, build), self._take(logits, build), self._take(labels, build))
        self.calibrate(self._take(features, cal), self._take(logits, cal))
        self.otsu.reset()
        self.otsu.value = self.calibrated_threshold

    def observe(self, scores: Any) -> float:
        """Feed a batch of scores to the adaptive threshold; returns the current threshold."""
        if self.threshold_mode == "otsu":
            self.otsu.update(scores)
        return self.threshold

    def score_and_flag(self, features: Any, logits: Any, observe: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, is_ood flags)`` of one batch; updates the adaptive threshold first."""
        scores = self.score(features, logits)
        if observe:
            self.observe(scores)
        return scores, self.is_ood(scores)

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(features, logits, labels) first")

    # -- persistence ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain-data state; a :meth:`for_stream` copy leaves out the shared :attr:`fixed_keys`."""
        st = {"name": self.name, "threshold": self.calibrated_threshold, "threshold_mode": self.threshold_mode,
              "otsu": self.otsu.state_dict(), "fitted": self.fitted, **self._extra_state()}
        if self.shares_fixed:
            for k in self.fixed_keys:
                st.pop(k, None)
        return st

    def _keep_shared(self, state: dict[str, Any], key: str, current: Any) -> bool:
        """Loading ``state``: True when this copy keeps its shared ``current`` value for ``key`` (the
        state leaves it out, or holds the same values, e.g. an older checkpoint); False when the state's
        own value must be loaded (then this copy no longer shares its fixed parts)."""
        if key not in state:
            if current is None:
                raise ValueError(f"{type(self).__name__} state has no {key!r} (it is shared by the copies "
                                 f"of one fitted scorer): load it into a copy of that scorer (for_stream)")
            return True
        if self.shares_fixed and current is not None and state[key] is not None:
            value = array_state(state[key])
            if value.shape == np.shape(current) and np.array_equal(value, current):
                return True
        self.shares_fixed = False
        return False

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name", self.name) != self.name:
            raise ValueError(f"state of scorer {state.get('name')!r} cannot be loaded into {self.name!r}")
        self.calibrated_threshold = float(state["threshold"])
        self.threshold_mode = state.get("threshold_mode", self.threshold_mode)
        if "otsu" in state:
            self.otsu.load_state_dict(state["otsu"])
        self.fitted = bool(state.get("fitted", True))
        self._load_extra_state(state)


def score_and_flag(scorer: OODScorer, features: Any, logits: Any, observe: bool = True) -> tuple[Any, np.ndarray]:
    """``(scores, boolean OOD flags)`` of one batch from any scorer; a :class:`ThresholdedScorer` feeds its
    adaptive (Otsu) threshold first unless ``observe`` is False (a batch scored a second time)."""
    if isinstance(scorer, ThresholdedScorer):
        scores, flags = scorer.score_and_flag(features, logits, observe=observe)
    else:
        scores = scorer.score(features, logits)
        flags = scorer.is_ood(scores)
    return scores, np.asarray(flags, dtype=bool)


class FeatureCentering:
    """``normalize(f - mu)``: optional centering on the source feature mean, then L2 norm.

    Penultimate features after a ReLU all live in the positive orthant, where cosines are crowded
    near 1; subtracting the source mean spreads them out (as SSD+/PALM standardise). ``momentum``
    > 0 tracks the mean online from trusted samples (covariate drift).
    """

    def __init__(self, center: bool = True, momentum: float = 0.0) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"center momentum must be in [0, 1), got {momentum}")
        self.center = bool(center)
        self.momentum = float(momentum)
        self.mean: np.ndarray | None = None

    def fit(self, features: Any) -> "FeatureCentering":
        f = to_numpy(features)
        self.mean = f.mean(0).astype(np.float32) if self.center else np.zeros(f.shape[1], np.float32)
        return self

    def update(self, features: Any) -> None:
        f = to_numpy(features)
        if self.center and self.momentum > 0 and len(f) and self.mean is not None:
            w = self.momentum ** len(f)
            self.mean = (w * self.mean + (1 - w) * f.mean(0)).astype(np.float32)

    def __call__(self, features: Any) -> np.ndarray:
        if self.mean is None:
            raise RuntimeError("FeatureCentering is not fitted")
        f = to_numpy(features) - self.mean
        return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)

    def state_dict(self) -> dict[str, Any]:
        return {"center": self.center, "mean": tensor_state(self.mean)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.center = bool(state["center"])
        self.mean = array_state(state["mean"], np.float32)


def confident_mask(logits: Any, accepted: Any | None, min_conf: float) -> tuple[np.ndarray, np.ndarray]:
    """``(mask, pseudo_labels)``: accepted samples whose max softmax is at least ``min_conf``."""
    p = softmax_np(logits)
    mask = p.max(1) >= min_conf
    if accepted is not None:
        mask &= to_numpy(accepted, bool).reshape(-1)
    return mask, p.argmax(1)


def gated_scores(scorer: Any, gate_scorer: Any, calibrated: bool, features: torch.Tensor, logits: torch.Tensor,
                 feed: bool = True) -> tuple[Any, Any, Any]:
    """``(scores, ood flags, keep)`` of one batch: the scorer's scores and flags, and the samples flagged by
    neither it nor the gate scorer (``feed=False``: a batch scored again). Uncalibrated: ``1 - max softmax``
    scores, no flags."""
    if not calibrated:
        scores = (1.0 - logits.softmax(1).max(1).values).numpy().astype(np.float64)
        return scores, np.zeros(len(scores), bool), np.ones(len(scores), bool)
    scores, flags = score_and_flag(scorer, features, logits, feed)
    keep = ~flags
    if gate_scorer is not None:
        keep = keep & ~score_and_flag(gate_scorer, features, logits, feed)[1]
    return scores, flags, keep
