"""Kafka source, sinks and dead-letter queue on confluent-kafka (librdkafka).

Delivery guarantee: **at-least-once**. :class:`KafkaSource` never commits on its own
(``enable.auto.commit=False``, ``enable.auto.offset.store=False``); the engine calls
:meth:`KafkaSource.commit` with *next* offsets (last processed + 1) only after its sinks flushed
successfully (:meth:`KafkaSink.flush` raises :class:`DeliveryError` if any output was lost) and its
state was checkpointed. A crash between processing and commit replays the uncommitted records.

Consumer defaults (:data:`CONSUMER_DEFAULTS`, any of them can be overridden except the two commit
settings):

* ``session.timeout.ms=6000`` / ``heartbeat.interval.ms=1000``: 6 s is the smallest session timeout a
  stock Kafka broker accepts (``group.min.session.timeout.ms``), and on the embedded Tansu broker the
  first group join takes half the session timeout (see :mod:`streamtta.stream.broker`): 3 s instead of
  23 s at librdkafka's 45 s default. Heartbeats come from librdkafka's own thread, so a slow model step
  does not cost the membership; a stalled loop is bounded by ``max.poll.interval.ms`` instead.
* ``partition.assignment.strategy=range`` (eager rebalancing): on the Tansu build we ship,
  ``cooperative-sticky`` revokes partitions and never hands them to the new member (measured). The
  source supports the cooperative protocol too (incremental assign) for real Kafka.
* ``fetch.wait.max.ms=100``: a new record reaches the engine within ~0.1 s on an idle topic.
* ``enable.partition.eof`` follows ``stop_at_end``.

>>> from streamtta.stream.kafka import CONSUMER_DEFAULTS
>>> CONSUMER_DEFAULTS["enable.auto.commit"], CONSUMER_DEFAULTS["session.timeout.ms"]
(False, 6000)
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable, Mapping

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition as KTP
from confluent_kafka.admin import AdminClient, NewTopic

from streamtta.stream import _json
from streamtta.stream.base import TopicPartition
from streamtta.types import RawRecord

__all__ = [
    "CONSUMER_DEFAULTS",
    "PRODUCER_DEFAULTS",
    "CommitError",
    "DeliveryError",
    "KafkaSource",
    "KafkaSink",
    "KafkaDeadLetter",
    "make_producer",
    "ensure_topics",
    "DLQ_HEADERS",
]

log = logging.getLogger(__name__)

#: librdkafka consumer settings used unless overridden (see the module docstring for the reasons).
CONSUMER_DEFAULTS: dict[str, Any] = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "auto.offset.reset": "earliest",
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 1000,
    "max.poll.interval.ms": 300_000,
    "partition.assignment.strategy": "range",
    "fetch.wait.max.ms": 100,
    "client.id": "streamtta",
}
_FORCED_FALSE = ("enable.auto.commit", "enable.auto.offset.store")

#: librdkafka producer settings used by :func:`make_producer` unless overridden.
PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 5,
    "client.id": "streamtta",
}

#: Headers a dead-lettered record carries, in addition to its original headers.
DLQ_HEADERS = ("dlq.origin.topic", "dlq.origin.partition", "dlq.origin.offset", "dlq.error", "dlq.timestamp")
_MAX_ERROR_CHARS = 4000
_MAX_KEPT_ERRORS = 20

RebalanceCallback = Callable[[list[TopicPartition]], "Mapping[TopicPartition, int] | None"]


class CommitError(RuntimeError):
    """A synchronous offset commit failed (the offsets were not stored)."""


class DeliveryError(RuntimeError):
    """One or more produced records were not delivered (or still queued after the flush timeout)."""


def _kconf(conf: Mapping[str, Any]) -> dict[str, Any]:
    """librdkafka settings are passed through verbatim (keys are dotted, a few use ``_``: ``log_level``)."""
    return {str(k): v for k, v in conf.items()}


def _is_true(v: Any) -> bool:
    return v is True or (isinstance(v, str) and v.strip().lower() in ("true", "1", "yes")) or v == 1


# ---------------------------------------------------------------------------------------------
# source
# ---------------------------------------------------------------------------------------------
class KafkaSource:
    """Batch consumer implementing :class:`~streamtta.stream.base.Source` (at-least-once).

    Parameters
    ----------
    bootstrap_servers
        ``host:port[,host:port]``.
    topics
        Topics to subscribe to (consumer-group managed assignment).
    group_id
        Consumer group; committed offsets are stored per group.
    overrides
        Extra librdkafka consumer settings (override :data:`CONSUMER_DEFAULTS`).
    stop_at_end
        Track partition EOF so that :meth:`at_end` turns True once every assigned partition has been
        read to its end (bounded replays).

    Rebalance callbacks registered with :meth:`on_assign` / :meth:`on_revoke` / :meth:`on_lost` are
    called with ``[(topic, partition), ...]`` from inside :meth:`consume` (or :meth:`close`). An
    ``on_assign`` callback may return ``{(topic, partition): offset}`` to start those partitions at
    given offsets (e.g. the offset stored in a state checkpoint) instead of the committed ones.

    Example (needs a broker)::

        src = KafkaSource("127.0.0.1:9092", ["streamtta.input"], "streamtta", stop_at_end=True)
        while not src.at_end():
            batch = src.consume(64, 1.0)
            ...  # process, flush sinks
            src.commit({(r.topic, r.partition): r.offset + 1 for r in batch})
        src.close()
    """

    def __init__(self, bootstrap_servers: str, topics: Iterable[str] | str, group_id: str, *,
                 overrides: Mapping[str, Any] | None = None, stop_at_end: bool = False) -> None:
        if isinstance(topics, str):
            topics = [topics]
        self.topics = list(topics)
        if not self.topics:
            raise ValueError("KafkaSource needs at least one topic")
        if not group_id:
            raise ValueError(f"KafkaSource needs a non-empty group_id, got {group_id!r}")
        self.bootstrap_servers = bootstrap_servers
        self.group_id = group_id
        self.stop_at_end = stop_at_end
        conf = dict(CONSUMER_DEFAULTS)
        conf["enable.partition.eof"] = bool(stop_at_end)
        extra = _kconf(overrides or {})
        for key in _FORCED_FALSE:
            if key in extra and _is_true(extra[key]):
                raise ValueError(f"KafkaSource: {key}=true would break at-least-once delivery; the engine commits "
                                 f"offsets itself after its outputs are flushed")
        conf.update(extra)
        conf["bootstrap.servers"] = bootstrap_servers
        conf["group.id"] = group_id
        self.config = conf
        self._cooperative = "cooperative" in str(conf.get("partition.assignment.strategy", ""))
        self._assign_cbs: list[RebalanceCallback] = []
        self._revoke_cbs: list[Callable[[list[TopicPartition]], None]] = []
        self._lost_cbs: list[Callable[[list[TopicPartition]], None]] = []
        self._assigned: set[TopicPartition] = set()
        self._eof: dict[TopicPartition, bool] = {}
        self._start_check: dict[TopicPartition, int] = {}
        self._paused = False
        self._in_lost = False
        self._closed = False
        self._warned: set[tuple[int, str]] = set()
        #: Number of consumer error events (not counting partition EOF) seen so far.
        self.errors = 0
        #: Number of rebalance callbacks (assign + revoke + lost) served so far.
        self.rebalances = 0
        self._consumer = Consumer(conf)
        self._consumer.subscribe(self.topics, on_assign=self._handle_assign, on_revoke=self._handle_revoke,
                                 on_lost=self._handle_lost)

    # -- Source protocol -----------------------------------------------------------------------
    def consume(self, max_records: int, timeout: float) -> list[RawRecord]:
        """Up to ``max_records`` records, waiting at most ``timeout`` seconds (``[]`` while paused)."""
        if self._closed:
            raise RuntimeError("KafkaSource.consume() called after close()")
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        msgs = self._consumer.consume(num_messages=int(max_records), timeout=float(timeout))
        out: list[RawRecord] = []
        for m in msgs:
            err = m.error()
            if err is not None:
                self._handle_error(m, err)
                continue
            tp = (m.topic(), m.partition())
            self._eof[tp] = False
            self._start_check.pop(tp, None)
            out.append(_to_raw(m))
        if self._start_check:
            self._check_starts()
        return out

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Synchronously commit next offsets ``{(topic, partition): last processed + 1}``.

        Raises :class:`CommitError` if the broker rejects any of them. While partitions are being
        *lost* (session expired) commits are skipped with a warning: the group has already moved on, and
        the new owner re-reads from the last committed offset (at-least-once).
        """
        if not offsets:
            return
        if self._closed:
            raise CommitError("commit() after close()")
        tps = []
        for (topic, partition), off in sorted(offsets.items()):
            if int(off) < 0:
                raise ValueError(f"commit offset for {topic}[{partition}] must be >= 0, got {off}")
            tps.append(KTP(topic, int(partition), int(off)))
        if self._in_lost:
            log.warning("skipping commit of %s: partitions were lost (session timeout)", _fmt(offsets))
            return
        try:
            result = self._consumer.commit(offsets=tps, asynchronous=False)
        except KafkaException as e:
            raise CommitError(f"commit of {_fmt(offsets)} failed: {e.args[0]}") from e
        failed = [f"{tp.topic}[{tp.partition}]: {tp.error}" for tp in (result or []) if tp.error is not None]
        if failed:
            raise CommitError(f"commit failed for {', '.join(failed)}")

    def on_assign(self, cb: RebalanceCallback) -> None:
        """Register ``cb(partitions)`` called when partitions are assigned (may return start offsets)."""
        self._assign_cbs.append(cb)

    def on_revoke(self, cb: Callable[[list[TopicPartition]], None]) -> None:
        """Register ``cb(partitions)`` called before partitions are revoked (commit here)."""
        self._revoke_cbs.append(cb)

    def on_lost(self, cb: Callable[[list[TopicPartition]], None]) -> None:
        """Register ``cb(partitions)`` for partitions lost without a clean revoke.

        Without any ``on_lost`` callback, lost partitions go to the ``on_revoke`` callbacks (whose commits
        are then skipped, see :meth:`commit`).
        """
        self._lost_cbs.append(cb)

    def pause(self) -> None:
        """Stop fetching from all assigned partitions (keep calling :meth:`consume`: it returns ``[]``).

        The pause survives rebalances: newly assigned partitions are paused as well.
        """
        self._paused = True
        parts = self._consumer.assignment()
        if parts:
            self._consumer.pause(parts)

    def resume(self) -> None:
        """Resume fetching from all assigned partitions."""
        self._paused = False
        parts = self._consumer.assignment()
        if parts:
            self._consumer.resume(parts)

    @property
    def paused(self) -> bool:
        return self._paused

    def at_end(self) -> bool:
        """True when ``stop_at_end`` and every assigned partition reported EOF after its last record."""
        if not self.stop_at_end or not self._assigned:
            return False
        return all(self._eof.get(tp, False) for tp in self._assigned)

    def close(self) -> None:
        """Leave the group (runs the revoke callbacks, which commit) and release the consumer."""
        if self._closed:
            return
        try:
            self._consumer.close()  # revoke callbacks run in here and may still commit
        finally:
            self._closed = True

    # -- extras ----------------------------------------------------------------------------------
    def assignment(self) -> list[TopicPartition]:
        """Currently assigned ``(topic, partition)`` pairs, sorted."""
        return sorted(self._assigned)

    def seek(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Move the fetch position of assigned partitions (outside rebalance callbacks)."""
        for (topic, partition), off in offsets.items():
            self._consumer.seek(KTP(topic, int(partition), int(off)))

    def committed(self, partitions: Iterable[TopicPartition] | None = None, timeout: float = 10.0
                  ) -> dict[TopicPartition, int | None]:
        """Committed next offsets of ``partitions`` (default: the assignment); None = nothing committed."""
        parts = [KTP(t, p) for t, p in (partitions if partitions is not None else self.assignment())]
        if not parts:
            return {}
        res = self._consumer.committed(parts, timeout=timeout)
        return {(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None) for tp in res}

    def lag(self, timeout: float = 5.0) -> dict[TopicPartition, int]:
        """Records behind the high watermark per assigned partition.

        Uses the watermark of the latest fetch response (no broker round trip; Tansu's ListOffsets
        under-reports it) and asks the broker only for partitions not fetched yet.
        """
        parts = self._consumer.assignment()
        if not parts:
            return {}
        out: dict[TopicPartition, int] = {}
        for tp in self._consumer.position(parts):
            ktp = KTP(tp.topic, tp.partition)
            lo, hi = self._consumer.get_watermark_offsets(ktp, cached=True)
            if hi < 0:
                lo, hi = self._consumer.get_watermark_offsets(ktp, timeout=timeout, cached=False)
            pos = tp.offset if tp.offset >= 0 else lo
            out[(tp.topic, tp.partition)] = max(int(hi) - int(pos), 0)
        return out

    def __enter__(self) -> "KafkaSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"KafkaSource(bootstrap_servers={self.bootstrap_servers!r}, topics={self.topics!r}, "
                f"group_id={self.group_id!r}, stop_at_end={self.stop_at_end})")

    # -- internals -----------------------------------------------------------------------------
    def _handle_error(self, m: Message, err: KafkaError) -> None:
        code = err.code()
        if code == KafkaError._PARTITION_EOF:
            self._eof[(m.topic(), m.partition())] = True
            self._start_check.pop((m.topic(), m.partition()), None)
            return
        self.errors += 1
        if err.fatal():
            raise KafkaException(err)
        key = (code, str(m.topic()))
        if key not in self._warned:  # one warning per (error, topic); librdkafka retries by itself
            self._warned.add(key)
            log.warning("Kafka consumer error on %s: %s", m.topic(), err.str())

    def _handle_assign(self, consumer: Consumer, partitions: list[KTP]) -> None:
        self.rebalances += 1
        tps = [(p.topic, p.partition) for p in partitions]
        starts: dict[TopicPartition, int] = {}
        for cb in self._assign_cbs:
            res = cb(list(tps))
            if res:
                starts.update({(t, int(p)): int(o) for (t, p), o in res.items()})
        for p in partitions:
            off = starts.get((p.topic, p.partition))
            if off is not None:
                p.offset = off
                self._start_check[(p.topic, p.partition)] = off
        if self._cooperative:
            consumer.incremental_assign(partitions)
            self._assigned |= set(tps)
        else:
            consumer.assign(partitions)
            self._assigned = set(tps)
        for tp in tps:
            self._eof[tp] = False
        if self._paused and partitions:  # assign() resets the pause state; re-apply ours
            consumer.pause(partitions)
        log.info("assigned %s", tps)

    def _check_starts(self) -> None:
        """Explicit start offsets past a partition's end would stall: Tansu answers such fetches with an
        empty response (no OFFSET_OUT_OF_RANGE, so no EOF either) and Kafka would reset the partition to
        ``auto.offset.reset``. Once a fetch reported the high watermark, start at the end instead (e.g. a
        checkpoint from an older, longer topic). The watermark comes from fetch responses (``cached``),
        because Tansu's ListOffsets(latest) under-reports it when the last batch holds several records.
        """
        for (topic, partition), start in list(self._start_check.items()):
            _, hi = self._consumer.get_watermark_offsets(KTP(topic, partition), cached=True)
            if hi < 0:
                continue  # no fetch response yet
            del self._start_check[(topic, partition)]
            if start > hi:
                log.warning("start offset %d of %s[%d] is past its end %d: starting at the end", start, topic,
                            partition, hi)
                self._consumer.seek(KTP(topic, partition, int(hi)))

    def _handle_revoke(self, consumer: Consumer, partitions: list[KTP]) -> None:
        self.rebalances += 1
        tps = [(p.topic, p.partition) for p in partitions]
        try:
            for cb in self._revoke_cbs:
                cb(list(tps))
        finally:
            self._forget(tps)
        log.info("revoked %s", tps)

    def _handle_lost(self, consumer: Consumer, partitions: list[KTP]) -> None:
        self.rebalances += 1
        tps = [(p.topic, p.partition) for p in partitions]
        self._in_lost = True
        try:
            for cb in (self._lost_cbs or self._revoke_cbs):
                cb(list(tps))
        finally:
            self._in_lost = False
            self._forget(tps)
        log.warning("lost %s (session timeout or fenced)", tps)

    def _forget(self, tps: list[TopicPartition]) -> None:
        self._assigned -= set(tps)
        for tp in tps:
            self._eof.pop(tp, None)
            self._start_check.pop(tp, None)


def _to_raw(m: Message) -> RawRecord:
    ts_type, ts = m.timestamp()
    headers = m.headers()
    return RawRecord(
        topic=m.topic(),
        partition=m.partition(),
        offset=m.offset(),
        value=m.value(),
        key=m.key(),
        headers=tuple((k, v if v is not None else b"") for k, v in headers) if headers else (),
        timestamp_ms=ts if ts_type != 0 and ts >= 0 else None,  # 0 = TIMESTAMP_NOT_AVAILABLE
    )


def _fmt(offsets: Mapping[TopicPartition, int]) -> str:
    return ", ".join(f"{t}[{p}]@{o}" for (t, p), o in sorted(offsets.items()))


# ---------------------------------------------------------------------------------------------
# producer, sinks, DLQ
# ---------------------------------------------------------------------------------------------
def make_producer(bootstrap_servers: str, **overrides: Any) -> Producer:
    """An idempotent producer (``acks=all``, ``linger.ms=5``); ``overrides`` are librdkafka settings.

    Dotted keys are passed by unpacking a dict: ``make_producer(bs, **{"linger.ms": 0})``.
    """
    conf = dict(PRODUCER_DEFAULTS)
    conf.update(_kconf(overrides))
    conf["bootstrap.servers"] = bootstrap_servers
    return Producer(conf)


class _Tracked:
    """Produce with per-message delivery tracking; flush() raises if anything was lost."""

    def __init__(self, producer: Producer | str, topic: str, overrides: Mapping[str, Any] | None) -> None:
        if not topic:
            raise ValueError("topic must be a non-empty string")
        if isinstance(producer, str):
            self._producer = make_producer(producer, **dict(overrides or {}))
            self._owns = True
        else:
            if overrides:
                raise ValueError("overrides only apply when a bootstrap string is given, not a Producer")
            self._producer = producer
            self._owns = False
        self.topic = topic
        #: Records confirmed by the broker.
        self.delivered = 0
        #: Records whose delivery failed (sticky until :meth:`clear_errors`).
        self.failed = 0
        #: First few delivery error messages.
        self.delivery_errors: list[str] = []
        self._closed = False

    @property
    def producer(self) -> Producer:
        return self._producer

    @property
    def pending(self) -> int:
        """Records queued in the (possibly shared) producer, not yet acknowledged."""
        return len(self._producer)

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.delivered += 1
            return
        self.failed += 1
        if len(self.delivery_errors) < _MAX_KEPT_ERRORS:
            self.delivery_errors.append(f"{msg.topic()}: {err.str()}")

    def _produce(self, value: bytes | None, key: bytes | None, headers: list[tuple[str, bytes]] | None = None
                 ) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} for topic {self.topic!r} is closed")
        while True:
            try:
                self._producer.produce(self.topic, value=value, key=key, headers=headers,
                                       on_delivery=self._on_delivery)
                break
            except BufferError:  # local queue full: serve delivery reports, then retry
                self._producer.poll(0.1)
        self._producer.poll(0)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait for all queued records; raise :class:`DeliveryError` if any failed or is still queued."""
        remaining = self._producer.flush(timeout)
        if self.failed:
            raise DeliveryError(f"{self.failed} record(s) to topic {self.topic!r} failed delivery; first: "
                                f"{self.delivery_errors[0] if self.delivery_errors else '?'}")
        if remaining:
            raise DeliveryError(f"{remaining} record(s) still undelivered after a {timeout:g} s flush "
                                f"(topic {self.topic!r})")

    def clear_errors(self) -> None:
        """Forget past delivery failures (after the caller handled them, e.g. by replaying)."""
        self.failed = 0
        self.delivery_errors.clear()

    def close(self) -> None:
        """Flush; an owned producer is released too."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            if self._owns and hasattr(self._producer, "close"):
                self._producer.close()


class KafkaSink(_Tracked):
    """:class:`~streamtta.stream.base.Sink` writing JSON values to ``topic`` (key = UTF-8 string).

    ``producer`` is a shared :class:`confluent_kafka.Producer` (see :func:`make_producer`) or a bootstrap
    string (the sink then owns its producer, configured with ``overrides``). Delivery errors are
    recorded per sink; :meth:`flush` raises :class:`DeliveryError` while any is recorded, so the engine
    never commits input offsets whose outputs were lost.
    """

    def __init__(self, producer: Producer | str, topic: str, *, overrides: Mapping[str, Any] | None = None
                 ) -> None:
        super().__init__(producer, topic, overrides)

    def write(self, key: str | None, value: Any) -> None:
        data = _json.dumps(value).encode("utf-8")
        self._produce(data, key.encode("utf-8") if key is not None else None)

    def __repr__(self) -> str:
        return f"KafkaSink(topic={self.topic!r})"


class KafkaDeadLetter(_Tracked):
    """:class:`~streamtta.stream.base.DeadLetter` re-publishing a bad record *unchanged* to ``topic``.

    The original key, value bytes and headers are kept; these headers are appended:
    ``dlq.origin.topic``, ``dlq.origin.partition``, ``dlq.origin.offset`` (decimal strings),
    ``dlq.error`` (the decode error message, UTF-8, at most 4000 chars) and ``dlq.timestamp``
    (milliseconds since the epoch when dead-lettered).
    """

    def __init__(self, producer: Producer | str, topic: str, *, overrides: Mapping[str, Any] | None = None
                 ) -> None:
        super().__init__(producer, topic, overrides)

    def send(self, record: RawRecord, error: str) -> None:
        headers = list(record.headers) + [
            ("dlq.origin.topic", record.topic.encode("utf-8")),
            ("dlq.origin.partition", str(record.partition).encode()),
            ("dlq.origin.offset", str(record.offset).encode()),
            ("dlq.error", str(error)[:_MAX_ERROR_CHARS].encode("utf-8", "replace")),
            ("dlq.timestamp", str(int(time.time() * 1000)).encode()),
        ]
        self._produce(record.value, record.key, headers)

    def __repr__(self) -> str:
        return f"KafkaDeadLetter(topic={self.topic!r})"


# ---------------------------------------------------------------------------------------------
# admin
# ---------------------------------------------------------------------------------------------
def ensure_topics(bootstrap_servers: str, topics: Mapping[str, int], *, timeout: float = 15.0,
                  replication_factor: int = -1) -> dict[str, int]:
    """Create missing topics (idempotent) and wait until all of them show in the metadata.

    ``topics`` maps name -> partition count. Existing topics are left as they are (a warning is logged
    when one has fewer partitions than requested). ``replication_factor=-1`` uses the broker default.
    Returns ``{name: partition count}`` as the broker reports it.
    """
    for name, n in topics.items():
        if not name or isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"ensure_topics: topic {name!r} needs a partition count >= 1, got {n!r}")
    if not topics:
        return {}
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    deadline = time.monotonic() + timeout
    md = admin.list_topics(timeout=timeout)
    missing = [name for name in topics if name not in md.topics or md.topics[name].error is not None]
    if missing:
        futures = admin.create_topics([NewTopic(name, num_partitions=topics[name],
                                                replication_factor=replication_factor) for name in missing],
                                      operation_timeout=timeout, request_timeout=timeout)
        for name, fut in futures.items():
            try:
                fut.result(timeout=max(deadline - time.monotonic(), 0.1))
            except KafkaException as e:
                if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise RuntimeError(f"could not create topic {name!r}: {e.args[0].str()}") from e
    while True:
        md = admin.list_topics(timeout=max(deadline - time.monotonic(), 0.5))
        found = {name: len(md.topics[name].partitions) for name in topics
                 if name in md.topics and md.topics[name].error is None and md.topics[name].partitions}
        if len(found) == len(topics):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"topics {sorted(set(topics) - set(found))} did not appear within {timeout:g} s")
        time.sleep(0.1)
    for name, n in found.items():
        if n < topics[name]:
            log.warning("topic %r exists with %d partition(s), fewer than the %d requested", name, n, topics[name])
    return found
