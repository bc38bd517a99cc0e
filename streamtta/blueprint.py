"""What every stream's pipeline is built from: the model, the configuration and the source fit.

A :class:`Blueprint` holds what all streams share -- the (frozen) source model, its classes, the
configuration, and, after :meth:`Blueprint.fit_source`, the OOD scorers fitted on source data, their
thresholds, the novel-class detector and the adapter's source references (class prior, source-fallback
reference). :meth:`Blueprint.new_parts` gives a fresh, independent set of per-stream components;
:class:`streamtta.pipeline.Pipeline` wraps one such set.

The scorers are fitted in the *adapter's* feature space: the source data go through a fresh adapter in
shuffled i.i.d. batches of the engine's batch size (so norm layers see the same kind of statistics they
see online), the scorer is built on them and its threshold set at 95% TPR on the hold-out.

``engine.device`` (:mod:`streamtta.devices`) says where the model and every adapter live: the model is
moved there once (``model.to(device)``: a CUDA device moves the caller's module too), source data go there
(the adapter's source pass takes them all at once), and the features the scorers are fitted on come back
to the CPU. Scorers that keep a
vector index (``device`` option) get the device too, so that FAISS searches on the GPU when it can.
"""
from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from streamtta.config import Config
from streamtta.devices import resolve_device, to_device


def limit_helper_threads() -> None:
    """One thread for numpy BLAS and FAISS: their batches are small, and extra threads only fight torch
    for the cores."""
    try:
        import faiss
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
        faiss.omp_set_num_threads(1)
    except Exception:  # pragma: no cover - optional speed-up only
        pass


def _for_stream(scorer: Any) -> Any:
    """A stream's copy of a fitted scorer: fixed source parts shared (read-only), online state its own."""
    return scorer.for_stream() if hasattr(scorer, "for_stream") else copy.deepcopy(scorer)


