"""The engine loop: decode -> adapt -> score -> monitor -> alert -> sinks -> checkpoint -> commit.

One :class:`Engine` drives any :class:`~streamtta.stream.base.Source` (Kafka or in-memory replay, so
offline simulations take exactly the live code path). Per batch of records:

1. **decode** every record (:func:`streamtta.stream.envelope.decode_value`); a record that fails goes to
   the dead-letter sink with its origin and error, and the batch goes on;
2. **group** the good samples by state key (partition by default, or stream id) -- each key has its own
   :class:`StreamState` (adapter, OOD scorer, shift monitor, alert policy), created fresh or restored from
   its checkpoint;
3. **adapter step** (pre-update logits and features); the engine passes a *gate* that scores the batch
   and keeps OOD-flagged samples out of every update;
4. **OOD scorer** (higher = more OOD);
5. **shift monitor** on batch-level signals (OOD rate, mean entropy of accepted-ID samples, mean score),
   **re-adaptation** on a confirmed shift (the batch that holds the change point -- this one or one still
   held, see below -- is processed again, in two parts, from the adapter state before it; optionally a
   restart from the meta-initialisation), **alert policy** (cooldown: one shift, one alert), sent at once;
   online scorer update from the ID-accepted samples of the batch's final outputs;
6. **sinks**: predictions (id = f(topic, partition, offset)), alerts (topic + JSONL). With re-adaptation,
   a batch's predictions are *held* until ``monitor.hold_batches`` (default 1) more batches of its
   partition (or stream) are processed -- at most ``monitor.hold_max_s`` seconds, and no longer once a
   poll brings nothing: a shift confirmed one batch late (most changes near the end of a batch are) still
   re-processes the batch it began in. A held batch that is re-processed gets the new predictions and
   keeps the scores and flags it was first given (the scorer memories learned them);
7. after the whole batch: **flush** every sink, **checkpoint** the touched states atomically, and only then
   **commit** ``last processed offset + 1`` per partition -- never past a record whose predictions are held.

Crash semantics: outputs are flushed before the checkpoint and the checkpoint (which stores the next
offset per partition) before the commit. On restart, records at offsets the restored checkpoint already
covers are skipped, so a crash between checkpoint and commit repeats nothing; a crash between flush and
checkpoint repeats the outputs written since the last checkpoint (one batch, plus the held ones), with
identical deterministic ids -- a held batch re-processed in that window is written again with its
predictions as checkpointed, before the re-processing. Held records are not committed; the checkpoint
carries their predictions as they stand, and a restart writes those first (the delivered-again records
are then skipped like any checkpointed ones). Undecodable records after a held one are not committed
either: after a crash they are dead-lettered again.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from streamtta.config import Config
from streamtta.alerts.schema import Alert, AlertKind, OffsetRange, Severity, deterministic_id
from streamtta.alerts.events import GuardResetEvent
from streamtta.detectors.ood.scorer import score_and_flag
from streamtta.detectors.shift.monitor import batch_signals, input_signals
from streamtta.runlog import BatchRecord, RunLog
from streamtta.stream.base import DeadLetter, Sink, Source, TopicPartition
from streamtta.stream.envelope import DecodeError, DecodeLimits, decode_value
from streamtta.types import RawRecord, Sample, StepOutput

log = logging.getLogger("streamtta.engine")


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
class CheckpointStore:
    """Atomic per-key state files: write to a temp file in the same directory, fsync, ``os.replace``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", key)
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        return self.directory / f"{safe}-{digest}.pt"

    def save(self, key: str, state: dict[str, Any]) -> None:
        target = self.path(key)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".pt")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dfd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def load(self, key: str) -> dict[str, Any] | None:
        p = self.path(key)
        if not p.exists():
            return None
        # our own files; they hold pickled river detectors, so weights_only cannot be used here
        return torch.load(p, map_location="cpu", weights_only=False)


# ----------------------------------------------------------------------------------------------
# per-stream state
# ----------------------------------------------------------------------------------------------
@dataclass
class _Batch:
    """One processed batch until its outputs are written."""

    items: list[tuple[RawRecord, Sample]]
    x: torch.Tensor
    pre_state: dict[str, Any] | None
    out: StepOutput
    scores: np.ndarray
    flags: np.ndarray
    keep: np.ndarray
    batch_index: int
    t0: float
    step_s: float
    offsets: OffsetRange
    shift: str | None = None
    t_done: float = 0.0


