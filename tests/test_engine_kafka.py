"""Engine over the embedded Kafka-protocol broker: end to end, dead letters, kill -9, SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Consumer, KafkaError

from streamtta.simulations.digits import load_digits_32
from streamtta.stream.envelope import encode_tensor
from streamtta.stream.kafka import ensure_topics, make_producer

pytestmark = [pytest.mark.kafka]

ROOT = Path(__file__).resolve().parents[1]


def produce_digits(bootstrap: str, topic: str, n: int, *, poison_at: set[int] = frozenset(), partitions: int = 1):
    d = load_digits_32()
    ensure_topics(bootstrap, {topic: partitions})
    prod = make_producer(bootstrap)
    for i in range(n):
        if i in poison_at:
            value = b"\x00garbage" if i % 2 else encode_tensor(np.full((1, 32, 32), np.nan, np.float32), "cam")
        else:
            j = i % len(d.x_test)
            value = encode_tensor(d.x_test[j], f"cam{i % partitions}", label=int(d.y_test[j]),
                                  is_unknown=bool(d.y_test[j] >= 8))
        prod.produce(topic, value=value, key=f"cam{i % partitions}".encode(), partition=i % partitions)
        if i % 1000 == 0:
            prod.poll(0)
    assert prod.flush(30) == 0


def read_topic(bootstrap: str, topic: str, *, max_wait_s: float = 60.0):
    """Every message of ``topic`` from the beginning to the current end (no group: assign + EOF)."""
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4()}",
                  "enable.auto.commit": False, "enable.partition.eof": True})
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    out, eof, t0 = [], set(), time.monotonic()
    try:
        while len(eof) < len(parts) and time.monotonic() - t0 < max_wait_s:
            for m in c.consume(500, 0.5):
                if m.error():
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        eof.add(m.partition())
                    continue
                eof.discard(m.partition())
                out.append(m)
    finally:
        c.close()
    assert len(eof) == len(parts), f"did not reach the end of {topic} in {max_wait_s} s"
    return out


def committed(bootstrap: str, group: str, topic: str, partitions: int = 1) -> list[int]:
    from confluent_kafka import TopicPartition
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        return [tp.offset for tp in c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)]
    finally:
        c.close()


def engine_cmd(bootstrap, topic, group, tmp_path, *extra):
    return [sys.executable, "-m", "streamtta.cli", "run", "--bootstrap-servers", bootstrap, "--topic", topic,
            "--group-id", group, "--no-replay", "--no-progress", "--output-dir", str(tmp_path / "runs"),
            "--checkpoint-dir", str(tmp_path / "ckpt"), "--set", "kafka.stop_at_end=true", *extra]


def test_end_to_end_with_poison_records(embedded_broker, tmp_path):
    bs = embedded_broker.bootstrap_servers
    topic, group = f"e2e-{uuid.uuid4().hex[:6]}", f"g-{uuid.uuid4().hex[:6]}"
    n, poison = 600, {17, 18, 301}
    produce_digits(bs, topic, n, poison_at=poison)
    res = subprocess.run(engine_cmd(bs, topic, group, tmp_path, "--batch-size", "32"), cwd=ROOT,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    preds = [json.loads(m.value()) for m in read_topic(bs, f"{topic}.predictions")]
    offsets = sorted(p["offset"] for p in preds)
    assert offsets == sorted(set(range(n)) - poison)  # every good record predicted once, stream continued
    dlq = read_topic(bs, f"{topic}.dlq")
    assert sorted(int(dict(m.headers())["dlq.origin.offset"]) for m in dlq) == sorted(poison)
    assert all(dict(m.headers())["dlq.origin.topic"].decode() == topic for m in dlq)
    assert committed(bs, group, topic) == [n]
    run_dir = next((tmp_path / "runs").iterdir())
    for name in ("config.toml", "manifest.json", "metrics.json", "alerts.jsonl", "run.png"):
        assert (run_dir / name).exists(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["stats"]["dead_letters"] == len(poison)
    assert metrics["summary"]["acc"] > 50.0  # clean digits through the shipped model (percent)
    alerts = [json.loads(line) for line in (run_dir / "alerts.jsonl").read_text().splitlines()]
    assert any(a["kind"] == "dead_letter" for a in alerts)


def test_kill9_restart_loses_nothing(embedded_broker, tmp_path):
    bs = embedded_broker.bootstrap_servers
    topic, group = f"k9-{uuid.uuid4().hex[:6]}", f"g-{uuid.uuid4().hex[:6]}"
    n, batch = 2000, 16
    produce_digits(bs, topic, n)
    # checkpoint_interval_s=0: a commit after every batch, so a kill duplicates at most one batch
    cmd = engine_cmd(bs, topic, group, tmp_path, "--batch-size", str(batch), "--set", "engine.checkpoint_interval_s=0")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # wait until it is mid-stream: some offsets committed, far from the end
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        off = committed(bs, group, topic)[0]
        if off >= 200:
            break
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    at_kill = committed(bs, group, topic)[0]
    assert 0 < at_kill < n, f"kill did not land mid-stream (committed {at_kill})"
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    preds = [json.loads(m.value()) for m in read_topic(bs, f"{topic}.predictions")]
    offsets = [p["offset"] for p in preds]
    assert set(offsets) == set(range(n)), "every input offset has a prediction"
    dup = len(offsets) - len(set(offsets))
    assert dup <= batch, f"{dup} duplicate predictions (bound: one batch = {batch})"
    ids = {}
    for p in preds:  # a re-processed record gets the same deterministic id
        assert ids.setdefault(p["offset"], p["id"]) == p["id"]
    assert committed(bs, group, topic) == [n]


def test_sigterm_exits_cleanly_with_offsets_committed(embedded_broker, tmp_path):
    bs = embedded_broker.bootstrap_servers
    topic, group = f"st-{uuid.uuid4().hex[:6]}", f"g-{uuid.uuid4().hex[:6]}"
    n, batch = 2000, 16
    produce_digits(bs, topic, n)
    cmd = engine_cmd(bs, topic, group, tmp_path, "--batch-size", str(batch))
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while committed(bs, group, topic)[0] < 100 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(60)
    assert rc == 0, proc.stderr.read().decode()[-3000:]
    off = committed(bs, group, topic)[0]
    preds = [json.loads(m.value()) for m in read_topic(bs, f"{topic}.predictions")]
    done = {p["offset"] for p in preds}
    assert 0 < off <= n
    assert set(range(off)) <= done, "everything below the committed offset has its prediction"
    assert max(done) == off - 1, "the batch in flight was finished, flushed and committed before exit"
