"""In-memory source/sinks (offline replay through the same engine path as Kafka) and a JSONL sink.

:class:`MemorySource` behaves like a bounded Kafka consumer: it delivers records in order, calls the
rebalance callbacks (``on_assign`` when a partition is first seen, ``on_revoke`` on :meth:`close`),
honours pause/resume, records commits in :attr:`MemorySource.committed`, and can resume from committed
offsets or simulate a crash (``fail_after``), so recovery tests need no broker.

>>> import numpy as np
>>> from streamtta.stream.envelope import encode_tensor
>>> src = MemorySource([encode_tensor(np.zeros(3, np.float32), "s") for _ in range(5)], topic="t")
>>> [r.offset for r in src.consume(3, 0.0)], src.at_end()
([0, 1, 2], False)
>>> src.commit({("t", 0): 3})
>>> src2 = MemorySource(src.records, start_offsets=src.committed)  # resume after a restart
>>> [r.offset for r in src2.consume(10, 0.0)], src2.at_end()
([3, 4], True)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from streamtta.stream import _json
from streamtta.stream.base import TopicPartition
from streamtta.stream.dlq import DEFAULT_MAX_VALUE_BYTES, DeadLetterMessage, dead_letter_message
from streamtta.types import RawRecord, Sample

__all__ = ["MemorySource", "MemorySink", "JsonlSink", "MemoryDeadLetter", "SimulatedCrash"]


class SimulatedCrash(RuntimeError):
    """Raised by :class:`MemorySource` when ``fail_after`` records have been delivered."""


class MemorySource:
    """A bounded :class:`~streamtta.stream.base.Source` over a list or an iterator.

    Parameters
    ----------
    records
        :class:`~streamtta.types.RawRecord` objects, or raw ``bytes`` values which are wrapped as records of
        ``topic`` partition 0 with offsets 0, 1, 2, ... (a list is kept and exposed as :attr:`records`;
        an iterator is consumed lazily).
    topic
        Topic name used for ``bytes`` items.
    start_offsets
        ``{(topic, partition): next offset}``: records below these offsets are skipped, as a consumer
        resuming from committed offsets would (pass a previous source's :attr:`committed`).
    fail_after
        Raise :class:`SimulatedCrash` from :meth:`consume` once this many records were delivered.
    """

    #: the engine stops at the end of a finite source (``Engine.run`` returns)
    finite = True

    def __init__(self, records: Iterable[RawRecord | bytes], topic: str = "memory", *,
                 start_offsets: Mapping[TopicPartition, int] | None = None, fail_after: int | None = None) -> None:
        self.topic = topic
        self.records: list[RawRecord] | None = None
        if isinstance(records, (list, tuple)):
            self.records = [self._wrap(r, i) for i, r in enumerate(records)]
            self._it: Iterator[RawRecord] = iter(self.records)
        else:
            self._it = (self._wrap(r, i) for i, r in enumerate(records))
        self.start_offsets = dict(start_offsets or {})
        self.fail_after = fail_after
        #: Last committed next offset per partition.
        self.committed: dict[TopicPartition, int] = {}
        #: Every commit call, in order.
        self.commit_history: list[dict[TopicPartition, int]] = []
        self.delivered = 0
        self._peek: RawRecord | None = None
        self._exhausted = False
        self._paused = False
        self._closed = False
        self._assigned: list[TopicPartition] = []
        self._ends: dict[TopicPartition, int] | None = None
        self._assign_cbs: list[Callable[[list[TopicPartition]], Any]] = []
        self._revoke_cbs: list[Callable[[list[TopicPartition]], Any]] = []

    @classmethod
    def from_samples(cls, samples: Iterable[Sample], topic: str = "memory", *, codec: str = "tensor",
                     **kw: Any) -> "MemorySource":
        """Encode samples (key = stream id) into a source; ``codec`` as in :func:`~streamtta.stream.envelope.encode_sample`."""
        from streamtta.stream.envelope import encode_sample

        def gen() -> Iterator[RawRecord]:
            for i, s in enumerate(samples):
                yield RawRecord(topic=topic, partition=0, offset=i, value=encode_sample(s, codec),
                                key=s.stream_id.encode("utf-8"))

        return cls(list(gen()), topic, **kw)

    def _wrap(self, r: RawRecord | bytes, i: int) -> RawRecord:
        if isinstance(r, RawRecord):
            return r
        if isinstance(r, (bytes, bytearray)) or r is None:
            return RawRecord(topic=self.topic, partition=0, offset=i, value=None if r is None else bytes(r))
        raise TypeError(f"MemorySource items must be RawRecord or bytes, got {type(r).__name__}")

    def _next(self) -> RawRecord | None:
        while True:
            if self._peek is not None:
                r, self._peek = self._peek, None
                return r
            try:
                r = next(self._it)
            except StopIteration:
                self._exhausted = True
                return None
            if r.offset >= self.start_offsets.get((r.topic, r.partition), 0):
                return r

    def end_offset(self, tp: TopicPartition) -> int | None:
        """Where partition ``tp`` ends (last offset + 1) for a list source, ``None`` for an iterator."""
        if self.records is None:
            return None
        if self._ends is None:
            self._ends = {}
            for r in self.records:
                key = (r.topic, r.partition)
                self._ends[key] = max(self._ends.get(key, 0), r.offset + 1)
        return self._ends.get(tp, 0)

    # -- Source protocol -----------------------------------------------------------------------
    def consume(self, max_records: int, timeout: float) -> list[RawRecord]:
        if self._closed:
            raise RuntimeError("MemorySource.consume() called after close()")
        if self._paused:
            return []
        out: list[RawRecord] = []
        while len(out) < max_records:
            if self.fail_after is not None and self.delivered >= self.fail_after:
                if out:
                    break
                raise SimulatedCrash(f"simulated crash after {self.delivered} delivered records")
            r = self._next()
            if r is None:
                break
            tp = (r.topic, r.partition)
            if tp not in self._assigned:
                self._assigned.append(tp)
                for cb in self._assign_cbs:
                    cb([tp])
            out.append(r)
            self.delivered += 1
        return out

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        if not offsets:
            return
        snapshot = {(t, int(p)): int(o) for (t, p), o in offsets.items()}
        for tp, o in snapshot.items():
            if o < 0:
                raise ValueError(f"commit offset for {tp} must be >= 0, got {o}")
        self.committed.update(snapshot)
        self.commit_history.append(snapshot)

    def on_assign(self, cb: Callable[[list[TopicPartition]], Any]) -> None:
        self._assign_cbs.append(cb)

    def on_revoke(self, cb: Callable[[list[TopicPartition]], Any]) -> None:
        self._revoke_cbs.append(cb)

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def at_end(self) -> bool:
        if self._exhausted:
            return True
        if self._peek is None:
            self._peek = self._next()
        return self._peek is None

    def close(self) -> None:
        """Calls the revoke callbacks with every partition seen (as a Kafka consumer does on close)."""
        if self._closed:
            return
        if self._assigned:
            for cb in self._revoke_cbs:
                cb(list(self._assigned))
        self._closed = True

    def assignment(self) -> list[TopicPartition]:
        return sorted(self._assigned)


class MemorySink:
    """:class:`~streamtta.stream.base.Sink` keeping ``(key, value)`` pairs in :attr:`records`."""

    def __init__(self) -> None:
        self.records: list[tuple[str | None, Any]] = []
        self.flushes = 0

    def write(self, key: str | None, value: Any) -> None:
        self.records.append((key, value))

    @property
    def values(self) -> list[Any]:
        return [v for _, v in self.records]

    def flush(self, timeout: float = 30.0) -> None:
        self.flushes += 1

    def close(self) -> None:
        pass


class JsonlSink:
    """:class:`~streamtta.stream.base.Sink` appending one JSON document per line to ``path``.

    Each line is the ``value`` (a JSON object); with ``include_key=True`` the key is added under
    ``"_key"``. :meth:`flush` flushes Python's buffer and ``os.fsync``\\ s the file, so everything
    written before a successful flush survives a crash of the process or the machine.

    >>> import json, tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "alerts.jsonl"
    >>> sink = JsonlSink(p)
    >>> sink.write("s1", {"kind": "ood_burst", "score": 0.5})
    >>> sink.flush()
    >>> [json.loads(line) for line in p.read_text().splitlines()]
    [{'kind': 'ood_burst', 'score': 0.5}]
    >>> sink.close()
    """

    def __init__(self, path: str | os.PathLike[str], *, include_key: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.include_key = include_key
        self._fh = open(self.path, "a", encoding="utf-8")
        self.written = 0

    def write(self, key: str | None, value: Any) -> None:
        if self._fh.closed:
            raise RuntimeError(f"JsonlSink({str(self.path)!r}) is closed")
        doc = value
        if self.include_key:
            if not isinstance(value, Mapping):
                raise TypeError(f"include_key=True needs mapping values, got {type(value).__name__}")
            doc = {**value, "_key": key}
        self._fh.write(_json.dumps(doc) + "\n")
        self.written += 1

    def flush(self, timeout: float = 30.0) -> None:
        if self._fh.closed:
            return
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self.flush()
            self._fh.close()

    def __repr__(self) -> str:
        return f"JsonlSink({str(self.path)!r})"


class MemoryDeadLetter:
    """:class:`~streamtta.stream.base.DeadLetter` keeping ``(record, error)`` pairs in :attr:`records` and,
    in :attr:`messages`, each dead letter as :class:`~streamtta.stream.kafka.KafkaDeadLetter` would publish
    it (original cut to ``max_value_bytes``, ``dlq.*`` headers; see :mod:`streamtta.stream.dlq`).

    >>> dlq = MemoryDeadLetter(max_value_bytes=4)
    >>> dlq.send(RawRecord(topic="t", partition=0, offset=3, value=b"0123456789"), "too long")
    >>> m = dlq.messages[0]
    >>> m.value, m.header("dlq.size"), m.header("dlq.error"), dlq.truncated
    (b'0123', b'10', b'too long', 1)
    """

    def __init__(self, *, max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES) -> None:
        self.max_value_bytes = max_value_bytes
        self.records: list[tuple[RawRecord, str]] = []
        self.messages: list[DeadLetterMessage] = []
        self.truncated = 0

    def send(self, record: RawRecord, error: str) -> None:
        msg = dead_letter_message(record, error, max_value_bytes=self.max_value_bytes)
        self.records.append((record, error))
        self.messages.append(msg)
        self.truncated += msg.truncated

    def flush(self, timeout: float = 30.0) -> None:
        pass

    def close(self) -> None:
        pass
