"""Broker faults: a broker that is absent at start, a topic that does not exist, a broker that goes away
mid-run and comes back, and commits that fail while it is away.

The embedded Tansu build keeps data in memory only (no persistent storage engine), so a real restart
loses every topic and offset. A broker that goes away *with its data kept* is simulated with
:class:`TcpProxy`: the broker advertises the proxy's port, and the proxy drops every connection and
refuses new ones while it is down -- what clients see of a broker restart.
"""
from __future__ import annotations

import json
import logging
import select
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException
from confluent_kafka import TopicPartition as KTP

from streamtta.stream.broker import EmbeddedBroker, free_port
from streamtta.stream.envelope import encode_tensor
from streamtta.stream.kafka import CommitError, KafkaSource
from streamtta.stream.kafka.admin import ensure_topics, wait_for_broker
from streamtta.stream.kafka.errors import BrokerUnavailable, MissingTopicError
from streamtta.stream.producer import produce_raw

ROOT = Path(__file__).resolve().parents[2]


class TcpProxy:
    """Forwards ``127.0.0.1:listen_port`` to ``127.0.0.1:target_port``; :meth:`down` closes the listener
    and every open connection (new ones are refused) until :meth:`up`."""

    def __init__(self, listen_port: int, target_port: int) -> None:
        self.listen_port, self.target_port = listen_port, target_port
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "TcpProxy":
        self.up()
        return self

    def up(self) -> None:
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.listen_port))
        srv.listen(64)
        self._listener = srv
        self._thread = threading.Thread(target=self._accept, args=(srv,), daemon=True)
        self._thread.start()

    def down(self) -> None:
        srv, self._listener = self._listener, None
        if srv is not None:
            srv.close()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    stop = down

    def _accept(self, srv: socket.socket) -> None:
        while self._listener is srv:
            try:
                ready, _, _ = select.select([srv], [], [], 0.1)
                if not ready:
                    continue
                client, _ = srv.accept()
            except (OSError, ValueError):
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 0.5)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            a.close()
            b.close()


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streamtta.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


# -- broker absent at start ----------------------------------------------------------------------
def test_run_with_absent_broker_exits_nonzero_with_one_clear_line(tmp_path):
    port = free_port()  # nothing listens there
    res = _cli("run", "--bootstrap-servers", f"127.0.0.1:{port}", "--no-replay", "--no-progress",
               "--output-dir", str(tmp_path / "runs"), "--set", "kafka.connect_timeout_s=1.5")
    assert res.returncode == 1, res.stderr[-2000:]
    err = _lines(res.stderr)
    assert len(err) == 1 and err[0].startswith(f"streamtta: cannot reach Kafka at 127.0.0.1:{port} after 1.5 s")
    assert "Connection refused" in err[0]
    out = _lines(res.stdout)
    assert "Traceback" not in res.stdout + res.stderr
    flat = " ".join(res.stdout.split())  # the log handler wraps long lines
    assert flat.count("cannot reach Kafka at") == 1, res.stdout  # the one retry warning, not one per attempt
    assert "retrying for up to 1.5 s" in flat
    assert len(out) <= 6, res.stdout  # that warning, wrapped; no librdkafka lines
    assert not (tmp_path / "runs").exists(), "nothing is written for a run that never reached Kafka"


def test_wait_for_broker_backs_off_until_the_broker_comes_up(tmp_path, caplog):
    port = free_port()
    broker = EmbeddedBroker(port=port, log_dir=tmp_path)
    starter = threading.Timer(3.0, broker.start)  # later than the first attempt, even on a loaded machine
    caplog.set_level(logging.DEBUG)
    starter.start()
    try:
        md = wait_for_broker(f"127.0.0.1:{port}", timeout=60)
        assert md.brokers, "a broker answered"
    finally:
        starter.join()
        broker.stop()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "cannot reach Kafka at" in warnings[0].getMessage()
    refused = [r for r in caplog.records if r.name == "streamtta.kafka.client" and "refused" in r.getMessage()]
    assert refused and all(r.levelno == logging.DEBUG for r in refused)  # librdkafka's lines, at DEBUG only


def test_wait_for_broker_gives_up_after_the_timeout(caplog):
    caplog.set_level(logging.WARNING)
    with pytest.raises(BrokerUnavailable, match=r"cannot reach Kafka at 127\.0\.0\.1:\d+ after 2.5 s.*refused"):
        wait_for_broker(f"127.0.0.1:{free_port()}", timeout=2.5)
    assert len(caplog.records) == 1, [r.getMessage() for r in caplog.records]  # one line, then the error
    assert "cannot reach Kafka at" in caplog.records[0].getMessage()
    assert "retrying for up to 2.5 s" in caplog.records[0].getMessage()


