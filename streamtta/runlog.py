"""Per-sample and per-batch records of one engine run, the input of every metric and plot.

The engine appends one :class:`BatchRecord` per processed batch and one alert document per alert.
Evaluation-only fields (labels, domain, ``is_unknown``) are copied from replayed samples when present
and are never used to adapt.

By default a :class:`RunLog` keeps everything in memory (offline ``simulate``, benchmarks, tests). With
``spool_dir`` (live runs) every batch record and alert is written through to a JSONL spool in that folder
(:data:`BATCHES_FILE`, :data:`ALERTS_FILE`) and only the last ``max_batches`` / ``max_alerts`` stay in
memory (:class:`RecordSpool`); ``len()``, iteration and indexing still see the whole log, read back from
the spool, so metrics and plots work unchanged. :meth:`RunLog.load` reads a spool (or a ``to_json`` file)
back into memory.

>>> import tempfile
>>> log = RunLog(spool_dir=tempfile.mkdtemp(), max_batches=2)
>>> for i in range(5):
...     log.append(BatchRecord(i, "s", "t", 0, i, i, [i], [0], [None], [0.5], [False], [None], [None],
...                            [0.1], [True], 0.01, 0.001))
>>> len(log.batches), log.batches.in_memory, [b.index for b in log.batches], log.n_samples
(5, 2, [0, 1, 2, 3, 4], 5)
"""
from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Generic, TypeVar, overload

import numpy as np

#: Batch-record spool of a spooled :class:`RunLog`, in its ``spool_dir``.
BATCHES_FILE = "runlog.jsonl"
#: Alert spool of a spooled :class:`RunLog` (``alerts.jsonl`` is the alerts sink's file).
ALERTS_FILE = "runlog-alerts.jsonl"

T = TypeVar("T")


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


_BATCH_FIELDS = tuple(f.name for f in fields(BatchRecord))


def _batch_doc(rec: BatchRecord) -> dict[str, Any]:
    return {name: getattr(rec, name) for name in _BATCH_FIELDS}


def _batch_from_doc(doc: dict[str, Any]) -> BatchRecord:
    return BatchRecord(**doc)


