"""Prototype memory: several unit-norm prototypes per known class, searched with FAISS.

Built from source features with spherical k-means per class (``faiss.Kmeans``), updated online by
an exponential moving average (EMA) from confident, ID-accepted samples:
``p <- normalize(m**n * p + (1 - m**n) * mean(z))`` for the ``n`` samples assigned to ``p`` (the
nearest prototype of the sample's pseudo-label). Optionally a far-away confident sample spawns a
new prototype of its class, up to ``max_per_class`` (the memory is bounded).

The arrays (``ids``, ``classes``, ``vectors``, ``counts``) are the state; the FAISS
``IndexIDMap2(IndexFlatIP)`` (or torch matrix on GPU) is rebuilt from them on load.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> feats = np.concatenate([rng.normal(5, 1, (40, 8)) * [1, 0, 0, 0, 0, 0, 0, 1],
...                         rng.normal(5, 1, (40, 8)) * [0, 1, 0, 0, 0, 0, 1, 0]]).astype("float32")
>>> labels = np.repeat([0, 1], 40)
>>> mem = PrototypeMemory(n_per_class=2, seed=0).fit(feats, labels)
>>> len(mem), mem.classes_.tolist()
(4, [0, 0, 1, 1])
>>> sim, cls, _ = mem.max_similarity(feats[:3])
>>> cls.tolist()
[0, 0, 0]
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from streamtta.detectors.ood.index import HAVE_FAISS, FlatIPIndex, as_float32, l2_normalize
from streamtta.detectors.ood.state import array_state, tensor_state

if HAVE_FAISS:
    import faiss  # type: ignore


def spherical_kmeans(x: np.ndarray, k: int, n_iter: int = 25, seed: int = 0) -> np.ndarray:
    """``k`` unit-norm centroids of the unit vectors ``x`` (FAISS k-means, torch fallback)."""
    x = l2_normalize(x)
    k = int(max(1, min(k, len(x))))
    if k == 1:
        return l2_normalize(x.mean(0, keepdims=True))
    if HAVE_FAISS:
        km = faiss.Kmeans(x.shape[1], k, niter=n_iter, spherical=True, seed=int(seed), verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=100_000)
        km.train(x)
        return l2_normalize(km.centroids)
    rng = np.random.default_rng(seed)  # pragma: no cover - only without faiss
    cent = x[rng.choice(len(x), k, replace=False)]
    for _ in range(n_iter):
        assign = (x @ cent.T).argmax(1)
        for j in range(k):
            if (assign == j).any():
                cent[j] = x[assign == j].mean(0)
        cent = l2_normalize(cent)
    return cent


class PrototypeMemory:
    """Bounded multi-prototype memory of the known classes.

    Parameters
    ----------
    n_per_class
        Prototypes per class built by :meth:`fit` (fewer when a class has few samples).
    max_per_class
        Upper bound per class once online spawning is enabled (default ``2 * n_per_class``).
    momentum
        EMA momentum ``m`` of the online update (per assigned sample).
    spawn_below
        A confident sample whose cosine to its class' nearest prototype is below this value spawns
        a new prototype (``None`` disables spawning).
    min_per_prototype
        :meth:`fit` uses at most ``n_samples_of_class // min_per_prototype`` prototypes.
    kmeans_iter, seed
        k-means iterations and seed.
    backend, device
        Search backend (see :class:`~streamtta.detectors.ood.index.FlatIPIndex`).
    """

    def __init__(
        self,
        n_per_class: int = 4,
        max_per_class: int | None = None,
        momentum: float = 0.98,
        spawn_below: float | None = None,
        min_per_prototype: int = 10,
        kmeans_iter: int = 25,
        seed: int = 0,
        backend: str = "auto",
        device: str | torch.device | None = None,
    ) -> None:
        if n_per_class < 1:
            raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.n_per_class = int(n_per_class)
        self.max_per_class = int(max_per_class) if max_per_class is not None else 2 * self.n_per_class
        if self.max_per_class < self.n_per_class:
            raise ValueError(f"max_per_class={max_per_class} < n_per_class={n_per_class}")
        self.momentum = float(momentum)
        self.spawn_below = spawn_below
        self.min_per_prototype = int(max(1, min_per_prototype))
        self.kmeans_iter = int(kmeans_iter)
        self.seed = int(seed)
        self.backend = backend
        self.device = device
        self._clear(dim=None)

    def _clear(self, dim: int | None) -> None:
        self.dim: int | None = dim
        self.ids_ = np.empty(0, np.int64)
        self.classes_ = np.empty(0, np.int64)
        self.vectors_ = np.empty((0, dim or 0), np.float32)
        self.counts_ = np.empty(0, np.float64)
        self.next_id_ = 0
        self.n_updates_ = 0
        self.index: FlatIPIndex | None = FlatIPIndex(dim, self.backend, self.device) if dim else None

    def __len__(self) -> int:
        return len(self.ids_)

    @property
    def known_classes(self) -> np.ndarray:
        return np.unique(self.classes_)

    # -- building ------------------------------------------------------------------------
    def fit(self, features: Any, labels: Any) -> "PrototypeMemory":
        """Build the prototypes of every class present in ``labels`` (replaces any old state).

        Rows with a negative label (unknown / unlabelled) are ignored.
        """
        x = l2_normalize(features)
        y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64).reshape(-1)
        if len(x) != len(y):
            raise ValueError(f"{len(x)} feature rows for {len(y)} labels")
        x, y = x[y >= 0], y[y >= 0]  # negative labels mark unknown / unlabelled rows
        if len(x) == 0:
            raise ValueError("cannot fit a prototype memory on zero labelled samples")
        self._clear(dim=x.shape[1])
        vecs, classes = [], []
        for c in np.unique(y):
            xc = x[y == c]
            k = min(self.n_per_class, max(1, len(xc) // self.min_per_prototype))
            cent = spherical_kmeans(xc, k, self.kmeans_iter, self.seed + int(c))
            vecs.append(cent)
            classes.append(np.full(len(cent), c, np.int64))
        self._add(np.concatenate(vecs), np.concatenate(classes))
        return self

    def _add(self, vecs: np.ndarray, classes: np.ndarray) -> np.ndarray:
        ids = np.arange(self.next_id_, self.next_id_ + len(vecs), dtype=np.int64)
        self.next_id_ += len(vecs)
        self.ids_ = np.concatenate([self.ids_, ids])
        self.classes_ = np.concatenate([self.classes_, classes.astype(np.int64)])
        self.vectors_ = np.concatenate([self.vectors_, vecs.astype(np.float32)])
        self.counts_ = np.concatenate([self.counts_, np.zeros(len(vecs))])
        self.index.upsert(ids, vecs)
        return ids

    def _require(self) -> None:
        if self.index is None or len(self) == 0:
            raise RuntimeError("the prototype memory is empty: call fit(features, labels) first")

    # -- queries -------------------------------------------------------------------------
    def search(self, z: Any, k: int = 1, normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` cosine similarities and prototype ids for each row of ``z``."""
        self._require()
        q = l2_normalize(z) if normalize else as_float32(z)
        return self.index.search(q, min(k, len(self)))

    def class_of(self, ids: Any) -> np.ndarray:
        """Class of each prototype id (``-1`` for ``-1`` padding)."""
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(self.ids_)
        pos = np.searchsorted(self.ids_[order], ids)
        pos = np.clip(pos, 0, len(order) - 1)
        cls = self.classes_[order][pos]
        return np.where(self.ids_[order][pos] == ids, cls, -1)

    def max_similarity(self, z: Any, normalize: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(max cosine, its class, its prototype id)`` per row of ``z``."""
        sims, ids = self.search(z, 1, normalize)
        return sims[:, 0].astype(np.float64), self.class_of(ids[:, 0]), ids[:, 0]

    def class_similarity(self, z: Any, normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``(n, C)`` max cosine to each known class' prototypes and the ``C`` class labels."""
        self._require()
        sims, ids = self.search(z, len(self), normalize)
        cls = self.class_of(ids)
        known = self.known_classes
        out = np.full((len(sims), len(known)), -np.inf)
        for j, c in enumerate(known):
            out[:, j] = np.where(cls == c, sims, -np.inf).max(1)
        return out, known

    # -- online update -------------------------------------------------------------------
    def update(self, z: Any, labels: Any, normalize: bool = True) -> dict[str, int]:
        """EMA-update prototypes from (already trusted) samples ``z`` with pseudo-labels ``labels``.

        Each sample moves the nearest prototype of its own class; classes unknown to the memory
        are ignored. Returns ``{"updated": n_prototypes_moved, "spawned": n_new}``.
        """
        self._require()
        x = l2_normalize(z) if normalize else as_float32(z)
        y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64).reshape(-1)
        if len(x) != len(y):
            raise ValueError(f"{len(x)} feature rows for {len(y)} labels")
        keep = np.isin(y, self.classes_)
        x, y = x[keep], y[keep]
        if len(x) == 0:
            return {"updated": 0, "spawned": 0}
        # similarity to every prototype; restrict to the sample's class
        sims = x @ self.vectors_.T  # (n, N), N is small
        same = y[:, None] == self.classes_[None, :]
        sims_same = np.where(same, sims, -np.inf)
        near = sims_same.argmax(1)
        near_sim = sims_same[np.arange(len(x)), near]
        spawned = 0
        if self.spawn_below is not None:
            far = near_sim < self.spawn_below
            for c in np.unique(y[far]):
                room = self.max_per_class - int((self.classes_ == c).sum())
                if room <= 0:
                    continue
                cand = np.flatnonzero(far & (y == c))
                cand = cand[np.argsort(near_sim[cand])][:1]  # the farthest one, one per class/batch
                self._add(x[cand], np.full(len(cand), c, np.int64))
                spawned += len(cand)
                far[cand] = False
                near[cand] = -1
        rows = near >= 0
        changed = []
        m = self.momentum
        for j in np.unique(near[rows]):
            members = x[rows][near[rows] == j]
            w = m ** len(members)
            v = w * self.vectors_[j] + (1.0 - w) * members.mean(0)
            self.vectors_[j] = v / max(np.linalg.norm(v), 1e-12)
            self.counts_[j] += len(members)
            changed.append(j)
        if changed:
            changed = np.asarray(changed)
            self.index.upsert(self.ids_[changed], self.vectors_[changed])
        self.n_updates_ += 1
        return {"updated": len(changed), "spawned": spawned}

    # -- persistence ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "ids": tensor_state(self.ids_),
            "classes": tensor_state(self.classes_),
            "vectors": tensor_state(self.vectors_),
            "counts": tensor_state(self.counts_),
            "next_id": int(self.next_id_),
            "n_updates": int(self.n_updates_),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        dim = state["dim"]
        self._clear(dim=int(dim) if dim else None)
        if not dim:
            return
        self.ids_ = array_state(state["ids"], np.int64)
        self.classes_ = array_state(state["classes"], np.int64)
        self.vectors_ = array_state(state["vectors"], np.float32).reshape(-1, int(dim))
        self.counts_ = array_state(state["counts"], np.float64)
        if not (len(self.ids_) == len(self.classes_) == len(self.vectors_) == len(self.counts_)):
            raise ValueError("inconsistent prototype state: ids/classes/vectors/counts lengths differ")
        self.next_id_ = int(state["next_id"])
        self.n_updates_ = int(state.get("n_updates", 0))
        self.index.upsert(self.ids_, self.vectors_)
