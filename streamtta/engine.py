"""Kafka plumbing: consume -> decode -> route to pipelines -> sinks -> checkpoint -> commit.

One :class:`Engine` drives any :class:`~streamtta.stream.base.Source` (Kafka or an in-memory replay, so
offline simulations take exactly the live code path). Per consumed batch of records:

1. **decode** every record; a record that fails goes to the dead-letter sink with its origin and error;
2. **route** the good samples by state key (partition by default, or stream id) to that key's
   :class:`~streamtta.pipeline.Pipeline` -- spawned from the template pipeline, or restored from its
   checkpoint -- which adapts, scores, monitors, re-adapts and raises alerts (alerts go out at once);
3. **sinks**: the predictions of the results a pipeline releases (held ``monitor.hold_batches`` batches,
   at most ``monitor.hold_max_s`` s, and no longer once a poll brings nothing);
4. **flush** every sink, **checkpoint** the touched streams atomically, and only then **commit**
   ``last processed offset + 1`` per partition -- never past a record whose predictions are held.

Crash semantics: flush before checkpoint (which stores the next offset per partition) before commit.
Records a restored checkpoint covers are skipped, so a crash between checkpoint and commit repeats
nothing; one between flush and checkpoint repeats the outputs written since the last checkpoint (one
batch plus the held ones) with identical deterministic ids. A checkpoint carries the predictions of held
results; a restart writes those first. Undecodable records after a held one are dead-lettered again.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from streamtta.alerts import Alert, OffsetRange
from streamtta.checkpoints import CheckpointError, CheckpointStore
from streamtta.config import Config
from streamtta.pipeline import Pipeline
from streamtta.records import batch_record, dead_letter_alert, prediction_docs, state_rejected_alert
from streamtta.results import BatchResult
from streamtta.runlog import RunLog
from streamtta.stream.base import DeadLetter, Sink, Source, TopicPartition
from streamtta.stream.envelope import DecodeError, DecodeLimits, decode_value
from streamtta.types import RawRecord, Sample

log = logging.getLogger("streamtta.engine")


@dataclass
class Outputs:
    predictions: Sink | None
    alerts: list[Sink]
    dlq: DeadLetter

    def all(self) -> list[Any]:
        return [s for s in [self.predictions, *self.alerts, self.dlq] if s is not None]


@dataclass
class StreamState:
    """One state key's pipeline and the next offset per partition its checkpoint covers."""

    key: str
    pipe: Pipeline
    next_offsets: dict[TopicPartition, int] = field(default_factory=dict)

    def state_dict(self, held: list[dict[str, Any]]) -> dict[str, Any]:
        return {"key": self.key, "pipeline": self.pipe.state_dict(), "held_predictions": held,
                "next_offsets": [[t, p, o] for (t, p), o in self.next_offsets.items()]}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.pipe.load_state_dict(st["pipeline"])
        self.next_offsets = {(str(t), int(p)): int(o) for t, p, o in st["next_offsets"]}


