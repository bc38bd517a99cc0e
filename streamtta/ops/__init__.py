"""Operating a running engine: metrics, health, structured logs and what ``streamtta top`` reads.

One concept per module: :mod:`.observer` (the hooks the engine calls), :mod:`.metrics` (Prometheus
metrics of one engine), :mod:`.kstats` (librdkafka statistics: lag, brokers, assignment),
:mod:`.health` (readiness), :mod:`.server` (``/metrics``, ``/healthz``, ``/readyz``), :mod:`.telemetry`
(the three together for one run), :mod:`.logs` (JSON log lines), :mod:`.eventlog` (the engine's
alert / checkpoint / commit / batch lines), :mod:`.scrape` (reading a worker's ``/metrics``: rates and
quantiles). Nothing is imported here, so the engine's import of :mod:`.observer` stays light.
"""
