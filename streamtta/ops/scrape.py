"""Reading a worker's ``/metrics`` (what ``streamtta top`` shows): :func:`fetch` and :func:`parse` give a
:class:`Snapshot`; :func:`summarize` turns two snapshots into rates, lag, OOD rate, latency quantiles
and alert counts. Quantiles are estimated from histogram buckets the way PromQL's
``histogram_quantile`` does (linear inside the bucket that holds the rank), over the buckets' increase
between the two snapshots when there was one, else over everything since the worker started.

>>> text = '''# TYPE streamtta_records_total counter
... streamtta_records_total{outcome="consumed"} 100.0
... # TYPE streamtta_step_seconds histogram
... streamtta_step_seconds_bucket{le="0.01"} 5.0
... streamtta_step_seconds_bucket{le="0.1"} 10.0
... streamtta_step_seconds_bucket{le="+Inf"} 10.0
... streamtta_step_seconds_count 10.0
... '''
>>> a = parse(text, at=0.0)
>>> b = parse(text.replace("100.0", "300.0"), at=2.0)
>>> rate(a, b, "streamtta_records_total", outcome="consumed")
100.0
>>> round(quantile(b.buckets("streamtta_step_seconds"), 0.5), 4)
0.01
"""
from __future__ import annotations

import base64
import math
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["MARKER", "MAX_BYTES", "Snapshot", "fetch", "metrics_url", "parse", "quantile", "rate", "summarize"]

#: the largest ``/metrics`` answer :func:`fetch` reads (a worker's is a few KiB): a wrong URL that streams
#: without end is an error, not a full memory
MAX_BYTES = 16 * 2**20
#: a sample every streamtta worker exports from its start (one per outcome, at 0)
MARKER = "streamtta_records_total"


def _split(url: str) -> tuple[str, str]:
    """``(url without "user:password@", "user:password" or "")``, ``http://`` added when no scheme."""
    url = url if "://" in url else f"http://{url}"
    scheme, rest = url.split("://", 1)
    netloc, slash, path = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    return f"{scheme}://{host}{slash}{path}", userinfo if at else ""


def metrics_url(url: str) -> str:
    """``http://host:port`` (or a URL already ending in ``/metrics``) -> the ``/metrics`` URL, without
    the credentials a ``user:password@`` in it gives (they go in an ``Authorization`` header, never shown).

    >>> metrics_url("http://localhost:9100"), metrics_url("localhost:9100/metrics")
    ('http://localhost:9100/metrics', 'http://localhost:9100/metrics')
    >>> metrics_url("https://ops:s3cret@worker-1:9100/")
    'https://worker-1:9100/metrics'
    """
    url = _split(url)[0]
    return url if url.rstrip("/").endswith("/metrics") else url.rstrip("/") + "/metrics"


def _authorization(url: str) -> str | None:
    """The HTTP basic ``Authorization`` value of a ``user:password@`` in ``url`` (percent-escapes decoded).

    >>> _authorization("http://ops:p%40ss@host:9100"), _authorization("http://host:9100")
    ('Basic b3BzOnBAc3M=', None)
    """
    userinfo = _split(url)[1]
    if not userinfo:
        return None
    user, _, password = userinfo.partition(":")
    pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
    return "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")