@dataclass
class StreamState:
    key: str
    adapter: Any
    scorer: Any
    monitor: Any | None
    policy: Any
    readapter: Any | None = None
    burst: Any | None = None
    novelty: Any | None = None
    gate_scorer: Any | None = None
    batch_index: int = 0
    n_samples: int = 0
    next_offsets: dict[TopicPartition, int] = field(default_factory=dict)
    #: processed batches whose predictions wait (``monitor.hold_batches``); their records are not committed;
    #: a checkpoint carries their predictions as they stand (written on restore)
    held: list["_Batch"] = field(default_factory=list)

    def score(self, features: torch.Tensor, logits: torch.Tensor,
              feed: bool = True) -> tuple[Any, np.ndarray, np.ndarray]:
        """``(scores, ood flags, keep)`` of a batch: the reporting scorer's scores and flags, and which
        samples may feed adaptation (flagged by neither the scorer nor the gate scorer). ``feed=False``
        for a batch scored again: adaptive thresholds do not see its scores twice."""
        scores, flags = score_and_flag(self.scorer, features, logits, feed)
        keep = ~flags
        if self.gate_scorer is not None:
            keep = keep & ~score_and_flag(self.gate_scorer, features, logits, feed)[1]
        return scores, flags, keep

    def step(self, x: torch.Tensor, feed: bool = True) -> tuple[StepOutput, np.ndarray, np.ndarray, np.ndarray]:
        """One adapter step gated by the scorers: ``(output, scores, ood flags, keep)``."""
        scored: dict[str, Any] = {}

        def gate(logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
            scored["v"] = self.score(features, logits, feed)
            return torch.from_numpy(scored["v"][2])

        out: StepOutput = self.adapter.step(x, gate=gate)
        if "v" not in scored:  # gradient-free adapters need no gate; score afterwards
            gate(out.logits, out.features)
        scores, flags, keep = scored["v"]
        return out, np.asarray(scores, dtype=np.float64), flags, keep

    def learn_scores(self, features: torch.Tensor, logits: torch.Tensor, keep: torch.Tensor) -> None:
        """Online scorer updates (prototype memory, ...) from the samples that were kept."""
        self.scorer.partial_fit(features, logits, keep)
        if self.gate_scorer is not None:
            self.gate_scorer.partial_fit(features, logits, keep)

    def state_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "adapter": self.adapter.state_dict(),
            "scorer": self.scorer.state_dict(),
            "monitor": self.monitor.state_dict() if self.monitor is not None else None,
            "policy": self.policy.state_dict(),
            "readapter": self.readapter.state_dict() if self.readapter is not None else None,
            "burst": self.burst.state_dict() if self.burst is not None else None,
            "novelty": self.novelty.state_dict() if self.novelty is not None else None,
            "gate_scorer": self.gate_scorer.state_dict() if self.gate_scorer is not None else None,
            "batch_index": self.batch_index,
            "n_samples": self.n_samples,
            "next_offsets": {f"{t}\x00{p}": o for (t, p), o in self.next_offsets.items()},
        }

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.adapter.load_state_dict(st["adapter"])
        self.scorer.load_state_dict(st["scorer"])
        if self.monitor is not None and st.get("monitor") is not None:
            self.monitor.load_state_dict(st["monitor"])
        self.policy.load_state_dict(st["policy"])
        if self.readapter is not None and st.get("readapter") is not None:
            self.readapter.load_state_dict(st["readapter"])
        if self.burst is not None and st.get("burst") is not None:
            self.burst.load_state_dict(st["burst"])
        if self.novelty is not None and st.get("novelty") is not None:
            self.novelty.load_state_dict(st["novelty"])
        if self.gate_scorer is not None and st.get("gate_scorer") is not None:
            self.gate_scorer.load_state_dict(st["gate_scorer"])
        self.batch_index = int(st["batch_index"])
        self.n_samples = int(st["n_samples"])
        self.next_offsets = {}
        for k, o in st["next_offsets"].items():
            t, p = k.split("\x00")
            self.next_offsets[(t, int(p))] = int(o)


