"""Known-vs-unknown kNN contrast: how much closer a sample is to the stream's own unknowns than to
anything known.

Features are L2-normalised (not centred: centring on the source mean hurts once the adapter moves
the statistics). Three memories, each a FAISS ``IndexIDMap2(IndexFlatIP)`` (:class:`FlatIPIndex`):

* **source**: the normalised source features given to :meth:`fit` (fixed: the copies
  :meth:`~streamtta.detectors.ood.scorer.ThresholdedScorer.for_stream` makes for the streams share it
  and leave it out of their ``state_dict``);
* **known**: a FIFO of recent stream samples that look ID (bounded, ``known_size``);
* **unknown**: a FIFO of recent stream samples that look most OOD (bounded, ``unknown_size``), the
  strong-OOD pool of OWTTT (Li et al., ICCV 2023) used as a second, "unknown" neighbour set.

With ``cos_k(z, M)`` the k-th largest cosine between ``z`` and memory ``M``::

    score(z) = cos_{k_unknown}(z, unknown) - max(cos_k(z, source), cos_k(z, known))

higher = more OOD. While the unknown memory holds fewer than ``min_unknown`` samples (32: a few
batches' worth) its term is a constant, the *prior* (``warm_prior=True``): the known similarity that a
fraction ``tpr`` of the calibration hold-out exceeds. The early scores are then on the scale of the later
ones and the decision boundary does not move when the memory takes over (``score > 0`` in both cases).
``warm_prior=False, min_unknown=k_unknown`` is the earlier behaviour (the term is 0 from the start and
switches to the memory at ``k_unknown`` samples); on the tuning streams (``digits-c-continual-openset``
seed 0 with the BatchNorm and LayerNorm ResNets, also on its first 1,024 samples, ``quickstart`` and
``sensor-drift`` with both sensor MLPs) the prior, ``min_unknown=32`` and ``known_accepted_only=True``
raised the mean AUROC over the seven runs from 83.1 to 85.5 (the first 1,024 samples: BN 87.3 -> 91.7,
LN 75.4 -> 82.1; full streams +0.3 to +1.7), accuracy within 0.2 points.

After each batch is scored, :meth:`partial_fit` ranks its samples by ``rank(score) + rank(1 - MSP)``
(the two ranks, each within the batch, so that one noisy view cannot admit a sample alone): the top
``unknown_quantile`` enter the unknown memory, the bottom ``known_quantile`` the known memory, and of
those only the ones the engine accepted (flagged by neither the scorer nor the gate,
``known_accepted_only=True``), so that unknowns the flags caught do not teach the known memory. Batches
smaller than ``min_batch`` are ranked together with the last ``queue_size`` scored samples instead of on
their own.

The score has a natural decision boundary: a sample is flagged when it is closer to the unknowns
than to anything known (``score > margin``, ``margin = 0``) once the unknown memory is in use; until then
the threshold calibrated on the source hold-out (95% ID-TPR), which the prior puts at 0 as well.
``threshold_mode="otsu"`` uses OWTTT's adaptive cut of the recent scores instead.

``known_quantile`` (default 0.7) assumes unknowns are under about 30% of a batch. Streams without
unknown samples still fill the unknown memory with their least typical ID samples, so on an all-ID
stream this scorer flags more samples than the 5% its calibrated threshold alone would.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> src = np.abs(rng.normal([3, 0, 0, 0], 0.3, (200, 4)))
>>> s = ContrastScorer(k=5, k_unknown=3, min_unknown=8).fit(src, None)
>>> batch = np.concatenate([np.abs(rng.normal([3, 0, 0, 0], 0.3, (48, 4))),
...                         np.abs(rng.normal([0, 0, 3, 0], 0.3, (16, 4)))])
>>> logits = np.zeros((64, 2))
>>> s.partial_fit(batch, logits)          # the far cluster fills the unknown memory
>>> later = np.abs(rng.normal([0, 0, 3, 0.5], 0.3, (4, 4)))
>>> bool(s.score(later, np.zeros((4, 2))).min() > s.score(src[:4], np.zeros((4, 2))).max())
True
"""
from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
import torch

