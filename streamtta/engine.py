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

Crash semantics: flush before checkpoint (which stores the next offset per partition) before commit. Records a
restored checkpoint covers are skipped, so a crash between checkpoint and commit repeats nothing; one between flush
and checkpoint repeats the outputs written since the last checkpoint (one batch plus the held ones) with identical
deterministic ids. A checkpoint carries the predictions of held results; a restart writes those first. Undecodable
records after a held one are dead-lettered again. After any exception (decode, step, scoring, a sink, a checkpoint, a
commit) the engine is *failed*: it re-raises, and neither the revoke callback nor close checkpoints or commits again,
so a restart re-reads from the last commit. States live in a bounded LRU table (:mod:`streamtta.states`). An
``observer`` (:class:`~streamtta.ops.observer.EngineObserver`: metrics, event logs) hears of every batch, step, alert,
checkpoint and commit.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from dataclasses import replace
from typing import Any, Callable

import numpy as np

from streamtta.alerts import Alert, OffsetRange
from streamtta.checkpoints import CheckpointStore
from streamtta.config import Config, ConfigError
from streamtta.faults import point
from streamtta.ops.observer import EngineObserver, timed
from streamtta.pipeline import Pipeline
from streamtta.records import batch_record, dead_letter_alert, prediction_docs
from streamtta.results import BatchResult
from streamtta.runlog import RunLog
from streamtta.states import StateTable, StreamState
from streamtta.stream.base import Outputs, Source, TopicPartition
from streamtta.stream.envelope import DecodeError, DecodeLimits, decode_value
from streamtta.types import RawRecord, Sample

__all__ = ["Engine", "Outputs"]

log = logging.getLogger("streamtta.engine")


