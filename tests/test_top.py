"""``streamtta top`` (issue 17): reads a worker's /metrics and shows throughput, lag, OOD rate, latency
quantiles and alerts by kind; ``--once`` prints one frame."""
from __future__ import annotations

import json
import re

import pytest

from streamtta.alerts import Alert, OffsetRange
from streamtta.cli import main
from streamtta.ops.metrics import EngineMetrics
from streamtta.ops.scrape import parse, quantile, rate, summarize
from streamtta.ops.server import OpsServer


def test_quantiles_and_rates_from_two_scrapes():
    m = EngineMetrics(process=False)
    for s in (0.002,) * 50 + (0.2,) * 50:
        m.step_seconds.observe(s)
    a = parse(m.exposition().decode(), at=10.0)
    for s in (0.02,) * 100:  # the window between the scrapes: only 20 ms steps
        m.step_seconds.observe(s)
    m.records.labels("processed").inc(400)
    m.ood.inc(100)
    b = parse(m.exposition().decode(), at=12.0)
    everything = quantile(b.buckets("streamtta_step_seconds"), 0.5)
    assert 0.005 < everything <= 0.025  # the median of all 200 steps lies in the (10 ms, 25 ms] bucket
    s = summarize(a, b)
    assert 0.01 < s["latency"]["step"]["p50"] <= 0.025 and 0.01 < s["latency"]["step"]["p99"] <= 0.025
    assert s["rates"]["processed"] == 200.0 and s["ood_fraction"] == 0.25
    restarted = parse(EngineMetrics(process=False).exposition().decode(), at=14.0)
    assert rate(b, restarted, "streamtta_records_total", outcome="processed") == 0.0  # restart: counts from 0


def test_top_once_prints_one_frame(capsys):
    m = EngineMetrics(process=True)
    m.on_stats(json.dumps({"topics": {"in": {"partitions": {"0": {"consumer_lag": 4321}}}}}))
    m.alert(Alert.create("covariate_shift", "cam", OffsetRange(topic="in", partition=0, first=0, last=63)))
    m.states.set(3)

    def scrape():  # the worker moves on between the two scrapes of --once
        m.records.labels("consumed").inc(64)
        m.records.labels("processed").inc(64)
        m.step_seconds.observe(0.03)
        m.alert(Alert.create("ood_burst", "cam", OffsetRange(topic="in", partition=0, first=64, last=127)))
        return m.exposition()

    srv = OpsServer("127.0.0.1", 0, scrape, lambda: (True, {})).start()
    try:
        assert main(["top", "--url", srv.url, "--once", "--interval", "0.05"]) == 0
    finally:
        srv.close()
    out = capsys.readouterr().out
    assert "in[0]" in out and "4,321" in out  # lag per partition
    assert re.search(r"consumed\s+│\s+128\s+│\s+[\d,.]+", out)  # total and a rate
    assert re.search(r"covariate_shift\s+│\s+0\s+│\s+1", out) and re.search(r"ood_burst\s+│\s+1\s+│\s+2", out)
    assert "states 3" in out and re.search(r"step\s+│\s+[\d.]+ ms", out)


def test_top_once_without_a_worker_fails(capsys):
    srv = OpsServer("127.0.0.1", 0, lambda: b"", lambda: (True, {})).start()
    url = srv.url
    srv.close()  # nothing listens there any more
    assert main(["top", "--url", url, "--once", "--interval", "0"]) == 1
    assert "cannot scrape" in capsys.readouterr().out


def test_top_once_on_something_that_is_not_prometheus_says_so(capsys):
    srv = OpsServer("127.0.0.1", 0, lambda: b"<html>{ this is Grafana, not /metrics\n", lambda: (True, {})).start()
    try:  # e.g. --url pointing at the wrong port: an error frame and exit 1, no traceback
        assert main(["top", "--url", srv.url, "--once", "--interval", "0"]) == 1
    finally:
        srv.close()
    assert "cannot scrape" in capsys.readouterr().out


def test_top_once_on_another_exporter_says_it_is_not_a_streamtta_worker(capsys):
    other = b"# HELP node_load1 1m load average.\n# TYPE node_load1 gauge\nnode_load1 0.5\n"
    srv = OpsServer("127.0.0.1", 0, lambda: other, lambda: (True, {})).start()
    try:  # valid Prometheus text of another exporter: an error frame and exit 1, not a frame of dashes
        assert main(["top", "--url", srv.url, "--once", "--interval", "0"]) == 1
    finally:
        srv.close()
    out = capsys.readouterr().out
    assert "cannot scrape" in out and "not a streamtta worker" in out


def test_fetch_reads_at_most_max_bytes(monkeypatch):
    from streamtta.ops import scrape

    m = EngineMetrics(process=False)
    srv = OpsServer("127.0.0.1", 0, m.exposition, lambda: (True, {})).start()
    try:
        assert scrape.fetch(srv.url).get("streamtta_records_total") == 0.0
        monkeypatch.setattr(scrape, "MAX_BYTES", len(m.exposition()) // 2)  # an answer larger than the cap
        with pytest.raises(ValueError, match="more than"):
            scrape.fetch(srv.url)
    finally:
        srv.close()


def test_top_sends_url_credentials_as_basic_auth_and_never_shows_them(capsys):
    """``--url http://user:password@host:port`` (a worker behind an authenticating proxy)."""
    import base64
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    m = EngineMetrics(process=False)
    expected = "Basic " + base64.b64encode(b"ops:hunter2@x").decode()

    class Proxy(BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.headers.get("Authorization") == expected
            body = m.exposition() if ok else b"unauthorized\n"
            self.send_response(200 if ok else 401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    try:
        assert main(["top", "--url", f"http://ops:hunter2%40x@127.0.0.1:{port}", "--once", "--interval", "0"]) == 0
        out = capsys.readouterr().out
        assert "hunter2" not in out and f"http://127.0.0.1:{port}/metrics" in out and "consumed" in out
        assert main(["top", "--url", f"http://ops:wrong@127.0.0.1:{port}", "--once", "--interval", "0"]) == 1
        out = capsys.readouterr().out
        assert "401" in out and "wrong" not in out
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_ctrl_c_ends_the_live_view_with_exit_code_0(monkeypatch, capsys):
    """Ctrl-C is how one leaves ``streamtta top``: not an error line, not exit code 130."""
    import signal

    from streamtta.cli import top
    from streamtta.signals import Interrupted

    def sleep(seconds):  # the CLI's SIGINT handler raises Interrupted wherever the main thread is
        raise Interrupted(signal.SIGINT)

    m = EngineMetrics(process=False)
    srv = OpsServer("127.0.0.1", 0, m.exposition, lambda: (True, {})).start()
    monkeypatch.setattr(top.time, "sleep", sleep)
    try:
        assert main(["top", "--url", srv.url, "--interval", "1"]) == 0
    finally:
        srv.close()
    captured = capsys.readouterr()
    assert "stopped by SIGINT" not in captured.err and "consumed" in captured.out