# -- missing topic ---------------------------------------------------------------------------------
def _topics(bootstrap: str) -> set[str]:
    from confluent_kafka.admin import AdminClient

    return set(AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics)


def test_missing_topic_is_an_error_naming_it_unless_create_topics(embedded_broker, tmp_path, unique_name):
    from streamtta.config import Config
    from streamtta.stream.producer import replay
    from streamtta.types import Sample

    bs = embedded_broker.bootstrap_servers
    with pytest.raises(MissingTopicError, match=f"'{unique_name}' does not exist.*--create-topics"):
        ensure_topics(bs, {unique_name: 1}, create=False)
    one = [Sample(x=np.zeros(18, np.float32), stream_id="s")]
    with pytest.raises(MissingTopicError, match=unique_name):
        replay(one, bs, unique_name, progress=False, kafka=Config().kafka)
    assert unique_name not in _topics(bs)

    args = ("run", "--bootstrap-servers", bs, "--topic", unique_name, "--no-replay", "--no-progress", "--model",
            "segment-mlp", "--output-dir", str(tmp_path / "runs"), "--checkpoint-dir", str(tmp_path / "ckpt"),
            "--set", "kafka.stop_at_end=true")
    res = _cli(*args)
    assert res.returncode == 1, res.stderr[-2000:]
    assert _lines(res.stderr) == [f"streamtta: topic '{unique_name}' does not exist on {bs} (misspelled?); create "
                                  f"it, or let streamtta create it with --create-topics (kafka.create_topics=true)"]
    assert unique_name not in _topics(bs), "a misspelled topic is not created (nor waited on)"

    res = _cli(*args, "--create-topics")  # created empty; stop_at_end ends the run at its (empty) end
    assert res.returncode == 0, res.stderr[-2000:]
    assert {unique_name, f"{unique_name}.predictions", f"{unique_name}.dlq"} <= _topics(bs)


# -- commit retries --------------------------------------------------------------------------------
class FlakyCommits:
    """Wraps a confluent_kafka Consumer: its next commits raise the queued errors, then commit for real."""

    def __init__(self, consumer: Consumer) -> None:
        self._consumer = consumer
        self.errors: list[int] = []
        self.always: int | None = None
        self.calls = 0

    def commit(self, **kw):
        self.calls += 1
        code = self.errors.pop(0) if self.errors else self.always
        if code is not None:
            raise KafkaException(KafkaError(code))
        return self._consumer.commit(**kw)

    def __getattr__(self, name):
        return getattr(self._consumer, name)


def test_commit_retries_while_the_broker_is_away_and_is_bounded(embedded_broker, unique_name, caplog):
    bs = embedded_broker.bootstrap_servers
    ensure_topics(bs, {unique_name: 1})
    produce_raw(bs, unique_name, [b"x"] * 5)
    src = KafkaSource(bs, [unique_name], unique_name, retry_timeout_s=30.0)
    flaky = FlakyCommits(src._consumer)
    src._consumer = flaky
    try:
        got, deadline = [], time.monotonic() + 30
        while len(got) < 5 and time.monotonic() < deadline:
            got += src.consume(5, 0.2)
        tp = (unique_name, 0)
        caplog.set_level(logging.WARNING, logger="streamtta.stream.kafka.source")

        flaky.errors = [KafkaError._TRANSPORT, KafkaError.COORDINATOR_NOT_AVAILABLE]  # broker restarting
        assert src.commit({tp: 3}) is True
        assert flaky.calls == 3 and src.committed([tp]) == {tp: 3}
        assert any("retrying for up to 30 s" in r.getMessage() for r in caplog.records)

        flaky.calls, flaky.always, src.retry_timeout_s = 0, KafkaError._TRANSPORT, 0.5  # never comes back
        with pytest.raises(CommitError, match=r"still failing after \d+ attempts in 0.5 s"):
            src.commit({tp: 4})
        assert flaky.calls > 1 and src.committed([tp]) == {tp: 3}

        flaky.calls, flaky.always, src.retry_timeout_s = 0, KafkaError.OFFSET_METADATA_TOO_LARGE, 30.0
        with pytest.raises(CommitError, match="commit failed"):  # not a broker fault: no retry
            src.commit({tp: 4})
        assert flaky.calls == 1

        flaky.calls, flaky.always = 0, None
        flaky.errors = [KafkaError.ILLEGAL_GENERATION]  # the group moved on: skipped, the next owner re-reads
        assert src.commit({tp: 4}) is False
        assert flaky.calls == 1 and src.committed([tp]) == {tp: 3}
        assert any("group rebalanced" in r.getMessage() for r in caplog.records)
        src.commit({tp: 5})
        assert src.committed([tp]) == {tp: 5}
    finally:
        src.close()


