"""The live operations view of one Kafka run: :class:`Telemetry` bundles the engine's metrics
(:class:`~streamtta.ops.metrics.EngineMetrics`), its readiness (:class:`~streamtta.ops.health.Readiness`)
and the HTTP endpoint serving both (:class:`~streamtta.ops.server.OpsServer`).

The run passes :meth:`Telemetry.source_options` to its :class:`~streamtta.stream.kafka.KafkaSource`
(librdkafka statistics: lag, broker state, polls), :attr:`Telemetry.metrics` to its engine as an observer,
and runs the engine inside :meth:`Telemetry.consuming`.

A statistics report is what tells readiness that the consumer was polled, so the poll age ``/readyz``
accepts is at least two statistics intervals: with ``metrics.stats_interval_ms`` above half of
``metrics.ready_max_poll_age_s`` a healthy worker would otherwise flap between ready and not ready
(a warning says which limit applies).

>>> from streamtta.config import Config
>>> Telemetry.from_config(Config()) is None   # metrics.port unset: no exporter
True
>>> t = Telemetry.from_config(Config(metrics={"port": 0, "host": "127.0.0.1"}), process=False).start()
>>> t.port > 0, t.readiness.check()[0]
(True, False)
>>> t.close()
>>> Telemetry(stats_interval_ms=60_000, ready_max_poll_age_s=30, process=False).readiness.max_poll_age_s
120.0
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from streamtta.ops.health import Readiness
from streamtta.ops.kstats import ConsumerStats
from streamtta.ops.metrics import EngineMetrics
from streamtta.ops.server import OpsServer

__all__ = ["Telemetry"]

log = logging.getLogger("streamtta.ops")


class Telemetry:
    """Metrics + readiness of one engine, served on ``host:port`` once :meth:`start` ed."""

    def __init__(self, host: str = "0.0.0.0", port: int = 0, *, stats_interval_ms: int = 1000,
                 ready_max_poll_age_s: float = 30.0, process: bool = True) -> None:
        self.metrics = EngineMetrics(process=process)
        self.stats_interval_ms = int(stats_interval_ms)
        max_age = max(float(ready_max_poll_age_s), 2 * self.stats_interval_ms / 1000)
        if max_age > ready_max_poll_age_s:
            log.warning("metrics.ready_max_poll_age_s=%g is shorter than two statistics intervals "
                        "(metrics.stats_interval_ms=%d): /readyz accepts a poll age of %g s", ready_max_poll_age_s,
                        self.stats_interval_ms, max_age)
        self.readiness = Readiness(max_age)
        self.server = OpsServer(host, port, self.metrics.exposition, self.readiness.check)
        self.started = False

    @classmethod
    def from_config(cls, cfg: Any, *, process: bool = True) -> Telemetry | None:
        """From ``cfg.metrics`` (a :class:`~streamtta.config.Config`); None when ``metrics.port`` is unset."""
        m = cfg.metrics
        if m.port is None:
            return None
        return cls(m.host, m.port, stats_interval_ms=m.stats_interval_ms,
                   ready_max_poll_age_s=m.ready_max_poll_age_s, process=process)

    def start(self) -> Telemetry:
        """Serve the endpoints (once)."""
        if not self.started:
            self.server.start()
            self.started = True
        return self

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return self.server.url

    def on_stats(self, stats: str | dict[str, Any]) -> None:
        """A consumer statistics report: lag gauges and readiness (parsed once)."""
        parsed = ConsumerStats.parse(stats)
        self.metrics.on_stats(parsed)
        self.readiness.on_stats(parsed)

    def source_options(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~streamtta.stream.kafka.KafkaSource` that feed :meth:`on_stats`."""
        return {"on_stats": self.on_stats, "stats_interval_ms": self.stats_interval_ms}

    @contextmanager
    def consuming(self, source: Any = None) -> Iterator[None]:
        """The engine runs inside: ``/readyz`` may answer 200 (see :class:`~streamtta.ops.health.Readiness`).
        On the way out the lag gauges are dropped: no statistics report will update them again."""
        try:
            with self.readiness.consuming(source):
                yield
        finally:
            self.metrics.on_stats(ConsumerStats())

    def close(self) -> None:
        self.server.close()
        self.started = False
