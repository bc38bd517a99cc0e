"""Strong-OOD pool: far-away unknown samples become "unknown" prototypes (OWTTT), bounded FIFO.

A sample enters the pool when the caller marks it as *strong* OOD (e.g. its OOD score is above a
high quantile of ID scores) **and** it is not a near-duplicate of an entry already there: its cosine
to every pool entry is below ``dedup_sim``, or, with ``add_rule="otsu"``, its distance to the
nearest known or pool prototype is above a second Otsu threshold over this batch's candidates
(OWTTT's ``ts_pro``). The pool keeps at most ``capacity`` entries; the oldest leaves first.

Novel clusters: pool entries linked by cosine ``>= cluster_sim`` form clusters (connected
components). A cluster holding at least ``min_cluster_size`` strong-OOD samples (its entries plus
the later samples that fell within ``cluster_sim`` of them, "hits") and active over at least
``persist_batches`` batches raises one
:class:`~streamtta.alerts.events.NovelClusterEvent`; it is not reported again while its
centroid stays within ``cluster_sim`` of a reported one.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> pool = StrongOODPool(capacity=50, min_cluster_size=4, persist_batches=3)
>>> centre = np.eye(8, dtype="float32")[5]
>>> events = []
>>> for b in range(4):
...     z = centre + rng.normal(0, 0.05, (6, 8)).astype("float32")
...     events += pool.update(z, batch_index=b)
>>> [e.batch_index for e in events], len(pool) <= 50
([2], True)
"""
from __future__ import annotations

from typing import Any

import numpy as np

from streamtta.alerts.events import NovelClusterEvent
from streamtta.detectors.ood.index import FlatIPIndex, l2_normalize
from streamtta.detectors.ood.state import array_state, tensor_state
from streamtta.detectors.ood.thresholds import otsu_threshold


