"""The engine's per-stream states: one :class:`~streamtta.pipeline.Pipeline` per state key, kept in a
bounded LRU table, checkpointed, restored on demand, and checked against the topic they resume.

* **Bounded**: :class:`StateTable` keeps at most ``max_states`` states in memory. After a checkpoint the
  least recently used ones that hold no result are dropped (their checkpoint is current) and restored
  from it when their key comes back. Between two checkpoints (``engine.checkpoint_every`` batches) the
  table can exceed the bound by the keys first seen in those batches. Without a checkpoint store nothing
  is evicted (an evicted state could not come back).
* **Restored safely**: a checkpoint that cannot be loaded as plain data, or that another model,
  adapter/scorer/monitor configuration or calibration made (its :func:`~streamtta.fingerprint.fingerprint` differs), or
  that does not fit this pipeline, is moved aside (``*.rejected``) and the stream starts fresh, with a
  ``state_rejected`` alert: never a crash, never a silent skip.
* **Topic incarnation**: a checkpoint records, per partition, the next offset it covers and the offset
  committed when it was saved. The first record of each partition after a restore checks them: a record
  *below* the committed offset (the group was reset, or the topic recreated and read from its start), or a
  partition whose end is *before* the checkpoint's next offset (the topic was recreated with fewer
  records), means the checkpoint's offsets belong to another incarnation of the topic. They are not
  applied to that partition: no record is skipped, its held predictions are dropped, and a
  ``topic_changed`` alert says so. The adaptation state itself is kept (same stream, same model).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from streamtta.alerts import Alert, AlertKind, OffsetRange, Severity
from streamtta.checkpoints import CheckpointError, CheckpointStore
from streamtta.fingerprint import calibration_token, fingerprint
from streamtta.pipeline import Pipeline
from streamtta.records import state_rejected_alert
from streamtta.stream.base import TopicPartition
from streamtta.types import RawRecord

__all__ = ["StreamState", "StateTable", "topic_changed_alert"]

log = logging.getLogger("streamtta.engine")


@dataclass
class StreamState:
    """One state key's pipeline, the next offset per partition it covers, the offsets committed when it
    was saved, and (after a restore) the partitions still to check and their held predictions."""

    key: str
    pipe: Pipeline
    next_offsets: dict[TopicPartition, int] = field(default_factory=dict)
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    unchecked: dict[TopicPartition, list[dict[str, Any]]] = field(default_factory=dict)
    fingerprint: str = ""

    def state_dict(self, held: list[dict[str, Any]]) -> dict[str, Any]:
        held = held + [d for docs in self.unchecked.values() for d in docs]  # restored, not written yet
        return {"key": self.key, "fingerprint": self.fingerprint, "pipeline": self.pipe.state_dict(),
                "held_predictions": held,
                "next_offsets": [[t, p, o] for (t, p), o in self.next_offsets.items()],
                "committed_offsets": [[t, p, o] for (t, p), o in self.committed.items()]}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.pipe.load_state_dict(st["pipeline"])
        self.next_offsets = {(str(t), int(p)): int(o) for t, p, o in st["next_offsets"]}
        self.committed = {(str(t), int(p)): int(o) for t, p, o in st.get("committed_offsets", [])}
        self.unchecked = {tp: [] for tp in self.next_offsets}
        for doc in st.get("held_predictions") or []:
            self.unchecked.setdefault((doc["topic"], doc["partition"]), []).append(doc)

    def check(self, rec: RawRecord, end_offset: int | None) -> tuple[list[dict[str, Any]], str | None]:
        """First record of a restored partition: its held predictions to write, and why the checkpoint's
        offsets were dropped for it (None when they apply)."""
        tp = (rec.topic, rec.partition)
        held = self.unchecked.pop(tp, [])
        nxt, com = self.next_offsets.get(tp), self.committed.get(tp)
        reason = None
        if com is not None and rec.offset < com:
            reason = f"record offset {rec.offset} is below the offset {com} committed when the checkpoint was saved"
        elif nxt is not None and end_offset is not None and end_offset < nxt:
            reason = f"the partition ends at offset {end_offset}, before the checkpoint's next offset {nxt}"
        if reason is None:
            return held, None
        self.next_offsets.pop(tp, None)
        self.committed.pop(tp, None)
        return [], reason


def topic_changed_alert(key: str, rec: RawRecord, reason: str, dropped: int) -> Alert:
    """The checkpoint of ``key`` belongs to another incarnation of ``rec``'s partition: offsets not applied."""
    return Alert.create(AlertKind.topic_changed, stream_id=key,
                        offsets=OffsetRange(topic=rec.topic, partition=rec.partition, first=rec.offset, last=rec.offset),
                        severity=Severity.warning,
                        message=f"{rec.topic}[{rec.partition}] is not the partition the checkpoint of {key} was saved "
                                f"on; its offsets are not applied ({dropped} held prediction(s) dropped)",
                        evidence={"reason": reason, "dropped_held_predictions": dropped}, action="offsets_not_applied")


