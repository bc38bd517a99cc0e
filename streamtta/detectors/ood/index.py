"""Exact inner-product search over L2-normalised vectors with stable int64 ids.

Two backends behind one small API:

* ``"faiss"``: ``faiss.IndexIDMap2(faiss.IndexFlatIP(d))`` on CPU. Updating a vector is
  ``remove_ids`` followed by ``add_with_ids`` under the same id.
* ``"torch"``: a ``(N, d)`` tensor and ``topk`` over ``Z @ P.T``, on any device. This is the GPU
  path: FAISS GPU indexes cannot ``remove_ids``, and for the few thousand vectors a prototype
  memory holds ``torch.mm`` is as fast. It is also the fallback when FAISS is missing.

``backend="auto"`` picks torch when ``device`` is a CUDA device, else FAISS when importable.

>>> import numpy as np
>>> idx = FlatIPIndex(3)
>>> idx.upsert(np.array([7, 9]), np.eye(3, dtype=np.float32)[:2])
>>> sims, ids = idx.search(np.array([[0.0, 1.0, 0.0]], dtype=np.float32), k=1)
>>> ids.tolist(), sims.round(3).tolist()
([[9]], [[1.0]])
>>> len(idx)
2
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

try:  # pragma: no cover - import guard
    import faiss  # type: ignore

    HAVE_FAISS = True
except Exception:  # pragma: no cover
    faiss = None
    HAVE_FAISS = False

BACKENDS = ("auto", "faiss", "torch")


def as_float32(x: Any) -> np.ndarray:
    """A C-contiguous float32 2-D numpy copy-or-view of ``x`` (tensor or array)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    arr = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D (n, d) array of vectors, got shape {arr.shape}")
    return arr


def l2_normalize(x: Any, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation; returns a new float32 array (zero rows stay zero)."""
    arr = np.array(as_float32(x), dtype=np.float32, copy=True)
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    arr /= np.maximum(norms, eps)
    return arr


def resolve_backend(backend: str, device: str | torch.device | None = None) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown index backend {backend!r}; choose one of {BACKENDS}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if backend == "auto":
        return "torch" if (dev.type != "cpu" or not HAVE_FAISS) else "faiss"
    if backend == "faiss" and not HAVE_FAISS:
        raise ImportError("backend='faiss' needs the faiss-cpu package (pip install faiss-cpu)")
    return backend


class FlatIPIndex:
    """Exact inner-product index with external int64 ids (callers pass unit vectors).

    Parameters
    ----------
    dim
        Vector dimension.
    backend
        ``"auto"``, ``"faiss"`` or ``"torch"`` (see module docstring).
    device
        Device of the torch backend (ignored by FAISS, which runs on CPU).
    """

    def __init__(self, dim: int, backend: str = "auto", device: str | torch.device | None = None) -> None:
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.backend = resolve_backend(backend, self.device)
        self.reset()

    # -- storage -------------------------------------------------------------------------
    def reset(self) -> None:
        if self.backend == "faiss":
            self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        else:
            self._vecs = torch.empty(0, self.dim, device=self.device)
            self._ids = torch.empty(0, dtype=torch.int64, device=self.device)

    def __len__(self) -> int:
        return int(self._index.ntotal) if self.backend == "faiss" else int(self._ids.numel())

    def _check(self, ids: np.ndarray, vecs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
        vecs = as_float32(vecs)
        if vecs.shape[1] != self.dim:
            raise ValueError(f"vectors have dimension {vecs.shape[1]}, index has dim={self.dim}")
        if len(ids) != len(vecs):
            raise ValueError(f"{len(ids)} ids for {len(vecs)} vectors")
        if len(np.unique(ids)) != len(ids):
            raise ValueError(f"duplicate ids in one call: {ids.tolist()}")
        return ids, vecs

    def remove(self, ids: Any) -> int:
        """Remove ``ids`` (unknown ids are ignored); returns how many were removed."""
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
        if len(ids) == 0 or len(self) == 0:
            return 0
        if self.backend == "faiss":
            return int(self._index.remove_ids(faiss.IDSelectorBatch(ids)))
        keep = ~torch.isin(self._ids, torch.as_tensor(ids, device=self.device))
        n = int((~keep).sum())
        self._vecs, self._ids = self._vecs[keep], self._ids[keep]
        return n

    def upsert(self, ids: Any, vecs: Any) -> None:
        """Insert or replace the vectors stored under ``ids``."""
        ids, vecs = self._check(ids, vecs)
        if len(ids) == 0:
            return
        self.remove(ids)
        if self.backend == "faiss":
            self._index.add_with_ids(vecs, ids)
        else:
            self._vecs = torch.cat([self._vecs, torch.as_tensor(vecs, device=self.device)])
            self._ids = torch.cat([self._ids, torch.as_tensor(ids, device=self.device)])

    def reconstruct(self, ids: Any) -> np.ndarray:
        """The stored vectors of ``ids`` as an ``(n, d)`` float32 array (KeyError if absent)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self.backend == "faiss":
            out = np.empty((len(ids), self.dim), dtype=np.float32)
            for i, key in enumerate(ids):
                try:
                    out[i] = self._index.reconstruct(int(key))
                except RuntimeError as e:
                    raise KeyError(f"id {int(key)} is not in the index") from e
            return out
        pos = {int(k): i for i, k in enumerate(self._ids.tolist())}
        missing = [int(k) for k in ids if int(k) not in pos]
        if missing:
            raise KeyError(f"ids {missing} are not in the index")
        sel = torch.as_tensor([pos[int(k)] for k in ids], dtype=torch.int64, device=self.device)
        return self._vecs[sel].float().cpu().numpy()

    def ids(self) -> np.ndarray:
        if self.backend == "faiss":
            return faiss.vector_to_array(self._index.id_map).astype(np.int64) if len(self) else np.empty(0, np.int64)
        return self._ids.cpu().numpy().copy()

    # -- search --------------------------------------------------------------------------
    def search(self, queries: Any, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` inner products and ids; rows are padded with ``-inf`` / ``-1`` past ``len``."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        n = int(queries.shape[0]) if hasattr(queries, "shape") else len(queries)
        n_avail = len(self)
        sims = np.full((n, k), -np.inf, dtype=np.float32)
        ids = np.full((n, k), -1, dtype=np.int64)
        if n == 0 or n_avail == 0:
            return sims, ids
        kk = min(k, n_avail)
        if self.backend == "faiss":
            d, i = self._index.search(as_float32(queries), kk)
            sims[:, :kk], ids[:, :kk] = d, i
        else:
            s, i = self.search_torch(queries, kk)
            sims[:, :kk], ids[:, :kk] = s.float().cpu().numpy(), i.cpu().numpy()
        return sims, ids

    def search_torch(self, queries: Any, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Torch backend search on ``self.device`` (returns tensors; ``k <= len``)."""
        q = queries if isinstance(queries, torch.Tensor) else torch.as_tensor(as_float32(queries))
        q = q.to(self.device, self._vecs.dtype)
        s, pos = (q @ self._vecs.T).topk(k, dim=1)
        return s, self._ids[pos]
