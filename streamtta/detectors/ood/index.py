"""Exact inner-product search over L2-normalised vectors with stable int64 ids.

Two backends behind one small API:

* ``"faiss"``: ``faiss.IndexIDMap2(faiss.IndexFlatIP(d))`` on the CPU holds the vectors. Updating a
  vector is ``remove_ids`` followed by ``add_with_ids`` under the same id. With a CUDA ``device`` and a
  FAISS build with GPU support (faiss-gpu: ``faiss.StandardGpuResources``, ``faiss.get_num_gpus() > 0``)
  searches run on a GPU copy of the flat index (``faiss.index_cpu_to_gpu``), made again after the
  vectors changed (FAISS GPU indexes cannot ``remove_ids``); positions it returns map to ids through the
  CPU index's id map. Without GPU support the index stays on the CPU (one log line says why).
* ``"torch"``: a ``(N, d)`` tensor and ``topk`` over ``Z @ P.T``, on any device; also the fallback
  when FAISS is missing.

``backend="auto"`` picks FAISS when importable, else torch. The CPU index is what stays: scorers
persist the vectors themselves (numpy, on the CPU), and a copy or pickle of an index leaves the GPU copy
out (it is made again at the next search).

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

import logging
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

log = logging.getLogger("streamtta.detectors")
#: reasons already logged for keeping a FAISS index on the CPU (each is logged once per process)
_LOGGED: set[str] = set()
#: one ``faiss.StandardGpuResources`` per GPU, made on first use
_GPU_RESOURCES: dict[int, Any] = {}


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
    """The backend ``backend`` means (``"auto"``: FAISS when importable, else torch); ``device`` is
    accepted for symmetry with :class:`FlatIPIndex` (a FAISS index on CUDA searches on a GPU copy)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown index backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "faiss" if HAVE_FAISS else "torch"
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
        Device of the torch backend's tensors; for FAISS, a CUDA device means searches on a GPU copy
        when FAISS has GPU support (else the CPU index, with one log line saying why).
    """

    def __init__(self, dim: int, backend: str = "auto", device: str | torch.device | None = None) -> None:
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.backend = resolve_backend(backend, self.device)
        #: the GPU FAISS searches on (None: searches on the CPU index)
        self.gpu: int | None = _faiss_gpu(self.device) if self.backend == "faiss" else None
        self._gpu_index: Any = None
        self._gpu_ids: np.ndarray | None = None
        self.reset()

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave the GPU copy out (it cannot be serialised; the next search makes it)."""
        state = self.__dict__.copy()
        state["_gpu_index"], state["_gpu_ids"] = None, None
        return state

    # -- storage -------------------------------------------------------------------------
    def reset(self) -> None:
        self._gpu_index, self._gpu_ids = None, None
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
            n = int(self._index.remove_ids(faiss.IDSelectorBatch(ids)))
            if n:
                self._gpu_index, self._gpu_ids = None, None
            return n
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
            self._gpu_index, self._gpu_ids = None, None
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
        if self.backend == "faiss" and self.gpu is not None:
            d, pos = self._gpu_search(as_float32(queries), kk)
            sims[:, :kk], ids[:, :kk] = d, np.where(pos >= 0, self._gpu_ids[np.maximum(pos, 0)], -1)
        elif self.backend == "faiss":
            d, i = self._index.search(as_float32(queries), kk)
            sims[:, :kk], ids[:, :kk] = d, i
        else:
            s, i = self.search_torch(queries, kk)
            sims[:, :kk], ids[:, :kk] = s.float().cpu().numpy(), i.cpu().numpy()
        return sims, ids

    def _gpu_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Search the GPU copy of the flat index (made now if the vectors changed since the last one):
        ``(sims, positions)``; position ``j`` is the ``j``-th id of the CPU index's id map."""
        if self._gpu_index is None:
            flat = faiss.downcast_index(self._index.index)
            self._gpu_index = faiss.index_cpu_to_gpu(_gpu_resources(self.gpu), self.gpu, flat)
            self._gpu_ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        return self._gpu_index.search(q, k)

    def search_torch(self, queries: Any, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Torch backend search on ``self.device`` (returns tensors; ``k <= len``)."""
        q = queries if isinstance(queries, torch.Tensor) else torch.as_tensor(as_float32(queries))
        q = q.to(self.device, self._vecs.dtype)
        s, pos = (q @ self._vecs.T).topk(k, dim=1)
        return s, self._ids[pos]


def _faiss_gpu(device: torch.device) -> int | None:
    """The GPU a FAISS index on ``device`` searches on, or None (CPU device, or FAISS without GPU support:
    logged once per reason)."""
    if device.type != "cuda":
        return None
    from streamtta.devices import faiss_gpu_status

    n, why = faiss_gpu_status()
    if device.index is not None:
        index = int(device.index)
    else:
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
    if why is None and index >= n:
        why = f"faiss sees {n} GPU(s), not GPU {index}"
    if why is not None:
        if why not in _LOGGED:
            _LOGGED.add(why)
            log.info("FAISS indexes stay on the CPU although the device is %s: %s", device, why)
        return None
    return index


def _gpu_resources(gpu: int) -> Any:
    """The process's ``faiss.StandardGpuResources`` of GPU ``gpu`` (shared by every index on it)."""
    if gpu not in _GPU_RESOURCES:
        _GPU_RESOURCES[gpu] = faiss.StandardGpuResources()
    return _GPU_RESOURCES[gpu]
