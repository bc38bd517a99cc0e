"""Clean shutdown: SIGINT/SIGTERM stop ``streamtta run`` engine first, then its embedded broker, then
the results are written; ``streamtta broker`` stops its Tansu child on either signal."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamtta.stream.broker import free_port

pytestmark = [pytest.mark.kafka]

ROOT = Path(__file__).resolve().parents[2]


def _children(pid: int) -> list[tuple[int, str]]:
    """``(pid, command name)`` of the live child processes of ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append((int(stat.parent.name), comm))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")


def _tansu_child(pid: int, proc: subprocess.Popen, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p, comm in _children(pid) if comm.startswith("tansu")]
        if found:
            return found[0]
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError("no tansu child process appeared")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_broker_command_stops_its_broker_on_signal(sig):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "streamtta.cli", "broker", "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert f"127.0.0.1:{port}" in first, first + proc.communicate()[1][-2000:]
        child = _tansu_child(proc.pid, proc)
        assert not _port_free(port)
        proc.send_signal(sig)
        signalled = time.monotonic()
        out, err = proc.communicate(timeout=30)
        print(f"figures: broker {sig.name} rc={proc.returncode} exit_s={time.monotonic() - signalled:.2f}")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert not err.strip(), err[-2000:]
    assert not _alive(child), "the tansu child process is gone"
    assert _port_free(port), "the broker's port is free again"


def _small_scenario(tmp_path: Path) -> Path:
    text = (ROOT / "simulations" / "sensor-drift.toml").read_text()
    assert "samples_per_domain = 1000" in text
    path = tmp_path / "sensor-small.toml"
    path.write_text(text.replace("samples_per_domain = 1000", "samples_per_domain = 300"))  # 1,800 records
    return path


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_run_signal_stops_engine_then_broker_then_writes_results(tmp_path, sig):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "streamtta.cli", "run", "--scenario", str(_small_scenario(tmp_path)), "--no-progress",
           "--batch-size", "2", "--output-dir", str(runs)]
    # own process group: SIGINT goes to the whole group, as a terminal's Ctrl-C does
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        child = _tansu_child(proc.pid, proc)
        deadline = time.monotonic() + 120
        while not list(runs.glob("*/checkpoints/*/*.pt")):  # the engine has processed and committed a batch
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        signalled = time.monotonic()
        out, err = proc.communicate(timeout=60)
        exit_s = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert not err.strip(), err[-3000:]
    assert "Kafka consumer" not in out and "Kafka producer" not in out, out  # no librdkafka noise on the way out
    assert not _alive(child), "the embedded broker was stopped"
    run_dir = next(runs.iterdir())
    stats = json.loads((run_dir / "metrics.json").read_text())["stats"]
    print(f"figures: {sig.name} samples={stats['samples']} of 1800 rc={proc.returncode} exit_s={exit_s:.2f}")
    assert stats["stopped_by"] == sig.name
    assert 0 < stats["samples"] < 1800, "stopped mid-stream, after the engine had consumed"
    runlog = json.loads((run_dir / "runlog.json").read_text())
    offsets = sorted(o for b in runlog["batches"] for o in b["offsets"])
    assert offsets == list(range(stats["samples"])), "every consumed record finished, in order, none held back"
    assert (run_dir / "run.png").exists()


def test_broker_command_on_a_busy_port_says_so(capsys):
    from streamtta import cli

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["broker", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is already in use" in err and "Traceback" not in err


def test_a_run_that_consumed_nothing_says_why(monkeypatch):
    from rich.console import Console

    import streamtta.cli.summary as summary_mod

    rec = Console(record=True, width=200)
    monkeypatch.setattr(summary_mod, "console", lambda: rec)
    summary_mod.print_summary({}, {"records": 0, "samples": 0, "group_id": "g1", "topic": "sensors"}, None)
    text = rec.export_text()
    assert "consumer group 'g1' has already read 'sensors' to its end" in text and "--group-id" in text
