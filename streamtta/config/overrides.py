"""``--set section.key=value`` command-line overrides and the nested-dict helpers they use."""
from __future__ import annotations

from typing import Any

import tomllib

from streamtta.config.errors import ConfigError


#: ``kafka`` fields holding librdkafka settings, whose names contain dots.
_LIBRDKAFKA_DICTS = ("security", "consumer", "producer")


def parse_set_option(items: list[str]) -> dict[str, Any]:
    """Turn ``["engine.batch_size=32", "adapter.options.lr=1e-4"]`` into a nested dict.

    Values are parsed as TOML scalars/arrays/inline tables when possible, else kept as strings.

    >>> parse_set_option(["engine.batch_size=32", "kafka.topic=images"])
    {'engine': {'batch_size': 32}, 'kafka': {'topic': 'images'}}

    Under ``kafka.security``, ``kafka.consumer`` and ``kafka.producer`` the rest of the key is one
    librdkafka setting (those names hold dots):

    >>> parse_set_option(["kafka.security.sasl.mechanism=PLAIN"])
    {'kafka': {'security': {'sasl.mechanism': 'PLAIN'}}}
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if len(parts) > 3 and parts[0] == "kafka" and parts[1] in _LIBRDKAFKA_DICTS:
            parts = parts[:2] + [".".join(parts[2:])]
        if len(parts) < 2:
            raise ConfigError(f"--set key must be dotted like 'engine.batch_size', got {key!r}")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        set_nested(out, parts, value)
    return out


def set_nested(d: dict[str, Any], parts: list[str], value: Any) -> None:
    """Set ``d[parts[0]][parts[1]]...[parts[-1]] = value``, creating the intermediate dicts.

    >>> d = {}; set_nested(d, ["engine", "seed"], 3); d
    {'engine': {'seed': 3}}
    """
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"conflicting --set for {'.'.join(parts)}")
    d[parts[-1]] = value


def deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``a`` updated with ``b``, recursively for nested dicts (neither input is modified).

    >>> deep_merge({"engine": {"seed": 1, "batch_size": 8}}, {"engine": {"seed": 2}})
    {'engine': {'seed': 2, 'batch_size': 8}}
    """
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