class Components:
    """Builds the per-stream components from the config and the loaded source model.

    The OOD scorer and the novel-class detector are fitted once, in the *adapter's* feature space: the
    clean source training data go through a fresh adapter in i.i.d. batches of the engine's batch size
    (so norm layers see the same kind of statistics they see online), the scorer is built on them and
    its threshold is set at 95% TPR on the source hold-out. Each new stream gets deep copies.
    """

    def __init__(self, cfg: Config, model: torch.nn.Module, meta: Any | None, *,
                 holdout: tuple[np.ndarray, np.ndarray] | None = None,
                 train: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        from streamtta.adapters import DEFAULT_SPEC, build_adapter
        from streamtta.detectors import DEFAULT_SCORER, build_scorer

        limit_helper_threads()
        self.cfg = cfg
        self.model = model.eval()
        self.meta = meta
        self.classes: list[int] = list(meta.classes) if meta is not None else list(range(cfg.model.num_classes or 0))
        if not self.classes:
            raise ValueError("model.num_classes must be set for models without streamtta metadata")
        self.num_classes = len(self.classes)
        self.spec = DEFAULT_SPEC if cfg.adapter.spec == "default" else cfg.adapter.spec
        self._build_adapter = build_adapter
        self._source_fit: tuple[list[Any], float | None] | None = None
        self.scorer_name = DEFAULT_SCORER if cfg.scorer.name == "default" else cfg.scorer.name
        self.base_scorer = build_scorer(self.scorer_name, **cfg.scorer.options)
        gate_name = cfg.scorer.gate
        self.base_gate_scorer = (build_scorer(gate_name, **cfg.scorer.gate_options)
                                 if gate_name not in (None, "", "none", self.scorer_name) else None)
        self.base_novelty: Any | None = None
        if cfg.scorer.calibrate and meta is None and (holdout is None or train is None):
            raise ValueError("scorer.calibrate needs a model with streamtta metadata (or disable it)")
        self._train = train
        if cfg.scorer.calibrate:
            if holdout is None:
                from streamtta.models.data import source_holdout

                holdout = source_holdout(meta)
            self._calibrate(self.source_train(), holdout)
        #: copied for every stream; built here so that a bad readapt option fails now, not at the first stream
        self.base_readapter: Any | None = None
        if cfg.monitor.readapt:
            from streamtta.readapt import ReAdapter, load_meta_init

            meta_init = (load_meta_init(cfg.model.source or "digits-resnet")
                         if cfg.monitor.readapt_options.get("restart", False) else None)
            try:
                self.base_readapter = ReAdapter(meta_init, **cfg.monitor.readapt_options)
            except (TypeError, ValueError) as e:
                raise ValueError(f"monitor.readapt_options: {e}") from None

    def source_train(self) -> tuple[Any, Any]:
        """The model's clean source training data (given to the constructor, else loaded once)."""
        if self._train is None:
            from streamtta.models.data import load_source_train

            self._train = load_source_train(self.meta)
        return self._train

    def class_indices(self, labels: Any) -> torch.Tensor:
        """Class labels -> output indices of the model (-1 for classes it does not know)."""
        index = {c: i for i, c in enumerate(self.classes)}
        return torch.as_tensor([index.get(int(v), -1) for v in np.asarray(labels)])

    def new_adapter(self) -> Any:
        """A fresh adapter; class-statistics norms (cb-stats) start from the source class prior and
        guards that compare samples with the source (source-fallback) get their reference."""
        torch.manual_seed(self.cfg.engine.seed)
        adapter = self._build_adapter(self.spec, self.model, self.num_classes, **self.cfg.adapter.options)
        if hasattr(adapter, "fit_source") and (self.meta is not None or self._train is not None):
            # one source pass: cb-stats class prior and source-fallback's reference, cached for later adapters
            with_prior = self.cfg.adapter.class_prior and bool(getattr(adapter, "_label_layers", None))
            if self._source_fit is None:
                x, y = self.source_train()
                self._source_fit = adapter.fit_source(torch.as_tensor(np.asarray(x), dtype=torch.float32),
                                                      self.class_indices(y) if with_prior else None)
            else:
                prior, reference = self._source_fit
                if with_prior:
                    adapter.set_class_prior(prior)
                adapter.set_guard_reference(reference)
        return adapter

    @torch.no_grad()
    def adapter_features(self, x: Any, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """``(logits, features, order)`` of ``x`` through a fresh adapter, in shuffled i.i.d. batches."""
        adapter = self.new_adapter()
        xt = torch.as_tensor(np.asarray(x), dtype=torch.float32)
        order = np.random.default_rng(seed).permutation(len(xt))
        bs = max(self.cfg.engine.batch_size, 2)
        logits, feats = [], []
        for i in range(0, len(order), bs):
            lg, ft = adapter.features(xt[order[i:i + bs]])
            logits.append(lg)
            feats.append(ft)
        return torch.cat(logits), torch.cat(feats), order

    def _calibrate(self, train: tuple[Any, Any], holdout: tuple[Any, Any]) -> None:
        from streamtta.detectors import NovelClassDetector

        lg, ft, order = self.adapter_features(train[0], seed=self.cfg.engine.seed)
        y = self.class_indices(np.asarray(train[1])[order])
        self.base_scorer.fit(ft, lg, y)
        hl, hf, _ = self.adapter_features(holdout[0], seed=self.cfg.engine.seed + 1)
        self.base_scorer.calibrate(hf, hl)
        if self.base_gate_scorer is not None:
            self.base_gate_scorer.fit(ft, lg, y)
            self.base_gate_scorer.calibrate(hf, hl)
        self.base_novelty = NovelClassDetector().fit(ft, y)

    def new_state(self, key: str) -> StreamState:
        from streamtta.alerts import AlertPolicy
        from streamtta.detectors import OODBurstRule, ShiftMonitor

        adapter = self.new_adapter()
        scorer = copy.deepcopy(self.base_scorer)
        mon_cfg = self.cfg.monitor
        monitor = (ShiftMonitor(detector=mon_cfg.detector, signals=tuple(mon_cfg.signals),
                                cooldown_batches=mon_cfg.cooldown_batches, seed=self.cfg.engine.seed,
                                **mon_cfg.options)
                   if mon_cfg.enabled else None)
        policy = AlertPolicy(cooldown_batches=self.cfg.alerts.cooldown_batches)
        readapter = copy.deepcopy(self.base_readapter) if mon_cfg.enabled and self.base_readapter is not None else None
        burst = OODBurstRule(**mon_cfg.burst) if mon_cfg.enabled and mon_cfg.burst is not None else None
        novelty = copy.deepcopy(self.base_novelty) if mon_cfg.enabled and mon_cfg.novelty else None
        gate_scorer = copy.deepcopy(self.base_gate_scorer) if self.base_gate_scorer is not None else None
        return StreamState(key, adapter, scorer, monitor, policy, readapter, burst, novelty, gate_scorer)


def limit_helper_threads() -> None:
    """One thread for numpy BLAS and FAISS: their batches are small, and extra threads only fight torch
    for the cores (measured: scoring 12-17% of the step with 2 threads, 2-6% with 1)."""
    try:
        import faiss
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
        faiss.omp_set_num_threads(1)
    except Exception:  # pragma: no cover - optional speed-up only
        pass


# ----------------------------------------------------------------------------------------------
# the engine
# ----------------------------------------------------------------------------------------------
@dataclass
class Outputs:
    predictions: Sink | None
    alerts: list[Sink]
    dlq: DeadLetter

    def all(self) -> list[Any]:
        return [s for s in [self.predictions, *self.alerts, self.dlq] if s is not None]


class Engine:
    """Runs the adaptation loop over a source until it ends, a stop is requested or a limit is hit."""

    def __init__(self, cfg: Config, source: Source, outputs: Outputs, components: Components, *,
                 store: CheckpointStore | None = None, runlog: RunLog | None = None,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.cfg = cfg
        self.source = source
        self.outputs = outputs
        self.components = components
        self.store = store
        self.runlog = runlog
        self.on_batch = on_batch
        self.states: dict[str, StreamState] = {}
        self.stop_event = threading.Event()
        self.records_seen = 0
        self.samples_processed = 0
        self.dead_letters = 0
        self.skipped = 0
        self.batches = 0
        self.step_time_s = 0.0
        #: ``time.perf_counter()`` when the first record arrived (after group join / assignment)
        self.first_record_at: float | None = None
        self._pending_commit: dict[TopicPartition, int] = {}
        self._batches_since_ckpt = 0
        self._dirty: set[str] = set()
        self._carry: list[RawRecord] = []
        shape = cfg.engine.expected_shape
        if shape is None and components.meta is not None:
            shape = list(components.meta.input_shape)
        self.limits = DecodeLimits(max_bytes=cfg.engine.max_record_bytes,
                                   expected_shape=tuple(shape) if shape else None)
        source.on_revoke(self._on_revoke)

    # -- rebalance ---------------------------------------------------------------------------
    def _on_revoke(self, partitions: list[TopicPartition]) -> None:
        """Checkpoint and forget the states of revoked partitions (the new owner restores them)."""
        self._finish_batch(force=True)
        lost = {f"{t}:{p}" for t, p in partitions}
        for key in list(self.states):
            st = self.states[key]
            if key in lost or (self.cfg.engine.state_key == "stream_id" and set(st.next_offsets) & set(partitions)):
                del self.states[key]

    def state_for(self, key: str) -> StreamState:
        st = self.states.get(key)
        if st is None:
            st = self.components.new_state(key)
            saved = self.store.load(key) if self.store is not None else None
            if saved is not None:
                st.load_state_dict(saved)
                log.info("restored state %s at batch %d", key, st.batch_index)
                held = saved.get("held_predictions") or []
                if held:  # the next checkpoint records them as written
                    self._write_predictions(st, held)
                    self._dirty.add(key)
                    log.info("wrote %d held predictions of %s from its checkpoint", len(held), key)
            self.states[key] = st
        return st

    # -- main loop ---------------------------------------------------------------------------
    def run(self, *, max_records: int | None = None) -> None:
        kcfg = self.cfg.kafka
        bs = self.cfg.engine.batch_size
        last_data = time.monotonic()
        # an exception propagates without the final commit: offsets of a half-processed batch are never
        # committed, so the records are re-delivered after a restart (at-least-once)
        while not self.stop_event.is_set():
            self._backpressure()
            if self._carry:
                records, self._carry = self._carry, []
            else:
                records = self.source.consume(bs, kcfg.poll_timeout_s)
            if records:
                last_data = time.monotonic()
                self.process(records)
                self._release_held(self.cfg.monitor.hold_max_s)
                if max_records is not None and self.records_seen >= max_records:
                    break
                continue
            if any(st.held for st in self.states.values()):  # nothing came: held outputs go out now
                self._finish_batch(force=True)
            if kcfg.stop_at_end and self.source.at_end():
                break
            if kcfg.idle_timeout_s is not None and time.monotonic() - last_data > kcfg.idle_timeout_s:
                log.info("no record for %.1f s: stopping", kcfg.idle_timeout_s)
                break
        self._finish_batch(force=True)

    def request_stop(self) -> None:
        self.stop_event.set()

    def _pending_outputs(self) -> int:
        """Outputs queued for delivery (sinks may share one producer, so take the largest count)."""
        most = 0
        for s in self.outputs.all():
            p = getattr(s, "pending", 0)
            most = max(most, int(p() if callable(p) else p))
        return most

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
        if self.first_record_at is None:
            self.first_record_at = t0
        self.records_seen += len(records)
        groups: dict[str, list[tuple[RawRecord, Sample]]] = defaultdict(list)
        bad: list[tuple[RawRecord, str]] = []
        for rec in records:
            try:
                sample = decode_value(rec.value, self.limits)
            except DecodeError as e:
                bad.append((rec, str(e)))
                continue
            key = f"{rec.topic}:{rec.partition}" if self.cfg.engine.state_key == "partition" else sample.stream_id
            groups[key].append((rec, sample))
        for rec, err in bad:
            self.outputs.dlq.send(rec, err)
        if bad:
            self.dead_letters += len(bad)
            self._dead_letter_alert(bad)
        for key, items in groups.items():
            st = self.state_for(key)
            fresh = [(r, s) for r, s in items if r.offset >= st.next_offsets.get((r.topic, r.partition), -1)]
            self.skipped += len(items) - len(fresh)
            if fresh:
                self._process_group(st, fresh, t0)
                self._dirty.add(key)
        for rec in records:  # only now: every record of the batch is output (or dead-lettered)
            tp = (rec.topic, rec.partition)
            self._pending_commit[tp] = max(self._pending_commit.get(tp, -1), rec.offset + 1)
        self.batches += 1
        self._batches_since_ckpt += 1
        self._finish_batch(force=False)
        if self.on_batch is not None:
            self.on_batch(len(records))

    # -- one group = one adapter step ---------------------------------------------------------
    def _process_group(self, st: StreamState, items: list[tuple[RawRecord, Sample]], t0: float) -> None:
        x = torch.from_numpy(np.stack([s.x for _, s in items]).astype(np.float32, copy=False))
        ts = time.perf_counter()
        # a re-adapter that may process this batch again after a shift needs the state before it (not while
        # the monitor's cooldown rules out a confirmation on this batch and on the batches that hold it)
        pre_state = (st.adapter.state_dict() if st.readapter is not None and st.readapter.needs_pre_state
                     and (st.monitor is None
                          or st.batch_index + self._hold(st) > getattr(st.monitor, "cooldown_until", -1))
                     else None)
        out, scores, flags, keep = st.step(x)
        step_s = time.perf_counter() - ts

        first, last = items[0][0], items[-1][0]
        cur = _Batch(items=items, x=x, pre_state=pre_state, out=out, scores=scores, flags=flags, keep=keep,
                     batch_index=st.batch_index, t0=t0, step_s=step_s,
                     offsets=OffsetRange(topic=last.topic, partition=last.partition, first=first.offset,
                                         last=last.offset))
        stream_id = items[-1][1].stream_id
        events: list[Any] = []
        unknown_hits = None
        if st.novelty is not None:
            events.extend(st.novelty.update(out.features, flags, st.batch_index, logits=out.logits))
            unknown_hits = np.full(len(items), st.novelty.last_unknown_hits)
        # the monitor, the novelty detector and the adaptive thresholds see the batch as first processed:
        # that is the evidence a shift is confirmed on
        signals = {**batch_signals(scores, flags, out.entropy.numpy(), unknown_hits), **input_signals(x)}
        ev = st.monitor.update(signals, st.batch_index) if st.monitor is not None else None
        if ev is not None:
            events.append(ev)
            cur.shift = ev.alert_kind
            if st.readapter is not None:  # if the change point lies in this batch or a held one: re-process
                tr = time.perf_counter()
                evidence = self._reprocess(st, cur)
                if evidence is not None:
                    ev.evidence["onset_split"] = evidence
                    ev.evidence["readaptation"] = {"action": "onset_split"}
                cur.step_s += time.perf_counter() - tr
            for b in st.held + [cur]:  # states from before this shift's re-processing / restart: never reused
                b.pre_state = None
        # online scorer updates and the re-adapter's buffer from the batch's final outputs (after a
        # re-processing, the split ones), before a meta restart re-fits the scorer
        tl = time.perf_counter()
        accepted = torch.from_numpy(cur.keep)
        st.learn_scores(cur.out.features, cur.out.logits, accepted)
        if st.readapter is not None:
            st.readapter.observe(x[accepted], st.batch_index)
        cur.step_s += time.perf_counter() - tl
        st.held.append(cur)
        if ev is not None and st.readapter is not None:
            if st.readapter.restart:
                ev.evidence["readaptation"] = st.readapter.on_shift(st.adapter, st.scorer, st.monitor, ev)
            st.monitor.reset_reference()
        if st.burst is not None:  # on the reported flags
            burst = st.burst.update(float(np.mean(cur.flags)), st.batch_index)
            if burst is not None:
                events.append(burst)
        if cur.out.reset:
            events.append(GuardResetEvent(batch_index=st.batch_index, reason=str(cur.out.info.get("guard", "")),
                                          evidence={k: v for k, v in cur.out.info.items() if _jsonable(v)}))
        # alerts go out now; only predictions wait while their batch is held
        for a in st.policy.process(events, stream_id=stream_id, offsets=cur.offsets, batch_index=st.batch_index,
                                   signals=signals):
            self._emit_alert(a)
        st.batch_index += 1
        st.n_samples += len(items)
        self.samples_processed += len(items)
        cur.t_done = time.perf_counter()
        while len(st.held) > self._hold(st):
            self._emit(st, st.held.pop(0))

    def _hold(self, st: StreamState) -> int:
        """Batches whose outputs wait for the next ones (only useful with a re-adapter that can split)."""
        ok = st.readapter is not None and st.readapter.needs_pre_state
        return self.cfg.monitor.hold_batches if ok else 0

    def _reprocess(self, st: StreamState, cur: "_Batch") -> dict[str, Any] | None:
        """Look for the change point in the held batches and ``cur`` and, if found, step again from the state
        before the batch holding it, in two parts. The outputs of ``cur`` are replaced; a held batch, which
        the scorer memories have already learned, gets the new predictions and keeps its first scores and
        flags (scored again, its samples would match themselves in the memories) while its ``update_mask``
        is the new one; ``cur``'s ``info`` counts cover every sample stepped on again (they can exceed its
        size). Returns the alert evidence, or None (nothing changed)."""
        cands = st.held + [cur]
        start = next((i for i, b in enumerate(cands) if b.pre_state is not None), None)
        if start is None:
            return None
        group = cands[start:]
        redo = st.readapter.reprocess(st.adapter, [b.x for b in group], [b.pre_state for b in group],
                                      lambda part: st.step(part, feed=False))
        if redo is None:
            return None
        out, scores, flags, keep = redo.outputs
        evidence = dict(redo.evidence)
        first, onset_batch = evidence.pop("first_batch", 0), evidence.pop("onset_batch", 0)
        evidence.pop("n_batches", None)
        evidence["onset_batch"] = group[onset_batch].batch_index
        evidence["batches"] = [b.batch_index for b in group[first:]]
        at = 0
        for pos, b in enumerate(group[first:], start=first):
            sl = slice(at, at + len(b.items))
            info = dict(out.info if b is cur else b.out.info)
            info.pop("onset_index", None)
            if pos == onset_batch:
                info["onset_index"] = evidence["onset_index"]
            b.out = StepOutput(logits=out.logits[sl], features=out.features[sl], update_mask=out.update_mask[sl],
                               loss=out.loss, reset=out.reset if b is cur else b.out.reset, info=info)
            if b is cur:
                b.scores, b.flags, b.keep = scores[sl], flags[sl], keep[sl]
            at += len(b.items)
        return evidence

    def _prediction_docs(self, b: "_Batch") -> list[dict[str, Any]]:
        """The prediction records of a batch (id = f(topic, partition, offset))."""
        conf, pred_idx = b.out.logits.softmax(1).max(1)
        preds = [self.components.classes[i] for i in pred_idx.tolist()]
        entropy = b.out.entropy.tolist()
        return [{
            "id": deterministic_id("prediction", rec.topic, rec.partition, rec.offset),
            "topic": rec.topic, "partition": rec.partition, "offset": rec.offset,
            "stream_id": s.stream_id, "pred": preds[i], "confidence": round(c, 6),
            "ood_score": round(float(b.scores[i]), 6), "ood": bool(b.flags[i]),
            "entropy": round(float(entropy[i]), 6), "batch_index": b.batch_index, "event_time": s.event_time,
        } for i, ((rec, s), c) in enumerate(zip(b.items, conf.tolist()))]

    def _write_predictions(self, st: StreamState, docs: list[dict[str, Any]]) -> None:
        """Write prediction records; their offsets become done (skipped if delivered again) and committable."""
        psink = self.outputs.predictions
        for doc in docs:
            if psink is not None:
                psink.write(doc["stream_id"], doc)
            tp = (doc["topic"], doc["partition"])
            st.next_offsets[tp] = max(st.next_offsets.get(tp, -1), doc["offset"] + 1)
            self._pending_commit[tp] = max(self._pending_commit.get(tp, -1), doc["offset"] + 1)

    def _emit(self, st: StreamState, b: "_Batch") -> None:
        """Write a batch's predictions and run-log record; its offsets become committable."""
        out, scores, flags, items = b.out, b.scores, b.flags, b.items
        self.step_time_s += b.step_s
        docs = self._prediction_docs(b)
        self._write_predictions(st, docs)
        self._dirty.add(st.key)  # its checkpoint must stop carrying them as held
        preds = [d["pred"] for d in docs]
        entropy = out.entropy.numpy()
        if self.runlog is not None:
            rng = b.offsets
            self.runlog.append(BatchRecord(
                index=len(self.runlog.batches), stream_id=items[-1][1].stream_id, topic=rng.topic,
                partition=rng.partition, first_offset=rng.first, last_offset=rng.last,
                offsets=[r.offset for r, _ in items], preds=preds, labels=[s.label for _, s in items],
                ood_scores=np.asarray(scores, dtype=np.float64).tolist(), ood_flags=np.asarray(flags).tolist(),
                is_unknown=[s.is_unknown for _, s in items], domains=[s.domain for _, s in items],
                entropy=entropy.tolist(), updated=out.update_mask.tolist(), latency_s=time.perf_counter() - b.t0,
                step_s=b.step_s, shift=b.shift, reset=out.reset,
                info={k: v for k, v in out.info.items() if _jsonable(v)},
            ))

    def _release_held(self, older_than_s: float | None) -> None:
        """Write the held batches (those processed more than ``older_than_s`` seconds ago; None = all)."""
        now = time.perf_counter()
        for st in self.states.values():
            while st.held and (older_than_s is None or now - st.held[0].t_done > older_than_s):
                self._emit(st, st.held.pop(0))

    def _dead_letter_alert(self, bad: list[tuple[RawRecord, str]]) -> None:
        first, last = bad[0][0], bad[-1][0]
        alert = Alert.create(AlertKind.dead_letter, stream_id=f"{first.topic}:{first.partition}",
                             offsets=OffsetRange(topic=first.topic, partition=first.partition,
                                                 first=first.offset, last=last.offset),
                             severity=Severity.warning, message=f"{len(bad)} record(s) sent to the dead-letter topic",
                             evidence={"count": len(bad), "first_error": bad[0][1][:500]},
                             action="dead_lettered")
        self._emit_alert(alert)

    def _emit_alert(self, alert: Alert) -> None:
        doc = alert.model_dump(mode="json")
        for sink in self.outputs.alerts:
            sink.write(alert.stream_id, doc)
        if self.runlog is not None:
            self.runlog.alerts.append(doc)

    # -- flush, checkpoint, commit -------------------------------------------------------------
    def _finish_batch(self, *, force: bool) -> None:
        if force:  # end of the run or a revocation: nothing stays held
            self._release_held(None)
        if not self._pending_commit:
            return
        if not force and self._batches_since_ckpt < self.cfg.engine.checkpoint_every:
            return
        for st in self.states.values():  # never commit past a record whose outputs are still held
            for b in st.held:
                for r, _ in b.items:
                    tp = (r.topic, r.partition)
                    if tp in self._pending_commit:
                        self._pending_commit[tp] = min(self._pending_commit[tp], r.offset)
        for sink in self.outputs.all():
            sink.flush()
        if self.store is not None:
            for key in sorted(self._dirty):
                if key in self.states:
                    st = self.states[key]
                    state = st.state_dict()
                    # held predictions travel with the state that has adapted on their records: a restart
                    # writes them instead of adapting on those records a second time
                    state["held_predictions"] = [d for b in st.held for d in self._prediction_docs(b)]
                    self.store.save(key, state)
        self._dirty.clear()
        self.source.commit(dict(self._pending_commit))
        self._pending_commit.clear()
        self._batches_since_ckpt = 0


def _jsonable(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool, type(None)))


def iter_chunks(items: Iterable[Any], n: int) -> Iterable[list[Any]]:
    buf: list[Any] = []
    for it in items:
        buf.append(it)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf
