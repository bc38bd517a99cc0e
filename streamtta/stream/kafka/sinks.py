"""Kafka outputs: the shared idempotent producer, the JSON sink and the dead-letter queue.

Both outputs track the delivery of every record they produce; :meth:`KafkaSink.flush` /
:meth:`KafkaDeadLetter.flush` raise :class:`~streamtta.stream.kafka.errors.DeliveryError` while a
failure is recorded, so the engine never commits input offsets whose outputs were lost.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

from confluent_kafka import KafkaError, Message, Producer

from streamtta.stream import _json
from streamtta.stream.kafka.errors import DeliveryError
from streamtta.stream.kafka.settings import producer_config
from streamtta.types import RawRecord

__all__ = ["DLQ_HEADERS", "KafkaDeadLetter", "KafkaSink", "make_producer"]

#: Headers a dead-lettered record carries, in addition to its original headers.
DLQ_HEADERS = ("dlq.origin.topic", "dlq.origin.partition", "dlq.origin.offset", "dlq.error", "dlq.timestamp")
_MAX_ERROR_CHARS = 4000
_MAX_KEPT_ERRORS = 20


def make_producer(bootstrap_servers: str, **overrides: Any) -> Producer:
    """An idempotent producer (``acks=all``, ``linger.ms=5``); ``overrides`` are librdkafka settings.

    Dotted keys are passed by unpacking a dict: ``make_producer(bs, **{"linger.ms": 0})``.
    """
    return Producer(producer_config(bootstrap_servers, overrides))


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
