"""The Kafka dead-letter queue and sinks with poison-sized records: an original over the producer's
``message.max.bytes`` lands in the DLQ topic cut, with its size and digest; produce never blocks forever
and never leaks a librdkafka exception."""
from __future__ import annotations

import hashlib
import time
import uuid

import numpy as np
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer
from confluent_kafka import TopicPartition as KTP

from streamtta.stream.kafka import (
    DLQ_HEADERS,
    DeliveryError,
    KafkaDeadLetter,
    KafkaSink,
    ensure_topics,
    make_producer,
    to_raw,
)
from streamtta.types import RawRecord

MOCK = {"test.mock.num.brokers": 1, "log_level": 0}


def read_topic(bootstrap: str, topic: str, n: int, timeout: float = 20.0) -> list[RawRecord]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                  "enable.auto.commit": False})
    try:
        c.assign([KTP(topic, 0, OFFSET_BEGINNING)])
        out: list[RawRecord] = []
        deadline = time.monotonic() + timeout
        while len(out) < n and time.monotonic() < deadline:
            out += [to_raw(m) for m in c.consume(10, 0.2) if m.error() is None]
        return out
    finally:
        c.close()


def test_record_over_1mb_lands_in_the_dlq_topic_cut_with_size_and_digest(embedded_broker, unique_name):
    bs, dlq_topic = embedded_broker.bootstrap_servers, f"{unique_name}.dlq"
    ensure_topics(bs, {dlq_topic: 1})
    value = np.random.default_rng(1).bytes(1_500_000)
    big = RawRecord(topic="sensors", partition=3, offset=12345, value=value, key=b"k",
                    headers=(("trace", b"t" * 70_000),))
    small = RawRecord(topic="sensors", partition=3, offset=12346, value=b"not a record", key=b"k")
    producer = make_producer(bs, **{"linger.ms": 0})
    dlq = KafkaDeadLetter(producer, dlq_topic)  # producer at librdkafka's default message.max.bytes
    assert dlq.max_value_bytes == 900_000
    dlq.send(big, "unknown record format")
    dlq.send(small, "unknown record format")
    dlq.flush()
    assert dlq.delivered == 2 and dlq.failed == 0 and dlq.truncated == 1
    got = read_topic(bs, dlq_topic, 2)
    assert len(got) == 2
    h = dict(got[0].headers)
    assert got[0].value == value[:900_000] and got[0].key == b"k"
    assert h["dlq.truncated"] == b"true" and h["dlq.size"] == b"1500000"
    assert h["dlq.sha256"].decode() == hashlib.sha256(value).hexdigest()
    assert h["dlq.headers.dropped"] == b"1" and "trace" not in h
    assert h["dlq.origin.topic"] == b"sensors" and h["dlq.origin.offset"] == b"12345"
    h2 = dict(got[1].headers)
    assert got[1].value == small.value and set(DLQ_HEADERS) <= set(h2) and "dlq.truncated" not in h2


def test_value_limit_follows_the_producers_message_max_bytes():
    producer = make_producer("127.0.0.1:1", **MOCK, **{"message.max.bytes": 2_000_000})
    assert KafkaDeadLetter(producer, "dlq").max_value_bytes == 1_900_000
    owned = KafkaDeadLetter("127.0.0.1:1", "dlq", overrides={**MOCK, "message.max.bytes": 300_000})
    assert owned.max_value_bytes == 200_000
    assert KafkaDeadLetter(producer, "dlq", max_value_bytes=5000).max_value_bytes == 5000
    with pytest.raises(ValueError, match="max_value_bytes"):
        KafkaDeadLetter(producer, "dlq", max_value_bytes=0)


def test_a_record_the_producer_refuses_is_a_delivery_error_naming_the_topic():
    producer = make_producer("127.0.0.1:1", **MOCK)  # message.max.bytes 1,000,000
    dlq = KafkaDeadLetter(producer, "the-dlq", max_value_bytes=2_000_000)  # a wrong limit: not cut enough
    rec = RawRecord(topic="in", partition=0, offset=0, value=b"x" * 1_200_000)
    with pytest.raises(DeliveryError, match=r"1200000-byte record to topic 'the-dlq': MSG_SIZE_TOO_LARGE"):
        dlq.send(rec, "bad")
    sink = KafkaSink(producer, "preds")
    with pytest.raises(DeliveryError, match=r"to topic 'preds': MSG_SIZE_TOO_LARGE"):
        sink.write("k", {"blob": "x" * 1_100_000})


def test_a_producer_queue_that_stays_full_is_a_delivery_error_not_a_hang():
    # nothing listens on port 1: the one queued record is never delivered, so the queue stays full
    producer = make_producer("127.0.0.1:1", **{"queue.buffering.max.messages": 1, "log_level": 0,
                                               "message.timeout.ms": 60_000})
    sink = KafkaSink(producer, "preds", queue_full_timeout_s=0.3)
    sink.write("k", {"i": 0})
    with pytest.raises(DeliveryError, match=r"producer queue stayed full for 0.3 s while producing to topic 'preds'"):
        sink.write("k", {"i": 1})
    producer.purge()
    producer.flush(0)


def test_a_key_that_is_not_valid_unicode_is_written_escaped():
    producer = make_producer("127.0.0.1:1", **MOCK)
    sink = KafkaSink(producer, "preds")
    sink.write("bad\ud800", {"pred": 1})
    sink.flush(10)
    assert sink.delivered == 1 and sink.failed == 0
