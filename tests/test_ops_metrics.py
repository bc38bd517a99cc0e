"""Prometheus metrics, health and readiness (issue 17): the engine's hooks move the metrics, each engine
has its own registry, lag comes from librdkafka statistics, and during a run on the embedded broker
``/metrics`` and ``/readyz`` answer over HTTP with values that move."""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
import torch

from streamtta.checkpoints import CheckpointStore
from streamtta.config import load_config
from streamtta.engine import Engine, Outputs
from streamtta.models.registry import load_model
from streamtta.ops.health import Readiness
from streamtta.ops.metrics import EngineMetrics
from streamtta.ops.scrape import fetch
from streamtta.ops.telemetry import Telemetry
from streamtta.runner import build_pipeline, consume
from streamtta.simulations.digits import load_digits_32
from streamtta.stream.envelope import encode_tensor
from streamtta.stream.memory import MemoryDeadLetter, MemorySink, MemorySource


@pytest.fixture(scope="module")
def model_meta():
    torch.set_num_threads(1)
    return load_model("digits-resnet")


def digit_values(n, poison=()):
    d = load_digits_32()
    return [b"not an envelope" if i in poison else
            encode_tensor(d.x_test[i % len(d.x_test)], "cam", label=int(d.y_test[i % len(d.x_test)]))
            for i in range(n)]


def test_engine_hooks_move_the_metrics(tmp_path, model_meta):
    cfg = load_config(overrides={"adapter": {"spec": "bn"}, "engine": {"batch_size": 32},
                                 "kafka": {"stop_at_end": True, "poll_timeout_s": 0.01}}, env=False)
    n, poison = 160, {3, 70, 71}
    metrics = EngineMetrics()
    out = Outputs(predictions=MemorySink(), alerts=[MemorySink()], dlq=MemoryDeadLetter())
    eng = Engine(cfg, MemorySource(digit_values(n, poison), topic="t"), out, build_pipeline(cfg, *model_meta),
                 store=CheckpointStore(tmp_path / "ck"), observer=metrics)
    eng.run()
    v = metrics.value
    assert v("streamtta_records_total", outcome="consumed") == n
    assert v("streamtta_records_total", outcome="processed") == n - len(poison) == eng.samples_processed
    assert v("streamtta_records_total", outcome="dead_lettered") == len(poison)
    assert v("streamtta_records_total", outcome="skipped") == 0  # no restored state: nothing covered twice
    assert v("streamtta_alerts_total", kind="dead_letter") >= 1
    assert v("streamtta_batch_seconds_count") == eng.batches
    assert v("streamtta_step_seconds_count") == eng.batches  # one state: one step per batch
    assert v("streamtta_commit_seconds_count") >= 1 and v("streamtta_checkpoint_seconds_count") >= 1
    assert v("streamtta_ood_total") == sum(p["ood"] for p in out.predictions.values)
    assert v("streamtta_states") == 1
    assert v("process_resident_memory_bytes") > 0
    alerts = [a["kind"] for a in out.alerts[0].values]
    assert sum(v("streamtta_alerts_total", kind=k) or 0 for k in set(alerts)) == len(alerts)
    shifts = sum(1 for a in alerts if a.endswith("_shift"))
    assert v("streamtta_shifts_total") >= shifts


def test_each_engine_has_its_own_registry():
    a, b = EngineMetrics(), EngineMetrics()  # no "duplicated timeseries" error: not the global registry
    a.commit({("t", 0): 1}, 0.01, True)
    assert a.value("streamtta_commit_seconds_count") == 1 and b.value("streamtta_commit_seconds_count") == 0
    assert b"streamtta_records_total" in b.exposition()


def test_lag_follows_statistics_and_drops_revoked_partitions():
    m = EngineMetrics(process=False)

    def stats(**lags):
        return json.dumps({"topics": {"t": {"partitions": {p[1:]: {"consumer_lag": v} for p, v in lags.items()}}}})

    m.on_stats(stats(p0=5, p1=9))
    assert m.value("streamtta_consumer_lag", topic="t", partition="1") == 9
    m.on_stats(stats(p0=2))  # partition 1 was revoked
    assert m.value("streamtta_consumer_lag", topic="t", partition="0") == 2
    assert m.value("streamtta_consumer_lag", topic="t", partition="1") is None


