"""Prototype-cosine OOD score: ``1 - max cos(z, p)`` over the known-class prototypes.

Features are centred on the source mean and L2-normalised (:class:`FeatureCentering`), then
compared with a :class:`~streamtta.detectors.ood.prototypes.PrototypeMemory` (several k-means
prototypes per class in a FAISS ``IndexIDMap2(IndexFlatIP)``). ``partial_fit`` moves the prototypes
by EMA towards confident ID-accepted samples, so the memory follows covariate drift while OOD
samples (never accepted) do not leak in. This is OWTTT's OOD score with PALM-style multiple
prototypes per class.

``mode="predicted"`` compares with the prototypes of the classifier's predicted class only, so a
sample that the classifier puts in a class whose prototypes it does not resemble scores high.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> f = np.abs(np.concatenate([rng.normal([3, 0, 0, 0], 0.4, (80, 4)), rng.normal([0, 3, 0, 0], 0.4, (80, 4))]))
>>> s = PrototypeScorer(n_per_class=2).fit(f, None, np.repeat([0, 1], 80))
>>> bool(s.score(np.array([[0, 0, 3.0, 3.0]]), None)[0] > s.threshold)
True
"""
from __future__ import annotations

from typing import Any

import numpy as np

from streamtta.detectors.ood.prototypes import PrototypeMemory
from streamtta.detectors.ood.scorer import FeatureCentering, ThresholdedScorer, confident_mask, softmax_np, to_numpy

MODES = ("max", "predicted")


class PrototypeScorer(ThresholdedScorer):
    """Cosine distance to the nearest known-class prototype (higher = more OOD).

    Parameters
    ----------
    n_per_class, max_per_class, momentum, spawn_below
        Prototype memory settings (see :class:`PrototypeMemory`).
    center
        Centre features on the source mean before normalising.
    center_momentum
        EMA momentum of the centre from accepted samples (0 = frozen).
    mode
        ``"max"`` (all known prototypes) or ``"predicted"`` (prototypes of the argmax class).
    update_min_conf
        Minimum max-softmax of an accepted sample to move a prototype.
    agree
        Only update from samples whose predicted class equals the nearest prototype's class.
    backend, device
        Search backend of the memory.
    **kw
        :class:`ThresholdedScorer` settings (``tpr``, ``threshold_mode``, ``calib_fraction``...).
    """

    name = "prototype"

    def __init__(self, n_per_class: int = 4, max_per_class: int | None = None, momentum: float = 0.98,
                 spawn_below: float | None = None, center: bool = True, center_momentum: float = 0.0,
                 mode: str = "max", update_min_conf: float = 0.9, agree: bool = True,
                 min_per_prototype: int = 10, backend: str = "auto", device: Any = None, **kw: Any) -> None:
        super().__init__(**kw)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.update_min_conf = float(update_min_conf)
        self.agree = bool(agree)
        self.centering = FeatureCentering(center, center_momentum)
        self.memory = PrototypeMemory(n_per_class=n_per_class, max_per_class=max_per_class, momentum=momentum,
                                      spawn_below=spawn_below, min_per_prototype=min_per_prototype,
                                      seed=self.seed, backend=backend, device=device)

    @staticmethod
    def _labels(labels: Any | None, logits: Any | None) -> np.ndarray:
        if labels is not None:
            return to_numpy(labels, np.int64).reshape(-1)
        if logits is None:
            raise ValueError("PrototypeScorer needs labels or logits (for pseudo-labels)")
        return softmax_np(logits).argmax(1)

    def _fit(self, features: Any, logits: Any, labels: Any | None) -> None:
        self.centering.fit(features)
        self.memory.fit(self.centering(features), self._labels(labels, logits))

    def _refit(self, features: Any, logits: Any, labels: Any | None) -> None:
        """Rebuild the prototypes of every class with enough (pseudo-labelled) samples.

        Classes with fewer than ``min_per_prototype`` samples in ``features`` keep their current
        prototypes; the centre is kept so old and new prototypes stay comparable.
        """
        self._check_fitted()
        y = self._labels(labels, logits)
        z = self.centering(features)
        mem = self.memory
        vecs, cls = [], []
        for c in mem.known_classes:
            zc = z[y == c]
            if len(zc) >= mem.min_per_prototype:
                rebuilt = PrototypeMemory(n_per_class=mem.n_per_class, min_per_prototype=mem.min_per_prototype,
                                          seed=self.seed, backend="torch").fit(zc, np.full(len(zc), c))
                vecs.append(rebuilt.vectors_)
            else:
                vecs.append(mem.vectors_[mem.classes_ == c])
            cls.append(np.full(len(vecs[-1]), c, np.int64))
        vecs_a, cls_a = np.concatenate(vecs), np.concatenate(cls)
        n = len(vecs_a)
        mem.load_state_dict({"dim": mem.dim, "ids": np.arange(n, dtype=np.int64), "classes": cls_a,
                             "vectors": vecs_a, "counts": np.zeros(n), "next_id": n, "n_updates": mem.n_updates_})

    def score(self, features: Any, logits: Any) -> np.ndarray:
        self._check_fitted()
        z = self.centering(features)
        if self.mode == "max" or logits is None:
            sim, _, _ = self.memory.max_similarity(z, normalize=False)
            return 1.0 - sim
        sims, known = self.memory.class_similarity(z, normalize=False)
        pred = softmax_np(logits).argmax(1)
        col = np.searchsorted(known, pred)
        col = np.clip(col, 0, len(known) - 1)
        hit = known[col] == pred
        sim = np.where(hit, sims[np.arange(len(z)), col], sims.max(1))
        return 1.0 - sim

    def partial_fit(self, features: Any, logits: Any, accepted: Any | None = None) -> None:
        """EMA-update prototypes (and centre) from confident ID-accepted samples."""
        if not self.fitted or logits is None:
            return
        mask, pred = confident_mask(logits, accepted, self.update_min_conf)
        if not mask.any():
            return
        z = self.centering(features)[mask]
        pred = pred[mask]
        if self.agree:
            _, near_cls, _ = self.memory.max_similarity(z, normalize=False)
            ok = near_cls == pred
            z, pred = z[ok], pred[ok]
            mask_idx = np.flatnonzero(mask)[ok]
        else:
            mask_idx = np.flatnonzero(mask)
        if len(z):
            self.memory.update(z, pred, normalize=False)
            self.centering.update(to_numpy(features)[mask_idx])

    def _extra_state(self) -> dict[str, Any]:
        return {"memory": self.memory.state_dict(), "centering": self.centering.state_dict()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.memory.load_state_dict(state["memory"])
        self.centering.load_state_dict(state["centering"])
