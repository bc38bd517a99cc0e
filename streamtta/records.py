"""What the engine writes for a result: prediction records, run-log records and dead-letter alerts.

A prediction record's id is ``sha1("prediction"|topic|partition|offset)``: writing the same record again
after a crash gives the same id.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from streamtta.alerts import Alert, AlertKind, OffsetRange, Severity, deterministic_id
from streamtta.results import BatchResult
from streamtta.runlog import BatchRecord
from streamtta.types import RawRecord, Sample


def prediction_docs(result: BatchResult) -> list[dict[str, Any]]:
    """One prediction record per input record of a result whose ``tag`` holds its ``(record, sample)``s."""
    items: Sequence[tuple[RawRecord, Sample]] = result.tag
    preds = result.predictions.tolist()
    conf = result.confidences.tolist()
    entropy = result.entropy.tolist()
    return [{
        "id": deterministic_id("prediction", rec.topic, rec.partition, rec.offset),
        "topic": rec.topic, "partition": rec.partition, "offset": rec.offset,
        "stream_id": s.stream_id, "pred": preds[i], "confidence": round(conf[i], 6),
        "ood_score": round(float(result.ood_scores[i]), 6), "ood": bool(result.ood_flags[i]),
        "entropy": round(float(entropy[i]), 6), "batch_index": result.batch_index, "event_time": s.event_time,
    } for i, (rec, s) in enumerate(items)]


def batch_record(result: BatchResult, index: int, docs: list[dict[str, Any]]) -> BatchRecord:
    """The run-log record of a result (evaluation fields from the samples; latency from the arrival of
    its records to now)."""
    items: Sequence[tuple[RawRecord, Sample]] = result.tag
    first, last = items[0][0], items[-1][0]
    return BatchRecord(
        index=index, stream_id=items[-1][1].stream_id, topic=last.topic, partition=last.partition,
        first_offset=first.offset, last_offset=last.offset, offsets=[r.offset for r, _ in items],
        preds=[d["pred"] for d in docs], labels=[s.label for _, s in items],
        ood_scores=np.asarray(result.ood_scores, dtype=np.float64).tolist(),
        ood_flags=np.asarray(result.ood_flags).tolist(), is_unknown=[s.is_unknown for _, s in items],
        domains=[s.domain for _, s in items], entropy=result.entropy.tolist(), updated=result.updated.tolist(),
        latency_s=time.perf_counter() - result.received_at, step_s=result.step_s, shift=result.shift, reset=result.reset,
        info=result.scalar_info)


def dead_letter_alert(bad: Sequence[tuple[RawRecord, str]]) -> Alert:
    """One warning alert for the records of a batch that went to the dead-letter topic."""
    first, last = bad[0][0], bad[-1][0]
    return Alert.create(AlertKind.dead_letter, stream_id=f"{first.topic}:{first.partition}",
                        offsets=OffsetRange(topic=first.topic, partition=first.partition,
                                            first=first.offset, last=last.offset),
                        severity=Severity.warning, message=f"{len(bad)} record(s) sent to the dead-letter topic",
                        evidence={"count": len(bad), "first_error": bad[0][1][:500]}, action="dead_lettered")


def state_rejected_alert(key: str, rec: RawRecord, error: str) -> Alert:
    """A stream's checkpoint could not be loaded: it was moved aside and the stream starts fresh."""
    return Alert.create(AlertKind.state_rejected, stream_id=key,
                        offsets=OffsetRange(topic=rec.topic, partition=rec.partition, first=rec.offset, last=rec.offset),
                        severity=Severity.warning, message=f"checkpoint of {key} rejected; the stream starts fresh",
                        evidence={"error": error[:500]}, action="started_fresh")