def test_lag_of_a_stopped_engine_is_not_served_stale():
    t = Telemetry(process=False)
    with t.consuming():
        t.on_stats({"topics": {"t": {"partitions": {"0": {"consumer_lag": 7}}}}})
        assert t.metrics.value("streamtta_consumer_lag", topic="t", partition="0") == 7
    # the consumer is closed: no report will update the gauge again, so it goes rather than freeze at 7
    assert t.metrics.value("streamtta_consumer_lag", topic="t", partition="0") is None


def test_an_idle_connection_does_not_hold_an_endpoint_thread_forever():
    import socket

    from streamtta.ops.server import OpsServer

    srv = OpsServer("127.0.0.1", 0, lambda: b"x 1\n", lambda: (True, {}), timeout_s=0.2).start()
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as sock:
            assert sock.recv(1) == b""  # sent nothing: the server closes the connection (no timeout here)
        assert urllib.request.urlopen(f"{srv.url}/healthz", timeout=60).status == 200
    finally:
        srv.close()


def test_readiness_says_what_is_missing():
    now = [0.0]
    r = Readiness(max_poll_age_s=5, clock=lambda: now[0])
    up = {"brokers": {"b:1/1": {"nodeid": 1, "state": "UP"}}, "cgrp": {"assignment_size": 2}}
    with r.consuming():
        r.on_stats(up)
        assert r.check()[0]
        now[0] = 6.0
        ok, d = r.check()
        assert not ok and "last polled" in d["reasons"][0]
        r.on_stats({**up, "brokers": {"b:1/1": {"nodeid": 1, "state": "DOWN"}}})
        assert r.check()[1]["reasons"] == ["no broker reachable in the last poll"]
        r.on_stats({**up, "cgrp": {"assignment_size": 0}})
        assert r.check()[1]["reasons"] == ["no partitions assigned"]
        r.on_stats(up)
    assert r.check()[1]["reasons"] == ["the engine is not consuming"]


def produce(bootstrap, topic, start, n):
    from streamtta.stream.kafka import make_producer

    prod = make_producer(bootstrap)
    for i, value in enumerate(digit_values(start + n)[start:]):
        prod.produce(topic, value=value, key=b"cam", partition=0)
        if i % 100 == 0:
            prod.poll(0)
    assert prod.flush(30) == 0


