"""Per-sample and per-batch records of one engine run, the input of every metric and plot.

The engine appends one :class:`BatchRecord` per processed batch. Evaluation-only fields (labels,
domain, ``is_unknown``) are copied from replayed samples when present and are never used to adapt.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class BatchRecord:
    index: int
    stream_id: str
    topic: str
    partition: int
    first_offset: int
    last_offset: int
    offsets: list[int]
    preds: list[int]
    labels: list[int | None]
    ood_scores: list[float]
    ood_flags: list[bool]
    is_unknown: list[bool | None]
    domains: list[str | None]
    entropy: list[float]
    updated: list[bool]
    latency_s: float
    step_s: float
    shift: str | None = None
    reset: bool = False
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunLog:
    batches: list[BatchRecord] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: int = 0
    change_points: list[int] = field(default_factory=list)  # ground-truth sample indices, if known
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0

    def append(self, rec: BatchRecord) -> None:
        self.batches.append(rec)

    # -- flat per-sample views ---------------------------------------------------------
    def _flat(self, name: str, dtype: Any = None) -> np.ndarray:
        vals = [v for b in self.batches for v in getattr(b, name)]
        return np.asarray(vals, dtype=dtype)

    @property
    def n_samples(self) -> int:
        return sum(len(b.preds) for b in self.batches)

    def preds(self) -> np.ndarray:
        return self._flat("preds", np.int64)

    def labels(self) -> np.ndarray:
        """Labels with -1 where unknown/absent."""
        return np.asarray([(-1 if v is None else v) for b in self.batches for v in b.labels], dtype=np.int64)

    def ood_scores(self) -> np.ndarray:
        return self._flat("ood_scores", np.float64)

    def ood_flags(self) -> np.ndarray:
        return self._flat("ood_flags", bool)

    def is_unknown(self) -> np.ndarray:
        return np.asarray([bool(v) for b in self.batches for v in b.is_unknown], dtype=bool)

    def domains(self) -> list[str | None]:
        return [v for b in self.batches for v in b.domains]

    def entropy(self) -> np.ndarray:
        return self._flat("entropy", np.float64)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"batches": [asdict(b) for b in self.batches], "alerts": self.alerts,
                                          "dead_letters": self.dead_letters, "change_points": self.change_points,
                                          "wall_s": self.wall_s, "peak_rss_mb": self.peak_rss_mb}))

    @classmethod
    def from_json(cls, path: str | Path) -> "RunLog":
        d = json.loads(Path(path).read_text())
        log = cls(alerts=d["alerts"], dead_letters=d["dead_letters"], change_points=d["change_points"],
                  wall_s=d["wall_s"], peak_rss_mb=d["peak_rss_mb"])
        log.batches = [BatchRecord(**b) for b in d["batches"]]
        return log
