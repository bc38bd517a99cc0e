"""Many streams, one forward per batch: :class:`GroupedPipeline`.

With ``engine.state_key = "stream_id"`` and ``grouped.enabled = true`` the engine keeps one grouped pipeline
per partition instead of one :class:`~streamtta.pipeline.Pipeline` per stream id. A batch holding samples of
many stream ids (sensors, machines, cameras) goes through the model once:

* **adapt**: every stream id has its own row of statistics in the first ``grouped.layers`` BatchNorm layers
  (:class:`~streamtta.adapters.grouped.GroupedStats`; the later layers keep the source statistics): a new id
  starts at the source statistics, and each of its samples is normalised with its own stream's statistics,
  updated from the samples it has sent so far (an exponential moving average per stream, ``grouped.alpha``
  per sample, ``grouped.prior`` samples of weight on the source for a new stream). Samples the OOD scorer
  (or the gate scorer) flags, and samples with NaN/Inf, never move a stream's statistics;
* **score**: one OOD scorer per partition scores every sample (higher = more OOD) and flags unknowns; its
  memories learn from the kept samples of all the partition's streams;
* **monitor**: every stream id has two shift detectors, river's Page-Hinkley vectorised over streams
  (:class:`~streamtta.detectors.shift.streams.StreamPageHinkley`): one on how far each sample's first
  BatchNorm input lies from its stream's statistics (``surprise``, :class:`~streamtta.adapters.grouped.GroupedStats`),
  one on its OOD flags. A rise of the first raises a ``covariate_shift`` alert for that stream id and
  **re-adapts** it: the stream's statistics forget how many samples they rest on, so the next samples move
  them as fast as a new stream's. A rise of the second raises a ``semantic_shift`` alert. At most one alert
  of a kind per ``grouped.cooldown_samples`` samples of a stream;
* at most ``grouped.max_streams`` ids are kept per partition; the least recently seen one beyond that gives
  its row to the newcomer and starts again from the source statistics if it comes back (a batch holding
  more ids than that goes through in consecutive parts of at most ``max_streams`` ids each, so no two ids
  of one forward share a row).

What the per-id pipelines have and this mode has not: gradient adapters (``adapter.spec`` is not used),
batch-level shift monitors, held predictions and re-processing of a batch (every result is final at once).

>>> import torch
>>> from torch import nn
>>> import streamtta
>>> from streamtta.grouped import GroupedPipeline
>>> torch.manual_seed(0) and None
>>> net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).eval()
>>> pipe = streamtta.Pipeline(net, num_classes=3)
>>> group = GroupedPipeline.from_pipeline(pipe)
>>> res = group.process(torch.randn(6, 8), stream_ids=["a", "b", "a", "c", "b", "a"])
>>> res.predictions.shape, sorted(group.stream_ids)
((6,), ['a', 'b', 'c'])
"""
from __future__ import annotations

import copy
import time
from collections import OrderedDict, deque
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np
import torch

from streamtta.adapters.grouped import GroupedStats
from streamtta.adapters.masks import sanitize_batch
from streamtta.alerts import Alert, AlertKind, OffsetRange, Severity
from streamtta.detectors.ood.scorer import gated_scores
from streamtta.detectors.shift.streams import StreamPageHinkley
from streamtta.devices import to_cpu, to_device
from streamtta.pipeline import READY_MAX, Pipeline
from streamtta.results import BatchResult
from streamtta.types import StepOutput

__all__ = ["GroupedPipeline"]

#: the per-stream signals watched, in order: input surprise (covariate) and OOD flags (semantic)
_SIGNALS = ("input", "ood")


