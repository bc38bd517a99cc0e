"""librdkafka client settings: the consumer and producer defaults and how overrides are applied.

>>> conf = consumer_config("127.0.0.1:9092", "g", {"fetch.wait.max.ms": 10}, stop_at_end=True)
>>> conf["fetch.wait.max.ms"], conf["enable.partition.eof"], conf["enable.auto.commit"]
(10, True, False)
>>> consumer_config("127.0.0.1:9092", "g", {"enable.auto.commit": "true"}, stop_at_end=False)
Traceback (most recent call last):
...
ValueError: KafkaSource: enable.auto.commit=true would break at-least-once delivery; the engine commits offsets itself after its outputs are flushed
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["CONSUMER_DEFAULTS", "PRODUCER_DEFAULTS", "client_settings", "consumer_config", "producer_config",
           "stats_settings"]

#: librdkafka consumer settings used unless overridden (see :mod:`streamtta.stream.kafka` for the reasons).
CONSUMER_DEFAULTS: dict[str, Any] = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "auto.offset.reset": "earliest",
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 1000,
    "max.poll.interval.ms": 300_000,
    "partition.assignment.strategy": "range",
    "fetch.wait.max.ms": 100,
    "client.id": "streamtta",
}
#: Consumer settings that must stay false: the engine commits offsets itself (at-least-once).
_FORCED_FALSE = ("enable.auto.commit", "enable.auto.offset.store")

#: librdkafka producer settings used by :func:`~streamtta.stream.kafka.make_producer` unless overridden.
PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 5,
    "client.id": "streamtta",
}


def _kconf(conf: Mapping[str, Any]) -> dict[str, Any]:
    """librdkafka settings are passed through verbatim (keys are dotted, a few use ``_``: ``log_level``)."""
    return {str(k): v for k, v in conf.items()}


def _is_true(v: Any) -> bool:
    return v is True or (isinstance(v, str) and v.strip().lower() in ("true", "1", "yes")) or v == 1


def consumer_config(bootstrap_servers: str, group_id: str, overrides: Mapping[str, Any] | None, *,
                    stop_at_end: bool) -> dict[str, Any]:
    """:data:`CONSUMER_DEFAULTS` + ``enable.partition.eof`` (= ``stop_at_end``) + ``overrides`` + the servers
    and group; refuses overrides that turn on auto commit or auto offset store."""
    conf = dict(CONSUMER_DEFAULTS)
    conf["enable.partition.eof"] = bool(stop_at_end)
    extra = _kconf(overrides or {})
    for key in _FORCED_FALSE:
        if key in extra and _is_true(extra[key]):
            raise ValueError(f"KafkaSource: {key}=true would break at-least-once delivery; the engine commits "
                             f"offsets itself after its outputs are flushed")
    conf.update(extra)
    conf["bootstrap.servers"] = bootstrap_servers
    conf["group.id"] = group_id
    return conf


def producer_config(bootstrap_servers: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """:data:`PRODUCER_DEFAULTS` + ``overrides`` + the servers."""
    conf = dict(PRODUCER_DEFAULTS)
    conf.update(_kconf(overrides))
    conf["bootstrap.servers"] = bootstrap_servers
    return conf


def client_settings(kafka: Any, role: str) -> dict[str, Any]:
    """The librdkafka overrides of one client of a run: ``kafka.security`` (shared by every client) then the
    role's own settings (``kafka.consumer`` for ``"consumer"``, ``kafka.producer`` for ``"producer"``;
    ``"admin"`` gets the security settings only). ``kafka`` is a :class:`~streamtta.config.KafkaConfig`.

    >>> from streamtta.config import Config
    >>> k = Config(kafka={"security": {"security.protocol": "SASL_SSL"}, "producer": {"linger.ms": 0}}).kafka
    >>> client_settings(k, "producer"), client_settings(k, "admin")
    ({'security.protocol': 'SASL_SSL', 'linger.ms': 0}, {'security.protocol': 'SASL_SSL'})
    """
    own = {"consumer": kafka.consumer, "producer": kafka.producer, "admin": {}}
    if role not in own:
        raise ValueError(f"client_settings: role must be one of {sorted(own)}, got {role!r}")
    return {**_kconf(kafka.security), **_kconf(own[role])}


def stats_settings(interval_ms: int, on_stats: Callable[[str], None]) -> dict[str, Any]:
    """Settings that make a client hand its statistics (librdkafka's JSON text) to ``on_stats`` every
    ``interval_ms``; a consumer calls it from inside ``consume()`` (so a report also says it was polled).

    >>> sorted(stats_settings(1000, print))
    ['statistics.interval.ms', 'stats_cb']
    """
    if int(interval_ms) <= 0:
        raise ValueError(f"statistics interval must be > 0 ms, got {interval_ms}")
    return {"statistics.interval.ms": int(interval_ms), "stats_cb": on_stats}
