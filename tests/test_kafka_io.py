"""Kafka source/sinks/DLQ against the embedded Tansu broker, plus the broker-free sinks and sources.

Broker tests use uniquely named topics and groups (the session broker is shared). Group-managed
consumers pay Tansu's first-join wait (session.timeout.ms / 2 = 3 s with our defaults); reads that only
verify what landed in a topic use a group-less ``assign()`` reader instead.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError
from confluent_kafka import TopicPartition as KTP

from streamtta.stream.broker import BrokerStartError, EmbeddedBroker
from streamtta.stream.envelope import DecodeError, decode_value, encode_tensor
from streamtta.stream.kafka import (
    DLQ_HEADERS,
    DeliveryError,
    KafkaDeadLetter,
    KafkaSink,
    KafkaSource,
    ensure_topics,
    make_producer,
    to_raw,
)
from streamtta.stream.memory import (
    JsonlSink,
    MemoryDeadLetter,
    MemorySink,
    MemorySource,
    SimulatedCrash,
)
from streamtta.stream.producer import produce_raw, replay
from streamtta.types import RawRecord, Sample


def read_all(bootstrap: str, topic: str, timeout: float = 15.0) -> list[RawRecord]:
    """Every record of ``topic`` (all partitions, from the beginning) without joining a group."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                  "enable.partition.eof": True, "enable.auto.commit": False})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        c.assign([KTP(topic, p, OFFSET_BEGINNING) for p in parts])
        pending, out = set(parts), []
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for m in c.consume(500, 0.2):
                if m.error() is None:
                    out.append(to_raw(m))
                elif m.error().code() == KafkaError._PARTITION_EOF:
                    pending.discard(m.partition())
        assert not pending, f"partitions {pending} of {topic} did not reach EOF in {timeout} s"
        return out
    finally:
        c.close()


def consume_until(src: KafkaSource, n: int, timeout: float = 20.0, batch: int = 5) -> list[RawRecord]:
    got: list[RawRecord] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += src.consume(batch, 0.2)
    return got


def samples(n_streams: int, per_stream: int, shape=(1, 4, 4)) -> list[Sample]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(per_stream):  # interleaved streams, like a multiplexed sensor feed
        for s in range(n_streams):
            out.append(Sample(x=rng.random(shape, dtype=np.float32), stream_id=f"stream-{s}", label=s,
                              event_time=float(i), meta={"i": i}))
    return out


# ---------------------------------------------------------------------------------------------
# KafkaSource: batches, commit, resume, rebalance callbacks, pause, stop_at_end
# ---------------------------------------------------------------------------------------------
def test_consume_commit_and_resume_in_same_group(embedded_broker, unique_name):
    bs, topic, group = embedded_broker.bootstrap_servers, unique_name, f"g-{unique_name}"
    ensure_topics(bs, {topic: 1})
    data = samples(1, 30)
    assert replay(data, bs, topic, progress=False) == 30

    assigned, revoked = [], []
    src = KafkaSource(bs, [topic], group, stop_at_end=True)
    src.on_assign(assigned.append)

    def on_revoke(tps):  # like the engine: final commit from inside the revoke callback
        revoked.append(tps)
        src.commit({(topic, 0): 12})

    src.on_revoke(on_revoke)
    got = consume_until(src, 12)
    assert len(got) >= 12
    assert assigned == [[(topic, 0)]] and src.assignment() == [(topic, 0)]
    assert [r.offset for r in got] == list(range(len(got)))
    first = decode_value(got[0].value)
    np.testing.assert_array_equal(first.x, data[0].x)
    assert got[0].key == b"stream-0" and got[0].timestamp_ms is not None
    assert src.lag() == {(topic, 0): 30 - len(got)}
    src.commit({(topic, 0): got[9].offset + 1})
    assert src.committed() == {(topic, 0): 10}
    # processed the first 12 only: the revoke callback run by close() commits next offset 12
    # (later ones must be redelivered to the next member)
    src.close()
    assert revoked == [[(topic, 0)]]
    src.close()  # idempotent

    # a second member of the group resumes at the committed offset; a pause set before the
    # assignment survives it (consume() keeps returning [] while paused)
    src2 = KafkaSource(bs, [topic], group, stop_at_end=True)
    src2.pause()
    deadline = time.monotonic() + 15
    while not src2.assignment() and time.monotonic() < deadline:
        assert src2.consume(10, 0.2) == []
    assert src2.assignment() == [(topic, 0)]
    assert src2.consume(10, 0.5) == []
    src2.resume()
    rest: list[RawRecord] = []
    deadline = time.monotonic() + 15
    while not src2.at_end() and time.monotonic() < deadline:
        rest += src2.consume(8, 0.2)
    assert src2.at_end()
    assert [r.offset for r in rest] == list(range(12, 30))
    assert [decode_value(r.value).meta["i"] for r in rest] == list(range(12, 30))
    assert src2.lag() == {(topic, 0): 0}
    src2.commit({(topic, 0): 30})
    src2.close()
    with pytest.raises(RuntimeError, match="after close"):
        src2.consume(1, 0.1)