@dataclass
class Snapshot:
    """The samples of one scrape: ``(name, labels) -> value``; ``at`` is ``time.monotonic()`` of the scrape."""

    at: float
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = field(default_factory=dict)

    def series(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        """Every sample called ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return [(dict(lab), v) for (n, lab), v in self.samples.items() if n == name and want <= lab]

    def get(self, name: str, **labels: str) -> float | None:
        """Sum of the matching samples; None when there is none."""
        found = self.series(name, **labels)
        return sum(v for _, v in found) if found else None

    def buckets(self, name: str) -> list[tuple[float, float]]:
        """``[(upper bound, cumulative count)]`` of histogram ``name`` (summed over its label sets)."""
        acc: dict[float, float] = {}
        for lab, v in self.series(f"{name}_bucket"):
            le = float(lab["le"])
            acc[le] = acc.get(le, 0.0) + v
        return sorted(acc.items())


def parse(text: str, at: float | None = None) -> Snapshot:
    """A snapshot of Prometheus text."""
    snap = Snapshot(at=time.monotonic() if at is None else at)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            snap.samples[(s.name, frozenset(s.labels.items()))] = float(s.value)
    return snap


def fetch(url: str, timeout: float = 5.0) -> Snapshot:
    """Scrape ``url`` (see :func:`metrics_url`; ``user:password@`` in it: HTTP basic auth): ``OSError``
    when it cannot be read, ``ValueError`` when what it answers is not Prometheus text, is larger than
    :data:`MAX_BYTES`, or holds no streamtta metrics (another exporter's port)."""
    target, auth = metrics_url(url), _authorization(url)
    request = urllib.request.Request(target, headers={"Authorization": auth} if auth else {})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        body = resp.read(MAX_BYTES + 1)
    if len(body) > MAX_BYTES:
        raise ValueError(f"{target} answered more than {MAX_BYTES:,} bytes: not a streamtta worker's metrics")
    try:
        snap = parse(body.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError included
        raise ValueError(f"{target} did not answer Prometheus metrics ({e})") from None
    if snap.get(MARKER) is None:
        raise ValueError(f"{target} answers Prometheus metrics, but no {MARKER}: not a streamtta worker "
                         f"(is it the port of `streamtta run --metrics-port`?)")
    return snap


def rate(prev: Snapshot | None, cur: Snapshot, name: str, **labels: str) -> float | None:
    """Per-second increase of a counter between two snapshots (None without a previous one or time);
    a counter that went down (the worker restarted) counts from 0."""
    if prev is None or cur.at <= prev.at:
        return None
    now, before = cur.get(name, **labels), prev.get(name, **labels)
    if now is None:
        return None
    before = before or 0.0
    return (now - before if now >= before else now) / (cur.at - prev.at)


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The ``q`` quantile of cumulative ``buckets`` (linear inside a bucket; the largest finite bound when
    the rank falls in ``+Inf``); None without observations.

    >>> round(quantile([(0.1, 0.0), (0.2, 10.0), (math.inf, 10.0)], 0.5), 6)
    0.15
    """
    if not buckets or buckets[-1][1] <= 0:
        return None
    total, rank = buckets[-1][1], q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank and count > below:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = (le if not math.isinf(le) else lower), count
    return lower if total else None


def _window(prev: Snapshot | None, cur: Snapshot, name: str) -> list[tuple[float, float]]:
    now = cur.buckets(name)
    if prev is None:
        return now
    before = dict(prev.buckets(name))
    delta = [(le, c - before.get(le, 0.0)) for le, c in now]
    if delta and delta[-1][1] > 0 and all(d >= 0 for _, d in delta):
        return delta
    return now  # nothing new in the window (or a restart): everything since the start


def summarize(prev: Snapshot | None, cur: Snapshot) -> dict[str, Any]:
    """What ``streamtta top`` shows, from the latest scrape and the one before (rates need both)."""
    records = {o: cur.get("streamtta_records_total", outcome=o)
               for o in ("consumed", "processed", "dead_lettered", "skipped")}
    rates = {o: rate(prev, cur, "streamtta_records_total", outcome=o) for o in records}
    ood_rate = rate(prev, cur, "streamtta_ood_total")
    processed_rate = rates["processed"]
    lag = {(lab.get("topic", ""), int(lab.get("partition", -1))): v
           for lab, v in cur.series("streamtta_consumer_lag")}
    alerts = {}
    for lab, v in cur.series("streamtta_alerts_total"):
        before = prev.get("streamtta_alerts_total", kind=lab["kind"]) if prev is not None else None
        alerts[lab["kind"]] = {"total": v, "recent": None if prev is None else v - (before or 0.0)}
    latency = {}
    for name in ("step", "batch", "checkpoint", "commit"):
        b = _window(prev, cur, f"streamtta_{name}_seconds")
        latency[name] = {"p50": quantile(b, 0.5), "p99": quantile(b, 0.99)}
    return {
        "records": records, "rates": rates, "lag": dict(sorted(lag.items())),
        "ood_ratio": cur.get("streamtta_ood_ratio"), "ood_total": cur.get("streamtta_ood_total"),
        "ood_fraction": (ood_rate / processed_rate) if ood_rate is not None and processed_rate else None,
        "latency": latency, "alerts": dict(sorted(alerts.items())), "states": cur.get("streamtta_states"),
        "shifts": cur.get("streamtta_shifts_total"), "resets": cur.get("streamtta_adapter_resets_total"),
        "readaptations": cur.get("streamtta_readaptations_total"),
        "rss_bytes": cur.get("process_resident_memory_bytes"),
        "window_s": (cur.at - prev.at) if prev is not None else None,
    }