class GroupedPipeline:
    """The streams of one partition through one model (see the module docstring). Built from a fitted
    :class:`~streamtta.pipeline.Pipeline` (:meth:`from_pipeline`), whose model, scorer calibration and
    configuration (the ``grouped`` section) it shares."""

    def __init__(self, template: Pipeline) -> None:
        if not template.blueprint.classes:
            raise ValueError("the number of classes is not known yet: fit or calibrate the pipeline first")
        self.template = template
        self.blueprint, self.cfg = template.blueprint, template.cfg
        self.calibration = template.calibration  # the checkpoint fingerprint covers it
        g = self.cfg.grouped
        adapter = template.adapter
        hook = getattr(adapter, "_hook", None)
        self.stats = GroupedStats(self.blueprint.model, alpha=g.alpha, prior=g.prior, layers=g.layers,
                                  source_weight=g.source_weight,
                                  feature_layer=getattr(adapter, "feature_layer", None),
                                  feature_hook=getattr(hook, "which", "input"))
        parts = self.blueprint.new_parts()
        self.scorer, self.gate_scorer = parts.scorer, parts.gate_scorer
        #: what the engine's observers read (no re-adapter here)
        self.parts = SimpleNamespace(adapter=None, scorer=self.scorer, gate_scorer=self.gate_scorer, readapter=None)
        opts = {"input": g.detector, "ood": g.ood_detector} if self.cfg.monitor.enabled else {}
        #: per-stream detectors by signal: ``input`` (surprise) and ``ood`` (flags); a null option: none
        self.detectors = {name: StreamPageHinkley(mode="up", **o) for name, o in opts.items() if o is not None}
        self._ids: OrderedDict[str, int] = OrderedDict()  # least recently seen first
        self._free: list[int] = []
        self._count = np.zeros(0, np.int64)  # samples per row since its stream took it
        self._alerted = np.zeros((0, len(_SIGNALS)), np.int64)  # _count at the row's last alert per signal
        self.batch_index = self.n_samples = 0
        self.evicted = 0
        self._ready: deque[BatchResult] = deque(maxlen=READY_MAX)

    @classmethod
    def from_pipeline(cls, template: Pipeline) -> "GroupedPipeline":
        return cls(template)

    def spawn(self) -> "GroupedPipeline":
        """A new grouped pipeline for another partition: same model and calibration, no stream yet."""
        return type(self)(self.template)

    def __repr__(self) -> str:
        return (f"GroupedPipeline(streams={len(self._ids)}, alpha={self.stats.alpha}, prior={self.stats.prior}, "
                f"scorer={self.cfg.scorer.name!r}, calibrated={self.blueprint.calibrated})")

    # -- streams ----------------------------------------------------------------------------------
    @property
    def classes(self) -> list[int]:
        return self.blueprint.classes

    @property
    def calibrated(self) -> bool:
        return self.blueprint.calibrated

    @property
    def stream_ids(self) -> list[str]:
        """The stream ids held, least recently seen first."""
        return list(self._ids)

    def _grow(self, rows: int) -> None:
        self.stats.ensure(rows)
        for det in self.detectors.values():
            det.ensure(rows)
        extra = rows - len(self._count)
        if extra > 0:
            self._count = np.concatenate([self._count, np.zeros(extra, np.int64)])
            self._alerted = np.concatenate([self._alerted, np.full((extra, len(_SIGNALS)), -1, np.int64)])

    def _rows(self, stream_ids: Sequence[str]) -> np.ndarray:
        """The row of every sample's stream id (new ids get a fresh row: a free one, a new one, or the least
        recently seen id's beyond ``grouped.max_streams``), all fresh rows reset at once."""
        out = np.empty(len(stream_ids), np.int64)
        fresh: list[int] = []
        for i, sid in enumerate(stream_ids):
            sid = str(sid)
            row = self._ids.get(sid)
            if row is not None:
                self._ids.move_to_end(sid)
            else:
                row = self._new_row()
                self._ids[sid] = row
                fresh.append(row)
            out[i] = row
        if fresh:
            self._reset(np.asarray(fresh, np.int64))
        return out

    def _new_row(self) -> int:
        if len(self._ids) >= self.cfg.grouped.max_streams:
            _, row = self._ids.popitem(last=False)
            self.evicted += 1
            return row
        if not self._free:
            have = self.stats.rows
            self._grow(min(max(have + 1, 2 * have, 16), self.cfg.grouped.max_streams))
            self._free.extend(range(self.stats.rows - 1, have - 1, -1))
        return self._free.pop()

    def _reset(self, rows: np.ndarray) -> None:
        self.stats.reset_rows(torch.from_numpy(rows))
        for det in self.detectors.values():
            det.reset_rows(rows)
        self._count[rows], self._alerted[rows] = 0, -1

    # -- one batch --------------------------------------------------------------------------------
    def _score(self, feats: torch.Tensor, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scores, flags, keep = gated_scores(self.scorer, self.gate_scorer, self.blueprint.calibrated, feats, logits)
        return (np.asarray(scores, dtype=np.float64), np.asarray(flags, dtype=bool),
                np.array(keep, dtype=bool))

    def process(self, x: Any, *, stream_ids: Sequence[str], stream_id: str = "", offsets: OffsetRange | None = None,
                tag: Any = None, received_at: float | None = None) -> BatchResult:
        """One batch of samples of the streams ``stream_ids`` (one id per sample). The result is final at
        once (:meth:`release` hands it out); its alerts are the per-stream shift alerts it raised.
        ``tag``: the engine's ``(record, sample)`` pairs, whose offsets the alerts carry."""
        t0 = time.perf_counter()
        x = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not isinstance(x, torch.Tensor) else x.float().cpu()
        meta = self.blueprint.meta
        if meta is not None and x.dim() == len(meta.input_shape):
            x = x.unsqueeze(0)
        if len(stream_ids) != len(x):
            raise ValueError(f"{len(x)} samples but {len(stream_ids)} stream ids")
        xs, finite = sanitize_batch(x)
        ok = np.ones(len(x), bool) if finite is None else finite.numpy()
        parts = [self._span(xs[a:b], ok[a:b], list(stream_ids[a:b]), a, tag, offsets)
                 for a, b in self._spans(stream_ids)]
        logits, feats = torch.cat([q[0] for q in parts]), torch.cat([q[1] for q in parts])
        scores, flags, keep = (np.concatenate([q[k] for q in parts]) for k in (2, 3, 4))
        out = StepOutput(logits=logits, features=feats, update_mask=torch.zeros(len(x), dtype=torch.bool),
                         info={"streams": len({str(s) for s in stream_ids})})
        cur = BatchResult(batch_index=self.batch_index, x=x, out=out, ood_scores=scores, ood_flags=flags, keep=keep,
                          classes=np.asarray(self.classes), tag=tag,
                          received_at=t0 if received_at is None else received_at)
        cur.alerts = [a for q in parts for a in q[5]]
        if cur.alerts:
            cur.shift = cur.alerts[0].kind.value
        self.batch_index += 1
        self.n_samples += len(x)
        cur.step_s = time.perf_counter() - t0
        cur.done_at = time.perf_counter()
        self._ready.append(cur)
        return cur

    def _spans(self, stream_ids: Sequence[str]) -> list[tuple[int, int]]:
        """Consecutive ``(start, stop)`` spans of the batch holding at most ``grouped.max_streams`` distinct
        ids each (one span unless the batch holds more ids than a partition keeps): within a span no id
        can take the row of another id of the same span."""
        cap, n = self.cfg.grouped.max_streams, len(stream_ids)
        if n <= cap:
            return [(0, n)]
        spans, start, held = [], 0, set()
        for i, sid in enumerate(map(str, stream_ids)):
            if sid not in held and len(held) >= cap:
                spans.append((start, i))
                start, held = i, set()
            held.add(sid)
        return spans + [(start, n)]

    def _span(self, xs: torch.Tensor, ok: np.ndarray, stream_ids: list[str], base: int, tag: Any,
              offsets: OffsetRange | None) -> tuple:
        """Forward, commit and watch the samples ``base ..`` of a batch: ``(logits, features, scores, flags,
        keep, alerts)``."""
        rows = self._rows(stream_ids)
        logits, feats = self.stats.forward(to_device(xs, self.blueprint.device), torch.from_numpy(rows))
        logits, feats = logits.cpu(), feats.cpu()
        surprise = self.stats.surprise.cpu().numpy().astype(np.float64)
        scores, flags, keep = self._score(feats, logits)
        keep &= ok
        self.stats.commit(torch.from_numpy(keep))
        if self.blueprint.calibrated:
            kt = torch.from_numpy(keep)
            self.scorer.partial_fit(feats, logits, kt)
            if self.gate_scorer is not None:
                self.gate_scorer.partial_fit(feats, logits, kt)
        np.add.at(self._count, rows, 1)
        surprise[~ok] = np.nan  # detectors skip them
        alerts = self._watch(rows, {"input": surprise, "ood": (flags | ~ok).astype(np.float64)}, stream_ids,
                             tag, offsets, base)
        return logits, feats, scores, flags, keep, alerts

    def _watch(self, rows: np.ndarray, signals: dict[str, np.ndarray], stream_ids: Sequence[str], tag: Any,
               offsets: OffsetRange | None, base: int = 0) -> list[Alert]:
        """Feed the per-stream detectors; alerts (and, for the input signal, a restart of the stream's
        statistics) for the changes they confirm."""
        alerts: list[Alert] = []
        cooldown = self.cfg.grouped.cooldown_samples
        for j, name in enumerate(_SIGNALS):
            det = self.detectors.get(name)
            if det is None:
                continue
            for i in np.flatnonzero(det.update(rows, signals[name])):
                row = int(rows[i])
                if name == "input":
                    self.stats.restart_rows(torch.tensor([row]))
                if self._alerted[row, j] >= 0 and self._count[row] - self._alerted[row, j] < cooldown:
                    continue
                self._alerted[row, j] = self._count[row]
                alerts.append(self._alert(name, str(stream_ids[i]), base + int(i), row, tag, offsets))
        return alerts

    def _alert(self, signal: str, sid: str, i: int, row: int, tag: Any, offsets: OffsetRange | None) -> Alert:
        if tag is not None:
            rec = tag[i][0]
            where = OffsetRange(topic=rec.topic, partition=rec.partition, first=rec.offset, last=rec.offset)
        elif offsets is not None:
            where = offsets
        else:
            where = OffsetRange(topic="", partition=0, first=self.n_samples + i, last=self.n_samples + i)
        if signal == "input":
            kind, action = AlertKind.covariate_shift, "stream_statistics_restarted"
            what = ("its inputs moved away from its normalisation statistics; they re-adapt from this sample "
                    "on")
        else:
            kind, action = AlertKind.semantic_shift, "alerted"
            what = "its rate of OOD-flagged samples rose"
        return Alert.create(kind, stream_id=sid, offsets=where, severity=Severity.warning,
                            message=f"stream {sid}: {what} (Page-Hinkley per stream)",
                            evidence={"detector": "page-hinkley", "signal": signal,
                                      "stream_samples": int(self._count[row])}, action=action)

    # -- results ----------------------------------------------------------------------------------
    hold = 0

    @property
    def held(self) -> list[BatchResult]:
        """Nothing is held: every result is final at once."""
        return []

    def release(self, *, older_than_s: float | None = None, everything: bool = False) -> list[BatchResult]:
        """The results processed since the last call (the last ``READY_MAX`` batches at most)."""
        out = list(self._ready)
        self._ready.clear()
        return out

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Every stream's statistics and detector, the scorer memories and the id table (plain data)."""
        n = self.stats.rows
        return {"kind": "grouped", "ids": [[sid, row] for sid, row in self._ids.items()], "free": list(self._free),
                "stats": self.stats.state_dict(n), "count": torch.from_numpy(self._count.copy()),
                "alerted": torch.from_numpy(self._alerted.copy()),
                "detectors": {name: det.state_dict() for name, det in self.detectors.items()},
                "scorer": to_cpu(self.scorer.state_dict()),
                "gate_scorer": to_cpu(self.gate_scorer.state_dict()) if self.gate_scorer is not None else None,
                "batch_index": self.batch_index, "n_samples": self.n_samples}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        if st.get("kind") != "grouped":
            raise ValueError("this state was saved by a per-stream pipeline, not a grouped one (grouped.enabled "
                             "changed since)")
        n = int(torch.as_tensor(st["stats"]["seen"]).shape[0])
        ids = [(str(sid), int(row)) for sid, row in st["ids"]]
        free = [int(r) for r in st["free"]]
        if any(not 0 <= r < n for _, r in ids) or any(not 0 <= r < n for r in free):
            raise ValueError(f"a stream row is outside the {n} rows of the statistics")
        if len({sid for sid, _ in ids}) != len(ids) or sorted([r for _, r in ids] + free) != list(range(n)):
            raise ValueError(f"the id table and the free rows do not share the {n} rows out one each (a row held "
                             f"twice, or one lost)")
        count = np.asarray(st["count"], dtype=np.int64).copy()
        alerted = np.asarray(st["alerted"], dtype=np.int64).copy()
        if count.shape != (n,) or alerted.shape != (n, len(_SIGNALS)):
            raise ValueError(f"per-stream counters of shape {count.shape} for {n} rows of statistics")
        saved = st.get("detectors") or {}
        if set(saved) != set(self.detectors):
            raise ValueError(f"the state has per-stream detectors {sorted(saved)}, this configuration "
                             f"{sorted(self.detectors)}")
        detectors = {name: copy.deepcopy(det) for name, det in self.detectors.items()}  # a refused state: no change
        for name, det in detectors.items():
            det.load_state_dict(saved[name])
            det.ensure(n)
        self.stats.load_state_dict(st["stats"])
        self.detectors = detectors
        self._ids = OrderedDict(ids)
        self._free = free
        self._count, self._alerted = count, alerted
        self.scorer.load_state_dict(st["scorer"])
        if self.gate_scorer is not None and st.get("gate_scorer") is not None:
            self.gate_scorer.load_state_dict(st["gate_scorer"])
        self.batch_index, self.n_samples = int(st["batch_index"]), int(st["n_samples"])
        self._ready = deque(maxlen=READY_MAX)
