"""Kafka source, sinks and dead-letter queue on confluent-kafka (librdkafka).

Delivery guarantee: **at-least-once**. :class:`KafkaSource` never commits on its own
(``enable.auto.commit=False``, ``enable.auto.offset.store=False``); the engine calls
:meth:`KafkaSource.commit` with *next* offsets (last processed + 1) only after its sinks flushed
successfully (:meth:`KafkaSink.flush` raises :class:`DeliveryError` if any output was lost) and its
state was checkpointed. A crash between processing and commit replays the uncommitted records.

Consumer defaults (:data:`~streamtta.stream.kafka.settings.CONSUMER_DEFAULTS`, any of them can be overridden except the two commit
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

The package is split by concept; everything is importable from here:

* :mod:`~streamtta.stream.kafka.settings` -- consumer/producer defaults and how overrides apply;
* :mod:`~streamtta.stream.kafka.source` -- :class:`KafkaSource`;
* :mod:`~streamtta.stream.kafka.sinks` -- :func:`make_producer`, :class:`KafkaSink`, :class:`KafkaDeadLetter`;
* :mod:`~streamtta.stream.kafka.admin` -- :func:`wait_for_broker`, :func:`ensure_topics`, :func:`prepare_topics`;
* :mod:`~streamtta.stream.kafka.errors` -- :class:`CommitError`, :class:`DeliveryError`,
  :class:`BrokerUnavailable`, :class:`MissingTopicError`, :class:`ClientLog` (librdkafka log summariser).
"""
from __future__ import annotations

from streamtta.stream.kafka.admin import ensure_topics, prepare_topics, wait_for_broker
from streamtta.stream.kafka.errors import BrokerUnavailable, ClientLog, CommitError, DeliveryError, MissingTopicError
from streamtta.stream.kafka.settings import CONSUMER_DEFAULTS, PRODUCER_DEFAULTS
from streamtta.stream.kafka.sinks import (
    DLQ_HEADERS,
    KafkaDeadLetter,
    KafkaSink,
    make_producer,
)
from streamtta.stream.kafka.source import KafkaSource, to_raw

__all__ = [
    "CONSUMER_DEFAULTS",
    "PRODUCER_DEFAULTS",
    "BrokerUnavailable",
    "ClientLog",
    "CommitError",
    "DeliveryError",
    "MissingTopicError",
    "prepare_topics",
    "wait_for_broker",
    "KafkaSource",
    "KafkaSink",
    "KafkaDeadLetter",
    "make_producer",
    "ensure_topics",
    "DLQ_HEADERS",
    "to_raw",
]
