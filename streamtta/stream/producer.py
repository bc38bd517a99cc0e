"""Replay samples into a Kafka topic (simulations, demos, tests).

Each :class:`~streamtta.types.Sample` becomes one record: value = tensor envelope (or a JSON row with
``codec="json"``, 1-D sensor rows only), key = ``stream_id`` so every stream maps to a single partition
and keeps its order. ``event_time`` travels inside the value only; the Kafka record timestamp stays the
produce time (synthetic event times near 1970 would make a real broker's time-based retention delete
the data at once).

Both functions take the librdkafka settings of their producer (``producer_overrides``: the run's
``client_settings(kafka, "producer")``, security included); the producer's repeated log events go
through a :class:`~streamtta.stream.kafka.errors.ClientLog`.

Example (needs a broker)::

    n = replay(stream.iter_samples(), "127.0.0.1:9092", "streamtta.input", rate=500, partitions=2)
"""
from __future__ import annotations

import time
from typing import Any, Iterable, Mapping, Sequence

from confluent_kafka import KafkaError, Message, Producer

from streamtta.stream.envelope import encode_sample
from streamtta.stream.kafka.admin import ensure_topics, wait_for_broker
from streamtta.stream.kafka.errors import ClientLog, DeliveryError, quiet
from streamtta.stream.kafka.sinks import make_producer
from streamtta.types import Sample

__all__ = ["replay", "produce_raw"]

_PROGRESS_EVERY = 256


class _Deliveries:
    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self.first_errors: list[str] = []

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.ok += 1
            return
        self.failed += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(f"{msg.topic()}[{msg.partition()}]: {err.str()}")


def _producer(bootstrap_servers: str, overrides: Mapping[str, Any] | None) -> Producer:
    return make_producer(bootstrap_servers, **quiet(dict(overrides or {}), ClientLog("replay producer")))


def _produce(producer: Producer, topic: str, value: bytes | None, key: bytes | None, cb: _Deliveries,
             headers: list[tuple[str, bytes]] | None = None) -> None:
    while True:
        try:
            producer.produce(topic, value=value, key=key, headers=headers, on_delivery=cb)
            return
        except BufferError:  # local queue full: let librdkafka send, then retry
            producer.poll(0.05)


def _finish(producer: Producer, cb: _Deliveries, n: int, topic: str, timeout: float) -> None:
    remaining = producer.flush(timeout)
    if cb.failed or remaining:
        raise DeliveryError(f"{cb.failed} of {n} record(s) to {topic!r} failed delivery and {remaining} are still "
                            f"queued after a {timeout:g} s flush; first errors: {cb.first_errors or 'none'}")


def replay(samples: Iterable[Sample], bootstrap_servers: str, topic: str, *, rate: float | None = None,
           partitions: int | None = None, progress: bool = True, codec: str = "tensor", total: int | None = None,
           producer_overrides: Mapping[str, Any] | None = None, kafka: Any = None, flush_timeout: float = 60.0) -> int:
    """Produce every sample to ``topic``; returns the number of records delivered.

    Parameters
    ----------
    rate
        Records per second (paced against a fixed schedule); ``None`` = as fast as possible.
    partitions
        If given, create ``topic`` with this many partitions first (no-op when it exists).
    progress
        Show a rich progress bar (``total`` = number of samples when known; taken from ``len(samples)``
        for sized inputs).
    codec
        ``"tensor"`` (binary envelope) or ``"json"`` (JSON rows; 1-D samples only).
    producer_overrides
        librdkafka settings of the producer.
    kafka
        The run's :class:`~streamtta.config.KafkaConfig`, if any: its client settings (``kafka.security``
        included) go to the producer (under ``producer_overrides``) and the admin client, the broker is
        waited for up to ``kafka.connect_timeout_s``, and a missing ``topic`` is created (``partitions``,
        else ``kafka.partitions``) only with ``kafka.create_topics``, else
        :class:`~streamtta.stream.kafka.errors.MissingTopicError` is raised.
    flush_timeout
        Seconds the final flush waits for deliveries (librdkafka retries them while a broker restarts).

    Raises :class:`~streamtta.stream.kafka.DeliveryError` if any record was not delivered.
    """
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be > 0 records/s or None, got {rate}")
    if codec not in ("tensor", "json"):
        raise ValueError(f"unknown codec {codec!r}; expected 'tensor' or 'json'")
    if kafka is not None:
        from streamtta.stream.kafka.settings import client_settings

        admin = client_settings(kafka, "admin")
        producer_overrides = {**client_settings(kafka, "producer"), **(producer_overrides or {})}
        wait_for_broker(bootstrap_servers, timeout=kafka.connect_timeout_s, config=admin)
        ensure_topics(bootstrap_servers, {topic: partitions or kafka.partitions}, create=kafka.create_topics,
                      config=admin)
    elif partitions is not None:
        ensure_topics(bootstrap_servers, {topic: partitions})
    if total is None and hasattr(samples, "__len__"):
        total = len(samples)  # type: ignore[arg-type]
    producer = _producer(bootstrap_servers, producer_overrides)
    cb = _Deliveries()
    n = 0
    t0 = time.perf_counter()
    with _progress(progress, total, f"replay -> {topic}") as advance:
        for s in samples:
            if rate is not None:
                while True:  # serve delivery callbacks while waiting for the schedule
                    wait = t0 + n / rate - time.perf_counter()
                    if wait <= 0:
                        break
                    producer.poll(wait)
            _produce(producer, topic, encode_sample(s, codec), s.stream_id.encode("utf-8"), cb)
            n += 1
            if n % _PROGRESS_EVERY == 0:
                producer.poll(0)
                advance(_PROGRESS_EVERY)
        advance(n % _PROGRESS_EVERY)
        _finish(producer, cb, n, topic, flush_timeout)
    return n


def produce_raw(bootstrap_servers: str, topic: str, values: Sequence[bytes | None], key: bytes | str | None = None,
                *, headers: Sequence[tuple[str, bytes]] | None = None, timeout: float = 30.0,
                producer_overrides: Mapping[str, Any] | None = None) -> int:
    """Produce raw values (e.g. poison records in tests) with one optional key; flush and check delivery."""
    producer = _producer(bootstrap_servers, producer_overrides)
    k = key.encode("utf-8") if isinstance(key, str) else key
    cb = _Deliveries()
    for v in values:
        _produce(producer, topic, v, k, cb, list(headers) if headers else None)
    _finish(producer, cb, len(values), topic, timeout)
    return len(values)


class _progress:
    """Context manager yielding ``advance(n)``; a rich progress bar when enabled."""

    def __init__(self, enabled: bool, total: int | None, description: str) -> None:
        self.enabled = enabled
        self.total = total
        self.description = description
        self._prog: Any = None
        self._task: Any = None

    def __enter__(self) -> Any:
        if not self.enabled:
            return lambda n: None
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                                   TimeElapsedColumn)

        self._prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TaskProgressColumn(), TimeElapsedColumn())
        self._prog.__enter__()
        self._task = self._prog.add_task(self.description, total=self.total)
        return lambda n: self._prog.update(self._task, advance=n) if n else None

    def __exit__(self, *exc: Any) -> None:
        if self._prog is not None:
            self._prog.__exit__(*exc)
