"""Events raised by the detectors; :class:`~streamtta.alerts.policy.AlertPolicy` turns them
into :class:`~streamtta.alerts.schema.Alert` records.

>>> ev = ShiftEvent(kind="semantic", signals=("ood_rate",), batch_index=12, evidence={"z": {"ood_rate": 9.1}})
>>> ev.alert_kind, ev.to_dict()["kind"]
('semantic_shift', 'semantic')
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SHIFT_KINDS = ("covariate", "semantic")


@dataclass
class ShiftEvent:
    """A confirmed distribution shift.

    ``kind`` is ``"covariate"`` (known classes look different) or ``"semantic"`` (new classes
    arrived); ``signals`` are the monitored signals whose detectors fired; ``evidence`` holds the
    figures behind the decision (z-scores, reference/recent means, test p-value, onset estimate);
    ``detector`` names the river detector (the shift monitor's default unless given).
    """

    kind: str
    signals: tuple[str, ...]
    batch_index: int
    evidence: dict[str, Any] = field(default_factory=dict)
    detector: str = "page_hinkley"

    def __post_init__(self) -> None:
        if self.kind not in SHIFT_KINDS:
            raise ValueError(f"shift kind must be one of {SHIFT_KINDS}, got {self.kind!r}")
        self.signals = tuple(self.signals)

    @property
    def alert_kind(self) -> str:
        return f"{self.kind}_shift"

    @property
    def onset_batch(self) -> int:
        """Estimated first batch of the new regime (the alarm batch when unknown)."""
        return int(self.evidence.get("onset_batch", self.batch_index))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class OODBurstEvent:
    """The OOD-flag rate stayed at or above ``level`` for ``n_batches`` consecutive batches."""

    batch_index: int
    rate: float
    n_batches: int
    level: float
    evidence: dict[str, Any] = field(default_factory=dict)
    alert_kind: str = "ood_burst"


@dataclass
class NovelClusterEvent:
    """A persistent cluster of strong-OOD samples (a candidate new class) in the unknown pool."""

    batch_index: int
    cluster_id: int
    size: int
    evidence: dict[str, Any] = field(default_factory=dict)
    alert_kind: str = "novel_cluster"


@dataclass
class GuardResetEvent:
    """The adapter's collapse guard reset the model (``reason`` e.g. ``"entropy_spike"``)."""

    batch_index: int
    reason: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)
    alert_kind: str = "collapse_guard"


@dataclass
class DeadLetterEvent:
    """Records that could not be decoded went to the dead-letter sink."""

    batch_index: int
    count: int
    reason: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)
    alert_kind: str = "dead_letter"


#: Every event type :class:`~streamtta.alerts.policy.AlertPolicy` accepts.
Event = ShiftEvent | OODBurstEvent | NovelClusterEvent | GuardResetEvent | DeadLetterEvent