class StateTable:
    """The states of one engine by key, least recently used first (see the module docstring).

    ``alert(a)`` receives the alerts of restores; ``end_offset(tp)`` (optional) tells where a partition
    ends now (``None`` when unknown).
    """

    def __init__(self, template: Pipeline, store: CheckpointStore | None, *, max_states: int,
                 alert: Callable[[Alert], None],
                 end_offset: Callable[[TopicPartition], int | None] | None = None) -> None:
        self.template = template
        self.store = store
        self.max_states = max_states
        self.alert = alert
        self.end_offset = end_offset
        self.evicted = self.restored = 0
        #: what made the states of this table (model weights + adapter/scorer/monitor configuration)
        self.fingerprint = fingerprint(template.blueprint.model, template.cfg, calibration_token(template))
        self._states: OrderedDict[str, StreamState] = OrderedDict()
        self._warned = False

    def __getitem__(self, key: str) -> StreamState:
        return self._states[key]

    def __contains__(self, key: object) -> bool:
        return key in self._states

    def __len__(self) -> int:
        return len(self._states)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._states))

    def values(self) -> list[StreamState]:
        return list(self._states.values())

    def pop(self, key: str) -> StreamState | None:
        return self._states.pop(key, None)

    def get(self, key: str, rec: RawRecord) -> StreamState:
        """The state of ``key`` (``rec``: its first record now), most recently used from now on: held,
        restored from its checkpoint, or new."""
        st = self._states.get(key)
        if st is not None:
            self._states.move_to_end(key)
            return st
        st = StreamState(key, self.template.spawn(), fingerprint=self.fingerprint)
        try:
            saved = self.store.load(key) if self.store is not None else None
            if saved is not None:
                if saved.get("fingerprint") != self.fingerprint:
                    raise CheckpointError(f"checkpoint {self.store.path(key)} was made by another model, "
                                          f"adapter/scorer/monitor configuration or calibration (fingerprint "
                                          f"{saved.get('fingerprint')!r}, this run {self.fingerprint!r})")
                try:
                    st.load_state_dict(saved)
                except Exception as e:
                    raise CheckpointError(f"checkpoint {self.store.path(key)} does not fit this pipeline: "
                                          f"{type(e).__name__}: {str(e)[:300]}") from None
                self.restored += 1
                log.info("restored state %s at batch %d", key, st.pipe.batch_index)
        except CheckpointError as e:
            log.error("%s; moved aside to %s, stream %s starts fresh", e, self.store.reject(key), key)
            self.alert(state_rejected_alert(key, rec, str(e)))
            st = StreamState(key, self.template.spawn(), fingerprint=self.fingerprint)
        self._states[key] = st
        return st

    def admit(self, st: StreamState, items: list[tuple[RawRecord, Any]]) -> list[dict[str, Any]]:
        """Check the partitions of ``items`` met for the first time since the restore; the held predictions
        of the checkpoint to write now, before skipping the records the state covers."""
        held: list[dict[str, Any]] = []
        for rec, _ in items:
            tp = (rec.topic, rec.partition)
            if tp in st.unchecked:
                docs = st.unchecked[tp]
                ok, reason = st.check(rec, self.end_offset(tp) if self.end_offset is not None else None)
                held.extend(ok)
                if reason is not None:
                    log.warning("checkpoint of %s not applied to %s[%d]: %s", st.key, rec.topic, rec.partition, reason)
                    self.alert(topic_changed_alert(st.key, rec, reason, len(docs)))
        return held

    def evict(self) -> int:
        """Right after a checkpoint (every state saved): drop the least recently used states beyond
        ``max_states`` that hold no result."""
        over = len(self._states) - self.max_states
        if over <= 0:
            return 0
        if self.store is None:
            if not self._warned:
                self._warned = True
                log.warning("%d states in memory, above engine.max_states=%d, and no checkpoint store to evict "
                            "them to", len(self._states), self.max_states)
            return 0
        gone = 0
        for key in list(self._states):
            if gone >= over:
                break
            st = self._states[key]
            if st.pipe.held:
                continue
            del self._states[key]
            gone += 1
        self.evicted += gone
        return gone