from streamtta.detectors.ood.index import FlatIPIndex, l2_normalize
from streamtta.detectors.ood.scorer import ThresholdedScorer, softmax_np, to_numpy
from streamtta.detectors.ood.state import array_state, tensor_state


def _ranks(v: np.ndarray) -> np.ndarray:
    """Ranks of ``v`` scaled to [0, 1] (ties broken by position)."""
    r = np.empty(len(v), dtype=np.float64)
    r[np.argsort(v, kind="stable")] = np.arange(len(v))
    return r / max(len(v) - 1, 1)


class _Ring:
    """A bounded FIFO of unit vectors searchable by inner product (slot number = index id)."""

    def __init__(self, dim: int, size: int, backend: str, device: Any) -> None:
        self.size = int(size)
        self.vecs = np.zeros((0, dim), np.float32)
        self.next = 0
        self.index = FlatIPIndex(dim, backend, device)

    def __len__(self) -> int:
        return len(self.vecs)

    def add(self, z: np.ndarray) -> None:
        z = np.asarray(z, np.float32)[-self.size:]
        if not len(z):
            return
        if len(self.vecs) < self.size:
            take = min(self.size - len(self.vecs), len(z))
            slots = np.arange(len(self.vecs), len(self.vecs) + take)
            self.vecs = np.concatenate([self.vecs, z[:take]])
            self.index.upsert(slots, z[:take])
            z = z[take:]
        if len(z):
            slots = (self.next + np.arange(len(z))) % self.size
            self.vecs[slots] = z
            self.index.upsert(slots, z)
            self.next = int((self.next + len(z)) % self.size)

    def kth(self, z: np.ndarray, k: int) -> np.ndarray | None:
        """k-th largest cosine per row, or None while fewer than ``k`` vectors are stored."""
        if len(self.vecs) < k:
            return None
        return self.index.search(z, k)[0][:, k - 1].astype(np.float64)

    def state_dict(self) -> dict[str, Any]:
        return {"vecs": tensor_state(self.vecs), "next": self.next}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.vecs = array_state(state["vecs"], np.float32)
        self.next = int(state["next"])
        self.index.reset()
        if len(self.vecs):
            self.index.upsert(np.arange(len(self.vecs)), self.vecs)


