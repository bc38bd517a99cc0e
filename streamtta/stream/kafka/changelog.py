"""A Kafka changelog of versioned byte values per key: chunked, hash-checked, read back to the end.

The changelog topic of a run is ``<input topic>.<group id>.state`` (:func:`changelog_topic`), created with
``cleanup.policy=compact`` when missing (:func:`ensure_changelog_topic`). Each :meth:`Changelog.put_many`
writes one new *version* of a key's bytes: its ``seq`` (callers take :meth:`Changelog.next_seq`, one
more than the newest seq the changelog holds for the key), a random version id, and the bytes cut into
chunks that fit the producer's ``message.max.bytes``. Every chunk carries the headers of :data:`HEADERS`:
state key, seq, version id, slot, chunk index, chunk count, SHA-256 and size of the whole value. All
records of a key go to one partition (CRC-32 of the key), in order. :meth:`~Changelog.put_many` returns only once every chunk is acknowledged (``acks=all``), and
raises :class:`~streamtta.stream.kafka.errors.DeliveryError` otherwise.

Reading never depends on compaction: :meth:`Changelog.versions` reads every partition from where it
stopped to its end (partition EOF, i.e. the high watermark of the fetch answer), indexes the versions
from the headers (values are not kept, :class:`ChangelogIndex`), and returns the complete ones, newest
first (highest seq; the same seq written twice: the later one). :meth:`Changelog.read` reassembles a
version and returns it only when its length and SHA-256 match; a torn or corrupt version is skipped in
favour of the previous complete one.

Under compaction: a record's Kafka key is ``<state key>#<slot>.<chunk index>``; a version is written to
the slot its key's newest complete version does not use, so compacting away a torn write's chunks never
removes the last complete version. :meth:`Changelog.reject` writes a marker (``<state key>#rejected``)
that hides the versions up to a seq from every reader.

>>> changelog_topic("sensors", "fleet")
'sensors.fleet.state'
>>> [(k, v, dict(h)["streamtta.state.chunk"]) for k, v, h in split("t:0", b"abcde", seq=1, vid="v", slot=0, chunk_bytes=2)]
[(b't:0#0.0', b'ab', b'0'), (b't:0#0.1', b'cd', b'1'), (b't:0#0.2', b'e', b'2')]
"""
from __future__ import annotations

import hashlib
import logging
import time
import uuid
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException
from confluent_kafka import TopicPartition as KTP
from confluent_kafka.admin import NewTopic

from streamtta.stream.kafka.admin import admin_client, ensure_topics
from streamtta.stream.kafka.errors import BrokerUnavailable, ClientLog, DeliveryError, MissingTopicError, quiet
from streamtta.stream.kafka.sinks import make_producer

__all__ = ["Changelog", "ChangelogError", "ChangelogIndex", "Version", "changelog_topic", "chunk_bytes_for",
           "ensure_changelog_topic", "split"]

log = logging.getLogger(__name__)

_H = "streamtta.state."
#: Headers of every chunk record (values are UTF-8 / decimal strings).
HEADERS = tuple(_H + n for n in ("key", "seq", "id", "slot", "chunk", "chunks", "sha256", "size"))
#: Header of a reject marker (value ``rejected``); its ``seq`` header: the newest seq it hides.
TYPE_HEADER = _H + "type"
#: Bytes of a record kept for its Kafka key, headers and batch framing below ``message.max.bytes``.
RECORD_OVERHEAD = 16_384
_KEEP_COMPLETE, _KEEP_TORN = 3, 4  # versions per key the index keeps
_FATAL_READ = frozenset({KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.TOPIC_AUTHORIZATION_FAILED,
                         KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED})


class ChangelogError(BrokerUnavailable):
    """The changelog could not be read (broker away, end not reached in time, access denied): ``run`` exits 1."""


def changelog_topic(input_topic: str, group_id: str) -> str:
    return f"{input_topic}.{group_id}.state"