class StrongOODPool:
    """Bounded FIFO pool of unknown-class prototypes (unit vectors) with novel-cluster events.

    Parameters
    ----------
    capacity
        Maximum number of pool entries (FIFO eviction).
    dedup_sim
        A candidate whose cosine to an existing pool entry is at least this is not added (it only
        counts as a hit of that entry).
    add_rule
        ``"dedup"`` (only ``dedup_sim``) or ``"otsu"`` (also OWTTT's second Otsu threshold).
    cluster_sim
        Cosine linking two entries of one cluster; also the "hit" radius of an entry.
    min_cluster_size, persist_batches
        Size and activity span (in batches) a cluster needs before it is reported.
    max_reported
        How many reported cluster centroids are remembered (FIFO).
    """

    def __init__(self, capacity: int = 100, dedup_sim: float = 0.95, add_rule: str = "dedup",
                 cluster_sim: float = 0.8, min_cluster_size: int = 5, persist_batches: int = 3,
                 max_reported: int = 32, backend: str = "auto", device: Any = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if add_rule not in ("dedup", "otsu"):
            raise ValueError(f"add_rule must be 'dedup' or 'otsu', got {add_rule!r}")
        if min_cluster_size < 1 or persist_batches < 1:
            raise ValueError("min_cluster_size and persist_batches must be >= 1")
        self.capacity = int(capacity)
        self.dedup_sim = float(dedup_sim)
        self.add_rule = add_rule
        self.cluster_sim = float(cluster_sim)
        self.min_cluster_size = int(min_cluster_size)
        self.persist_batches = int(persist_batches)
        self.max_reported = int(max_reported)
        self.backend, self.device = backend, device
        self.reset()

    def reset(self) -> None:
        self.dim: int | None = None
        self.index: FlatIPIndex | None = None
        self.ids = np.empty(0, np.int64)
        self.vectors = np.empty((0, 0), np.float32)
        self.birth = np.empty(0, np.int64)  # batch index an entry was added
        self.last_seen = np.empty(0, np.int64)  # last batch it was added or hit
        self.hits = np.empty(0, np.int64)
        self.next_id = 0
        self.reported = np.empty((0, 0), np.float32)
        self.n_events = 0

    def __len__(self) -> int:
        return len(self.ids)

    def _init(self, dim: int) -> None:
        self.dim = dim
        self.index = FlatIPIndex(dim, self.backend, self.device)
        self.vectors = np.empty((0, dim), np.float32)
        self.reported = np.empty((0, dim), np.float32)

    # -- queries -------------------------------------------------------------------------
    def similarity(self, z: Any, normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``(max cosine to the pool, nearest pool id)`` per row; ``(-1, -1)`` when empty."""
        q = l2_normalize(z) if normalize else np.asarray(z, np.float32)
        if len(self) == 0:
            return np.full(len(q), -1.0), np.full(len(q), -1, np.int64)
        sims, ids = self.index.search(q, 1)
        return sims[:, 0].astype(np.float64), ids[:, 0]

    # -- online update -------------------------------------------------------------------
    def update(self, candidates: Any, batch_index: int, known_sim: Any | None = None,
               normalize: bool = True) -> list[NovelClusterEvent]:
        """Offer this batch's strong-OOD samples; returns the novel-cluster events it triggers.

        ``known_sim`` (max cosine of each candidate to the known-class prototypes) orders the
        candidates farthest-first and feeds the Otsu rule; without it they keep their order.
        """
        z = l2_normalize(candidates) if normalize else np.asarray(candidates, np.float32)
        if len(z) == 0:
            return []
        if self.dim is None:
            self._init(z.shape[1])
        elif z.shape[1] != self.dim:
            raise ValueError(f"candidates have dimension {z.shape[1]}, pool has {self.dim}")
        ksim = np.full(len(z), -1.0) if known_sim is None else np.asarray(known_sim, np.float64).reshape(-1)
        order = np.argsort(ksim, kind="stable")  # farthest from the known classes first
        z, ksim = z[order], ksim[order]
        psim, pid = self.similarity(z, normalize=False)
        # hits: candidates inside the radius of an existing entry
        hit = psim >= self.cluster_sim
        if hit.any():
            pos = np.searchsorted(self.ids, pid[hit])
            self.last_seen[pos] = batch_index
            np.add.at(self.hits, pos, 1)
        cut = -np.inf
        if self.add_rule == "otsu" and len(z) >= 4:
            dist = 1.0 - np.maximum(ksim, psim)
            cut = otsu_threshold(dist)
        ok = (psim < self.dedup_sim) & ((1.0 - np.maximum(ksim, psim)) >= cut)
        cand = np.flatnonzero(ok)
        if len(cand):
            gram = z[cand] @ z[cand].T
            keep: list[int] = []
            for j in range(len(cand)):  # greedy de-duplication within the batch, farthest first
                if not keep or float(gram[j, keep].max()) < self.dedup_sim:
                    keep.append(j)
            self._append(z[cand[keep]], batch_index)
        return self._clusters(batch_index)

    def _append(self, vecs: np.ndarray, batch_index: int) -> None:
        n = len(vecs)
        ids = np.arange(self.next_id, self.next_id + n, dtype=np.int64)
        self.next_id += n
        self.ids = np.concatenate([self.ids, ids])
        self.vectors = np.concatenate([self.vectors, vecs.astype(np.float32)])
        self.birth = np.concatenate([self.birth, np.full(n, batch_index, np.int64)])
        self.last_seen = np.concatenate([self.last_seen, np.full(n, batch_index, np.int64)])
        self.hits = np.concatenate([self.hits, np.zeros(n, np.int64)])
        self.index.upsert(ids, vecs)
        over = len(self.ids) - self.capacity
        if over > 0:  # FIFO: ids are increasing, the first rows are the oldest
            self.index.remove(self.ids[:over])
            for name in ("ids", "vectors", "birth", "last_seen", "hits"):
                setattr(self, name, getattr(self, name)[over:])

    def _components(self) -> list[np.ndarray]:
        """Connected components of the graph linking entries with cosine >= ``cluster_sim``."""
        from scipy.sparse import csr_matrix
        from scipy.sparse.csgraph import connected_components

        adj = (self.vectors @ self.vectors.T) >= self.cluster_sim
        n_comp, lab = connected_components(csr_matrix(adj), directed=False)
        return [np.flatnonzero(lab == c) for c in range(n_comp)]

    def _clusters(self, batch_index: int) -> list[NovelClusterEvent]:
        if len(self) == 0:
            return []
        events = []
        for members in self._components():
            mass = int(len(members) + self.hits[members].sum())
            if mass < self.min_cluster_size:
                continue
            span = int(self.last_seen[members].max() - self.birth[members].min()) + 1
            if span < self.persist_batches:
                continue
            c = self.vectors[members].mean(0)
            c = c / max(np.linalg.norm(c), 1e-12)
            if len(self.reported) and float((self.reported @ c).max()) >= self.cluster_sim:
                continue
            self.reported = np.concatenate([self.reported, c[None].astype(np.float32)])[-self.max_reported:]
            self.n_events += 1
            intra = self.vectors[members] @ self.vectors[members].T
            events.append(NovelClusterEvent(
                batch_index=int(batch_index), cluster_id=int(self.ids[members].min()), size=mass,
                evidence={"samples": mass, "entries": int(len(members)), "span_batches": span,
                          "first_batch": int(self.birth[members].min()),
                          "mean_intra_cos": float(intra[np.triu_indices(len(members), 1)].mean()) if len(members) > 1 else 1.0,
                          "pool_size": int(len(self))},
            ))
        return events

    # -- persistence ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"dim": self.dim, "ids": tensor_state(self.ids), "vectors": tensor_state(self.vectors),
                "birth": tensor_state(self.birth), "last_seen": tensor_state(self.last_seen),
                "hits": tensor_state(self.hits), "next_id": self.next_id, "reported": tensor_state(self.reported),
                "n_events": self.n_events}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        if state["dim"] is None:
            return
        self._init(int(state["dim"]))
        self.ids = array_state(state["ids"], np.int64)
        self.vectors = array_state(state["vectors"], np.float32).reshape(-1, self.dim)
        self.birth = array_state(state["birth"], np.int64)
        self.last_seen = array_state(state["last_seen"], np.int64)
        self.hits = array_state(state["hits"], np.int64)
        self.next_id = int(state["next_id"])
        self.reported = array_state(state["reported"], np.float32).reshape(-1, self.dim)
        self.n_events = int(state["n_events"])
        if len(self.ids):
            self.index.upsert(self.ids, self.vectors)
