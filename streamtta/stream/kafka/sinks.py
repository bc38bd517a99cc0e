"""Kafka outputs: the shared idempotent producer, the JSON sink and the dead-letter queue.

Both outputs track the delivery of every record they produce; :meth:`KafkaSink.flush` /
:meth:`KafkaDeadLetter.flush` raise :class:`~streamtta.stream.kafka.errors.DeliveryError` while a
failure is recorded, so the engine never commits input offsets whose outputs were lost. Producing is
bounded too: a producer queue that stays full for ``queue_full_timeout_s`` seconds, or a record the
producer refuses (e.g. larger than its ``message.max.bytes``), raises :class:`DeliveryError` naming the
topic instead of blocking or crashing with a librdkafka error.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from streamtta.stream import _json
from streamtta.stream.dlq import DLQ_HEADERS, DLQ_TRUNCATION_HEADERS, dead_letter_message, max_value_bytes_for
from streamtta.stream.kafka.errors import DeliveryError
from streamtta.stream.kafka.settings import producer_config
from streamtta.types import RawRecord

__all__ = ["DLQ_HEADERS", "DLQ_TRUNCATION_HEADERS", "KafkaDeadLetter", "KafkaSink", "make_producer"]

_MAX_KEPT_ERRORS = 20
#: Default of ``queue_full_timeout_s``: how long a produce call waits for room in the producer queue.
QUEUE_FULL_TIMEOUT_S = 60.0


class _Producer(Producer):
    """A :class:`confluent_kafka.Producer` that remembers its ``message.max.bytes`` (None: the default)."""

    message_max_bytes: int | None = None


def make_producer(bootstrap_servers: str, **overrides: Any) -> Producer:
    """An idempotent producer (``acks=all``, ``linger.ms=5``); ``overrides`` are librdkafka settings.

    Dotted keys are passed by unpacking a dict: ``make_producer(bs, **{"linger.ms": 0})``. The producer
    remembers its ``message.max.bytes`` so a :class:`KafkaDeadLetter` sharing it cuts oversized records
    to fit.
    """
    conf = producer_config(bootstrap_servers, overrides)
    producer = _Producer(conf)
    if "message.max.bytes" in conf:
        producer.message_max_bytes = int(conf["message.max.bytes"])
    return producer


class _Tracked:
    """Produce with per-message delivery tracking; flush() raises if anything was lost."""

    def __init__(self, producer: Producer | str, topic: str, overrides: Mapping[str, Any] | None,
                 queue_full_timeout_s: float = QUEUE_FULL_TIMEOUT_S) -> None:
        if not topic:
            raise ValueError("topic must be a non-empty string")
        if not queue_full_timeout_s >= 0:
            raise ValueError(f"queue_full_timeout_s must be >= 0, got {queue_full_timeout_s!r}")
        self.queue_full_timeout_s = float(queue_full_timeout_s)
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

    def _produce(self, value: bytes | None, key: bytes | None, headers: list[tuple[str, Any]] | None = None
                 ) -> None:
        """Queue one record; while the local queue is full, serve delivery reports and retry for at most
        ``queue_full_timeout_s`` seconds. :class:`DeliveryError` when it stays full or the producer refuses
        the record."""
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} for topic {self.topic!r} is closed")
        deadline = time.monotonic() + self.queue_full_timeout_s
        while True:
            try:
                self._producer.produce(self.topic, value=value, key=key, headers=headers,
                                       on_delivery=self._on_delivery)
                break
            except BufferError as e:  # local queue full: serve delivery reports, then retry
                if time.monotonic() >= deadline:
                    raise DeliveryError(f"producer queue stayed full for {self.queue_full_timeout_s:g} s while "
                                        f"producing to topic {self.topic!r} ({len(self._producer)} records "
                                        f"waiting for delivery; is the broker reachable?)") from e
                self._producer.poll(0.1)
            except KafkaException as e:
                err = e.args[0] if e.args and isinstance(e.args[0], KafkaError) else None
                what = f"{err.name()}: {err.str()}" if err is not None else str(e)
                size = len(value) if value is not None else 0
                raise DeliveryError(f"could not produce a {size}-byte record to topic {self.topic!r}: {what}") from e
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
    never commits input offsets whose outputs were lost. :meth:`write` raises :class:`DeliveryError`
    when the producer queue stays full for ``queue_full_timeout_s`` seconds or the record is refused.
    """

    def __init__(self, producer: Producer | str, topic: str, *, overrides: Mapping[str, Any] | None = None,
                 queue_full_timeout_s: float = QUEUE_FULL_TIMEOUT_S) -> None:
        super().__init__(producer, topic, overrides, queue_full_timeout_s)

    def write(self, key: str | None, value: Any) -> None:
        data = _json.dumps(value).encode("utf-8")
        # a key that is not valid Unicode (a lone surrogate; decoding rejects such stream ids) is written
        # with the offending code points as backslash escapes rather than failing the batch
        self._produce(data, key.encode("utf-8", "backslashreplace") if key is not None else None)

    def __repr__(self) -> str:
        return f"KafkaSink(topic={self.topic!r})"


class KafkaDeadLetter(_Tracked):
    """:class:`~streamtta.stream.base.DeadLetter` re-publishing a bad record to ``topic``.

    The original key, value bytes and headers are kept; the headers of :data:`DLQ_HEADERS` are appended:
    ``dlq.origin.topic``, ``dlq.origin.partition``, ``dlq.origin.offset`` (decimal strings),
    ``dlq.error`` (the error message, UTF-8, at most 4000 chars) and ``dlq.timestamp`` (milliseconds
    since the epoch when dead-lettered).

    A record that could not be re-published whole never makes :meth:`send` fail: a value over
    ``max_value_bytes`` is cut to its first ``max_value_bytes`` bytes (keys over 16 KiB and original
    headers over 64 KiB are cut too) and the dead letter carries ``dlq.truncated`` = ``true``,
    ``dlq.size`` (the original value's byte count) and ``dlq.sha256`` (hex SHA-256 of the whole original
    value); see :mod:`streamtta.stream.dlq`. ``max_value_bytes`` defaults to 100,000 bytes below the
    producer's ``message.max.bytes`` when it is known (a bootstrap string with ``overrides``, or a producer
    from :func:`make_producer`), else to 900,000 (librdkafka's default ``message.max.bytes`` is 1,000,000).
    """

    def __init__(self, producer: Producer | str, topic: str, *, overrides: Mapping[str, Any] | None = None,
                 max_value_bytes: int | None = None, queue_full_timeout_s: float = QUEUE_FULL_TIMEOUT_S) -> None:
        super().__init__(producer, topic, overrides, queue_full_timeout_s)
        if max_value_bytes is None:
            max_value_bytes = max_value_bytes_for(getattr(self._producer, "message_max_bytes", None))
        if isinstance(max_value_bytes, bool) or not isinstance(max_value_bytes, int) or max_value_bytes < 1:
            raise ValueError(f"max_value_bytes must be a positive int, got {max_value_bytes!r}")
        self.max_value_bytes = max_value_bytes
        #: Dead letters whose original had to be cut (see the class docstring).
        self.truncated = 0

    def send(self, record: RawRecord, error: str) -> None:
        msg = dead_letter_message(record, error, max_value_bytes=self.max_value_bytes)
        self.truncated += msg.truncated
        self._produce(msg.value, msg.key, list(msg.headers))

    def __repr__(self) -> str:
        return f"KafkaDeadLetter(topic={self.topic!r}, max_value_bytes={self.max_value_bytes})"