def test_stop_at_end_on_empty_partitions(embedded_broker, unique_name):
    bs, topic = embedded_broker.bootstrap_servers, unique_name
    ensure_topics(bs, {topic: 2})
    produce_raw(bs, topic, [encode_tensor(np.full(2, i, np.float32), "s") for i in range(6)], key="s")
    src = KafkaSource(bs, topic, f"g-{unique_name}", stop_at_end=True)
    assigned: list = []
    src.on_assign(assigned.append)  # assigned partitions start at the committed offset (none: the beginning)
    got: list[RawRecord] = []
    deadline = time.monotonic() + 15
    while not src.at_end() and time.monotonic() < deadline:
        got += src.consume(10, 0.2)
    assert src.at_end(), "at_end() must turn True once both partitions (one empty) reported EOF"
    assert sorted(src.assignment()) == [(topic, 0), (topic, 1)] == sorted(tp for tps in assigned for tp in tps)
    assert [r.offset for r in got] == list(range(6)) and len({r.partition for r in got}) == 1
    assert [float(decode_value(r.value).x[0]) for r in got] == [float(i) for i in range(6)]
    src.close()


def test_rebalance_hands_partitions_over_with_commit_on_revoke(embedded_broker, unique_name):
    bs, topic, group = embedded_broker.bootstrap_servers, unique_name, f"g-{unique_name}"
    ensure_topics(bs, {topic: 2})
    producer = make_producer(bs)

    def produce(lo, hi):
        for i in range(lo, hi):
            producer.produce(topic, value=encode_tensor(np.full(1, i, np.float32), f"s{i % 2}"), partition=i % 2)
        assert producer.flush(10) == 0

    def member(name):
        src = KafkaSource(bs, [topic], group)
        done = {}  # next offset per partition, processed by this member

        def revoke(tps):
            src.commit({tp: done[tp] for tp in tps if tp in done})
            events.append((name, "revoke", sorted(tps)))

        src.on_assign(lambda tps: events.append((name, "assign", sorted(tps))))
        src.on_revoke(revoke)
        return src, done

    events: list = []
    seen: dict[str, list[int]] = {"a": [], "b": []}
    produce(0, 20)
    a, done_a = member("a")
    while len(seen["a"]) < 20:
        for r in a.consume(10, 0.2):
            seen["a"].append(int(decode_value(r.value).x[0]))
            done_a[(r.topic, r.partition)] = r.offset + 1
        assert len(events) < 3, events
    b, done_b = member("b")
    deadline = time.monotonic() + 20
    while not (len(a.assignment()) == 1 and len(b.assignment()) == 1) and time.monotonic() < deadline:
        for src, name, done in ((a, "a", done_a), (b, "b", done_b)):
            for r in src.consume(10, 0.1):
                seen[name].append(int(decode_value(r.value).x[0]))
                done[(r.topic, r.partition)] = r.offset + 1
    assert sorted(a.assignment() + b.assignment()) == [(topic, 0), (topic, 1)], events
    assert ("a", "revoke", [(topic, 0), (topic, 1)]) in events
    produce(20, 40)
    deadline = time.monotonic() + 15
    while len(seen["a"]) + len(seen["b"]) < 40 and time.monotonic() < deadline:
        for src, name, done in ((a, "a", done_a), (b, "b", done_b)):
            for r in src.consume(10, 0.1):
                seen[name].append(int(decode_value(r.value).x[0]))
                done[(r.topic, r.partition)] = r.offset + 1
    # nothing lost, nothing redelivered (a committed in its revoke callback), each member owns one partition
    assert sorted(seen["a"] + seen["b"]) == list(range(40))
    (pa,), (pb,) = a.assignment(), b.assignment()
    assert {v % 2 for v in seen["b"]} == {pb[1]}
    assert {v % 2 for v in seen["a"][20:]} == {pa[1]}
    a.close()
    b.close()