class ContrastScorer(ThresholdedScorer):
    """k-NN similarity to the stream's unknowns minus k-NN similarity to known samples.

    Parameters
    ----------
    k
        Neighbour rank for the source and known memories.
    k_unknown
        Neighbour rank for the unknown memory.
    known_size, unknown_size
        Capacities of the two online FIFO memories.
    unknown_quantile
        Fraction of each batch (most OOD by the rank criterion) that enters the unknown memory.
    known_quantile
        Fraction of each batch (least OOD) that enters the known memory. 0.7 assumes unknowns are
        under about 30% of a batch; lower it for streams with more.
    margin
        Flag ``score > margin`` once the unknown memory is in use (``threshold_mode="tpr"``);
        None: always the calibrated threshold.
    known_accepted_only
        Only samples the engine accepted (flagged by no scorer) may enter the known memory.
    warm_prior
        Until the unknown memory is in use its term is the calibrated prior (see above), else 0.
    min_unknown
        The unknown memory is used from this many samples on (at least ``k_unknown``).
    min_batch, queue_size
        Batches below ``min_batch`` samples are ranked against the last ``queue_size`` samples.
    backend, device
        Vector index backend (see :class:`~streamtta.detectors.ood.index.FlatIPIndex`).
    """

    name = "contrast"
    fixed_keys = ("source",)

    def __init__(self, k: int = 10, k_unknown: int = 5, known_size: int = 1024, unknown_size: int = 512,
                 unknown_quantile: float = 0.15, known_quantile: float = 0.7, min_batch: int = 16,
                 queue_size: int = 256, known_accepted_only: bool = True, margin: float | None = 0.0,
                 warm_prior: bool = True, min_unknown: int = 32, backend: str = "auto", device: Any = None,
                 **kw: Any) -> None:
        super().__init__(**kw)
        if k < 1 or k_unknown < 1:
            raise ValueError(f"need k >= 1 and k_unknown >= 1, got k={k}, k_unknown={k_unknown}")
        if known_size < k or unknown_size < k_unknown:
            raise ValueError(f"memories must hold at least k samples: known_size={known_size} (k={k}), "
                             f"unknown_size={unknown_size} (k_unknown={k_unknown})")
        for nm, q in (("unknown_quantile", unknown_quantile), ("known_quantile", known_quantile)):
            if not 0.0 < q < 1.0:
                raise ValueError(f"{nm} must be in (0, 1), got {q}")
        if min_batch < 1 or queue_size < 1:
            raise ValueError(f"min_batch and queue_size must be >= 1, got {min_batch}, {queue_size}")
        self.k, self.k_unknown = int(k), int(k_unknown)
        self.known_size, self.unknown_size = int(known_size), int(unknown_size)
        self.unknown_quantile, self.known_quantile = float(unknown_quantile), float(known_quantile)
        self.min_batch, self.queue_size = int(min_batch), int(queue_size)
        self.known_accepted_only = bool(known_accepted_only)
        self.margin = None if margin is None else float(margin)
        self.warm_prior = bool(warm_prior)
        self.min_unknown = max(int(min_unknown), self.k_unknown)
        if self.min_unknown > unknown_size:
            raise ValueError(f"min_unknown={min_unknown} exceeds unknown_size={unknown_size}: the unknown memory "
                             "would never be used")
        #: stand-in for the unknown term while the unknown memory is not usable (``warm_prior``)
        self.prior = 0.0
        self.backend, self.device = backend, device
        self.source: FlatIPIndex | None = None
        self.source_vecs: np.ndarray | None = None
        self.known: _Ring | None = None
        self.unknown: _Ring | None = None
        self.queue: deque[tuple[float, float]] = deque(maxlen=self.queue_size)
        self._last: tuple[tuple, Any, np.ndarray, np.ndarray] | None = None

    # -- threshold -----------------------------------------------------------------------
    def _get_threshold(self) -> float:
        if (self.threshold_mode == "tpr" and self.margin is not None and self.unknown is not None
                and self._unknown_ready()):
            return self.margin
        return ThresholdedScorer.threshold.fget(self)

    threshold = property(_get_threshold, ThresholdedScorer.threshold.fset)  # type: ignore[assignment]

    # -- state ---------------------------------------------------------------------------
    def _set_source(self, vecs: np.ndarray) -> None:
        """A new source memory (new objects: copies that shared the old one keep it) and empty online ones."""
        dim = vecs.shape[1]
        self.source_vecs = np.asarray(vecs, np.float32)
        self.source = FlatIPIndex(dim, self.backend, self.device)
        self.source.upsert(np.arange(len(self.source_vecs)), self.source_vecs)
        self.known = _Ring(dim, self.known_size, self.backend, self.device)
        self.unknown = _Ring(dim, self.unknown_size, self.backend, self.device)

    def _fixed_objects(self) -> list[Any]:
        return [self.source, self.source_vecs]

    def _fit(self, features: Any, logits: Any, labels: Any | None) -> None:
        z = l2_normalize(to_numpy(features))
        if len(z) < self.k:
            raise ValueError(f"ContrastScorer needs at least k={self.k} source samples, got {len(z)}")
        self._set_source(z.astype(np.float32))
        self.queue.clear()
        self._last = None

    # -- scoring -------------------------------------------------------------------------
    def _known_similarity(self, z: np.ndarray) -> np.ndarray:
        """``max(cos_k(z, source), cos_k(z, known))`` per row."""
        known = self.source.search(z, self.k)[0][:, self.k - 1].astype(np.float64)
        online = self.known.kth(z, self.k)
        return known if online is None else np.maximum(known, online)

    def _score_z(self, z: np.ndarray) -> np.ndarray:
        unk = self.unknown.kth(z, self.k_unknown) if self._unknown_ready() else None
        return (self.prior if unk is None else unk) - self._known_similarity(z)

    def _unknown_ready(self) -> bool:
        return self.unknown is not None and len(self.unknown) >= self.min_unknown

    def calibrate(self, features: Any, logits: Any) -> float:
        """Calibrate the threshold; with ``warm_prior`` first set :attr:`prior` to the known similarity
        that a fraction ``tpr`` of these ID samples exceed."""
        self._check_fitted()
        z = l2_normalize(to_numpy(features))
        if self.warm_prior and len(z) and not self._unknown_ready():
            self.prior = float(np.quantile(self._known_similarity(z), 1.0 - self.tpr))
        return super().calibrate(features, logits)

    @staticmethod
    def _key(features: Any) -> tuple | None:
        """Identity of a torch batch (storage, shape, version): the engine scores ``feats.detach()``
        and later learns from another detached view of the same tensor."""
        if isinstance(features, torch.Tensor):
            return (features.data_ptr(), tuple(features.shape), features._version, features.device)
        return None

    def score(self, features: Any, logits: Any) -> np.ndarray:
        self._check_fitted()
        z = l2_normalize(to_numpy(features))
        s = self._score_z(z)
        key = self._key(features)
        # the tensor is kept so that its storage cannot be reused by another batch meanwhile
        self._last = None if key is None else (key, features, z, s)
        return s

    def partial_fit(self, features: Any, logits: Any, accepted: Any | None = None) -> None:
        """Admit the batch's most OOD samples to the unknown memory and its most ID ones to the known one."""
        if not self.fitted or logits is None:
            return
        key = self._key(features)
        if self._last is not None and key is not None and self._last[0] == key:
            _, _, z, s = self._last
        else:
            z = l2_normalize(to_numpy(features))
            s = self._score_z(z)
        self._last = None
        n = len(s)
        if n == 0:
            return
        not_conf = 1.0 - softmax_np(logits).max(1)
        if n >= self.min_batch:
            crit = ref_crit = _ranks(s) + _ranks(not_conf)
        else:  # a small batch is ranked among the recent samples as well
            ref = np.array(self.queue, dtype=np.float64).reshape(-1, 2)
            ref_crit = _ranks(np.concatenate([ref[:, 0], s])) + _ranks(np.concatenate([ref[:, 1], not_conf]))
            crit = ref_crit[len(ref):]
        self.queue.extend(zip(s.tolist(), not_conf.tolist()))
        if len(ref_crit) < self.min_batch:
            return  # too few samples to tell the tails apart yet
        hi_cut = np.quantile(ref_crit, 1.0 - self.unknown_quantile)
        lo_cut = np.quantile(ref_crit, self.known_quantile)
        self.unknown.add(z[crit >= hi_cut])
        ok = crit <= lo_cut
        if accepted is not None and self.known_accepted_only:
            ok &= to_numpy(accepted, bool).reshape(-1)
        self.known.add(z[ok])

    def _refit(self, features: Any, logits: Any, labels: Any | None) -> None:
        """After a re-adaptation: the known memory restarts from the recent trusted samples."""
        self._check_fitted()
        z = l2_normalize(to_numpy(features))
        self.known = _Ring(z.shape[1], self.known_size, self.backend, self.device)
        self.known.add(z)

    # -- persistence ---------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        return {"source": None if self.shares_fixed else tensor_state(self.source_vecs),
                "known": None if self.known is None else self.known.state_dict(),
                "unknown": None if self.unknown is None else self.unknown.state_dict(),
                "queue": tensor_state(np.array(self.queue, dtype=np.float64).reshape(-1, 2)), "prior": self.prior}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the online memories; the source memory from the state when it holds one that differs
        from the shared one (else the shared one stays)."""
        self._last = None
        if "source" in state and state["source"] is None:
            return  # the state of an unfitted scorer
        if not self._keep_shared(state, "source", self.source_vecs):
            self._set_source(array_state(state["source"], np.float32))
        self.known.load_state_dict(state["known"])
        self.unknown.load_state_dict(state["unknown"])
        self.prior = float(state.get("prior", 0.0))
        self.queue = deque((tuple(r) for r in array_state(state["queue"], np.float64).reshape(-1, 2).tolist()),
                           maxlen=self.queue_size)