class Engine:
    """Runs the pipelines over a source until it ends, a stop is requested or a limit is hit."""

    def __init__(self, cfg: Config, source: Source, outputs: Outputs, pipeline: Pipeline, *,
                 store: CheckpointStore | None = None, runlog: RunLog | None = None,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.cfg = cfg
        self.source = source
        self.outputs = outputs
        self.template = pipeline
        self.store = store
        self.runlog = runlog
        self.on_batch = on_batch
        self.states: dict[str, StreamState] = {}
        self.stop_event = threading.Event()
        self.records_seen = self.samples_processed = self.dead_letters = self.skipped = self.batches = 0
        self.step_time_s = 0.0
        #: ``time.perf_counter()`` when the first record arrived (after group join / assignment)
        self.first_record_at: float | None = None
        self._pending_commit: dict[TopicPartition, int] = {}
        self._batches_since_ckpt = 0
        self._dirty: set[str] = set()
        self._carry: list[RawRecord] = []
        # the input shape: configured, else the model's or its source data's, else the first record's
        shape = cfg.engine.expected_shape or pipeline.blueprint.input_shape
        self.limits = DecodeLimits(max_bytes=cfg.engine.max_record_bytes, expected_shape=tuple(shape) if shape else None)
        source.on_revoke(self._on_revoke)

    # -- streams ---------------------------------------------------------------------------------
    def _on_revoke(self, partitions: list[TopicPartition]) -> None:
        """Checkpoint and forget the streams of revoked partitions (the new owner restores them)."""
        self._finish_batch(force=True)
        lost = {f"{t}:{p}" for t, p in partitions}
        for key in list(self.states):
            if key in lost or (self.cfg.engine.state_key == "stream_id"
                               and set(self.states[key].next_offsets) & set(partitions)):
                del self.states[key]

    def state_for(self, key: str, rec: RawRecord) -> StreamState:
        """The stream of ``key`` (``rec``: its first record now): held, restored from its checkpoint, or
        new. A checkpoint that cannot be loaded is moved aside and the stream starts fresh, with an alert."""
        st = self.states.get(key)
        if st is None:
            st = StreamState(key, self.template.spawn())
            try:
                saved = self.store.load(key) if self.store is not None else None
            except CheckpointError as e:
                log.error("%s; moved aside to %s, stream %s starts fresh", e, self.store.reject(key), key)
                self._emit_alert(state_rejected_alert(key, rec, str(e)))
                saved = None
            if saved is not None:
                st.load_state_dict(saved)
                log.info("restored state %s at batch %d", key, st.pipe.batch_index)
                held = saved.get("held_predictions") or []
                if held:  # the next checkpoint records them as written
                    self._write_predictions(st, held)
                    self._dirty.add(key)
                    log.info("wrote %d held predictions of %s from its checkpoint", len(held), key)
            self.states[key] = st
        return st

    # -- main loop -------------------------------------------------------------------------------
    def run(self, *, max_records: int | None = None) -> None:
        """Consume until a stop is requested, ``max_records`` are seen, the idle timeout passes, or the
        source ends (``kafka.stop_at_end``, or any finite in-memory source)."""
        kcfg = self.cfg.kafka
        stop_at_end = kcfg.stop_at_end or getattr(self.source, "finite", False)
        last_data = time.monotonic()
        # an exception propagates without the final commit: a half-processed batch is re-delivered
        while not self.stop_event.is_set():
            self._backpressure()
            if self._carry:
                records, self._carry = self._carry, []
            else:
                records = self.source.consume(self.cfg.engine.batch_size, kcfg.poll_timeout_s)
            if records:
                last_data = time.monotonic()
                self.process(records)
                self._release(older_than_s=self.cfg.monitor.hold_max_s)
                if max_records is not None and self.records_seen >= max_records:
                    break
                continue
            if any(st.pipe.held for st in self.states.values()):  # nothing came: held outputs go out now
                self._finish_batch(force=True)
            if stop_at_end and self.source.at_end():
                break
            if kcfg.idle_timeout_s is not None and time.monotonic() - last_data > kcfg.idle_timeout_s:
                log.info("no record for %.1f s: stopping", kcfg.idle_timeout_s)
                break
        self._finish_batch(force=True)

    def request_stop(self) -> None:
        self.stop_event.set()

    def _pending_outputs(self) -> int:
        """Outputs queued for delivery (sinks may share one producer, so take the largest count)."""
        pending = [getattr(s, "pending", 0) for s in self.outputs.all()]
        return max([int(p() if callable(p) else p) for p in pending], default=0)

    def _backpressure(self) -> None:
        """While too many outputs wait for delivery, pause the input and keep polling until they drain."""
        limit = self.cfg.kafka.max_pending_outputs
        if self._pending_outputs() <= limit:
            return
        self.source.pause()
        try:
            while self._pending_outputs() > limit // 2 and not self.stop_event.is_set():
                for s in self.outputs.all():
                    prod = getattr(s, "producer", None)
                    if prod is not None:
                        prod.poll(0.05)  # serve delivery reports
                # keep polling the consumer (group membership, max.poll.interval); paused partitions
                # deliver nothing, but anything already fetched is kept for the next batch
                self._carry.extend(self.source.consume(1, 0.0))
        finally:
            self.source.resume()

    def process(self, records: list[RawRecord]) -> None:
        """Process one consumed batch end to end (up to the commit)."""
        t0 = time.perf_counter()
        self.first_record_at = self.first_record_at or t0
        self.records_seen += len(records)
        groups: dict[str, list[tuple[RawRecord, Sample]]] = defaultdict(list)
        bad: list[tuple[RawRecord, str]] = []
        for rec in records:
            try:
                sample = decode_value(rec.value, self.limits)
                if self.limits.expected_shape is None:  # later records of another shape are dead-lettered
                    self.limits = replace(self.limits, expected_shape=tuple(sample.x.shape))
            except DecodeError as e:
                bad.append((rec, str(e)))
                continue
            key = f"{rec.topic}:{rec.partition}" if self.cfg.engine.state_key == "partition" else sample.stream_id
            groups[key].append((rec, sample))
        for rec, err in bad:
            self.outputs.dlq.send(rec, err)
        if bad:
            self.dead_letters += len(bad)
            self._emit_alert(dead_letter_alert(bad))
        for key, items in groups.items():
            st = self.state_for(key, items[0][0])
            fresh = [(r, s) for r, s in items if r.offset >= st.next_offsets.get((r.topic, r.partition), -1)]
            self.skipped += len(items) - len(fresh)
            if fresh:
                self._process_stream(st, fresh, t0)
                self._dirty.add(key)
        for rec in records:  # only now: every record of the batch is output (or dead-lettered)
            tp = (rec.topic, rec.partition)
            self._pending_commit[tp] = max(self._pending_commit.get(tp, -1), rec.offset + 1)
        self.batches += 1
        self._batches_since_ckpt += 1
        self._finish_batch(force=False)
        if self.on_batch is not None:
            self.on_batch(len(records))

    def _process_stream(self, st: StreamState, items: list[tuple[RawRecord, Sample]], t0: float) -> None:
        x = np.stack([s.x for _, s in items]).astype(np.float32, copy=False)
        first, last = items[0][0], items[-1][0]
        res = st.pipe.process(x, stream_id=items[-1][1].stream_id, tag=items,
                              offsets=OffsetRange(topic=last.topic, partition=last.partition, first=first.offset,
                                                  last=last.offset), received_at=t0)
        for alert in res.alerts:
            self._emit_alert(alert)
        self.samples_processed += len(items)
        for done in st.pipe.release():
            self._emit(st, done)

    # -- outputs ---------------------------------------------------------------------------------
    def _write_predictions(self, st: StreamState, docs: list[dict[str, Any]]) -> None:
        """Write prediction records; their offsets become done (skipped if delivered again) and committable."""
        psink = self.outputs.predictions
        for doc in docs:
            if psink is not None:
                psink.write(doc["stream_id"], doc)
            tp = (doc["topic"], doc["partition"])
            st.next_offsets[tp] = max(st.next_offsets.get(tp, -1), doc["offset"] + 1)
            self._pending_commit[tp] = max(self._pending_commit.get(tp, -1), doc["offset"] + 1)

    def _emit(self, st: StreamState, res: BatchResult) -> None:
        """Write a final result's predictions and run-log record; its offsets become committable."""
        self.step_time_s += res.step_s
        docs = prediction_docs(res)
        self._write_predictions(st, docs)
        self._dirty.add(st.key)  # its checkpoint must stop carrying them as held
        if self.runlog is not None:
            self.runlog.append(batch_record(res, len(self.runlog.batches), docs))

    def _release(self, *, older_than_s: float | None = None, everything: bool = False) -> None:
        for st in self.states.values():
            for res in st.pipe.release(older_than_s=older_than_s, everything=everything):
                self._emit(st, res)

    def _emit_alert(self, alert: Alert) -> None:
        doc = alert.model_dump(mode="json")
        for sink in self.outputs.alerts:
            sink.write(alert.stream_id, doc)
        if self.runlog is not None:
            self.runlog.alerts.append(doc)

    # -- flush, checkpoint, commit ---------------------------------------------------------------
    def _finish_batch(self, *, force: bool) -> None:
        if force:  # end of the run or a revocation: nothing stays held
            self._release(everything=True)
        if not self._pending_commit:
            return
        if not force and self._batches_since_ckpt < self.cfg.engine.checkpoint_every:
            return
        for st in self.states.values():  # never commit past a record whose outputs are still held
            for res in st.pipe.held:
                for r, _ in res.tag:
                    tp = (r.topic, r.partition)
                    if tp in self._pending_commit:
                        self._pending_commit[tp] = min(self._pending_commit[tp], r.offset)
        for sink in self.outputs.all():
            sink.flush()
        if self.store is not None:
            for key in sorted(self._dirty):
                if key in self.states:
                    st = self.states[key]
                    # held predictions travel with the state that has adapted on their records: a restart
                    # writes them instead of adapting on those records a second time
                    held = [d for res in st.pipe.held for d in prediction_docs(res)]
                    self.store.save(key, st.state_dict(held))
        self._dirty.clear()
        self.source.commit(dict(self._pending_commit))
        self._pending_commit.clear()
        self._batches_since_ckpt = 0