def readyz(url):
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_for(pred, what, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_metrics_and_readyz_over_http_during_a_kafka_run(embedded_broker, tmp_path, model_meta):
    from streamtta.stream.kafka import ensure_topics

    bs = embedded_broker.bootstrap_servers
    topic, group = f"ops-{uuid.uuid4().hex[:6]}", f"g-{uuid.uuid4().hex[:6]}"
    n1, n2 = 192, 128
    ensure_topics(bs, {topic: 1})
    produce(bs, topic, 0, n1)
    cfg = load_config(overrides={
        "adapter": {"spec": "bn"}, "engine": {"batch_size": 32, "checkpoint_dir": str(tmp_path / "ck")},
        "kafka": {"topic": topic, "group_id": group, "poll_timeout_s": 0.2, "consumer": {"session.timeout.ms": 6000}},
        "metrics": {"port": 0, "host": "127.0.0.1", "stats_interval_ms": 100}}, env=False)
    pipe = build_pipeline(cfg, *model_meta)
    telemetry = Telemetry.from_config(cfg).start()
    try:
        code, body = readyz(telemetry.url)
        assert code == 503 and "the engine is not consuming" in body["reasons"]
        result = {}
        worker = threading.Thread(target=lambda: result.update(r=consume(cfg, bs, pipeline=pipe, progress=False,
                                                                           telemetry=telemetry,
                                                                           max_records=n1 + n2)),
                                  daemon=True)  # a failed assertion below must not keep pytest from exiting
        worker.start()

        def scrape_once_consumed(n):
            snap = fetch(telemetry.url)
            return snap if (snap.get("streamtta_records_total", outcome="consumed") or 0) >= n else None

        first = wait_for(lambda: scrape_once_consumed(n1), "the first records")
        status = wait_for(lambda: (r := readyz(telemetry.url))[0] == 200 and r, "/readyz 200 while consuming")
        assert status[1]["partitions"] == 1 and status[1]["brokers_up"] >= 1
        lag = first.series("streamtta_consumer_lag")
        assert any(lab == {"topic": topic, "partition": "0"} for lab, _ in lag) and all(v >= 0 for _, v in lag)
        produce(bs, topic, n1, n2)
        wait_for(lambda: scrape_once_consumed(n1 + n2), "the second records")
        worker.join(120)
        assert not worker.is_alive() and result["r"].stats["records"] == n1 + n2
        second = fetch(telemetry.url)
        for name, labels in [("streamtta_records_total", {"outcome": "consumed"}),
                             ("streamtta_records_total", {"outcome": "processed"}),
                             ("streamtta_batch_seconds_count", {}), ("streamtta_step_seconds_count", {}),
                             ("streamtta_commit_seconds_count", {}), ("streamtta_checkpoint_seconds_count", {})]:
            assert second.get(name, **labels) > first.get(name, **labels), name
        assert second.get("streamtta_records_total", outcome="processed") == n1 + n2
        assert first.get("streamtta_states") == 1 and second.get("process_resident_memory_bytes") > 0
        assert second.get("streamtta_states") == 0  # the stopped engine's consumer gave its partition back
        code, body = readyz(telemetry.url)  # the engine stopped: not ready, still alive
        assert code == 503 and "the engine is not consuming" in body["reasons"]
        with urllib.request.urlopen(f"{telemetry.url}/healthz", timeout=5) as r:
            assert r.status == 200
    finally:
        telemetry.close()
    assert np.isfinite(second.get("streamtta_ood_ratio"))


def test_readiness_does_not_flap_between_statistics_reports(caplog):
    """Statistics every 60 s against a 30 s poll-age limit: a healthy worker stays ready between reports."""
    from streamtta.ops.telemetry import Telemetry

    with caplog.at_level("WARNING", logger="streamtta.ops"):
        t = Telemetry(stats_interval_ms=60_000, ready_max_poll_age_s=30, process=False)
    assert "accepts a poll age of 120 s" in caplog.text
    now = [0.0]
    t.readiness.clock = lambda: now[0]
    with t.consuming():
        t.on_stats({"brokers": {"b:1/1": {"nodeid": 1, "state": "UP"}}, "cgrp": {"assignment_size": 1}})
        now[0] = 45.0  # the next report is 15 s away
        assert t.readiness.check()[0]
        now[0] = 121.0  # two reports missed: the consumer is not polled
        assert not t.readiness.check()[0]
    assert Telemetry(stats_interval_ms=1000, ready_max_poll_age_s=30, process=False).readiness.max_poll_age_s == 30


def test_states_gauge_follows_a_revocation_without_a_batch():
    """A worker that loses its partitions (and gets no more records) must not go on showing their states."""
    from types import SimpleNamespace

    m = EngineMetrics(process=False)
    engine = SimpleNamespace(records_seen=64, samples_processed=64, dead_letters=0, states={"t:0": 1, "t:1": 2})
    m.batch(engine, [], 0.01)
    assert m.value("streamtta_states") == 2
    engine.states.clear()  # Engine._on_revoke pops the revoked partitions' states; no batch follows
    assert m.value("streamtta_states") == 0


def test_lag_help_says_it_counts_from_the_committed_offset():
    """librdkafka (>= 1.7) computes consumer_lag from the committed offset, not the consumer's position."""
    from prometheus_client.parser import text_string_to_metric_families

    fams = {f.name: f for f in text_string_to_metric_families(EngineMetrics(process=False).exposition().decode())}
    assert "committed offset" in fams["streamtta_consumer_lag"].documentation


def test_records_a_restored_state_had_processed_count_as_skipped():
    """After a takeover the new owner consumes again the records its restored state covers: without a
    ``skipped`` outcome, consumed would exceed processed + dead-lettered with nothing to say why."""
    from types import SimpleNamespace

    m = EngineMetrics(process=False)
    engine = SimpleNamespace(records_seen=3040, samples_processed=2974, dead_letters=2, skipped=64, states={})
    m.batch(engine, [], 0.01)
    v = lambda o: m.value("streamtta_records_total", outcome=o)  # noqa: E731
    assert v("skipped") == 64 and v("consumed") == v("processed") + v("dead_lettered") + v("skipped")