def chunk_bytes_for(message_max_bytes: int | None) -> int:
    """The largest chunk of value that fits a record of ``message_max_bytes`` (librdkafka's default
    1,000,000 when None) with room for its key and headers.

    >>> chunk_bytes_for(None), chunk_bytes_for(16_384)
    (983616, 8192)
    """
    limit = int(message_max_bytes or 1_000_000)
    return max(limit - RECORD_OVERHEAD, limit // 2)


def _b(key: str) -> bytes:
    return key.encode("utf-8", "surrogatepass")


def split(key: str, data: bytes, *, seq: int, vid: str, slot: int, chunk_bytes: int
          ) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    """The records ``(kafka key, value, headers)`` of one version of ``key`` (at least one, even when
    ``data`` is empty)."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    parts = [data[i:i + chunk_bytes] for i in range(0, len(data), chunk_bytes)] or [b""]
    digest = hashlib.sha256(data).hexdigest()
    out = []
    for i, part in enumerate(parts):
        values = (key, seq, vid, slot, i, len(parts), digest, len(data))
        out.append((_b(f"{key}#{slot}.{i}"), part, [(h, _b(str(v))) for h, v in zip(HEADERS, values)]))
    return out


@dataclass
class Version:
    """One version of a key in the changelog: where its chunks are (``parts``: index -> (partition, offset))."""

    key: str
    seq: int
    vid: str
    slot: int
    count: int
    sha256: str
    size: int
    parts: dict[int, tuple[int, int]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.parts) == self.count

    @property
    def order(self) -> tuple[int, int, int]:
        """Newer versions sort higher: seq, then the position of the last chunk."""
        last = max(self.parts.values(), default=(0, -1))
        return (self.seq, last[1], last[0])


def _headers(msg_headers: Any) -> dict[str, str]:
    return {k: bytes(v).decode("utf-8", "surrogatepass")
            for k, v in msg_headers or () if k.startswith(_H) and v is not None}


class ChangelogIndex:
    """The versions per key of a changelog, from record headers only (a few per key are kept: the three
    newest complete ones and the four newest torn ones), and the reject markers.

    >>> idx = ChangelogIndex()
    >>> for off, (_, _, hdrs) in enumerate(split("k", b"xyz", seq=1, vid="a", slot=0, chunk_bytes=2)):
    ...     idx.add(0, off, hdrs)
    >>> [(v.seq, v.complete) for v in idx.candidates("k")], idx.newest_seq("k")
    ([(1, True)], 1)
    """

    def __init__(self) -> None:
        self._versions: dict[str, dict[str, Version]] = {}
        self._rejected: dict[str, int] = {}

    def add(self, partition: int, offset: int, headers: Any) -> None:
        """Index one changelog record. Records without valid state headers (missing, not UTF-8, not
        numbers, a negative seq, a slot other than 0 or 1, no chunks) are data another client wrote:
        logged and ignored, never raised."""
        try:
            h = _headers(headers)  # UnicodeDecodeError is a ValueError
            key, seq = h[_H + "key"], int(h[_H + "seq"])
            if h.get(TYPE_HEADER) == "rejected" and seq >= 0:
                self._rejected[key] = max(self._rejected.get(key, 0), seq)
                return
            vid, slot, idx, count = h[_H + "id"], int(h[_H + "slot"]), int(h[_H + "chunk"]), int(h[_H + "chunks"])
            sha, size = h[_H + "sha256"], int(h[_H + "size"])
            if seq < 0 or slot not in (0, 1) or count < 1 or size < 0:
                raise ValueError(f"seq {seq}, slot {slot}, {count} chunks, size {size}")
        except (KeyError, ValueError) as e:
            log.debug("changelog record %d@%d: no valid state headers (%s); ignored", partition, offset, e)
            return
        versions = self._versions.setdefault(key, {})
        v = versions.get(vid)
        if v is None:
            v = versions[vid] = Version(key, seq, vid, slot, count, sha, size)
        if (v.seq, v.count, v.sha256, v.size) == (seq, count, sha, size) and 0 <= idx < count:
            v.parts[idx] = (partition, offset)
        if len(versions) > _KEEP_COMPLETE + _KEEP_TORN:
            self._prune(key)

    def _prune(self, key: str) -> None:
        ordered = sorted(self._versions[key].values(), key=lambda v: v.order, reverse=True)
        keep = [v for v in ordered if v.complete][:_KEEP_COMPLETE] + [v for v in ordered if not v.complete][:_KEEP_TORN]
        self._versions[key] = {v.vid: v for v in keep}

    def candidates(self, key: str) -> list[Version]:
        """The complete versions of ``key`` not hidden by a reject marker, newest first."""
        hidden = self._rejected.get(key, 0)
        found = [v for v in self._versions.get(key, {}).values() if v.complete and v.seq > hidden]
        return sorted(found, key=lambda v: v.order, reverse=True)

    def rejected(self, key: str) -> int:
        """The newest seq of ``key`` a reject marker hides (0: none)."""
        return self._rejected.get(key, 0)

    def positions(self, key: str) -> set[tuple[int, int]]:
        """(partition, offset) of every indexed chunk of ``key``."""
        return {po for v in self._versions.get(key, {}).values() for po in v.parts.values()}

    def newest_seq(self, key: str) -> int:
        """The highest seq the changelog holds for ``key`` (torn versions and reject markers included); 0: none."""
        seqs = [v.seq for v in self._versions.get(key, {}).values()] + [self._rejected.get(key, 0)]
        return max(seqs)

    def free_slot(self, key: str) -> int:
        """The slot a new version of ``key`` goes to: not its newest complete version's."""
        cands = self.candidates(key)
        return 1 - cands[0].slot if cands else 0


def ensure_changelog_topic(bootstrap_servers: str, topic: str, partitions: int, *,
                           config: Mapping[str, Any] | None = None, timeout: float = 15.0) -> int:
    """Create ``topic`` with ``cleanup.policy=compact`` when it is missing (``config``: the admin client's
    librdkafka settings); its partition count. :class:`MissingTopicError` when it cannot be created."""
    admin = admin_client(bootstrap_servers, config)
    md = admin.list_topics(timeout=timeout)
    if topic not in md.topics or md.topics[topic].error is not None:
        fut = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=-1,
                                            config={"cleanup.policy": "compact"})],
                                  operation_timeout=timeout, request_timeout=timeout)[topic]
        try:
            fut.result(timeout=timeout)
            log.info("created changelog topic %s (%d partitions, cleanup.policy=compact)", topic, partitions)
        except KafkaException as e:
            if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise MissingTopicError(f"could not create changelog topic {topic!r}: {e.args[0].str()}") from e
    return ensure_topics(bootstrap_servers, {topic: partitions}, timeout=timeout, config=config)[topic]