# -- broker away mid-run ---------------------------------------------------------------------------
def _committed(bootstrap: str, group: str, topic: str) -> int:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "log_level": 0})
    try:
        return c.committed([KTP(topic, 0)], timeout=10)[0].offset
    finally:
        c.close()


def _prediction_offsets(bootstrap: str, topic: str) -> list[int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"r-{uuid.uuid4().hex}", "enable.partition.eof": True})
    c.assign([KTP(topic, 0, OFFSET_BEGINNING)])
    out, deadline = [], time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            msgs = c.consume(500, 1.0)
            if any(m.error() is not None and m.error().code() == KafkaError._PARTITION_EOF for m in msgs):
                out += [json.loads(m.value())["offset"] for m in msgs if m.error() is None]
                return out
            out += [json.loads(m.value())["offset"] for m in msgs if m.error() is None]
        raise AssertionError(f"{topic} did not reach its end")
    finally:
        c.close()


def test_broker_away_mid_run_the_run_continues_and_loses_nothing(tmp_path):
    import signal

    proxy_port, broker_port = free_port(), free_port()
    proxy = TcpProxy(proxy_port, broker_port).start()
    rng = np.random.default_rng(0)
    batch, first, second = 4, 600, 200

    def rows(n: int) -> list[bytes]:
        return [encode_tensor(rng.random(18, dtype=np.float32), "s0") for _ in range(n)]

    try:
        with EmbeddedBroker(port=broker_port, advertised_port=proxy_port, log_dir=tmp_path) as broker:
            bs = broker.bootstrap_servers  # the proxy's address
            topic, group = f"away-{uuid.uuid4().hex[:6]}", f"g-{uuid.uuid4().hex[:6]}"
            ensure_topics(bs, {topic: 1})
            produce_raw(bs, topic, rows(first), key="s0")
            proc = subprocess.Popen(
                [sys.executable, "-m", "streamtta.cli", "run", "--bootstrap-servers", bs, "--topic", topic,
                 "--group-id", group, "--no-replay", "--no-progress", "--model", "segment-mlp", "--batch-size",
                 str(batch), "--output-dir", str(tmp_path / "runs"), "--checkpoint-dir", str(tmp_path / "ckpt"),
                 "--set", "engine.checkpoint_interval_s=0"],  # commits advance per batch: the outage lands mid-stream
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                deadline = time.monotonic() + 120
                while _committed(bs, group, topic) < 50:
                    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
                    time.sleep(0.1)
                proxy.down()  # every connection dropped, new ones refused: the broker is away
                time.sleep(4.0)
                proxy.up()
                at_return = _committed(bs, group, topic)
                assert at_return < first, f"the outage did not land mid-stream (committed {at_return})"
                produce_raw(bs, topic, rows(second), key="s0")  # records written after the outage
                while _committed(bs, group, topic) < first + second:
                    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
                    time.sleep(0.2)
                proc.send_signal(signal.SIGTERM)
                stopped_at = time.monotonic()
                out, err = proc.communicate(timeout=60)
                exit_s = time.monotonic() - stopped_at
            finally:
                if proc.poll() is None:
                    proc.kill()
            assert proc.returncode == 0, err[-3000:]
            assert "Traceback" not in err and len(_lines(err)) <= 2, err[-3000:]
            assert len(_lines(out)) < 60, out  # each kind of librdkafka event once, not once per reconnect
            offsets = _prediction_offsets(bs, f"{topic}.predictions")
            assert set(offsets) == set(range(first + second)), "every input offset has its prediction"
            dup = len(offsets) - len(set(offsets))
            print(f"figures: records={first + second} lost={first + second - len(set(offsets))} duplicated={dup} "
                  f"rc={proc.returncode} exit_after_sigterm_s={exit_s:.2f} committed_when_back={at_return}")
            assert dup <= batch  # the documented flush->checkpoint window at most
    finally:
        proxy.stop()


def test_a_parent_killed_outright_leaves_no_broker_behind(tmp_path):
    """SIGKILL skips stop() and the atexit hook: the parent-death signal still stops the broker."""
    import os
    import signal

    script = ("import sys, time\n"
              "from streamtta.stream.broker import EmbeddedBroker\n"
              "b = EmbeddedBroker(); b.start()\n"
              "print(b._proc.pid, flush=True)\n"
              "time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=str(ROOT), text=True)
    try:
        line = child.stdout.readline()
        assert line.strip().isdigit(), f"the child did not start a broker: {line!r}"
        broker_pid = int(line)
        os.kill(broker_pid, 0)  # alive
        child.kill()
        child.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(broker_pid, 0)
            except ProcessLookupError:
                break
            try:  # reap it if it became our zombie (it is not our child; this only waits)
                os.waitpid(broker_pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.1)
        else:
            os.kill(broker_pid, signal.SIGKILL)
            pytest.fail("the broker outlived its killed parent")
    finally:
        if child.poll() is None:
            child.kill()
