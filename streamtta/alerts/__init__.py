"""Alerts: the events detectors raise, the policy that turns them into alerts, and the alert schema.

* :mod:`~streamtta.alerts.events`: typed events (shift, OOD burst, novel cluster, guard reset, dead letter);
* :class:`AlertPolicy` (:mod:`~streamtta.alerts.policy`): events -> alerts, with a cooldown (one shift,
  one alert) and severities;
* :class:`Alert` (:mod:`~streamtta.alerts.schema`): the record written to ``<topic>.alerts`` and
  ``alerts.jsonl``.
"""
from streamtta.alerts.events import (
    DeadLetterEvent,
    GuardResetEvent,
    NovelClusterEvent,
    OODBurstEvent,
    ShiftEvent,
)
from streamtta.alerts.policy import AlertPolicy
from streamtta.alerts.schema import Alert, AlertKind, OffsetRange, Severity, deterministic_id

__all__ = [
    "Alert", "AlertKind", "OffsetRange", "Severity", "deterministic_id", "AlertPolicy",
    "ShiftEvent", "OODBurstEvent", "NovelClusterEvent", "GuardResetEvent", "DeadLetterEvent",
]