def _scorer_options(name: str, options: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``options`` of scorer ``name`` plus ``device`` for a scorer that takes one (its vector indexes),
    unless the options set it or the device is the CPU (the scorers' default)."""
    from streamtta.detectors.ood.registry import SCORERS

    cls = SCORERS.get(name)
    if device.type == "cpu" or "device" in options or cls is None:
        return dict(options)
    if "device" not in inspect.signature(cls.__init__).parameters:
        return dict(options)
    return {**options, "device": device}


def _reseed(seed: int, cpu_state: torch.Tensor) -> None:
    """The torch RNG as ``torch.manual_seed(seed)`` and building an adapter leave it (without re-seeding
    the CPU generator, which is slow: its recorded state is set instead)."""
    if torch.cuda.is_available():
        torch.manual_seed(seed)
    torch.set_rng_state(cpu_state)


def _eager_if_possible(model: torch.nn.Module) -> torch.nn.Module:
    """A scripted ``nn.Sequential`` of standard layers as its eager twin (:mod:`streamtta.models.unscript`),
    so that every adapter runs on it; any other model as it is."""
    from streamtta.adapters.scripted import is_script
    from streamtta.models.unscript import eager_sequential

    eager = eager_sequential(model) if is_script(model) else None
    if eager is None:
        return model
    logging.getLogger("streamtta").info("model: a scripted nn.Sequential of standard layers, rebuilt as an eager "
                                        "module (same weights): every adapter runs on it")
    return eager


def _runnable_default(model: torch.nn.Module) -> str:
    """What ``"default"`` means for ``model`` (:func:`~streamtta.adapters.defaults.default_spec`), with a
    logged warning when a TorchScript model cannot run the BatchNorm default or the model has no BatchNorm."""
    from streamtta.adapters import DEFAULT_SPEC
    from streamtta.adapters.defaults import NO_BATCHNORM_SPEC, default_spec, has_batchnorm
    from streamtta.adapters.scripted import is_script

    chosen = default_spec(model)
    log = logging.getLogger("streamtta")
    if is_script(model) and has_batchnorm(model) and chosen != DEFAULT_SPEC:
        log.warning(f"adapter: the default spec {DEFAULT_SPEC!r} cannot run on this TorchScript model (its BatchNorm "
                    f"layers cannot be replaced inside a compiled graph); using {chosen!r}. Load the eager module "
                    "('module:factory' + weights) for the default")
    elif chosen == NO_BATCHNORM_SPEC:
        log.info("adapter: the model has no BatchNorm layer; the default aligns its LayerNorm/GroupNorm outputs to "
                 "their source statistics (%r)", chosen)
    elif chosen == "source":
        log.warning("adapter: nothing for the default to adapt in this model (no BatchNorm, and no LayerNorm/GroupNorm "
                    "layer that can be replaced%s); adapter 'source'. Gradient specs such as 'source+tent' still run",
                    " in a compiled graph" if is_script(model) else "")
    return chosen


@dataclass
class Parts:
    """The per-stream components of one pipeline (each stream owns its own copies)."""

    adapter: Any
    scorer: Any
    gate_scorer: Any | None
    monitor: Any | None
    policy: Any
    readapter: Any | None
    burst: Any | None
    novelty: Any | None


class Blueprint:
    """Shared, fitted-once components; ``new_parts()`` makes the per-stream ones.

    ``meta`` is the model's streamtta metadata (classes, input shape, source data), or None for a user's
    model; then ``classes`` (or ``cfg.model.num_classes``) must be known before :meth:`new_parts`.
    """

    def __init__(self, cfg: Config, model: torch.nn.Module, meta: Any | None = None, *,
                 classes: list[int] | None = None) -> None:
        from streamtta.detectors import DEFAULT_SCORER, build_scorer

        limit_helper_threads()
        model = _eager_if_possible(model)
        self.cfg = cfg
        #: where the model and the adapters run (``engine.device``, resolved)
        self.device: torch.device = resolve_device(cfg.engine.device)
        self.model = model.eval() if self.device.type == "cpu" else model.eval().to(self.device)
        self.meta = meta
        if classes is None:
            classes = list(meta.classes) if meta is not None else list(range(cfg.model.num_classes or 0))
        self.classes: list[int] = [int(c) for c in classes]
        self.spec = cfg.adapter.spec
        if cfg.adapter.spec == "default":
            self.spec = _runnable_default(model)
        else:  # a spec a TorchScript model cannot run is refused now, not at the first stream
            from streamtta.adapters import parse_spec
            from streamtta.adapters.scripted import check_script_spec, is_script

            if is_script(model):
                norm = parse_spec(self.spec).norm
                check_script_spec(model, norm.name, norm.args, self.spec)
        self.scorer_name = DEFAULT_SCORER if cfg.scorer.name == "default" else cfg.scorer.name
        self.base_scorer = build_scorer(self.scorer_name, **_scorer_options(self.scorer_name, cfg.scorer.options,
                                                                            self.device))
        gate_name = cfg.scorer.gate
        self.base_gate_scorer = (build_scorer(gate_name, **_scorer_options(str(gate_name), cfg.scorer.gate_options,
                                                                           self.device))
                                 if gate_name not in (None, "", "none", self.scorer_name) else None)
        self.base_novelty: Any | None = None
        self.calibrated = False
        #: the shape of one sample, once source data or a model's metadata tell it
        self.input_shape: list[int] | None = list(meta.input_shape) if meta is not None else None
        self._train: tuple[Any, Any | None] | None = None
        self._source_fit: tuple[list[Any], float | None] | None = None
        #: (classes, prototype adapter, RNG state after building it): see :meth:`new_adapter`
        self._proto: tuple[tuple[int, ...], Any, torch.Tensor] | None = None
        #: copied for every stream; built here so that a bad readapt option fails now, not at the first stream
        self.base_readapter: Any | None = None
        if cfg.monitor.readapt:
            from streamtta.readapt import ReAdapter, load_meta_init
            from streamtta.readapt.meta_init import default_restart_init

            opts = {"hold_batches": cfg.monitor.hold_batches, **cfg.monitor.readapt_options}
            if "restart" in opts:  # the model's own meta-init (a built-in passed as a module: its metadata name)
                named = cfg.model.source or (meta.name if meta is not None else None)
                if opts["restart"] and named is None:
                    raise ValueError("monitor.readapt_options.restart=true needs a meta-initialisation: set "
                                     "model.source to a model that has one (streamtta meta-train)")
                meta_init = load_meta_init(named) if opts["restart"] else None
            else:  # unset: on for gradient specs that have a meta-initialisation (default_restart_init);
                # weights from model.state_dict are not the ones the checkpoint's meta-init was learned for, and
                # one state per stream id would keep one restart buffer per id (engine.max_states of them)
                own = cfg.model.state_dict is None and cfg.engine.state_key != "stream_id"
                meta_init = default_restart_init(self.spec, cfg.model.source if own else None, model)
                opts["restart"] = meta_init is not None
                if meta_init is not None:
                    logging.getLogger("streamtta").info(
                        "meta restart on by default for the gradient spec %r (readapt_options.restart=false "
                        "turns it off)", self.spec)
            try:
                self.base_readapter = ReAdapter(meta_init, **opts)
            except (TypeError, ValueError) as e:
                raise ValueError(f"monitor.readapt_options: {e}") from None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_indices(self, labels: Any) -> torch.Tensor:
        """Class labels -> output indices of the model (-1 for classes it does not know)."""
        index = {c: i for i, c in enumerate(self.classes)}
        return torch.as_tensor([index.get(int(v), -1) for v in np.asarray(labels).reshape(-1)])

    # -- adapters ------------------------------------------------------------------------------
    def new_adapter(self) -> Any:
        """A fresh adapter; class-statistics norms (cb-stats) start from the source class prior and
        guards that compare samples with the source (source-fallback) get their reference, once source
        data are known.

        The first call builds a prototype (and fits the source references on it); every adapter is a
        :func:`~streamtta.adapters.state.stream_copy` of it: the model's fixed weights are shared, the
        rest is the adapter's own, exactly as a newly built one (the torch RNG is left as building
        one leaves it)."""
        from streamtta.adapters.state import stream_copy

        if not self.classes:
            raise ValueError("the number of classes is unknown: set model.num_classes (or pass classes=) or "
                             "call fit_source / process first so that a probe forward can tell")
        key = tuple(self.classes)
        if self._proto is None or self._proto[0] != key:
            adapter, rng = self._build_adapter()
            self._proto = (key, adapter, rng)
            return stream_copy(adapter)  # the RNG as the source-data pass left it
        _reseed(self.cfg.engine.seed, self._proto[2])
        return stream_copy(self._proto[1])

    def _build_adapter(self) -> tuple[Any, torch.Tensor]:
        """Build the prototype adapter (and fit the adapter's source references on it once); records the
        RNG state that building one leaves (:meth:`new_adapter` restores it for the copies)."""
        from streamtta.adapters import build_adapter
        from streamtta.adapters.state import share_fixed

        torch.manual_seed(self.cfg.engine.seed)
        adapter = build_adapter(self.spec, self.model, self.num_classes, **self.cfg.adapter.options)
        rng = torch.get_rng_state()
        if hasattr(adapter, "fit_source") and self._train is not None:
            # one source pass: cb-stats class prior and source-fallback's reference, cached for later adapters
            x, y = self._train
            with_prior = self.cfg.adapter.class_prior and bool(getattr(adapter, "_label_layers", None))
            if self._source_fit is None:
                # the adapter's source pass feeds its model the data as given: on its device (all at once);
                # unlabelled source data: the source model's predictions stand in for the class prior's labels
                xt = to_device(torch.as_tensor(np.asarray(x), dtype=torch.float32), self.device)
                labels: Any = None
                if with_prior:
                    labels = "predicted" if y is None else to_device(self.class_indices(y), self.device)
                self._source_fit = adapter.fit_source(xt, labels)
            else:
                prior, reference = self._source_fit
                if with_prior:
                    adapter.set_class_prior(prior)
                adapter.set_guard_reference(reference)
        return share_fixed(adapter), rng

    @torch.no_grad()
    def adapter_features(self, x: Any, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """``(logits, features, order)`` of ``x`` through a fresh adapter, in shuffled i.i.d. batches (run on
        :attr:`device`; logits and features on the CPU)."""
        adapter = self.new_adapter()
        xt = torch.as_tensor(np.asarray(x), dtype=torch.float32)
        order = np.random.default_rng(seed).permutation(len(xt))
        bs = max(self.cfg.engine.batch_size, 2)
        logits, feats = [], []
        for i in range(0, len(order), bs):
            lg, ft = adapter.features(to_device(xt[order[i:i + bs]], self.device))
            logits.append(lg.cpu())
            feats.append(ft.cpu())
        return torch.cat(logits), torch.cat(feats), order

    # -- source fit ----------------------------------------------------------------------------
    def fit_source(self, x: Any = None, y: Any = None, *, holdout: Any = None,
                   holdout_fraction: float = 0.2) -> "Blueprint":
        """Fit on clean source data: the adapter's source references and, with ``scorer.calibrate``, the
        scorer memories, thresholds (95% TPR on a hold-out) and the novel-class detector.

        ``x=None`` takes the model's own source data (built-in models). ``y=None`` calibrates without
        labels: pseudo-labels (the model's own predictions) stand in for classes. ``holdout`` is
        ``x_holdout`` or ``(x_holdout, y_holdout)``; without it ``holdout_fraction`` of ``x`` is set aside.
        """
        if x is None:
            if self.meta is None:
                raise ValueError("fit_source() without data needs a model with streamtta metadata; pass x_source")
            from streamtta.models.data import load_source_train, source_holdout

            x, y = load_source_train(self.meta)
            holdout = source_holdout(self.meta) if holdout is None else holdout
        x = np.asarray(x, dtype=np.float32)
        y = None if y is None else np.asarray(y)
        if y is not None and len(y) != len(x):
            raise ValueError(f"fit_source got {len(x)} samples but {len(y)} labels")
        self.input_shape = list(x.shape[1:])
        if holdout is None:
            cut = np.random.default_rng(self.cfg.engine.seed).permutation(len(x))
            n_hold = int(round(holdout_fraction * len(x)))
            if n_hold < 10 or len(x) - n_hold < 10:
                raise ValueError(f"fit_source needs at least 20 source samples to set a hold-out aside, got {len(x)}")
            hold_idx, cut = cut[:n_hold], cut[n_hold:]
            holdout = x[hold_idx]
            x, y = x[cut], (None if y is None else y[cut])
        hx = holdout[0] if isinstance(holdout, (tuple, list)) else holdout
        self._train, self._source_fit, self._proto = (x, y), None, None
        if self.cfg.scorer.calibrate:
            self._calibrate(x, y, np.asarray(hx, dtype=np.float32))
        return self

    def _calibrate(self, x: np.ndarray, y: np.ndarray | None, hx: np.ndarray) -> None:
        from streamtta.detectors import NovelClassDetector

        lg, ft, order = self.adapter_features(x, seed=self.cfg.engine.seed)
        labels = self.class_indices(y[order]) if y is not None else lg.argmax(1)
        self.base_scorer.fit(ft, lg, labels)
        hl, hf, _ = self.adapter_features(hx, seed=self.cfg.engine.seed + 1)
        self.base_scorer.calibrate(hf, hl)
        if self.base_gate_scorer is not None:
            self.base_gate_scorer.fit(ft, lg, labels)
            self.base_gate_scorer.calibrate(hf, hl)
        self.base_novelty = NovelClassDetector().fit(ft, labels)
        self.calibrated = True

    # -- per-stream parts ------------------------------------------------------------------------
    def new_parts(self) -> Parts:
        """A fresh set of per-stream components (adapter from the source state, copies of the fitted
        scorers, a new monitor and alert policy)."""
        from streamtta.alerts import AlertPolicy
        from streamtta.detectors import OODBurstRule, ShiftMonitor

        mon = self.cfg.monitor
        adapter = self.new_adapter()
        scorer = _for_stream(self.base_scorer)
        monitor = (ShiftMonitor(detector=mon.detector, signals=tuple(mon.signals), cooldown_batches=mon.cooldown_batches,
                                seed=self.cfg.engine.seed, **mon.options) if mon.enabled else None)
        policy = AlertPolicy(cooldown_batches=self.cfg.alerts.cooldown_batches)
        readapter = copy.deepcopy(self.base_readapter) if mon.enabled and self.base_readapter is not None else None
        burst = OODBurstRule(**mon.burst) if mon.enabled and mon.burst is not None else None
        novelty = copy.deepcopy(self.base_novelty) if mon.enabled and mon.novelty else None
        gate = _for_stream(self.base_gate_scorer) if self.base_gate_scorer is not None and self.calibrated else None
        return Parts(adapter, scorer, gate, monitor, policy, readapter, burst, novelty)
