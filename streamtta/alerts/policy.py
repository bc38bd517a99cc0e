"""Alert policy: detector events -> :class:`~streamtta.alerts.schema.Alert` records.

Events are the typed records of :mod:`streamtta.alerts.events` (shift, OOD burst, novel cluster,
guard reset, dead letter); anything else is a ``TypeError``.

The policy assigns a severity, writes a one-line message and JSON-safe evidence figures, records
the action taken, drops alerts below ``min_severity`` and enforces a cooldown per *group* of
kinds: covariate shift, semantic shift and OOD burst form one group (one shift = one alert, even
when several detectors see it), every other kind is its own group. Alert ids are deterministic:
``sha1(kind|topic|partition|last offset)`` (:meth:`Alert.create`), so replaying the same offsets
after a crash reproduces the same ids.

>>> from streamtta.alerts.schema import OffsetRange
>>> from streamtta.alerts.events import ShiftEvent
>>> pol = AlertPolicy(cooldown_batches=5)
>>> rng = OffsetRange(topic="t", partition=0, first=0, last=63)
>>> ev = ShiftEvent("covariate", ("id_entropy",), batch_index=3, evidence={"z": {"id_entropy": 5.0}})
>>> a = pol.process([ev], stream_id="s", offsets=rng, batch_index=3)
>>> [x.kind.value for x in a], a[0].id == pol.process([ev], stream_id="s", offsets=rng, batch_index=40)[0].id
(['covariate_shift'], True)
>>> pol.process([ev], stream_id="s", offsets=rng, batch_index=42)   # inside the cooldown
[]
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import numpy as np

from streamtta.alerts.events import (
    DeadLetterEvent,
    Event,
    GuardResetEvent,
    NovelClusterEvent,
    OODBurstEvent,
    ShiftEvent,
)
from streamtta.alerts.schema import Alert, AlertKind, OffsetRange, Severity

SEVERITY_ORDER = {Severity.info: 0, Severity.warning: 1, Severity.critical: 2}

#: Kinds sharing one cooldown: one shift gives one alert.
DEFAULT_GROUPS: dict[str, str] = {
    "covariate_shift": "shift",
    "semantic_shift": "shift",
    "ood_burst": "shift",
}


def jsonable(x: Any) -> Any:
    """Recursively convert numpy scalars/arrays, tuples and non-finite floats to JSON-safe values."""
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer, int)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    if x is None or isinstance(x, str):
        return x
    if hasattr(x, "item"):
        try:
            return jsonable(x.item())
        except (TypeError, ValueError):
            pass
    return str(x)


class AlertPolicy:
    """Turn detector events into alerts with severity, evidence, cooldown and deduplication.

    Parameters
    ----------
    cooldown_batches
        After an alert of a group, further alerts of that group are suppressed for this many
        batches.
    min_severity
        Alerts below this severity are dropped (``"info"``, ``"warning"``, ``"critical"``).
    critical_z
        A shift whose largest |z| reaches this is critical.
    critical_ood_rate
        An OOD burst whose mean rate reaches this is critical.
    dead_letter_warning
        Dead-letter counts at or above this are warnings (below: info).
    groups
        Kind -> cooldown group (default :data:`DEFAULT_GROUPS`).
    """

    def __init__(self, cooldown_batches: int = 10, min_severity: str | Severity = "info", critical_z: float = 8.0,
                 critical_ood_rate: float = 0.8, dead_letter_warning: int = 10,
                 groups: Mapping[str, str] | None = None) -> None:
        if cooldown_batches < 0:
            raise ValueError(f"cooldown_batches must be >= 0, got {cooldown_batches}")
        try:
            self.min_severity = Severity(min_severity)
        except ValueError as e:
            raise ValueError(f"min_severity must be one of {[s.value for s in Severity]}, got {min_severity!r}") from e
        self.cooldown_batches = int(cooldown_batches)
        self.critical_z = float(critical_z)
        self.critical_ood_rate = float(critical_ood_rate)
        self.dead_letter_warning = int(dead_letter_warning)
        self.groups = dict(DEFAULT_GROUPS if groups is None else groups)
        self.reset()

    def reset(self) -> None:
        self.last_alert_batch: dict[str, int] = {}
        self.n_emitted = 0
        self.n_suppressed = 0

    # -- event -> fields ------------------------------------------------------------------
    def _describe(self, event: Event) -> tuple[str, Severity, str, dict[str, Any], str | None]:
        """``(kind, severity, message, evidence, action)`` of one typed event (TypeError for anything else)."""
        if isinstance(event, ShiftEvent):
            z = event.evidence.get("z", {})
            zmax = max((abs(float(z[s])) for s in event.signals if s in z), default=0.0)
            sev = Severity.critical if zmax >= self.critical_z else Severity.warning
            re = event.evidence.get("readaptation")
            action = re.get("action") if isinstance(re, Mapping) else None
            msg = (f"{event.kind} shift detected by {event.detector} on {', '.join(event.signals)} "
                   f"(max |z| {zmax:.1f}, onset batch {event.onset_batch})")
            return event.alert_kind, sev, msg, {"signals": list(event.signals), **event.evidence}, action
        if isinstance(event, OODBurstEvent):
            sev = Severity.critical if event.rate >= self.critical_ood_rate else Severity.warning
            msg = f"OOD burst: {event.rate:.0%} of samples flagged for {event.n_batches} batches (level {event.level:.0%})"
            return event.alert_kind, sev, msg, {"rate": event.rate, "n_batches": event.n_batches,
                                                "level": event.level, **event.evidence}, "excluded_from_adaptation"
        if isinstance(event, NovelClusterEvent):
            msg = (f"novel cluster of {event.size} strong-OOD samples persisting over "
                   f"{event.evidence.get('span_batches', '?')} batches")
            return event.alert_kind, Severity.warning, msg, {"cluster_id": event.cluster_id, "size": event.size,
                                                             **event.evidence}, "unknown_prototypes_added"
        if isinstance(event, GuardResetEvent):
            msg = f"collapse guard reset the adapter{': ' + event.reason if event.reason else ''}"
            return event.alert_kind, Severity.warning, msg, dict(event.evidence), "adapter_reset"
        if isinstance(event, DeadLetterEvent):
            sev = Severity.warning if event.count >= self.dead_letter_warning else Severity.info
            msg = f"{event.count} undecodable record(s) sent to the dead-letter sink{': ' + event.reason if event.reason else ''}"
            return event.alert_kind, sev, msg, {"count": event.count, **event.evidence}, "dead_lettered"
        raise TypeError(f"AlertPolicy cannot handle event of type {type(event).__name__}")

    # -- public API ------------------------------------------------------------------------
    def handle(self, event: Event, *, stream_id: str, offsets: OffsetRange, batch_index: int,
               signals: Mapping[str, float] | None = None, action: str | None = None,
               event_time: float | None = None) -> Alert | None:
        """One event -> one alert, or ``None`` when suppressed (cooldown, severity)."""
        kind, severity, message, evidence, ev_action = self._describe(event)
        if SEVERITY_ORDER[severity] < SEVERITY_ORDER[self.min_severity]:
            self.n_suppressed += 1
            return None
        group = self.groups.get(kind, kind)
        last = self.last_alert_batch.get(group)
        if last is not None and 0 <= batch_index - last <= self.cooldown_batches:
            self.n_suppressed += 1
            return None
        self.last_alert_batch[group] = int(batch_index)
        self.n_emitted += 1
        if signals is not None:
            evidence = {**evidence, "batch_signals": dict(signals)}
        return Alert.create(AlertKind(kind), stream_id=stream_id, offsets=offsets, severity=severity,
                            message=message, evidence=jsonable(evidence), action=action or ev_action,
                            batch_index=int(batch_index), event_time=event_time)

    def process(self, events: Iterable[Event], *, stream_id: str, offsets: OffsetRange, batch_index: int,
                signals: Mapping[str, float] | None = None, event_time: float | None = None) -> list[Alert]:
        """All events of one batch -> the alerts to emit (most severe first within a group)."""
        described = list(events)
        order = sorted(range(len(described)),
                       key=lambda i: -SEVERITY_ORDER[self._describe(described[i])[1]])
        out = []
        for i in order:
            a = self.handle(described[i], stream_id=stream_id, offsets=offsets, batch_index=batch_index,
                            signals=signals, event_time=event_time)
            if a is not None:
                out.append(a)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"last_alert_batch": dict(self.last_alert_batch), "n_emitted": self.n_emitted,
                "n_suppressed": self.n_suppressed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.last_alert_batch = {str(k): int(v) for k, v in state["last_alert_batch"].items()}
        self.n_emitted = int(state["n_emitted"])
        self.n_suppressed = int(state["n_suppressed"])
