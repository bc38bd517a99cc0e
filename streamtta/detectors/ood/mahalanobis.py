"""Class-conditional Gaussians with a shared (tied) covariance on features (Lee et al. 2018).

Score = ``min_c (f - mu_c)^T Sigma^-1 (f - mu_c)`` on L2-normalised features (as SSD+/PALM and
Mahalanobis++ recommend); higher = more OOD. The covariance is shrunk towards
``trace/d * I`` by ``shrinkage`` so small hold-outs stay well conditioned.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> f = np.concatenate([rng.normal([3, 0, 0], 0.3, (60, 3)), rng.normal([0, 3, 0], 0.3, (60, 3))])
>>> s = MahalanobisScorer().fit(f, None, np.repeat([0, 1], 60))
>>> bool(s.score(np.array([[0, 0, 3.0]]), None)[0] > s.threshold)
True
"""
from __future__ import annotations

from typing import Any

import numpy as np

from streamtta.detectors.ood.scorer import ThresholdedScorer, confident_mask, softmax_np, to_numpy
from streamtta.detectors.ood.state import array_state, tensor_state


class MahalanobisScorer(ThresholdedScorer):
    """Tied-covariance Mahalanobis distance to the nearest class mean.

    Parameters
    ----------
    normalize
        L2-normalise features first.
    shrinkage
        Covariance shrinkage towards ``trace/d * I`` (0..1).
    momentum
        EMA momentum for online class-mean updates from confident accepted samples (0 = frozen).
    update_min_conf
        Minimum max-softmax of a sample used for online updates.
    """

    name = "mahalanobis"
    fixed_keys = ("classes", "precision")

    def __init__(self, normalize: bool = True, shrinkage: float = 0.05, momentum: float = 0.0,
                 update_min_conf: float = 0.9, min_class_samples: int = 5, **kw: Any) -> None:
        super().__init__(**kw)
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
        self.normalize = bool(normalize)
        self.shrinkage = float(shrinkage)
        self.momentum = float(momentum)
        self.update_min_conf = float(update_min_conf)
        self.min_class_samples = int(min_class_samples)
        self.classes: np.ndarray | None = None
        self.means: np.ndarray | None = None
        self.precision: np.ndarray | None = None

    def _prep(self, features: Any) -> np.ndarray:
        f = to_numpy(features, np.float64)
        if self.normalize:
            f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        return f

    @staticmethod
    def _labels(labels: Any | None, logits: Any | None) -> np.ndarray:
        if labels is not None:
            return to_numpy(labels, np.int64).reshape(-1)
        if logits is None:
            raise ValueError("MahalanobisScorer needs labels or logits (for pseudo-labels)")
        return softmax_np(logits).argmax(1)

    def _fit(self, features: Any, logits: Any, labels: Any | None) -> None:
        f = self._prep(features)
        y = self._labels(labels, logits)
        f, y = f[y >= 0], y[y >= 0]  # negative labels mark unknown / unlabelled rows
        if len(f) == 0:
            raise ValueError("MahalanobisScorer.fit got no labelled (label >= 0) samples")
        self.classes = np.unique(y)
        self.means = np.stack([f[y == c].mean(0) for c in self.classes])
        centred = f - self.means[np.searchsorted(self.classes, y)]
        cov = centred.T @ centred / max(len(f) - 1, 1)
        d = cov.shape[0]
        cov = (1 - self.shrinkage) * cov + self.shrinkage * np.trace(cov) / d * np.eye(d)
        self.precision = np.linalg.pinv(cov)

    def _refit(self, features: Any, logits: Any, labels: Any | None) -> None:
        self._check_fitted()
        f = self._prep(features)
        y = self._labels(labels, logits)
        for j, c in enumerate(self.classes):
            if (y == c).sum() >= self.min_class_samples:
                self.means[j] = f[y == c].mean(0)

    def score(self, features: Any, logits: Any) -> np.ndarray:
        self._check_fitted()
        f = self._prep(features)
        fp = f @ self.precision
        d2 = (fp * f).sum(1)[:, None] - 2 * fp @ self.means.T + ((self.means @ self.precision) * self.means).sum(1)[None]
        return np.maximum(d2.min(1), 0.0)

    def partial_fit(self, features: Any, logits: Any, accepted: Any | None = None) -> None:
        if self.momentum <= 0 or not self.fitted:
            return
        mask, pred = confident_mask(logits, accepted, self.update_min_conf)
        f = self._prep(features)[mask]
        pred = pred[mask]
        for j, c in enumerate(self.classes):
            sel = pred == c
            if sel.any():
                w = self.momentum ** int(sel.sum())
                self.means[j] = w * self.means[j] + (1 - w) * f[sel].mean(0)

    def _fixed_objects(self) -> list[Any]:
        return [self.classes, self.precision]  # fixed by the source fit; the class means move online

    def _extra_state(self) -> dict[str, Any]:
        shared = self.shares_fixed
        return {"classes": None if shared else tensor_state(self.classes), "means": tensor_state(self.means),
                "precision": None if shared else tensor_state(self.precision)}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Class means from the state; classes and precision too unless this copy keeps the shared ones."""
        keep = [self._keep_shared(state, k, getattr(self, k)) for k in self.fixed_keys]
        if not all(keep):  # one of them differs: both come from the state
            self.classes = array_state(state["classes"], np.int64)
            self.precision = array_state(state["precision"], np.float64)
        self.means = array_state(state["means"], np.float64)