def test_source_refuses_auto_commit():
    with pytest.raises(ValueError, match="enable.auto.commit=true would break at-least-once"):
        KafkaSource("127.0.0.1:1", ["t"], "g", overrides={"enable.auto.commit": True})
    with pytest.raises(ValueError, match="at least one topic"):
        KafkaSource("127.0.0.1:1", [], "g")


# ---------------------------------------------------------------------------------------------
# sinks and dead letters
# ---------------------------------------------------------------------------------------------
def test_dead_letter_keeps_value_and_carries_origin_headers(embedded_broker, unique_name):
    bs, topic, dlq_topic = embedded_broker.bootstrap_servers, unique_name, f"{unique_name}.dlq"
    ensure_topics(bs, {topic: 1, dlq_topic: 1})
    good = encode_tensor(np.ones(3, np.float32), "cam")
    poison = [b"\x00garbage", good[:-2], encode_tensor(np.array([np.nan], np.float32), "cam")]
    produce_raw(bs, topic, [good, *poison, good], key=b"cam", headers=[("trace", b"abc")])

    producer = make_producer(bs)
    dlq = KafkaDeadLetter(producer, dlq_topic)
    errors = {}
    for rec in read_all(bs, topic):
        try:
            decode_value(rec.value)
        except DecodeError as e:
            errors[rec.offset] = str(e)
            dlq.send(rec, str(e))
    assert sorted(errors) == [1, 2, 3]
    dlq.flush()
    assert dlq.delivered == 3 and dlq.failed == 0

    out = read_all(bs, dlq_topic)
    assert [r.value for r in out] == poison  # original bytes, unchanged
    for r, off in zip(out, [1, 2, 3]):
        h = dict(r.headers)
        assert r.key == b"cam"
        assert set(DLQ_HEADERS) <= set(h) and h["trace"] == b"abc"
        assert h["dlq.origin.topic"] == topic.encode()
        assert h["dlq.origin.partition"] == b"0" and h["dlq.origin.offset"] == str(off).encode()
        assert h["dlq.error"].decode() == errors[off]
        assert abs(int(h["dlq.timestamp"]) / 1000 - time.time()) < 60
    assert "unknown record format" in errors[1] and "payload is" in errors[2] and "NaN" in errors[3]


def test_kafka_sink_writes_json_and_shares_a_producer(embedded_broker, unique_name):
    bs = embedded_broker.bootstrap_servers
    a, b = f"{unique_name}.a", f"{unique_name}.b"
    ensure_topics(bs, {a: 1, b: 1})
    producer = make_producer(bs)
    sa, sb = KafkaSink(producer, a), KafkaSink(producer, b)
    sa.write("s1", {"score": np.float32(0.25), "flags": np.array([True, False]), "bad": float("nan")})
    sb.write(None, {"n": 1})
    sa.flush()
    sb.flush()
    assert (sa.delivered, sb.delivered, sa.pending) == (1, 1, 0)
    (ra,), (rb,) = read_all(bs, a), read_all(bs, b)
    assert ra.key == b"s1" and json.loads(ra.value) == {"score": 0.25, "flags": [True, False], "bad": None}
    assert rb.key is None and json.loads(rb.value) == {"n": 1}
    sa.close()
    with pytest.raises(RuntimeError, match="closed"):
        sa.write("k", {})


