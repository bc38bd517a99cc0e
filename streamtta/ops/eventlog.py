"""The engine's event log lines: :class:`EventLog` writes one line per alert, checkpoint and commit at
INFO and one per batch at DEBUG, on the ``streamtta.engine`` logger.

Each line is readable as text and carries structured fields for JSON logs (:mod:`streamtta.ops.logs`):
``event`` (``alert``, ``checkpoint``, ``commit``, ``batch``), ``stream`` (state key or stream id),
``partition`` (when one partition is concerned), ``offsets`` (``{"topic[partition]": offset}``: the
next offsets of a checkpoint or commit, ``[first, last]`` of an alert or a batch) and ``seconds``.
Nothing is formatted while the level is off.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from streamtta.ops.observer import EngineObserver

__all__ = ["EventLog", "offsets_field"]


def offsets_field(offsets: Mapping[tuple[str, int], Any]) -> dict[str, Any]:
    """``{(topic, partition): v}`` -> ``{"topic[partition]": v}`` (JSON keys), sorted.

    >>> offsets_field({("t", 1): 9, ("t", 0): [0, 63]})
    {'t[0]': [0, 63], 't[1]': 9}
    """
    return {f"{t}[{p}]": v for (t, p), v in sorted(offsets.items())}


def _one_partition(offsets: Mapping[tuple[str, int], Any]) -> dict[str, Any]:
    parts = {p for _, p in offsets}
    return {"partition": next(iter(parts))} if len(parts) == 1 else {}


class EventLog(EngineObserver):
    """Log lines of the engine's events (see the module doc)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.log = logger or logging.getLogger("streamtta.engine")

    def batch(self, engine: Any, records: list[Any], seconds: float) -> None:
        if not self.log.isEnabledFor(logging.DEBUG) or not records:
            return
        spans: dict[tuple[str, int], list[int]] = {}
        for r in records:
            span = spans.setdefault((r.topic, r.partition), [r.offset, r.offset])
            span[0], span[1] = min(span[0], r.offset), max(span[1], r.offset)
        offsets = offsets_field(spans)
        self.log.debug("batch of %d records %s in %.1f ms", len(records), offsets, seconds * 1e3,
                       extra={"event": "batch", "records": len(records), "offsets": offsets,
                              "seconds": round(seconds, 6), **_one_partition(spans)})

    def alert(self, alert: Any) -> None:
        if not self.log.isEnabledFor(logging.INFO):
            return
        kind, o = getattr(alert.kind, "value", str(alert.kind)), alert.offsets
        severity = getattr(alert.severity, "value", str(alert.severity))
        self.log.info("alert %s (%s) on stream %s, %s[%d] offsets %d-%d: %s", kind, severity, alert.stream_id,
                      o.topic, o.partition, o.first, o.last, alert.message,
                      extra={"event": "alert", "kind": kind, "severity": severity, "alert_id": alert.id,
                             "stream": alert.stream_id, "topic": o.topic, "partition": o.partition,
                             "offsets": {f"{o.topic}[{o.partition}]": [o.first, o.last]}})

    def checkpoint(self, key: str, offsets: Mapping[tuple[str, int], int], seconds: float) -> None:
        if not self.log.isEnabledFor(logging.INFO):
            return
        field = offsets_field(offsets)
        self.log.info("checkpoint of %s (next offsets %s) in %.1f ms", key, field, seconds * 1e3,
                      extra={"event": "checkpoint", "stream": key, "offsets": field, "seconds": round(seconds, 6),
                             **_one_partition(offsets)})

    def commit(self, offsets: Mapping[tuple[str, int], int], seconds: float, stored: bool) -> None:
        if not self.log.isEnabledFor(logging.INFO):
            return
        field = offsets_field(offsets)
        self.log.info("%s %s in %.1f ms", "committed" if stored else "commit skipped (the group moved on):",
                      field, seconds * 1e3, extra={"event": "commit", "offsets": field, "stored": stored,
                                                   "seconds": round(seconds, 6), **_one_partition(offsets)})