class Changelog:
    """Versions of byte values per key in one changelog topic (see the module docstring).

    ``producer_config`` / ``consumer_config`` / ``admin_config``: librdkafka settings of its clients (a run
    passes ``client_settings(kafka, role)``, so security settings apply). ``partitions``: the partition
    count used when the topic is created. ``timeout_s`` bounds a write's acknowledgement and a read to
    the end. ``chunk_bytes`` defaults to :func:`chunk_bytes_for` the producer's ``message.max.bytes``.
    """

    def __init__(self, bootstrap_servers: str, topic: str, *, partitions: int = 1,
                 producer_config: Mapping[str, Any] | None = None, consumer_config: Mapping[str, Any] | None = None,
                 admin_config: Mapping[str, Any] | None = None, timeout_s: float = 30.0,
                 chunk_bytes: int | None = None) -> None:
        self.topic, self.timeout_s = topic, float(timeout_s)
        self.partitions = ensure_changelog_topic(bootstrap_servers, topic, partitions, config=admin_config,
                                                 timeout=self.timeout_s)
        pconf = {str(k): v for k, v in (producer_config or {}).items()}
        self._producer = make_producer(bootstrap_servers, **quiet(pconf, ClientLog("producer")))
        self.chunk_bytes = chunk_bytes or chunk_bytes_for(getattr(self._producer, "message_max_bytes", None))
        cconf = {str(k): v for k, v in (consumer_config or {}).items()}
        cconf.update({"bootstrap.servers": bootstrap_servers, "enable.auto.commit": False,
                      "enable.auto.offset.store": False, "enable.partition.eof": True,
                      "auto.offset.reset": "earliest", "fetch.wait.max.ms": 10})  # the end is found sooner
        cconf.setdefault("group.id", f"{topic}.reader")  # never joined nor committed: partitions are assigned
        self._consumer = Consumer(quiet(cconf, ClientLog("consumer")))
        self.index = ChangelogIndex()
        self._pos: dict[int, int] = {}
        self._kept: dict[tuple[int, int], bytes] = {}
        self._known: set[str] = set()  # keys whose newest seq the index is up to date with
        self._closed = False

    def partition_of(self, key: str) -> int:
        return zlib.crc32(_b(key)) % self.partitions

    # -- writing ---------------------------------------------------------------------------------
    def next_seq(self, key: str) -> int:
        """One more than the newest seq of ``key`` (read to the end first unless this changelog has read
        or written ``key`` before: one writer per key at a time, the group's owner of it)."""
        if key not in self._known:
            self.catch_up()
            self._known.add(key)
        return self.index.newest_seq(key) + 1

    def put_many(self, values: Mapping[str, tuple[int, bytes]]) -> None:
        """Write ``{key: (seq, data)}`` and wait until every chunk is acknowledged (then indexed).
        :class:`DeliveryError` when any chunk failed or is unacknowledged after ``timeout_s``: nothing may
        then count as durable."""
        if not set(values) <= self._known:
            self.catch_up()
        self._known.update(values)
        records = []
        for key, (seq, data) in values.items():
            chunks = split(key, data, seq=seq, vid=uuid.uuid4().hex[:16], slot=self.index.free_slot(key),
                           chunk_bytes=self.chunk_bytes)
            records += [(k, v, h, self.partition_of(key)) for k, v, h in chunks]
        self._send(records)

    def reject(self, key: str, seq: int) -> None:
        """Hide the versions of ``key`` up to ``seq`` from every reader (a durable marker)."""
        headers = [(_H + "key", _b(key)), (_H + "seq", _b(str(seq))), (TYPE_HEADER, b"rejected")]
        self._send([(_b(f"{key}#rejected"), b"rejected", headers, self.partition_of(key))])

    def _send(self, records: list[tuple[bytes, bytes, list[tuple[str, bytes]], int]]) -> None:
        errors: list[str] = []

        def delivered(headers: Any) -> Any:
            def cb(err: KafkaError | None, msg: Any) -> None:
                if err is not None:
                    errors.append(err.str())
                else:
                    self.index.add(msg.partition(), msg.offset(), headers)
            return cb

        for key, value, headers, partition in records:
            deadline = time.monotonic() + self.timeout_s
            while True:
                try:
                    self._producer.produce(self.topic, value=value, key=key, headers=headers, partition=partition,
                                           on_delivery=delivered(headers))
                    break
                except BufferError as e:
                    if time.monotonic() > deadline:
                        raise DeliveryError(f"producer queue stayed full for {self.timeout_s:g} s writing the "
                                            f"changelog {self.topic!r}") from e
                    self._producer.poll(0.1)
                except KafkaException as e:
                    raise DeliveryError(f"could not write a {len(value)}-byte chunk to the changelog "
                                        f"{self.topic!r}: {e.args[0].str() if e.args else e}") from e
        left = self._producer.flush(self.timeout_s)
        if errors or left:
            raise DeliveryError(f"changelog {self.topic!r}: {len(errors)} chunk(s) failed, {left} unacknowledged "
                                f"after {self.timeout_s:g} s; first error: {errors[0] if errors else '-'}")

    # -- reading ---------------------------------------------------------------------------------
    def catch_up(self, keep: str | None = None) -> None:
        """Index every partition from where the last catch-up stopped to its end (values of ``keep``'s
        records are kept for the next :meth:`read`). :class:`ChangelogError` after ``timeout_s``."""
        self._kept.clear()
        self._consumer.assign([KTP(self.topic, p, self._pos.get(p, OFFSET_BEGINNING)) for p in range(self.partitions)])
        pending, deadline = set(range(self.partitions)), time.monotonic() + self.timeout_s
        want, last_error = (_b(keep) if keep is not None else None), "-"
        try:
            while pending:
                if time.monotonic() > deadline:
                    raise ChangelogError(f"could not read the changelog {self.topic!r} to its end within "
                                         f"{self.timeout_s:g} s (partitions {sorted(pending)} unfinished; "
                                         f"last error: {last_error})")
                for m in self._consumer.consume(1000, 0.02):
                    err = m.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            pending.discard(m.partition())
                        elif err.fatal() or err.code() in _FATAL_READ:
                            raise ChangelogError(f"reading the changelog {self.topic!r}: {err.str()}")
                        else:  # the broker away for a moment: retried until the deadline
                            last_error = err.str()
                        continue
                    p, o = m.partition(), m.offset()
                    self._pos[p] = o + 1
                    self.index.add(p, o, m.headers())
                    if want is not None and dict(m.headers() or ()).get(_H + "key") == want:
                        self._kept[(p, o)] = m.value() or b""
                if len(self._kept) > 64:  # keep only the chunks of versions the index still holds
                    live = self.index.positions(keep or "")
                    self._kept = {po: v for po, v in self._kept.items() if po in live}
        finally:
            self._consumer.unassign()

    def versions(self, key: str) -> list[Version]:
        """Read the changelog to its end; the complete versions of ``key``, newest first."""
        self.catch_up(keep=key)
        self._known.add(key)
        return self.index.candidates(key)

    def read(self, version: Version) -> bytes | None:
        """The value of ``version``, None when a chunk is gone or the bytes do not match its size and SHA-256."""
        need = {o: (p, i) for i, (p, o) in version.parts.items()}
        got = {i: self._kept[(p, o)] for o, (p, i) in need.items() if (p, o) in self._kept}
        if len(got) < version.count:
            got.update(self._fetch(version))
        if len(got) < version.count:
            return None
        data = b"".join(got[i] for i in range(version.count))
        if len(data) != version.size or hashlib.sha256(data).hexdigest() != version.sha256:
            log.warning("version %d of %s in the changelog %s does not match its SHA-256; ignored",
                        version.seq, version.key, self.topic)
            return None
        return data

    def _fetch(self, version: Version) -> dict[int, bytes]:
        by_part: dict[int, dict[int, int]] = {}
        for i, (p, o) in version.parts.items():
            by_part.setdefault(p, {})[o] = i
        got: dict[int, bytes] = {}
        for p, offsets in by_part.items():
            self._consumer.assign([KTP(self.topic, p, min(offsets))])
            deadline, last = time.monotonic() + self.timeout_s, max(offsets)
            try:
                while time.monotonic() < deadline:
                    msgs = self._consumer.consume(1000, 0.02)
                    if any(m.error() is not None and m.error().code() == KafkaError._PARTITION_EOF for m in msgs):
                        deadline = 0.0
                    for m in msgs:
                        if m.error() is None and m.offset() in offsets:
                            got[offsets[m.offset()]] = m.value() or b""
                        if m.error() is None and m.offset() >= last:
                            deadline = 0.0
            finally:
                self._consumer.unassign()
        return got

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._producer.flush(self.timeout_s)
        finally:
            self._consumer.close()
