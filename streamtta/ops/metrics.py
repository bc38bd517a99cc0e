"""The Prometheus metrics of one engine (:class:`EngineMetrics`), in a registry of its own.

Each :class:`EngineMetrics` has its own :class:`~prometheus_client.CollectorRegistry` (never the global
one), so tests and several engines in one process do not collide; the process collector
(``process_resident_memory_bytes``, ``process_cpu_seconds_total``, ...) is registered in it. It is an
:class:`~streamtta.ops.observer.EngineObserver`: the engine's hooks update it, and :meth:`on_stats`
takes the consumer's librdkafka statistics (lag per partition). Base units: seconds, records.
``streamtta_states`` is read from the engine at each scrape (from its first batch on), so states dropped
on a revocation leave it at once, even when no batch follows.

>>> m = EngineMetrics(process=False)
>>> m.commit({("t", 0): 5}, 0.002, True)
>>> m.value("streamtta_commit_seconds_count")
1.0
>>> m.on_stats({"topics": {"t": {"partitions": {"0": {"consumer_lag": 12}}}}})
>>> m.value("streamtta_consumer_lag", topic="t", partition="0")
12.0
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from streamtta.ops.kstats import ConsumerStats
from streamtta.ops.observer import EngineObserver

__all__ = ["LATENCY_BUCKETS", "OUTCOMES", "EngineMetrics"]

#: histogram buckets (seconds) of batch, step, checkpoint and commit durations: 1 ms .. 30 s
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: the ``outcome`` label values of ``streamtta_records_total``: ``skipped`` counts records consumed again
#: that a restored state had already processed (after a takeover or a restart), so consumed = processed +
#: dead_lettered + skipped once nothing is in flight
OUTCOMES = ("consumed", "processed", "dead_lettered", "skipped")


class EngineMetrics(EngineObserver):
    """Counters, gauges and histograms of one engine (names: see the module and the README)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        if process:
            ProcessCollector(registry=self.registry)
        r = self.registry
        self.records = Counter("streamtta_records", "Records consumed, processed (predicted), dead-lettered and "
                               "skipped (already processed by a restored state).", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.records.labels(outcome)  # every outcome is exported from the start, at 0
        self.batch_seconds = Histogram("streamtta_batch_seconds", "Whole engine batch: decode, pipelines, "
                                       "sinks, checkpoint and commit.", buckets=LATENCY_BUCKETS, registry=r)
        self.step_seconds = Histogram("streamtta_step_seconds", "One pipeline step: adapt, score, monitor, "
                                      "re-adapt.", buckets=LATENCY_BUCKETS, registry=r)
        self.lag = Gauge("streamtta_consumer_lag", "Records between the group's committed offset and the end "
                         "of each assigned partition (librdkafka statistics).", ["topic", "partition"], registry=r)
        self.ood_ratio = Gauge("streamtta_ood_ratio", "Fraction of the last batch flagged OOD.", registry=r)
        self.ood = Counter("streamtta_ood", "Samples flagged OOD.", registry=r)
        self.alerts = Counter("streamtta_alerts", "Alerts sent, by kind.", ["kind"], registry=r)
        self.shifts = Counter("streamtta_shifts", "Confirmed shifts (covariate or semantic).", registry=r)
        self.resets = Counter("streamtta_adapter_resets", "Adapter resets by a guard.", registry=r)
        self.readaptations = Counter("streamtta_readaptations", "Confirmed shifts the re-adapter handled.",
                                     registry=r)
        self.checkpoint_seconds = Histogram("streamtta_checkpoint_seconds", "Writing one state's checkpoint.",
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.commit_seconds = Histogram("streamtta_commit_seconds", "One offset commit.",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.states = Gauge("streamtta_states", "Adaptation states held in memory.", registry=r)
        self._seen = dict.fromkeys(OUTCOMES, 0)
        self._engine: Any = None  # the engine whose states the gauge reads
        self._lag_labels: set[tuple[str, str]] = set()

    # -- engine hooks ----------------------------------------------------------------------------
    def batch(self, engine: Any, records: list[Any], seconds: float) -> None:
        self.batch_seconds.observe(seconds)
        now = {"consumed": engine.records_seen, "processed": engine.samples_processed,
               "dead_lettered": engine.dead_letters, "skipped": getattr(engine, "skipped", 0)}
        for outcome, total in now.items():  # the engine's own counters: nothing is counted twice
            if total > self._seen[outcome]:
                self.records.labels(outcome).inc(total - self._seen[outcome])
            self._seen[outcome] = total
        if engine is not self._engine:  # read at every scrape: a revocation drops states between batches
            self._engine = engine
            self.states.set_function(lambda: len(engine.states))

    def step(self, key: str, result: Any, pipeline: Any) -> None:
        self.step_seconds.observe(result.step_s)
        flags = np.asarray(result.ood_flags, dtype=bool)
        self.ood_ratio.set(float(flags.mean()) if len(flags) else 0.0)
        self.ood.inc(int(flags.sum()))
        if result.shift:
            self.shifts.inc()
            if getattr(pipeline.parts, "readapter", None) is not None:
                self.readaptations.inc()
        if result.reset:
            self.resets.inc()

    def alert(self, alert: Any) -> None:
        self.alerts.labels(getattr(alert.kind, "value", str(alert.kind))).inc()

    def checkpoint(self, key: str, offsets: Mapping[tuple[str, int], int], seconds: float) -> None:
        self.checkpoint_seconds.observe(seconds)

    def commit(self, offsets: Mapping[tuple[str, int], int], seconds: float, stored: bool) -> None:
        self.commit_seconds.observe(seconds)

    # -- consumer statistics ---------------------------------------------------------------------
    def on_stats(self, stats: ConsumerStats | dict[str, Any] | str) -> None:
        """Lag per partition from a librdkafka statistics report; partitions no longer reported (revoked)
        are dropped from the gauge."""
        s = stats if isinstance(stats, ConsumerStats) else ConsumerStats.parse(stats)
        current = {(t, str(p)): v for (t, p), v in s.lag.items()}
        for labels in list(self._lag_labels - current.keys()):
            self.lag.remove(*labels)
        for labels, v in current.items():
            self.lag.labels(*labels).set(v)
        self._lag_labels = set(current)

    # -- reading ---------------------------------------------------------------------------------
    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float | None:
        """The current value of one sample (``name`` as exported, e.g. ``streamtta_records_total``)."""
        return self.registry.get_sample_value(name, labels)