class Engine:
    """Runs the pipelines over a source until it ends, a stop is requested or a limit is hit."""

    def __init__(self, cfg: Config, source: Source, outputs: Outputs, pipeline: Pipeline, *,
                 store: CheckpointStore | None = None, runlog: RunLog | None = None,
                 on_batch: Callable[[int], None] | None = None, observer: EngineObserver | None = None) -> None:
        self.cfg, self.source, self.outputs = cfg, source, outputs
        self.template, self.store, self.runlog, self.on_batch = pipeline, store, runlog, on_batch
        self.observe = observer or EngineObserver()
        #: grouped.enabled: one GroupedPipeline per partition serves all its stream ids (streamtta.grouped)
        self.grouped = cfg.grouped.enabled
        if self.grouped and cfg.engine.state_key != "stream_id":
            raise ConfigError("grouped.enabled needs engine.state_key='stream_id' (it keeps per-stream-id "
                              "statistics; with state_key='partition' every partition is one stream already)")
        if self.grouped:
            from streamtta.grouped import GroupedPipeline

            pipeline = GroupedPipeline.from_pipeline(pipeline)  # type: ignore[assignment]
        self.states = StateTable(pipeline, store, max_states=cfg.engine.max_states, alert=self._emit_alert,
                                 end_offset=getattr(source, "end_offset", None))
        self.stop_event = threading.Event()
        self.records_seen = self.samples_processed = self.dead_letters = self.skipped = self.batches = 0
        self.step_time_s, self._batches_since_ckpt = 0.0, 0
        self._hinted = False  # the grouped-mode hint is logged once
        self._last_ckpt = time.monotonic()
        #: ``time.perf_counter()`` when the first record arrived (after group join / assignment)
        self.first_record_at: float | None = None
        self._pending_commit: dict[TopicPartition, int] = {}
        self._dirty: set[str] = set()
        self._carry: list[RawRecord] = []
        self._committed: dict[TopicPartition, int] = {}
        #: the exception that stopped the engine; after one, nothing more is checkpointed or committed
        self.failed: BaseException | None = None
        # the input shape: configured, else the model's or its source data's, else the first record's
        shape, names = cfg.engine.expected_shape or pipeline.blueprint.input_shape, cfg.engine.feature_names
        self.limits = DecodeLimits(max_bytes=cfg.engine.max_record_bytes, expected_shape=tuple(shape) if shape else None,
                                   feature_names=tuple(names) if names else None)
        source.on_revoke(self._on_revoke)
        if hasattr(source, "on_lost"):
            source.on_lost(self._on_lost)

    # -- streams ---------------------------------------------------------------------------------
    def _on_revoke(self, partitions: list[TopicPartition]) -> None:
        """Checkpoint and forget the streams of revoked partitions (the new owner restores them); after a
        failure only forget them: nothing past the last commit is written, checkpointed or committed."""
        if self.failed is None:
            self._finish_batch(force=True)
        self._forget(partitions)

    def _on_lost(self, partitions: list[TopicPartition]) -> None:
        """Partitions lost without a clean revoke (session timeout): another worker may own them already, so
        their streams are forgotten unsaved (no checkpoint, no commit: a stale state must not overwrite the
        new owner's); their records come again from the last commit. Their held predictions are written first:
        a stream_id state may hold records of a kept partition, which is committed past them later."""
        log.warning("partitions %s lost: their state since the last checkpoint is dropped", sorted(partitions))
        doomed = self._doomed(partitions)
        for key in doomed if self.failed is None else []:
            for res in self.states[key].pipe.release(everything=True):
                self._emit(self.states[key], res)
        for tp in partitions:
            self._pending_commit.pop(tp, None)
        self._dirty -= set(doomed)
        for key in doomed:
            self.states.pop(key)

    def _doomed(self, partitions: list[TopicPartition]) -> list[str]:
        """The keys of the states that belong to ``partitions``."""
        lost = {f"{t}:{p}" for t, p in partitions}
        return [key for key in list(self.states) if key in lost or (self.cfg.engine.state_key == "stream_id"
                and set(self.states[key].next_offsets) & set(partitions))]

    def _forget(self, partitions: list[TopicPartition]) -> None:
        for key in self._doomed(partitions):
            self.states.pop(key)

    # -- main loop -------------------------------------------------------------------------------
    def run(self, *, max_records: int | None = None) -> None:
        """Consume until a stop is requested, ``max_records`` are seen, the idle timeout passes, or the
        source ends (``kafka.stop_at_end``, or any finite in-memory source)."""
        stop_at_end = self.cfg.kafka.stop_at_end or getattr(self.source, "finite", False)
        last_data = time.monotonic()
        # an exception propagates without the final commit: a half-processed batch is re-delivered
        try:
            self._loop(max_records, stop_at_end, last_data)
            self._finish_batch(force=True)
        except BaseException as e:
            self.failed = self.failed or e
            raise

    def _loop(self, max_records: int | None, stop_at_end: bool, last_data: float) -> None:
        kcfg = self.cfg.kafka
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
                    return
                continue
            if self._pending_commit or any(st.pipe.held for st in self.states.values()):
                self._finish_batch(force=True)  # nothing came: held outputs go out, state and offsets are saved
            if stop_at_end and self.source.at_end():
                return
            if kcfg.idle_timeout_s is not None and time.monotonic() - last_data > kcfg.idle_timeout_s:
                log.info("no record for %.1f s: stopping", kcfg.idle_timeout_s)
                return

    def request_stop(self) -> None:
        self.stop_event.set()

    def _pending_outputs(self) -> int:  # sinks may share one producer: the largest count
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
        """Process one consumed batch end to end (up to the commit). After an exception here the engine
        is failed: it checkpoints and commits nothing more (a restart re-reads from the last commit)."""
        try:
            self._process(records)
        except BaseException as e:
            self.failed = self.failed or e
            raise

    def _process(self, records: list[RawRecord]) -> None:
        if self.failed is not None:
            raise RuntimeError(f"the engine failed earlier ({self.failed!r}); start a new one") from self.failed
        t0 = time.perf_counter()
        if self.first_record_at is None:  # the interval counts from the first record, not the group join
            self.first_record_at, self._last_ckpt = t0, time.monotonic()
        self.records_seen += len(records)
        groups: dict[str, list[tuple[RawRecord, Sample]]] = defaultdict(list)
        bad: list[tuple[RawRecord, str]] = []
        for rec in records:
            point("decode")
            try:
                sample = decode_value(rec.value, self.limits)
                if self.limits.expected_shape is None:  # later records of another shape are dead-lettered
                    self.limits = replace(self.limits, expected_shape=tuple(sample.x.shape))
            except DecodeError as e:
                bad.append((rec, str(e)))
                continue
            except Exception as e:  # a decoder bug must not become a poison pill either
                log.exception("decoding %s[%d]@%d failed", rec.topic, rec.partition, rec.offset)
                bad.append((rec, f"undecodable record ({type(e).__name__}: {e})"))
                continue
            by_partition = self.grouped or self.cfg.engine.state_key == "partition"
            key = f"{rec.topic}:{rec.partition}" if by_partition else sample.stream_id
            groups[key].append((rec, sample))
        for rec, err in bad:
            point("dlq")
            self.outputs.dlq.send(rec, err)
        if bad:
            self.dead_letters += len(bad)
            self._emit_alert(dead_letter_alert(bad))
        if len(groups) > 16 and not self.grouped and not self._hinted:
            self._hinted = True
            log.warning("one batch held %d stream ids, each stepping its own pipeline on its few samples; "
                        "grouped.enabled=true serves them all in one forward per batch (README: Many streams)",
                        len(groups))
        for key, items in groups.items():
            st = self.states.get(key, items[0][0])
            held = self.states.admit(st, items)
            if held:  # predictions its checkpoint held: written now, recorded as written by the next one
                self._write_predictions(st, held, commit=False)  # committed once their records come again
                self._dirty.add(key)
                log.info("wrote %d held predictions of %s from its checkpoint", len(held), key)
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
        self.observe.batch(self, records, time.perf_counter() - t0)
        if self.on_batch is not None:
            self.on_batch(len(records))

    def _process_stream(self, st: StreamState, items: list[tuple[RawRecord, Sample]], t0: float) -> None:
        x = np.stack([s.x for _, s in items]).astype(np.float32, copy=False)
        first, last = items[0][0], items[-1][0]
        more = {"stream_ids": [s.stream_id for _, s in items]} if self.grouped else {}
        res = st.pipe.process(x, stream_id=items[-1][1].stream_id, tag=items, **more,
                              offsets=OffsetRange(topic=last.topic, partition=last.partition, first=first.offset,
                                                  last=last.offset), received_at=t0)
        self.observe.step(st.key, res, st.pipe)
        for alert in res.alerts:
            self._emit_alert(alert)
        self.samples_processed += len(items)
        for done in st.pipe.release():
            self._emit(st, done)

    # -- outputs ---------------------------------------------------------------------------------
    def _write_predictions(self, st: StreamState, docs: list[dict[str, Any]], commit: bool = True) -> None:
        """Write prediction records; their offsets become done (skipped if delivered again) and, with
        ``commit``, committable (not a checkpoint's held ones: other streams' records before them may be unread)."""
        psink = self.outputs.predictions
        for doc in docs:
            point("predictions")
            if psink is not None:
                psink.write(doc["stream_id"], doc)
            tp, nxt = (doc["topic"], doc["partition"]), doc["offset"] + 1
            st.next_offsets[tp] = max(st.next_offsets.get(tp, -1), nxt)
            if commit:
                self._pending_commit[tp] = max(self._pending_commit.get(tp, -1), nxt)

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
        point("alert")
        for sink in self.outputs.alerts:
            sink.write(alert.stream_id, doc)
        self.observe.alert(alert)
        if self.runlog is not None:
            self.runlog.alerts.append(doc)

    # -- flush, checkpoint, commit ---------------------------------------------------------------
    def _finish_batch(self, *, force: bool) -> None:
        if self.failed is not None:  # never checkpoint or commit after a failure
            return
        if force:  # end of the run or a revocation: nothing stays held
            self._release(everything=True)
        e = self.cfg.engine
        if not self._pending_commit or (not force and (self._batches_since_ckpt < e.checkpoint_every or
                                                       time.monotonic() - self._last_ckpt < e.checkpoint_interval_s)):
            return
        pend = self._pending_commit  # never commit past a record whose outputs are still held
        for r, _ in (item for st in self.states.values() for res in st.pipe.held for item in res.tag):
            if (r.topic, r.partition) in pend:
                pend[(r.topic, r.partition)] = min(pend[(r.topic, r.partition)], r.offset)
        for sink in self.outputs.all():  # a broker outage may last up to kafka.connect_timeout_s
            point("flush")
            sink.flush(max(30.0, self.cfg.kafka.connect_timeout_s))
        if self.store is not None:
            states = {}
            for key in sorted(k for k in self._dirty if k in self.states):
                st = self.states[key]
                # held predictions travel with the state that has adapted on their records: a restart
                # writes them instead of adapting on those records a second time
                held = [d for res in st.pipe.held for d in prediction_docs(res)]
                st.committed.update({tp: o for tp, o in self._committed.items() if tp in st.next_offsets})
                states[key] = st.state_dict(held)
            if states:  # one write for all (a Kafka changelog waits for one acknowledgement round)
                point("checkpoint")
                seconds = timed(self.store.save_many, states)[1]
                for key in states:
                    self.observe.checkpoint(key, self.states[key].next_offsets, seconds / len(states))
        point("commit")
        stored, seconds = timed(self.source.commit, dict(self._pending_commit))
        self.observe.commit(self._pending_commit, seconds, stored is not False)
        if stored is not False:  # False: skipped (group moved on)
            self._committed.update(self._pending_commit)
        self._pending_commit.clear()
        self._batches_since_ckpt, self._last_ckpt = 0, time.monotonic()
        self._dirty.clear()
        self.states.evict()