def test_sink_flush_raises_on_failed_delivery():
    # nothing listens on port 1: the record times out after 300 ms and flush must say so
    sink = KafkaSink("127.0.0.1:1", "t", overrides={"message.timeout.ms": 300, "log_level": 0})
    sink.write("k", {"v": 1})
    with pytest.raises(DeliveryError, match=r"1 record\(s\) to topic 't' failed delivery"):
        sink.flush(timeout=10)
    with pytest.raises(DeliveryError):  # sticky: never report success for lost outputs
        sink.flush(timeout=1)
    sink.clear_errors()
    sink.flush(timeout=1)
    sink.close()


def test_ensure_topics_is_idempotent(embedded_broker, unique_name):
    bs = embedded_broker.bootstrap_servers
    assert ensure_topics(bs, {unique_name: 3}) == {unique_name: 3}
    assert ensure_topics(bs, {unique_name: 3, f"{unique_name}.x": 1}) == {unique_name: 3, f"{unique_name}.x": 1}
    assert ensure_topics(bs, {unique_name: 5}) == {unique_name: 3}  # existing topics are left alone
    with pytest.raises(ValueError, match="partition count >= 1"):
        ensure_topics(bs, {"t": 0})


# ---------------------------------------------------------------------------------------------
# replay producer
# ---------------------------------------------------------------------------------------------
def test_replay_keys_each_stream_to_one_partition_in_order(embedded_broker, unique_name):
    bs, topic = embedded_broker.bootstrap_servers, unique_name
    data = samples(6, 10)
    assert replay(data, bs, topic, partitions=4, progress=False) == 60
    out = read_all(bs, topic)
    assert len(out) == 60
    parts: dict[str, set[int]] = {}
    order: dict[str, list[int]] = {}
    for r in sorted(out, key=lambda r: (r.partition, r.offset)):
        s = decode_value(r.value)
        assert r.key == s.stream_id.encode()
        parts.setdefault(s.stream_id, set()).add(r.partition)
        order.setdefault(s.stream_id, []).append(s.meta["i"])
    assert all(len(p) == 1 for p in parts.values()), parts
    assert len(set.union(*parts.values())) > 1, "6 keys all hashed to one of 4 partitions"
    assert all(o == list(range(10)) for o in order.values())


def test_replay_rate_limit_and_json_codec(embedded_broker, unique_name):
    bs, topic = embedded_broker.bootstrap_servers, unique_name
    rows = [Sample(x=np.array([i, i + 0.5], np.float32), stream_id="row", label=i % 2) for i in range(30)]
    t0 = time.perf_counter()
    assert replay(rows, bs, topic, rate=100.0, partitions=1, progress=False, codec="json") == 30
    assert time.perf_counter() - t0 >= 29 / 100 * 0.9
    out = read_all(bs, topic)
    assert [r.value[:1] for r in out] == [b"{"] * 30
    assert [decode_value(r.value).x.tolist() for r in out] == [[i, i + 0.5] for i in range(30)]
    with pytest.raises(ValueError, match="rate must be > 0"):
        replay(rows, bs, topic, rate=0, progress=False)


# ---------------------------------------------------------------------------------------------
# broker-free pieces: JSONL durability, in-memory source/sinks, broker start errors
# ---------------------------------------------------------------------------------------------
def test_jsonl_sink_flush_fsyncs_and_survives_a_crash(tmp_path, monkeypatch):
    path = tmp_path / "out" / "alerts.jsonl"
    sink = JsonlSink(path)
    synced = []
    real_fsync = __import__("os").fsync
    monkeypatch.setattr("streamtta.stream.memory.os.fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    sink.write("a", {"x": np.int64(1)})
    sink.write("b", {"x": 2.5})
    sink.flush()
    assert synced == [sink._fh.fileno()]
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"x": 1}, {"x": 2.5}]
    sink.close()
    sink.close()
    with pytest.raises(RuntimeError, match="closed"):
        sink.write("c", {})
    keyed = JsonlSink(path, include_key=True)  # appends, never truncates
    keyed.write("k", {"x": 3})
    keyed.close()
    assert [json.loads(line) for line in path.read_text().splitlines()][-1] == {"x": 3, "_key": "k"}

    # a process that dies right after flush (no close, no atexit) keeps its flushed lines
    crash = tmp_path / "crash.jsonl"
    code = ("import os; from streamtta.stream.memory import JsonlSink\n"
            f"s = JsonlSink({str(crash)!r})\n"
            "for i in range(3): s.write(str(i), {'i': i})\n"
            "s.flush(); s.write('lost', {'i': 99}); os._exit(1)\n")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 1
    assert [json.loads(line)["i"] for line in crash.read_text().splitlines()] == [0, 1, 2]


