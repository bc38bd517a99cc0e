"""kNN OOD score (Sun et al., ICML 2022): distance to the k-th nearest source feature.

Features are centred and L2-normalised; a bounded reservoir of source features lives in a FAISS
``IndexIDMap2(IndexFlatIP)`` (reservoir slot = id). Score = ``sqrt(2 - 2 cos_k)``, the Euclidean
distance between unit vectors to the k-th neighbour; higher = more OOD. With ``online=True``,
confident ID-accepted samples enter the reservoir by reservoir sampling (Vitter's algorithm R).

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> f = np.abs(np.concatenate([rng.normal([3, 0, 0, 0], 0.4, (100, 4)), rng.normal([0, 3, 0, 0], 0.4, (100, 4))]))
>>> s = KNNScorer(k=5).fit(f, None)
>>> bool(s.score(np.array([[0, 0, 3.0, 3.0]]), None)[0] > s.threshold)
True
"""
from __future__ import annotations

from typing import Any

import numpy as np

from streamtta.detectors.ood.index import FlatIPIndex
from streamtta.detectors.ood.scorer import FeatureCentering, ThresholdedScorer, confident_mask
from streamtta.detectors.ood.state import array_state, tensor_state


class KNNScorer(ThresholdedScorer):
    """k-th nearest-neighbour distance over a bounded reservoir of normalised source features.

    Parameters
    ----------
    k
        Which neighbour.
    reservoir_size
        Maximum number of stored features.
    center
        Centre features on the source mean before normalising.
    online
        Add confident accepted samples by reservoir sampling in :meth:`partial_fit`.
    update_min_conf
        Minimum max-softmax for online insertion.
    """

    name = "knn"

    def __init__(self, k: int = 10, reservoir_size: int = 4096, center: bool = True, online: bool = False,
                 update_min_conf: float = 0.9, backend: str = "auto", device: Any = None, **kw: Any) -> None:
        super().__init__(**kw)
        if k < 1 or reservoir_size < k:
            raise ValueError(f"need 1 <= k <= reservoir_size, got k={k}, reservoir_size={reservoir_size}")
        self.k = int(k)
        self.reservoir_size = int(reservoir_size)
        self.online = bool(online)
        self.update_min_conf = float(update_min_conf)
        self.backend, self.device = backend, device
        self.centering = FeatureCentering(center)
        self.bank: np.ndarray | None = None
        self.n_seen = 0
        self.index: FlatIPIndex | None = None
        self._rng = np.random.default_rng(self.seed)

    def _rebuild(self) -> None:
        self.index = FlatIPIndex(self.bank.shape[1], self.backend, self.device)
        self.index.upsert(np.arange(len(self.bank)), self.bank)

    def _fit(self, features: Any, logits: Any, labels: Any | None) -> None:
        self.centering.fit(features)
        z = self.centering(features)
        if len(z) > self.reservoir_size:
            z = z[self._rng.choice(len(z), self.reservoir_size, replace=False)]
        self.bank = z.astype(np.float32)
        self.n_seen = len(features)
        self._rebuild()

    def _insert(self, z: np.ndarray) -> None:
        slots = []
        for v in z:
            self.n_seen += 1
            if len(self.bank) < self.reservoir_size:
                self.bank = np.concatenate([self.bank, v[None]])
                slots.append(len(self.bank) - 1)
            else:
                j = int(self._rng.integers(self.n_seen))
                if j >= self.reservoir_size:
                    continue
                self.bank[j] = v
                slots.append(j)
        if slots:
            last = {s: i for i, s in enumerate(slots)}  # last write per slot wins
            ids = np.fromiter(last.keys(), np.int64)
            self.index.upsert(ids, self.bank[ids])

    def _refit(self, features: Any, logits: Any, labels: Any | None) -> None:
        """Replace random reservoir slots (at most half) with the recent trusted features."""
        self._check_fitted()
        z = self.centering(features)
        n = min(len(z), len(self.bank) // 2)
        slots = self._rng.choice(len(self.bank), n, replace=False)
        self.bank[slots] = z[self._rng.choice(len(z), n, replace=False)]
        self.index.upsert(slots, self.bank[slots])

    def score(self, features: Any, logits: Any) -> np.ndarray:
        self._check_fitted()
        sims, _ = self.index.search(self.centering(features), self.k)
        cos_k = sims[:, -1].astype(np.float64)
        cos_k = np.where(np.isfinite(cos_k), cos_k, -1.0)  # fewer than k stored: treat as far
        return np.sqrt(np.maximum(2.0 - 2.0 * cos_k, 0.0))

    def partial_fit(self, features: Any, logits: Any, accepted: Any | None = None) -> None:
        if not (self.online and self.fitted) or logits is None:
            return
        mask, _ = confident_mask(logits, accepted, self.update_min_conf)
        if mask.any():
            self._insert(self.centering(features)[mask])

    def _extra_state(self) -> dict[str, Any]:
        return {"bank": tensor_state(self.bank), "n_seen": self.n_seen,
                "centering": self.centering.state_dict(), "rng": self._rng.bit_generator.state}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.centering.load_state_dict(state["centering"])
        self.n_seen = int(state["n_seen"])
        self._rng.bit_generator.state = state["rng"]
        self.bank = array_state(state["bank"], np.float32)
        if self.bank is not None:
            self._rebuild()
