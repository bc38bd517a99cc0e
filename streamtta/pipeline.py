"""One stream, tensors in, results out: adapt -> score -> monitor -> re-adapt -> alerts.

:class:`Pipeline` is the per-stream unit. The Kafka engine (:mod:`streamtta.engine`) keeps one per state
key and the offline ``simulate`` / ``bench`` jobs drive the same pipelines through the same engine, so
online and offline results agree. It needs no broker:

>>> import torch
>>> from torch import nn
>>> import streamtta
>>> torch.manual_seed(0) and None
>>> net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).eval()
>>> pipe = streamtta.Pipeline(net, adapter="bn", scorer="energy")
>>> pipe.fit_source(torch.randn(200, 8))            # no labels: calibrates on pseudo-labels
Pipeline(adapter='bn', scorer='energy', classes=3, calibrated=True)
>>> res = pipe.process(torch.randn(32, 8) + 3.0)
>>> res.predictions.shape, res.ood_scores.shape, res.ood_flags.dtype
((32,), (32,), dtype('bool'))
>>> pipe.process(torch.randn(1, 8)).predictions.shape   # batch size 1 works
(1,)

A user's model has no source data of its own: :meth:`Pipeline.calibrate` (or ``Pipeline(...,
calibration=...)``) fits it on the user's clean data -- arrays, a data file or a calibration file written by
``streamtta calibrate`` (:mod:`streamtta.calibration`); uncalibrated, a pipeline flags nothing as OOD.

Per batch (:meth:`Pipeline.process`): the adapter steps with a *gate* that scores the batch and keeps
OOD-flagged samples out of every update; the OOD scorer gives scores (higher = more OOD) and flags; the
novel-class detector, the shift monitor (river detectors on batch signals) and the OOD-burst rule watch
the stream; on a confirmed shift the re-adapter (:mod:`streamtta.readapt`) re-processes the batch that
holds the change point; the alert policy turns events into :class:`~streamtta.alerts.Alert` objects; the
scorer memories learn from the batch's final outputs.

With re-adaptation and ``monitor.hold_batches > 0`` (the engine's default) a result may still be revised
by the next batch; :meth:`Pipeline.release` hands out the results that are final. A pipeline built
directly (``Pipeline(model, ...)``) holds nothing unless ``hold_batches`` is given. Steps run on
``engine.device``; outputs come back to the CPU to be scored: results and states are CPU data on any device.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any

import numpy as np
import torch

from streamtta.alerts import GuardResetEvent, OffsetRange
from streamtta.blueprint import Blueprint
from streamtta.config import Config, load_config
from streamtta.detectors.ood.scorer import gated_scores
from streamtta.detectors.shift import batch_signals, input_signals
from streamtta.devices import move_tensors, output_to_cpu, to_cpu, to_device
from streamtta.faults import point
from streamtta.results import BatchResult
from streamtta.types import StepOutput


#: final results kept for :meth:`Pipeline.release` at most (older ones are dropped if never released)
READY_MAX = 1024


class Pipeline:
    """Adapt, score, monitor, re-adapt and alert on one stream of batches.

    Parameters
    ----------
    model
        An ``nn.Module`` (also a TorchScript module), or a built-in name / checkpoint or TorchScript path /
        ``'module:factory'`` (see :func:`streamtta.models.registry.load_model`).
    adapter, scorer
        Adapter spec (``"default"``, ``"bn"``, ``"cb-stats+tent+conf-drop"``, ...) and OOD scorer name;
        None takes them from ``config`` (default ``"default"``).
    config
        A :class:`~streamtta.config.Config` (or a dict of its sections) for everything else: gate scorer,
        monitor, re-adaptation, alerts, seed, batch size used when fitting on source data.
    classes, num_classes
        The model's class labels (default ``0..C-1``); ``C`` from the model's metadata, else from a probe
        forward on the first data the pipeline sees.
    hold_batches
        Overrides ``monitor.hold_batches`` (default 0 here: every result is final at once).
    state_dict
        Weights loaded into a model given as a spec (``'module:factory'``), as ``model.state_dict``.
    calibration, labels
        Clean source data to fit on at once (:meth:`calibrate`): arrays ``x`` or ``(x, y)``, a data file
        (``.npz`` with ``x`` and optional ``y``, ``.npy``, ``.csv``, ``.parquet``; ``labels`` names the
        label column or key) or a calibration file written by ``streamtta calibrate``.
    """

    #: what the pipeline was calibrated on (:class:`~streamtta.calibration.CalibrationData`), if anything
    calibration: Any = None

    def __init__(self, model: Any, adapter: str | None = None, scorer: str | None = None, *,
                 config: Config | dict[str, Any] | None = None, classes: list[int] | None = None,
                 num_classes: int | None = None, hold_batches: int | None = 0, meta: Any = None,
                 calibration: Any = None, labels: str | None = None, state_dict: Any = None) -> None:
        cfg = config.model_copy(deep=True) if isinstance(config, Config) else load_config(overrides=config, env=False)
        cfg.adapter.spec = adapter if adapter is not None else cfg.adapter.spec
        cfg.scorer.name = scorer if scorer is not None else cfg.scorer.name
        if hold_batches is not None:
            cfg.monitor.hold_batches = hold_batches
        if num_classes is not None:
            cfg.model.num_classes = num_classes
        if state_dict is not None:
            cfg.model.state_dict = str(state_dict)
        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            from streamtta.models.registry import load_model

            model, meta = load_model(str(model) if not isinstance(model, bytes) else model.decode(),
                                     state_dict=cfg.model.state_dict)
        self._init(Blueprint(cfg, model, meta, classes=classes))
        if calibration is not None:
            self.calibrate(calibration, labels=labels)

    def _init(self, blueprint: Blueprint) -> None:
        self.blueprint = blueprint
        self.cfg = blueprint.cfg
        self.batch_index = 0
        self.n_samples = 0
        self._held: list[BatchResult] = []
        self._ready: deque[BatchResult] = deque(maxlen=READY_MAX)
        self._parts = blueprint.new_parts() if blueprint.classes else None

    @classmethod
    def from_config(cls, cfg: Config | dict[str, Any], model: Any = None, meta: Any = None) -> "Pipeline":
        """A pipeline with every option from ``cfg`` (a Config or a dict of its sections; ``model=None``
        loads ``cfg.model.source``)."""
        cfg = cfg if isinstance(cfg, Config) else load_config(overrides=cfg, env=False)
        if model is None:
            from streamtta.models.registry import load_model

            if cfg.model.threads:
                torch.set_num_threads(cfg.model.threads)
            model, meta = load_model(cfg.model.source or "digits-resnet", state_dict=cfg.model.state_dict)
        self = cls.__new__(cls)
        self._init(Blueprint(cfg, model, meta))
        return self

    def spawn(self) -> "Pipeline":
        """A new pipeline for another stream: same model and source fit, fresh per-stream state."""
        other = type(self).__new__(type(self))
        other._init(self.blueprint)
        return other

    def __repr__(self) -> str:
        b = self.blueprint
        return (f"Pipeline(adapter={b.spec!r}, scorer={self.cfg.scorer.name!r}, "
                f"classes={b.num_classes}, calibrated={b.calibrated})")

    # -- set-up ---------------------------------------------------------------------------------
    @property
    def classes(self) -> list[int]:
        return self.blueprint.classes

    @property
    def calibrated(self) -> bool:
        """True once the OOD scorer has been fitted on source data (else: no OOD flags)."""
        return self.blueprint.calibrated

    @property
    def adapter(self) -> Any:
        return self._require().adapter

    @property
    def parts(self) -> Any:
        """The per-stream components (adapter, scorer, gate scorer, monitor, policy, readapter, ...)."""
        return self._require()

    def _require(self) -> Any:
        if self._parts is None:
            raise RuntimeError("the number of classes is not known yet: call fit_source() or process() first")
        return self._parts

    @staticmethod
    def _input_error(x: torch.Tensor, e: Exception) -> str:
        return (f"the model cannot take input of shape {tuple(x.shape[1:])}: {str(e).splitlines()[0][:200]} "
                f"(a label column left among the features? name it with labels= / --labels)")

    def _probe(self, x: torch.Tensor) -> None:
        """Learn the number of classes from one forward pass when nobody said it."""
        if self.blueprint.classes:
            return
        with torch.no_grad():
            try:
                out = self.blueprint.model(to_device(x[: max(2, min(len(x), 8))], self.blueprint.device))
            except RuntimeError as e:
                raise ValueError(self._input_error(x, e)) from None
        out = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise ValueError(f"cannot infer the number of classes: the model returned {type(out).__name__} "
                             f"of shape {getattr(out, 'shape', None)}; pass num_classes=")
        self.blueprint.classes = list(range(int(out.shape[1])))
        self._parts = self.blueprint.new_parts()

    def fit_source(self, x: Any = None, y: Any = None, *, holdout: Any = None) -> "Pipeline":
        """Fit on clean source data: scorer memories and thresholds, novel-class detector and the
        adapter's source references (class prior, source-fallback reference). ``x=None`` uses a built-in
        model's own source data; ``y=None`` calibrates without labels. Resets this pipeline's stream state."""
        if x is not None:
            x = torch.as_tensor(np.asarray(x, dtype=np.float32))
            self._probe(x)
        self.blueprint.fit_source(x, y, holdout=holdout)
        self._init(self.blueprint)
        return self

    def calibrate(self, data: Any, y: Any = None, *, labels: str | None = None) -> "Pipeline":
        """Fit on the user's clean source data (:meth:`fit_source`) and remember what they were.

        ``data`` is ``x`` (with ``y`` or not), ``(x, y)``, a data file (``labels`` names the label column /
        key) or a calibration file, which must have been made for this model's weights (else
        :class:`~streamtta.calibration.CalibrationError`). Without labels the calibration is unsupervised."""
        from streamtta.calibration import CalibrationData, CalibrationError, as_data, load_any

        if isinstance(data, CalibrationData):
            d = data
        elif isinstance(data, (str, bytes)) or hasattr(data, "__fspath__"):
            d = load_any(data.decode() if isinstance(data, bytes) else data, self.blueprint.model, labels)
        elif isinstance(data, tuple) and len(data) == 2 and y is None:
            d = as_data(*data)
        else:
            d = as_data(data, y)
        x = torch.from_numpy(d.x)
        try:
            self._probe(x)
            with torch.no_grad():
                self.blueprint.model(to_device(x[:2], self.blueprint.device))
        except (ValueError, RuntimeError) as e:
            msg = str(e) if isinstance(e, ValueError) else self._input_error(x, e)
            raise CalibrationError(f"{d.source}: {msg}") from None
        foreign = sorted(set(np.unique(d.y).tolist()) - set(self.classes)) if d.y is not None else []
        if foreign:
            raise CalibrationError(f"{d.source}: labels {foreign} are not classes of the model "
                                   f"({self.classes[0]}..{self.classes[-1]})")
        self.fit_source(d.x, d.y)
        self.calibration = d
        return self

    # -- one batch ------------------------------------------------------------------------------
    def score(self, features: torch.Tensor, logits: torch.Tensor, feed: bool = True) -> tuple[Any, Any, Any]:
        """``(scores, ood flags, keep)``: the reporting scorer's scores and flags, and which samples may
        feed adaptation (flagged by neither the scorer nor the gate scorer). ``feed=False`` for a batch
        scored again: adaptive thresholds do not see its scores twice. Uncalibrated: ``1 - max softmax``
        scores and no flags."""
        p = self._require()
        return gated_scores(p.scorer, p.gate_scorer, self.blueprint.calibrated, features, logits, feed)

    def step(self, x: torch.Tensor, feed: bool = True) -> tuple[StepOutput, np.ndarray, np.ndarray, np.ndarray]:
        """One adapter step gated by the scorers: ``(output, scores, ood flags, keep)``; the step runs on the
        model's device, the output is on the CPU."""
        scored: dict[str, Any] = {}
        point("step")

        def gate(logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
            point("score")
            lc, fc = logits.cpu(), features.cpu()  # no copy on the CPU
            scored["v"] = self.score(fc, lc, feed)
            scored["gated"] = (logits, features, lc, fc)
            return torch.from_numpy(scored["v"][2])

        out: StepOutput = self._require().adapter.step(to_device(x, self.blueprint.device), gate=gate)
        if "v" not in scored:  # gradient-free adapters need no gate; score afterwards
            out = output_to_cpu(out)
            gate(out.logits, out.features)
        else:
            out = output_to_cpu(out, scored["gated"])
        scores, flags, keep = scored["v"]
        return out, np.asarray(scores, dtype=np.float64), flags, keep

    def learn_scores(self, features: torch.Tensor, logits: torch.Tensor, keep: Any) -> None:
        """Online scorer updates (prototype memory, ...) from the samples that were kept."""
        p = self._require()
        if not self.blueprint.calibrated:
            return
        keep = torch.as_tensor(np.asarray(keep, dtype=bool))
        p.scorer.partial_fit(features, logits, keep)
        if p.gate_scorer is not None:
            p.gate_scorer.partial_fit(features, logits, keep)

    def process(self, x: Any, *, stream_id: str = "", offsets: OffsetRange | None = None,
                tag: Any = None, received_at: float | None = None) -> BatchResult:
        """Process one batch (a tensor or array of samples; one sample is a batch of 1 when its shape
        is the model's input shape). Alerts go out with the result; its predictions are final once
        :meth:`release` hands it out (at once unless ``hold_batches``)."""
        t0 = time.perf_counter()
        x = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not isinstance(x, torch.Tensor) else x.float().cpu()
        meta = self.blueprint.meta
        if meta is not None and x.dim() == len(meta.input_shape):
            x = x.unsqueeze(0)
        self._probe(x)
        p = self._require()
        ra = p.readapter
        pre_state = ra.pre_state(p.adapter, self.batch_index, p.monitor) if ra is not None else None
        out, scores, flags, keep = self.step(x)
        cur = BatchResult(batch_index=self.batch_index, x=x, out=out, ood_scores=scores, ood_flags=flags, keep=keep,
                          classes=np.asarray(self.classes), pre_state=pre_state, tag=tag,
                          received_at=t0 if received_at is None else received_at)
        events: list[Any] = []
        unknown_hits = None
        if p.novelty is not None and self.blueprint.calibrated:
            events.extend(p.novelty.update(out.features, flags, self.batch_index, logits=out.logits))
            unknown_hits = np.full(len(x), p.novelty.last_unknown_hits)
        # the monitor, the novelty detector and the adaptive thresholds see the batch as first processed:
        # that is the evidence a shift is confirmed on
        finite_x = x[torch.from_numpy(~cur.nonfinite)] if cur.nonfinite.any() and not cur.nonfinite.all() else x
        signals = {**batch_signals(scores, flags, out.entropy.numpy(), unknown_hits), **input_signals(finite_x)}
        ev = p.monitor.update(signals, self.batch_index) if p.monitor is not None else None
        if ev is not None:
            events.append(ev)
            cur.shift = ev.alert_kind
            if ra is not None:  # the change point in this batch or a held one: re-process it
                evidence = ra.reprocess_held(p.adapter, self._held + [cur], lambda part: self.step(part, feed=False))
                if evidence is not None:
                    ev.evidence["onset_split"] = evidence
                    ev.evidence["readaptation"] = {"action": "onset_split"}
        # scorer memories and the re-adapter's buffer learn from the batch's final outputs, before a
        # meta restart re-fits the scorer
        self.learn_scores(cur.features, cur.logits, cur.keep)
        if ra is not None:
            ra.observe(x[torch.from_numpy(cur.keep)], self.batch_index)
            if ev is not None:
                if ra.restart:
                    ev.evidence["readaptation"] = ra.on_shift(p.adapter, p.scorer, p.monitor, ev)
                p.monitor.reset_reference()
        if p.burst is not None:  # on the reported flags
            burst = p.burst.update(float(np.mean(cur.ood_flags)), self.batch_index)
            if burst is not None:
                events.append(burst)
        if cur.out.reset:
            events.append(GuardResetEvent(batch_index=self.batch_index, reason=str(cur.out.info.get("guard", "")),
                                          evidence=cur.scalar_info))
        if offsets is None:
            offsets = OffsetRange(topic="", partition=0, first=self.n_samples, last=self.n_samples + len(x) - 1)
        cur.alerts = p.policy.process(events, stream_id=stream_id, offsets=offsets, batch_index=self.batch_index,
                                      signals=signals)
        self.batch_index += 1
        self.n_samples += len(x)
        cur.step_s = time.perf_counter() - t0
        cur.done_at = time.perf_counter()
        self._held.append(cur)
        while len(self._held) > self.hold:  # final now: no re-processing can reach it any more
            self._ready.append(self._finalise(self._held.pop(0)))
        return cur

    # -- results ----------------------------------------------------------------------------------
    @property
    def hold(self) -> int:
        """How many results are held back for a possible re-processing."""
        ra = self._parts.readapter if self._parts is not None else None
        return ra.hold if ra is not None else 0

    @property
    def held(self) -> list[BatchResult]:
        """Results not final yet (oldest first): at most ``hold``."""
        return list(self._held)

    @staticmethod
    def _finalise(b: BatchResult) -> BatchResult:
        b.pre_state = None  # no re-processing can need the adapter state before it any more
        return b

    def release(self, *, older_than_s: float | None = None, everything: bool = False) -> list[BatchResult]:
        """Hand out the results that became final since the last call (beyond the hold window), plus held
        ones older than ``older_than_s`` seconds, or all held ones (``everything``). Final results that are
        never released are kept for the last ``READY_MAX`` batches only (memory stays bounded)."""
        now = time.perf_counter()
        while self._held and (everything or (older_than_s is not None and now - self._held[0].done_at > older_than_s)):
            self._ready.append(self._finalise(self._held.pop(0)))
        out = list(self._ready)
        self._ready.clear()
        return out

    # -- state --------------------------------------------------------------------------------
    _PARTS = ("adapter", "scorer", "monitor", "policy", "readapter", "burst", "novelty", "gate_scorer")

    def state_dict(self) -> dict[str, Any]:
        """Everything this stream has learned (CPU tensors, numbers, strings); held results are not part of it."""
        p = self._require()
        st: dict[str, Any] = {name: (to_cpu(getattr(p, name).state_dict()) if getattr(p, name) is not None else None)
                              for name in self._PARTS}
        st.update(batch_index=self.batch_index, n_samples=self.n_samples)
        return st

    def load_state_dict(self, st: dict[str, Any]) -> None:
        p = self._require()
        p.adapter.load_state_dict(move_tensors(st["adapter"], self.blueprint.device))  # a CPU state on the device
        p.scorer.load_state_dict(st["scorer"])
        p.policy.load_state_dict(st["policy"])
        for name in ("monitor", "readapter", "burst", "novelty", "gate_scorer"):
            if getattr(p, name) is not None and st.get(name) is not None:
                getattr(p, name).load_state_dict(st[name])
        self.batch_index = int(st["batch_index"])
        self.n_samples = int(st["n_samples"])
        self._held, self._ready = [], deque(maxlen=READY_MAX)