class RecordSpool(Generic[T]):
    """An append-only sequence written through to a JSONL file, holding only its last ``window`` items
    in memory. ``len()`` counts every item appended; iteration, ``[i]`` and slices read older items back
    from the file (the file is flushed first). Items read back are new objects: changing one does not
    change the spool. The file is truncated when the spool is created.

    ``to_doc``/``from_doc`` turn an item into a JSON-able value and back. Every ``index_every``-th
    item's byte offset is kept (the only memory that grows with the spool), so ``[i]`` reads at most
    that many lines; a slice with a step reads the whole spool. Lines are buffered: :meth:`flush` before
    another reader (e.g. :meth:`RunLog.load`) opens the file.
    """

    def __init__(self, path: str | Path, window: int, to_doc: Callable[[T], Any], from_doc: Callable[[Any], T],
                 *, index_every: int = 256) -> None:
        if window < 0:
            raise ValueError(f"RecordSpool: window must be >= 0, got {window}")
        self.path = Path(path)
        self.window: deque[T] = deque(maxlen=window)
        self._to_doc, self._from_doc = to_doc, from_doc
        self._every = max(1, int(index_every))
        self._marks: list[int] = []  # byte offset of item k * index_every
        self._n = 0
        self._bytes = 0
        self._fh: Any = self.path.open("wb")

    @property
    def in_memory(self) -> int:
        """How many items are held in memory (at most ``window``)."""
        return len(self.window)

    def append(self, item: T) -> None:
        line = json.dumps(self._to_doc(item)).encode() + b"\n"
        if self._n % self._every == 0:
            self._marks.append(self._bytes)
        if self._fh is None:
            self._fh = self.path.open("ab")
        self._fh.write(line)
        self._bytes += len(line)
        self._n += 1
        self.window.append(item)

    def extend(self, items: Iterable[T]) -> None:
        for item in items:
            self.append(item)

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    def close(self) -> None:
        """Close the file (a later append reopens it for appending)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __len__(self) -> int:
        return self._n

    def _iter_range(self, start: int, stop: int) -> Iterator[T]:
        first_mem = self._n - len(self.window)
        pos = start
        if pos < min(stop, first_mem):
            self.flush()
            with self.path.open("rb") as f:
                mark = pos // self._every
                f.seek(self._marks[mark])
                skip = pos - mark * self._every
                for line in f:
                    if skip:
                        skip -= 1
                        continue
                    if pos >= min(stop, first_mem):
                        break
                    yield self._from_doc(json.loads(line))
                    pos += 1
        window = list(self.window)
        for p in range(max(pos, first_mem), stop):
            yield window[p - first_mem]

    def __iter__(self) -> Iterator[T]:
        return self._iter_range(0, self._n)

    @overload
    def __getitem__(self, i: int) -> T: ...

    @overload
    def __getitem__(self, i: slice) -> list[T]: ...

    def __getitem__(self, i: int | slice) -> T | list[T]:
        if isinstance(i, slice):
            start, stop, step = i.indices(self._n)
            if step != 1:
                return list(self)[i]
            return list(self._iter_range(start, max(start, stop)))
        j = i + self._n if i < 0 else i
        if not 0 <= j < self._n:
            raise IndexError(f"RecordSpool index {i} out of range for {self._n} items")
        return next(self._iter_range(j, j + 1))

    def __bool__(self) -> bool:
        return self._n > 0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (RecordSpool, list, tuple)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RecordSpool({str(self.path)!r}, items={self._n}, in_memory={self.in_memory})"

    @staticmethod
    def read(path: str | Path, from_doc: Callable[[Any], T]) -> Iterator[T]:
        """The items of a spool file, in order (nothing if it does not exist)."""
        p = Path(path)
        if not p.is_file():
            return
        with p.open("rb") as f:
            for line in f:
                if line.strip():
                    yield from_doc(json.loads(line))


#: ``sample_column`` names: (dtype or None for a list, the batch's values).
_SAMPLE_COLUMNS: dict[str, tuple[Any, Callable[[BatchRecord], Any]]] = {
    "preds": (np.int64, lambda b: b.preds),
    "labels": (np.int64, lambda b: [-1 if v is None else v for v in b.labels]),
    "ood_scores": (np.float64, lambda b: b.ood_scores),
    "ood_flags": (bool, lambda b: b.ood_flags),
    "is_unknown": (bool, lambda b: [bool(v) for v in b.is_unknown]),
    "has_truth": (bool, lambda b: [v is not None for v in b.is_unknown]),
    "entropy": (np.float64, lambda b: b.entropy),
    "updated": (bool, lambda b: [bool(v) for v in b.updated]),
    "domains": (None, lambda b: b.domains),
}
#: ``batch_column`` names: (dtype, the batch's value).
_BATCH_COLUMNS: dict[str, tuple[Any, Callable[[BatchRecord], Any]]] = {
    "size": (np.int64, lambda b: len(b.preds)),
    "index": (np.int64, lambda b: b.index),
    "topic": (object, lambda b: b.topic),
    "partition": (np.int64, lambda b: b.partition),
    "first_offset": (np.int64, lambda b: b.first_offset),
    "last_offset": (np.int64, lambda b: b.last_offset),
    "latency_s": (np.float64, lambda b: b.latency_s),
    "step_s": (np.float64, lambda b: b.step_s),
    "shift": (object, lambda b: b.shift),
    "reset": (bool, lambda b: bool(b.reset)),
}


def _finish(dtype: Any, vals: list[Any]) -> Any:
    return vals if dtype is None else np.asarray(vals, dtype=dtype)


def _build_column(table: dict[str, tuple[Any, Callable[[BatchRecord], Any]]], name: str,
                  batches: Iterable[BatchRecord]) -> Any:
    dtype, get = table[name]
    if table is _SAMPLE_COLUMNS:
        return _finish(dtype, [v for b in batches for v in get(b)])
    return _finish(dtype, [get(b) for b in batches])


def _all_columns(batches: Iterable[BatchRecord]) -> dict[str, Any]:
    """Every sample and batch column in one pass."""
    acc: dict[str, list[Any]] = {k: [] for k in (*_SAMPLE_COLUMNS, *_BATCH_COLUMNS)}
    for b in batches:
        for k, (_, get) in _SAMPLE_COLUMNS.items():
            acc[k].extend(get(b))
        for k, (_, get) in _BATCH_COLUMNS.items():
            acc[k].append(get(b))
    table = {**_SAMPLE_COLUMNS, **_BATCH_COLUMNS}
    return {k: _finish(table[k][0], v) for k, v in acc.items()}


@dataclass
class RunLog:
    """The records of one run. ``spool_dir`` (live runs): write batch records and alerts through to
    :data:`BATCHES_FILE` / :data:`ALERTS_FILE` there and keep only the last ``max_batches`` /
    ``max_alerts`` in memory; ``batches``/``alerts`` are then :class:`RecordSpool` objects."""

    batches: list[BatchRecord] | RecordSpool[BatchRecord] = field(default_factory=list)
    alerts: list[dict[str, Any]] | RecordSpool[dict[str, Any]] = field(default_factory=list)
    dead_letters: int = 0
    change_points: list[int] = field(default_factory=list)  # ground-truth sample indices, if known
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    spool_dir: Path | None = field(default=None, repr=False, compare=False)
    max_batches: int = field(default=1024, repr=False, compare=False)
    max_alerts: int = field(default=1024, repr=False, compare=False)
    _columns: tuple[int, dict[str, Any]] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.spool_dir is None:
            return
        d = self.spool_dir = Path(self.spool_dir)
        d.mkdir(parents=True, exist_ok=True)
        batches, alerts = self.batches, self.alerts
        self.batches = RecordSpool(d / BATCHES_FILE, self.max_batches, _batch_doc, _batch_from_doc)
        self.alerts = RecordSpool(d / ALERTS_FILE, self.max_alerts, dict, dict)
        self.batches.extend(batches)
        self.alerts.extend(alerts)

    @property
    def spooled(self) -> bool:
        return isinstance(self.batches, RecordSpool)

    def append(self, rec: BatchRecord) -> None:
        self.batches.append(rec)
        self._columns = None

    def flush(self) -> None:
        """Write buffered spool lines to disk (no-op in memory)."""
        for s in (self.batches, self.alerts):
            if isinstance(s, RecordSpool):
                s.flush()

    def close(self) -> None:
        """Close the spool files (the log stays readable; no-op in memory)."""
        for s in (self.batches, self.alerts):
            if isinstance(s, RecordSpool):
                s.close()

    # -- columns: flat per-sample and per-batch views -----------------------------------
    def sample_column(self, name: str) -> Any:
        """One value per sample, all batches in order: ``preds``, ``labels`` (-1 where absent),
        ``ood_scores``, ``ood_flags``, ``is_unknown`` (None -> False), ``has_truth`` (``is_unknown`` given),
        ``entropy``, ``updated`` (numpy arrays) or ``domains`` (a list)."""
        return self._column(_SAMPLE_COLUMNS, name)

    def batch_column(self, name: str) -> np.ndarray:
        """One value per batch: ``size`` (samples), ``index``, ``topic``, ``partition``, ``first_offset``,
        ``last_offset``, ``latency_s``, ``step_s``, ``shift``, ``reset``."""
        return self._column(_BATCH_COLUMNS, name)

    def _column(self, table: dict[str, tuple[Any, Callable[[BatchRecord], Any]]], name: str) -> Any:
        if name not in table:
            raise KeyError(f"RunLog has no column {name!r}; known: {sorted(table)}")
        if not isinstance(self.batches, RecordSpool):  # in memory: always from the records as they are now
            return _build_column(table, name, self.batches)
        # spooled: every column in one pass over the spool, kept until the next append
        if self._columns is None or self._columns[0] != len(self.batches):
            self._columns = (len(self.batches), _all_columns(self.batches))
        col = self._columns[1][name]
        return list(col) if isinstance(col, list) else col.copy()

    @property
    def n_samples(self) -> int:
        return int(self.batch_column("size").sum())

    def preds(self) -> np.ndarray:
        return self.sample_column("preds")

    def labels(self) -> np.ndarray:
        """Labels with -1 where unknown/absent."""
        return self.sample_column("labels")

    def ood_scores(self) -> np.ndarray:
        return self.sample_column("ood_scores")

    def ood_flags(self) -> np.ndarray:
        return self.sample_column("ood_flags")

    def is_unknown(self) -> np.ndarray:
        return self.sample_column("is_unknown")

    def domains(self) -> list[str | None]:
        return self.sample_column("domains")

    def entropy(self) -> np.ndarray:
        return self.sample_column("entropy")

    # -- files -------------------------------------------------------------------------
    def to_json(self, path: str | Path) -> None:
        """One JSON document with every record, written record by record (a spooled log is streamed
        from its spool, never held whole in memory)."""
        with Path(path).open("w") as f:
            f.write('{"batches": [')
            f.writelines((", " if i else "") + json.dumps(asdict(b)) for i, b in enumerate(self.batches))
            f.write('], "alerts": [')
            f.writelines((", " if i else "") + json.dumps(a) for i, a in enumerate(self.alerts))
            rest = {"dead_letters": self.dead_letters, "change_points": self.change_points,
                    "wall_s": self.wall_s, "peak_rss_mb": self.peak_rss_mb}
            f.write("], " + json.dumps(rest)[1:])

    @classmethod
    def from_json(cls, path: str | Path) -> RunLog:
        d = json.loads(Path(path).read_text())
        log = cls(alerts=d["alerts"], dead_letters=d["dead_letters"], change_points=d["change_points"],
                  wall_s=d["wall_s"], peak_rss_mb=d["peak_rss_mb"])
        log.batches = [BatchRecord(**b) for b in d["batches"]]
        return log

    @classmethod
    def load(cls, path: str | Path) -> RunLog:
        """An in-memory log read from a ``to_json`` file (``*.json``), or from a spool: a spool folder or
        its :data:`BATCHES_FILE` (alerts from :data:`ALERTS_FILE` next to it). A spool holds records and
        alerts only: the run's totals (``wall_s``, ``dead_letters``, ...) are left at their defaults."""
        p = Path(path)
        if p.is_file() and p.suffix == ".json":
            return cls.from_json(p)
        d = p if p.is_dir() else p.parent
        bfile = p if p.is_file() else d / BATCHES_FILE
        if not bfile.is_file():
            raise FileNotFoundError(f"no run log at {p}: neither a .json run log nor a {BATCHES_FILE} spool")
        return cls(batches=list(RecordSpool.read(bfile, _batch_from_doc)),
                   alerts=list(RecordSpool.read(d / ALERTS_FILE, dict)))
