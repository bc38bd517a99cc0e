"""State that moves between machines: two worker processes with separate checkpoint directories, one
killed with SIGKILL mid-stream; the survivor restores its adapter states from the Kafka changelog.

A second group of two workers reads the same topic at the same time without a kill: the uninterrupted
run the accuracy is compared with. Workers are ``tests/state_worker.py`` (Engine + KafkaSource +
KafkaStateStore); the stream is the start of the sensor-drift scenario on 4 partitions.
"""
from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from streamtta.runner import resolve_scenario
from streamtta.simulations.scenario import build_stream, load_scenario
from streamtta.stream.envelope import encode_tensor
from streamtta.stream.kafka import ensure_topics, make_producer

pytestmark = [pytest.mark.kafka]

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "state_worker.py"
PARTS, N, BATCH, RATE = 4, 2400, 16, 240.0  # records/s of the live stream


def committed(bs: str, group: str, topic: str) -> list[int]:
    c = Consumer({"bootstrap.servers": bs, "group.id": group})
    try:
        return [max(tp.offset, 0) for tp in c.committed([TopicPartition(topic, p) for p in range(PARTS)], timeout=10)]
    finally:
        c.close()


def predictions(bs: str, topic: str) -> list[dict]:
    c = Consumer({"bootstrap.servers": bs, "group.id": f"reader-{uuid.uuid4()}", "enable.partition.eof": True})
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    out, eof, deadline = [], set(), time.monotonic() + 30
    try:
        while len(eof) < len(parts) and time.monotonic() < deadline:
            for m in c.consume(500, 0.2):
                if m.error():
                    eof.add(m.partition()) if m.error().code() == KafkaError._PARTITION_EOF else None
                    continue
                out.append(json.loads(m.value()))
    finally:
        c.close()
    return out


def start(bs: str, topic: str, group: str, tmp: Path, name: str) -> tuple[subprocess.Popen, Path]:
    result = tmp / f"{name}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(WORKER), bs, topic, group, str(tmp / name / "ckpt"), str(result),
                             "--batch-size", str(BATCH)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, result


def assigned(result: Path) -> list[int]:
    p = Path(str(result) + ".assigned")
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return []


def wait(cond, what: str, procs, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for p in procs:
            assert p.poll() is None, f"a worker exited while waiting for {what}: {p.stderr.read().decode()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def accuracy(preds: list[dict], labels: dict) -> float:
    last = {(d["partition"], d["offset"]): d["pred"] for d in preds}
    known = [k for k, (_, unknown) in labels.items() if not unknown]
    return 100.0 * sum(last[k] == labels[k][0] for k in known) / len(known)


def test_survivor_restores_killed_workers_state_from_the_changelog(embedded_broker, tmp_path):
    bs = embedded_broker.bootstrap_servers
    topic = f"handover-{uuid.uuid4().hex[:6]}"
    gk, gb = f"killed-{uuid.uuid4().hex[:6]}", f"whole-{uuid.uuid4().hex[:6]}"
    ensure_topics(bs, {topic: PARTS, **{f"{topic}.{g}.{s}": 1 for g in (gk, gb) for s in ("predictions", "dlq")}})
    samples = list(itertools.islice(build_stream(load_scenario(resolve_scenario("sensor-drift")), 0).iter_samples(), N))
    labels = {(i % PARTS, i // PARTS): (s.label, bool(s.is_unknown)) for i, s in enumerate(samples)}
    end = N // PARTS

    def produce_live() -> None:  # a live stream: every partition grows at the same pace
        prod, t0 = make_producer(bs), time.monotonic()
        for i, s in enumerate(samples):
            time.sleep(max(0.0, t0 + i / RATE - time.monotonic()))
            prod.produce(topic, partition=i % PARTS, key=f"s{i % PARTS}".encode(),
                         value=encode_tensor(s.x, f"s{i % PARTS}", label=s.label, is_unknown=s.is_unknown))
            prod.poll(0)
        assert prod.flush(30) == 0

    workers = {name: start(bs, topic, g, tmp_path, name) for name, g in
               (("victim", gk), ("survivor", gk), ("whole-a", gb), ("whole-b", gb))}
    procs = [p for p, _ in workers.values()]
    producer = threading.Thread(target=produce_live, daemon=True)
    try:
        victim, survivor = workers["victim"], workers["survivor"]
        wait(lambda: all(len(assigned(r)) == 2 for _, r in workers.values()), "both groups to settle", procs)
        producer.start()
        # mid-stream: each partition a fifth committed, the stream still flowing
        wait(lambda: min(committed(bs, gk, topic)) >= end // 5, "the killed group to be mid-stream", procs)
        victim_parts = assigned(victim[1])
        os.kill(victim[0].pid, signal.SIGKILL)
        victim[0].wait(10)
        killed_at, at_kill = time.time(), committed(bs, gk, topic)
        assert all(0 < at_kill[p] < end for p in victim_parts), f"kill not mid-stream: committed {at_kill}"
        rest = [survivor[0], workers["whole-a"][0], workers["whole-b"][0]]
        producer.join(60)
        wait(lambda: committed(bs, gk, topic) == [end] * PARTS and committed(bs, gb, topic) == [end] * PARTS,
             "both groups to commit the whole topic", rest, timeout=90)
        for p in rest:
            p.send_signal(signal.SIGTERM)
        for p in rest:
            assert p.wait(60) == 0, p.stderr.read().decode()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()

    res = json.loads(survivor[1].read_text())
    after = [r for r in res["restores"] if r["at"] >= killed_at]
    moved = {r["key"]: r for r in after if r["key"] in {f"{topic}:{p}" for p in victim_parts}}
    assert set(moved) == {f"{topic}:{p}" for p in victim_parts}
    for p in victim_parts:
        r = moved[f"{topic}:{p}"]
        # the dead worker's state, not a fresh one: from the changelog, with its counters and offsets
        assert r["source"] == "changelog" and r["seq"] >= 1, r
        assert r["batch_index"] > 0 and r["n_samples"] > 0, r
        nxt = {(t, q): o for t, q, o in r["next_offsets"]}
        assert nxt[(topic, p)] >= at_kill[p], "the restored state covers every committed offset"
    for key, st in res["final"].items():  # counters continued: every record adapted on once per partition
        assert st["n_samples"] == end, (key, st)
    assert all(r["n_samples"] < end for r in moved.values()), f"a partition was done before the kill: {moved}"
    for k, r in moved.items():
        assert res["final"][k]["batch_index"] > r["batch_index"], (k, res["final"][k], r)
    killed, whole = predictions(bs, f"{topic}.{gk}.predictions"), predictions(bs, f"{topic}.{gb}.predictions")
    seen = {(d["partition"], d["offset"]) for d in killed}
    lost, duplicated = len(set(labels) - seen), len(killed) - len(seen)
    assert lost == 0 and {(d["partition"], d["offset"]) for d in whole} == set(labels)
    acc_killed, acc_whole = accuracy(killed, labels), accuracy(whole, labels)
    assert abs(acc_killed - acc_whole) <= 1.0, (acc_killed, acc_whole)
    restore_s = [r["seconds"] for r in moved.values()]
    print(f"\nhand-over: accuracy {acc_killed:.2f} % (killed run) vs {acc_whole:.2f} % (uninterrupted); "
          f"records lost {lost}, duplicated predictions {duplicated}; restore "
          f"{', '.join(f'{s:.3f}' for s in restore_s)} s; restored at batch "
          f"{[moved[k]['batch_index'] for k in sorted(moved)]}; recovery {max(r['at'] for r in after) - killed_at:.1f} s "
          f"after the kill")
