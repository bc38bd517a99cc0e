"""The Kafka source: a batch consumer with at-least-once delivery (the engine commits, never librdkafka).

See :mod:`streamtta.stream.kafka` for the guarantee and the consumer defaults.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message
from confluent_kafka import TopicPartition as KTP

from streamtta.stream.base import TopicPartition
from streamtta.stream.kafka.errors import (
    ClientLog,
    CommitError,
    is_group_change,
    is_transient,
    quiet,
)
from streamtta.stream.kafka.settings import consumer_config, stats_settings
from streamtta.types import RawRecord

__all__ = ["KafkaSource", "to_raw"]

log = logging.getLogger(__name__)

#: :meth:`KafkaSource.consume` waits for a full batch in slices this long, so that it returns once the end is reached
WAIT_SLICE_S = 0.1

#: ``cb(partitions)`` registered with :meth:`KafkaSource.on_assign` / ``on_revoke`` / ``on_lost``.
RebalanceCallback = Callable[[list[TopicPartition]], None]


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
        Extra librdkafka consumer settings (override :data:`~streamtta.stream.kafka.settings.CONSUMER_DEFAULTS`).
    stop_at_end
        Track partition EOF so that :meth:`at_end` turns True once every assigned partition has been
        read to its end (bounded replays).
    retry_timeout_s
        How long :meth:`commit` retries a commit that failed because the broker or the group
        coordinator is away (a broker restart), with backoff, before it raises :class:`CommitError`.
    on_stats, stats_interval_ms
        With ``on_stats``, librdkafka's statistics (JSON text: consumer lag per partition, broker states,
        group state) are passed to it every ``stats_interval_ms``, from inside :meth:`consume`.

    librdkafka's log and error events go through a :class:`~streamtta.stream.kafka.errors.ClientLog`
    (:attr:`client_log`): each kind once, repeats at DEBUG, unless ``overrides`` set their own
    ``logger`` / ``error_cb``.

    Rebalance callbacks registered with :meth:`on_assign` / :meth:`on_revoke` / :meth:`on_lost` are
    called with ``[(topic, partition), ...]`` from inside :meth:`consume` (or :meth:`close`). Assigned
    partitions start at their committed offsets (``auto.offset.reset`` without one).

    Example (needs a broker)::

        src = KafkaSource("127.0.0.1:9092", ["streamtta.input"], "streamtta", stop_at_end=True)
        while not src.at_end():
            batch = src.consume(64, 1.0)
            ...  # process, flush sinks
            src.commit({(r.topic, r.partition): r.offset + 1 for r in batch})
        src.close()
    """

    def __init__(self, bootstrap_servers: str, topics: Iterable[str] | str, group_id: str, *,
                 overrides: Mapping[str, Any] | None = None, stop_at_end: bool = False,
                 retry_timeout_s: float = 30.0, on_stats: Callable[[str], None] | None = None,
                 stats_interval_ms: int = 1000) -> None:
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
        self.retry_timeout_s = float(retry_timeout_s)
        self.client_log = ClientLog("consumer")
        conf = quiet(consumer_config(bootstrap_servers, group_id, overrides, stop_at_end=stop_at_end),
                     self.client_log)
        if on_stats is not None:
            conf.update(stats_settings(stats_interval_ms, on_stats))
        self.config = conf
        self._cooperative = "cooperative" in str(conf.get("partition.assignment.strategy", ""))
        self._assign_cbs: list[RebalanceCallback] = []
        self._revoke_cbs: list[RebalanceCallback] = []
        self._lost_cbs: list[RebalanceCallback] = []
        self._assigned: set[TopicPartition] = set()
        self._eof: dict[TopicPartition, bool] = {}
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
        """Up to ``max_records`` records, waiting at most ``timeout`` seconds for a full batch (``[]`` while
        paused); with ``stop_at_end``, no longer once every assigned partition has reported its end."""
        if self._closed:
            raise RuntimeError("KafkaSource.consume() called after close()")
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        deadline = time.monotonic() + float(timeout)
        out: list[RawRecord] = []
        while True:  # waits in slices: a batch cut short by the end of the stream goes out at once, not at timeout
            wait = max(0.0, min(WAIT_SLICE_S, deadline - time.monotonic()))
            for m in self._consumer.consume(num_messages=int(max_records) - len(out), timeout=wait):
                err = m.error()
                if err is not None:
                    self._handle_error(m, err)
                    continue
                self._eof[(m.topic(), m.partition())] = False
                out.append(to_raw(m))
            if len(out) >= max_records or time.monotonic() >= deadline or self.at_end():
                return out

    def commit(self, offsets: Mapping[TopicPartition, int]) -> bool:
        """Synchronously commit next offsets ``{(topic, partition): last processed + 1}``; True once the
        broker stored them, False when the commit was skipped (see below).

        A commit that fails because the broker or the group coordinator cannot be reached (transport
        errors, coordinator not available, timeouts: a broker restart) is retried with backoff (0.1 s
        doubling to 2 s) for up to ``retry_timeout_s``; then, or at once for any other error,
        :class:`CommitError` is raised. A commit rejected because the group rebalanced without this
        member (unknown member, illegal generation, rebalance in progress) is skipped with a warning:
        the next owner re-reads from the last committed offset (at-least-once; the engine's checkpoint
        skips what it already covered). While partitions are being *lost* (session expired) commits are
        skipped with a warning for the same reason.
        """
        if not offsets:
            return True
        if self._closed:
            raise CommitError("commit() after close()")
        tps = []
        for (topic, partition), off in sorted(offsets.items()):
            if int(off) < 0:
                raise ValueError(f"commit offset for {topic}[{partition}] must be >= 0, got {off}")
            tps.append(KTP(topic, int(partition), int(off)))
        if self._in_lost:
            log.warning("skipping commit of %s: partitions were lost (session timeout)", _fmt(offsets))
            return False
        deadline = time.monotonic() + self.retry_timeout_s
        pause, attempts = 0.1, 0
        while True:
            attempts += 1
            try:
                result = self._consumer.commit(offsets=tps, asynchronous=False)
                errors = [(f"{tp.topic}[{tp.partition}]", tp.error) for tp in (result or []) if tp.error is not None]
            except KafkaException as e:
                errors = [(_fmt(offsets), e.args[0])]
            if not errors:
                if attempts > 1:
                    log.warning("commit of %s succeeded after %d attempts", _fmt(offsets), attempts)
                return True
            codes = [err.code() for _, err in errors]
            text = ", ".join(f"{where}: {err.str()}" for where, err in errors)
            if any(is_group_change(c) for c in codes):
                log.warning("commit of %s skipped: the group rebalanced without this member (%s); the "
                            "partition's next owner re-reads from the last committed offset", _fmt(offsets), text)
                return False
            left = deadline - time.monotonic()
            if not all(is_transient(c) for c in codes):
                raise CommitError(f"commit failed for {text}")
            if left <= 0:
                raise CommitError(f"commit of {_fmt(offsets)} still failing after {attempts} attempts in "
                                  f"{self.retry_timeout_s:g} s: {text}")
            if attempts == 1:
                log.warning("commit of %s failed (%s); retrying for up to %g s", _fmt(offsets), text,
                            self.retry_timeout_s)
            time.sleep(min(pause, left))
            pause = min(pause * 2, 2.0)

    def on_assign(self, cb: RebalanceCallback) -> None:
        """Register ``cb(partitions)`` called when partitions are assigned."""
        self._assign_cbs.append(cb)

    def on_revoke(self, cb: RebalanceCallback) -> None:
        """Register ``cb(partitions)`` called before partitions are revoked (commit here)."""
        self._revoke_cbs.append(cb)

    def on_lost(self, cb: RebalanceCallback) -> None:
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

    def committed(self, partitions: Iterable[TopicPartition] | None = None, timeout: float = 10.0
                  ) -> dict[TopicPartition, int | None]:
        """Committed next offsets of ``partitions`` (default: the assignment); None = nothing committed."""
        parts = [KTP(t, p) for t, p in (partitions if partitions is not None else self.assignment())]
        if not parts:
            return {}
        res = self._consumer.committed(parts, timeout=timeout)
        return {(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None) for tp in res}

    def end_offset(self, tp: TopicPartition) -> int | None:
        """Where partition ``tp`` ends now (its high watermark) as the latest fetch response reported it;
        ``None`` when no fetch has reported it yet (no broker round trip)."""
        try:
            _, hi = self._consumer.get_watermark_offsets(KTP(tp[0], int(tp[1])), cached=True)
        except KafkaException:
            return None
        return int(hi) if hi is not None and hi >= 0 else None

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
        for cb in self._assign_cbs:
            cb(list(tps))
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


def to_raw(m: Message) -> RawRecord:
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
