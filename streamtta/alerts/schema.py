"""Alert schema (pydantic) and alert sinks' record format.

An alert id is deterministic from the record that triggered it: ``sha1(kind|topic|partition|offset)``,
so reprocessing the same offsets after a crash reproduces the same ids instead of new ones.
"""
from __future__ import annotations

import hashlib
import time
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


class AlertKind(str, Enum):
    ood_burst = "ood_burst"
    covariate_shift = "covariate_shift"
    semantic_shift = "semantic_shift"
    novel_cluster = "novel_cluster"
    collapse_guard = "collapse_guard"
    dead_letter = "dead_letter"
    state_rejected = "state_rejected"
    topic_changed = "topic_changed"


class Severity(str, Enum):
    info = "info"
    warning = "warning"
    critical = "critical"


class OffsetRange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    topic: str
    partition: int
    first: int
    last: int


def deterministic_id(kind: str, topic: str, partition: int, offset: int) -> str:
    """Stable id for an alert/prediction derived from where in the stream it was produced."""
    return hashlib.sha1(f"{kind}|{topic}|{partition}|{offset}".encode()).hexdigest()[:20]


class Alert(BaseModel):
    """One alert, as written to the alerts topic and ``alerts.jsonl``."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    id: str
    kind: AlertKind
    severity: Severity = Severity.warning
    stream_id: str
    offsets: OffsetRange
    message: str = ""
    evidence: dict[str, Any] = Field(default_factory=dict)
    action: str | None = None
    batch_index: int | None = None
    event_time: float | None = None
    created_at: float = Field(default_factory=time.time)

    @classmethod
    def create(cls, kind: AlertKind | str, stream_id: str, offsets: OffsetRange, **kw: Any) -> "Alert":
        kind = AlertKind(kind)
        aid = deterministic_id(kind.value, offsets.topic, offsets.partition, offsets.last)
        return cls(id=aid, kind=kind, stream_id=stream_id, offsets=offsets, **kw)
