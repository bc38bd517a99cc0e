"""Open-set bookkeeping next to any scorer: known-class prototypes + strong-OOD pool.

:class:`NovelClassDetector` keeps its own :class:`~streamtta.detectors.ood.prototypes.PrototypeMemory`
of the known classes (centred, L2-normalised penultimate features) and a
:class:`~streamtta.detectors.ood.strong_ood.StrongOODPool`. Each batch, samples that the engine's
scorer flagged OOD *and* whose cosine distance to every known prototype exceeds
``strong_threshold`` (the ``strong_quantile`` of ID hold-out distances) are offered to the pool
(OWTTT's strong OOD); a persistent cluster there raises a
:class:`~streamtta.alerts.events.NovelClusterEvent`. ``last_unknown_hits`` (fraction of the batch
closer to an unknown prototype than to every known one) is a signal for semantic-shift typing.
Confident ID-accepted samples move the known prototypes by EMA.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> known = np.abs(np.concatenate([rng.normal([4, 0, 0, 0, 0], .5, (100, 5)), rng.normal([0, 4, 0, 0, 0], .5, (100, 5))]))
>>> det = NovelClassDetector(n_per_class=2, min_cluster_size=10, persist_batches=3).fit(known, np.repeat([0, 1], 100))
>>> events = []
>>> for b in range(5):
...     new = np.abs(rng.normal([0, 0, 0, 4, 4], .3, (8, 5)))
...     events += det.update(new, np.ones(8, bool), batch_index=b)
>>> [e.batch_index for e in events], det.last_unknown_hits > 0.5
([2], True)
"""
from __future__ import annotations

from typing import Any

import numpy as np

from streamtta.alerts.events import NovelClusterEvent
from streamtta.detectors.ood.prototypes import PrototypeMemory
from streamtta.detectors.ood.scorer import FeatureCentering, confident_mask, to_numpy
from streamtta.detectors.ood.strong_ood import StrongOODPool
from streamtta.detectors.ood.thresholds import tpr_threshold


class NovelClassDetector:
    """Strong-OOD pool and novel-cluster events on top of the engine's OOD flags.

    Parameters
    ----------
    n_per_class, momentum
        Known-class prototype memory settings.
    strong_quantile
        Quantile of ID hold-out prototype distances above which a flagged sample is strong OOD.
    center
        Centre features on the source mean before normalising.
    update_min_conf
        Minimum max-softmax of an accepted sample to move a known prototype (needs logits).
    capacity, dedup_sim, cluster_sim, min_cluster_size, persist_batches
        :class:`StrongOODPool` settings.
    """

    def __init__(self, n_per_class: int = 4, momentum: float = 0.98, strong_quantile: float = 0.99,
                 center: bool = True, update_min_conf: float = 0.9, capacity: int = 100, dedup_sim: float = 0.95,
                 cluster_sim: float = 0.8, min_cluster_size: int = 20, persist_batches: int = 5,
                 calib_fraction: float = 0.2, backend: str = "auto", seed: int = 0) -> None:
        if not 0.0 < strong_quantile < 1.0:
            raise ValueError(f"strong_quantile must be in (0, 1), got {strong_quantile}")
        self.strong_quantile = float(strong_quantile)
        self.update_min_conf = float(update_min_conf)
        self.calib_fraction = float(calib_fraction)
        self.seed = int(seed)
        self.centering = FeatureCentering(center)
        self.memory = PrototypeMemory(n_per_class=n_per_class, momentum=momentum, seed=seed, backend=backend)
        self.pool = StrongOODPool(capacity=capacity, dedup_sim=dedup_sim, cluster_sim=cluster_sim,
                                  min_cluster_size=min_cluster_size, persist_batches=persist_batches, backend=backend)
        self.strong_threshold = float("inf")
        self.last_unknown_hits = 0.0
        self.fitted = False

    def fit(self, features: Any, labels: Any) -> "NovelClassDetector":
        """Build the known prototypes and the strong-OOD distance threshold from ID data."""
        f = to_numpy(features)
        y = to_numpy(labels, np.int64).reshape(-1)
        idx = np.random.default_rng(self.seed).permutation(len(f))
        n_cal = int(round(self.calib_fraction * len(f)))
        build, cal = (idx[n_cal:], idx[:n_cal]) if n_cal >= 20 and len(f) - n_cal >= 20 else (idx, idx)
        self.centering.fit(f[build])
        self.memory.fit(self.centering(f[build]), y[build])
        self.strong_threshold = tpr_threshold(self.distance(f[cal]), self.strong_quantile)
        self.pool.reset()
        self.fitted = True
        return self

    def distance(self, features: Any) -> np.ndarray:
        """Cosine distance ``1 - max cos`` to the known-class prototypes."""
        sim, _, _ = self.memory.max_similarity(self.centering(features), normalize=False)
        return 1.0 - sim

    def update(self, features: Any, flags: Any, batch_index: int, logits: Any | None = None) -> list[NovelClusterEvent]:
        """Process one batch: pool update from strong OOD, known-prototype EMA from confident ID."""
        if not self.fitted:
            raise RuntimeError("NovelClassDetector is not fitted: call fit(features, labels) first")
        z = self.centering(features)
        flags = to_numpy(flags, bool).reshape(-1)
        ksim, _, _ = self.memory.max_similarity(z, normalize=False)
        psim, _ = self.pool.similarity(z, normalize=False)
        self.last_unknown_hits = float(np.mean((psim > ksim) & (psim >= self.pool.cluster_sim))) if len(z) else 0.0
        strong = flags & (1.0 - ksim > self.strong_threshold)
        events = self.pool.update(z[strong], batch_index, known_sim=ksim[strong], normalize=False) if strong.any() else []
        if logits is not None:
            mask, pred = confident_mask(logits, ~flags, self.update_min_conf)
            if mask.any():
                self.memory.update(z[mask], pred[mask], normalize=False)
        return events

    def state_dict(self) -> dict[str, Any]:
        return {"centering": self.centering.state_dict(), "memory": self.memory.state_dict(),
                "pool": self.pool.state_dict(), "strong_threshold": self.strong_threshold,
                "last_unknown_hits": self.last_unknown_hits, "fitted": self.fitted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.centering.load_state_dict(state["centering"])
        self.memory.load_state_dict(state["memory"])
        self.pool.load_state_dict(state["pool"])
        self.strong_threshold = float(state["strong_threshold"])
        self.last_unknown_hits = float(state["last_unknown_hits"])
        self.fitted = bool(state["fitted"])
