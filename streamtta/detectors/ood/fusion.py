"""Fusion of a feature-space and a logit-space OOD score (default: Mahalanobis + energy).

Each component score is standardised with the mean and standard deviation of its scores on the
calibration (ID) data, and the fused score is the weighted sum of the standardised scores (higher
= more OOD). Feature-space distances (Mahalanobis, prototypes) and logit-space confidence (energy)
fail on different samples: a sample the classifier is confident about can still lie far from
every class in feature space, and the converse. Components are built from the single scorers of
:mod:`~streamtta.detectors.ood.members` (a fusion scorer cannot contain another one).

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> f = np.concatenate([rng.normal([3, 0, 0], 0.3, (60, 3)), rng.normal([0, 3, 0], 0.3, (60, 3))])
>>> logits = np.concatenate([np.tile([6.0, 0.0], (60, 1)), np.tile([0.0, 6.0], (60, 1))]) + rng.normal(0, .5, (120, 2))
>>> s = FusionScorer().fit(f, logits, np.repeat([0, 1], 60))
>>> bool(s.score(np.array([[0, 0, 3.0]]), np.array([[0.5, 0.4]]))[0] > s.threshold)
True
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from streamtta.detectors.ood.members import build_member
from streamtta.detectors.ood.scorer import ThresholdedScorer
from streamtta.detectors.ood.state import array_state, tensor_state


def _build(name: str, kw: dict[str, Any]) -> ThresholdedScorer:
    """One component: a single scorer that uses all the data it is given (the fused score holds out)."""
    if name == "fusion":
        raise ValueError("a fusion scorer cannot contain another fusion scorer")
    return build_member(name, calib_fraction=0.0, **kw)


class FusionScorer(ThresholdedScorer):
    """Weighted sum of standardised component scores.

    Parameters
    ----------
    components
        Single-scorer names (or ``(name, kwargs)`` pairs) from
        :data:`~streamtta.detectors.ood.members.MEMBER_SCORERS`.
    weights
        One weight per component (default: all 1).
    online
        Components whose standardisation (mean, std) tracks the recent stream by EMA in
        :meth:`partial_fit` instead of staying at the calibration values. Feature-space distances
        move with every normalisation-statistics update of the adapter; re-standardising them
        keeps the fused score balanced (the logit-space energy keeps its calibrated scale, so
        a sustained burst of unknowns still raises the fused score).
    online_momentum
        EMA momentum per batch of the online standardisation.
    **kw
        :class:`ThresholdedScorer` settings of the fused score.
    """

    name = "fusion"

    def __init__(self, components: Sequence[str | tuple[str, dict[str, Any]]] = ("mahalanobis", "energy"),
                 weights: Sequence[float] | None = None, online: Sequence[str] = ("mahalanobis",),
                 online_momentum: float = 0.9, **kw: Any) -> None:
        super().__init__(**kw)
        if not 0.0 <= online_momentum < 1.0:
            raise ValueError(f"online_momentum must be in [0, 1), got {online_momentum}")
        self.online = tuple(online)
        self.online_momentum = float(online_momentum)
        if len(components) < 1:
            raise ValueError("FusionScorer needs at least one component")
        specs = [(c, {}) if isinstance(c, str) else (c[0], dict(c[1])) for c in components]
        self.components = [_build(n, k) for n, k in specs]
        self.component_names = [n for n, _ in specs]
        self.weights = np.ones(len(specs)) if weights is None else np.asarray(weights, np.float64)
        if self.weights.shape != (len(specs),):
            raise ValueError(f"{len(self.weights)} weights for {len(specs)} components")
        unknown = set(self.online) - set(self.component_names)
        if unknown:
            raise ValueError(f"online names {sorted(unknown)} are not components {self.component_names}")
        self.loc = np.zeros(len(specs))
        self.scale = np.ones(len(specs))
        self.cal_loc = np.zeros(len(specs))
        self.cal_scale = np.ones(len(specs))

    def _fit(self, features: Any, logits: Any, labels: Any | None) -> None:
        for c in self.components:
            c._fit(features, logits, labels)
            c.fitted = True

    def _refit(self, features: Any, logits: Any, labels: Any | None) -> None:
        for c in self.components:
            c._refit(features, logits, labels)

    def calibrate(self, features: Any, logits: Any) -> float:
        """Standardise every component on these ID samples, then set the fused threshold."""
        for j, c in enumerate(self.components):
            s = c.score(features, logits)
            c.threshold = float(np.quantile(s, self.tpr))
            self.loc[j] = float(np.mean(s))
            self.scale[j] = float(max(np.std(s), 1e-12))
        self.cal_loc, self.cal_scale = self.loc.copy(), self.scale.copy()
        return super().calibrate(features, logits)

    def component_scores(self, features: Any, logits: Any) -> np.ndarray:
        """``(n, n_components)`` standardised component scores."""
        return np.stack([(c.score(features, logits) - m) / s
                         for c, m, s in zip(self.components, self.loc, self.scale)], 1)

    def score(self, features: Any, logits: Any) -> np.ndarray:
        self._check_fitted()
        return self.component_scores(features, logits) @ self.weights

    def partial_fit(self, features: Any, logits: Any, accepted: Any | None = None) -> None:
        """Update the components; ``online`` components also re-standardise on the recent batches."""
        for j, (name, c) in enumerate(zip(self.component_names, self.components)):
            c.partial_fit(features, logits, accepted)
            if name in self.online and len(features) > 1:
                s = c.score(features, logits)
                m = self.online_momentum
                # the spread of the batch relative to calibration: (mean, std) of the whole batch
                self.loc[j] = m * self.loc[j] + (1 - m) * float(np.mean(s))
                self.scale[j] = m * self.scale[j] + (1 - m) * float(max(np.std(s), 1e-12))

    def _fixed_objects(self) -> list[Any]:
        return [o for c in self.components for o in c._fixed_objects()]

    def _mark_shared(self, shared: bool) -> None:
        for c in self.components:
            c._mark_shared(shared and bool([o for o in c._fixed_objects() if o is not None]))
        super()._mark_shared(shared)

    def _extra_state(self) -> dict[str, Any]:
        return {"components": [c.state_dict() for c in self.components], "loc": tensor_state(self.loc),
                "scale": tensor_state(self.scale), "weights": tensor_state(self.weights),
                "cal_loc": tensor_state(self.cal_loc), "cal_scale": tensor_state(self.cal_scale)}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if len(state["components"]) != len(self.components):
            raise ValueError(f"state has {len(state['components'])} components, scorer has {len(self.components)}")
        for c, st in zip(self.components, state["components"]):
            c.load_state_dict(st)
        self.loc = array_state(state["loc"], np.float64)
        self.scale = array_state(state["scale"], np.float64)
        self.weights = array_state(state["weights"], np.float64)
        self.cal_loc = array_state(state.get("cal_loc", self.loc), np.float64)
        self.cal_scale = array_state(state.get("cal_scale", self.scale), np.float64)