def test_memory_source_callbacks_pause_resume_and_crash():
    recs = [RawRecord("t", p, o, encode_tensor(np.zeros(1, np.float32), "s")) for o in range(3) for p in (0, 1)]
    src = MemorySource(recs, fail_after=4)
    assigned, revoked = [], []
    src.on_assign(assigned.append)
    src.on_revoke(revoked.append)
    src.pause()
    assert src.consume(10, 0.0) == [] and not src.at_end()
    src.resume()
    assert len(src.consume(3, 0.0)) == 3
    assert assigned == [[("t", 0)], [("t", 1)]]
    assert len(src.consume(10, 0.0)) == 1  # stops at the crash point ...
    with pytest.raises(SimulatedCrash):  # ... and then crashes
        src.consume(10, 0.0)
    src.commit({("t", 0): 2, ("t", 1): 1})
    src.close()
    assert revoked == [[("t", 0), ("t", 1)]]
    resumed = MemorySource(recs, start_offsets=src.committed)
    assert [(r.partition, r.offset) for r in resumed.consume(10, 0.0)] == [(1, 1), (0, 2), (1, 2)]
    assert resumed.at_end()


def test_memory_source_from_iterator_and_samples():
    gen = (encode_tensor(np.full(2, i, np.float32), "s") for i in range(5))
    src = MemorySource(gen, topic="sim")
    got = []
    while not src.at_end():
        got += src.consume(2, 0.0)
    assert [(r.topic, r.offset) for r in got] == [("sim", i) for i in range(5)]
    src2 = MemorySource.from_samples(samples(2, 2), topic="x")
    recs = src2.consume(10, 0.0)
    assert [r.key for r in recs] == [b"stream-0", b"stream-1"] * 2
    assert decode_value(recs[3].value).meta == {"i": 1}
    with pytest.raises(TypeError, match="RawRecord or bytes"):
        MemorySource([1, 2])


def test_memory_sinks():
    sink, dlq = MemorySink(), MemoryDeadLetter()
    sink.write("k", {"a": 1})
    sink.flush()
    assert sink.records == [("k", {"a": 1})] and sink.values == [{"a": 1}] and sink.flushes == 1
    rec = RawRecord("t", 0, 7, b"bad")
    dlq.send(rec, "boom")
    assert dlq.records == [(rec, "boom")]


def test_broker_start_failure_reports_log_tail(tmp_path):
    script = tmp_path / "fake-broker"
    script.write_text("#!/bin/sh\necho 'fatal: storage engine unavailable' >&2\nexit 3\n")
    script.chmod(0o755)
    broker = EmbeddedBroker(binary=str(script), log_dir=tmp_path, startup_timeout=5)
    with pytest.raises(BrokerStartError, match=r"(?s)exited with code 3.*storage engine unavailable"):
        broker.start()
    assert not broker.is_running()
    with pytest.raises(BrokerStartError, match="could not execute"):
        EmbeddedBroker(binary=str(tmp_path / "missing"), log_dir=tmp_path).start()
    with pytest.raises(RuntimeError, match="not running"):
        _ = broker.bootstrap_servers


def test_embedded_broker_lifecycle(embedded_broker):
    assert embedded_broker.is_running()
    assert embedded_broker.startup_s is not None and embedded_broker.startup_s < 20
    host, port = embedded_broker.bootstrap_servers.split(":")
    assert host == "127.0.0.1" and int(port) > 0
