"""Shift detection on batch-level signals with river's change detectors.

:class:`ShiftMonitor` watches a few per-batch scalars, by default

* ``ood_rate``: fraction of the batch flagged OOD (about ``1 - tpr`` under no shift),
* ``id_entropy``: mean prediction entropy of the ID-accepted samples,
* ``mean_score``: mean OOD score of the batch,

plus the model-free input statistics ``in_mean``, ``in_std``, ``in_hf`` of :func:`input_signals`
(:func:`batch_signals` computes the model signals plus ``low_score``, the 25th percentile of the
scores, used to type a shift). Each signal is standardised against a rolling *reference* of its
recent past values, clipped to ``[-z_clip, z_clip]`` and fed to its own river detector
(``PageHinkley`` by default, ``ADWIN`` or ``KSWIN``; river's implementations are used as they are).

Why Page-Hinkley by default: on one value per batch, ADWIN's variance-based cut needs a window of
roughly ``2 ln(2 ln n / delta)`` (about 15) values in all before it can cut, and a large jump
inflates the window variance it compares against, so it reacts late or not at all to the abrupt
shifts of a stream (measured on corrupted-digits streams: PH caught 9/9 corruption changes with
median delay 0 batches, ADWIN 3/9). ADWIN remains available (``detector="adwin"``).

A detector alarm is latched for ``confirm_window + pending_extra`` batches (the reference is frozen
meanwhile) and becomes a :class:`ShiftEvent` only when

1. the mean standardised deviation of the last ``confirm_window`` batches is at least ``min_z``
   (hysteresis: a detector that fires on a blip is ignored), and
2. with ``confirm="ks"``, a two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``) of the
   reference values against those recent values rejects at ``confirm_alpha``, and
3. the monitor is not in its cooldown after the previous event.

After an event every detector is reset, the references are cleared and re-learnt from the next
``warmup_batches`` batches (the new regime becomes the reference), and nothing fires for
``cooldown_batches`` batches: one shift gives one event.

Typing (:meth:`ShiftMonitor.classify`): a shift is *semantic* (new classes) when the OOD evidence
went up (OOD-flag rate, mean OOD score, or the rate of samples nearest an unknown prototype,
``unknown_hits``) while the ID part of the stream looks unchanged: the entropy of accepted samples
and the lower quartile of the scores (``low_score``) moved by less than ``semantic_max_z`` and the
input statistics (:func:`input_signals`) by less than ``semantic_max_z_input``. Otherwise it is
*covariate* (the known classes look different).

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> mon = ShiftMonitor(signals=("mean_score",), cooldown_batches=10)
>>> events = []
>>> for b in range(120):
...     x = rng.normal(0.0 if b < 60 else 1.0, 0.1)
...     ev = mon.update({"mean_score": x}, batch_index=b)
...     if ev is not None:
...         events.append(ev.batch_index)
>>> len(events), 60 <= events[0] <= 63
(1, True)
"""
from __future__ import annotations

import math
import pickle
from collections import deque
from typing import Any, Iterable, Mapping

import numpy as np
from scipy.stats import ks_2samp

from streamtta.alerts.events import ShiftEvent

DEFAULT_SIGNALS = ("ood_rate", "id_entropy", "mean_score", "in_mean", "in_std", "in_hf")
#: Signals that describe the inputs only (covariate evidence).
INPUT_SIGNALS = ("in_mean", "in_std", "in_hf")
DETECTORS = ("adwin", "page_hinkley", "kswin")
_ALIASES = {"ph": "page_hinkley", "pagehinkley": "page_hinkley", "page-hinkley": "page_hinkley"}

#: Default river detector settings, tuned for *batch-level*, standardised signals (one value per
#: batch, so ADWIN's clock must be 1 and its minimum sub-window small).
DETECTOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "adwin": {"delta": 0.01, "clock": 1, "min_window_length": 1, "grace_period": 4},
    "page_hinkley": {"min_instances": 4, "delta": 0.5, "threshold": 8.0, "alpha": 1.0, "mode": "both"},
    "kswin": {"alpha": 0.01, "window_size": 30, "stat_size": 5},
}


def make_detector(name: str, seed: int | None = None, **kw: Any) -> Any:
    """A river drift detector by name (``adwin``, ``page_hinkley``/``ph``, ``kswin``)."""
    from river import drift

    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DETECTORS:
        raise ValueError(f"unknown shift detector {name!r}; choose one of {DETECTORS}")
    params = {**DETECTOR_DEFAULTS[key], **kw}
    try:
        if key == "adwin":
            return drift.ADWIN(**params)
        if key == "page_hinkley":
            return drift.PageHinkley(**params)
        params.setdefault("seed", seed)
        return drift.KSWIN(**params)
    except TypeError as e:
        raise ValueError(f"bad settings {kw!r} for river detector {key!r}: {e}") from e


def batch_signals(scores: Any, flags: Any, entropy: Any, unknown_hits: Any | None = None) -> dict[str, float]:
    """The standard per-batch signals from per-sample scores, OOD flags and entropies.

    >>> s = batch_signals([0.1, 0.2, 0.9], [False, False, True], [0.5, 0.7, 2.0])
    >>> round(s["ood_rate"], 3), round(s["id_entropy"], 3), round(s["mean_score"], 3)
    (0.333, 0.6, 0.4)
    """
    scores = np.asarray(scores, np.float64).reshape(-1)
    flags = np.asarray(flags, bool).reshape(-1)
    entropy = np.asarray(entropy, np.float64).reshape(-1)
    if not (len(scores) == len(flags) == len(entropy)):
        raise ValueError(f"scores, flags and entropy differ in length: {len(scores)}, {len(flags)}, {len(entropy)}")
    if len(scores) == 0:
        raise ValueError("batch_signals got an empty batch")
    out = {
        "ood_rate": float(flags.mean()),
        "id_entropy": float(entropy[~flags].mean()) if (~flags).any() else float("nan"),
        "mean_score": float(scores.mean()),
        "low_score": float(np.quantile(scores, 0.25)),
    }
    if unknown_hits is not None:
        out["unknown_hits"] = float(np.mean(np.asarray(unknown_hits, np.float64)))
    return out


def input_signals(x: Any) -> dict[str, float]:
    """Per-batch input statistics: mean, standard deviation and (images) high-frequency energy.

    ``in_hf`` is the mean absolute difference between neighbouring pixels (rows and columns);
    noise raises it, blur lowers it. These model-free signals catch corruption changes that leave
    the model's confidence unchanged.

    >>> import numpy as np
    >>> s = input_signals(np.zeros((4, 1, 8, 8)))
    >>> sorted(s), s["in_hf"]
    (['in_hf', 'in_mean', 'in_std'], 0.0)
    """
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float32)
    if a.size == 0:
        raise ValueError("input_signals got an empty batch")
    out = {"in_mean": float(a.mean()), "in_std": float(a.std())}
    if a.ndim >= 3 and a.shape[-1] > 1 and a.shape[-2] > 1:
        out["in_hf"] = float(np.abs(np.diff(a, axis=-1)).mean() + np.abs(np.diff(a, axis=-2)).mean())
    return out


class _Track:
    """Reference window, recent values and river detector of one signal."""

    def __init__(self, detector: Any) -> None:
        self.detector = detector
        self.ref: deque[float] = deque()
        self.lag: deque[float] = deque()
        self.recent: deque[float] = deque()
        self.n_since_reset = 0
        self.pending_until = -1


class ShiftMonitor:
    """River detectors on standardised batch signals, with confirmation, typing and cooldown.

    Parameters
    ----------
    detector
        ``"adwin"`` (default), ``"page_hinkley"`` (``"ph"``) or ``"kswin"``.
    signals
        Names of the signals that drive detection (others passed to :meth:`update` are kept for
        typing only).
    cooldown_batches
        Batches after an event during which no new event is raised.
    confirm
        ``"ks"`` (two-sample KS test of reference vs recent values) or ``None``.
    warmup_batches
        Reference values needed before a signal can fire (after start and after each event).
    reference_size
        Maximum length of the rolling reference.
    confirm_window
        Recent batches compared with the reference (and kept out of it).
    min_z
        Minimum mean |standardised deviation| of the recent window for an alarm to count.
    direction
        ``"both"`` (default) or ``"up"`` (only increases of the signals count).
    min_std
        Floor of the reference standard deviation per signal (absolute units); signals not
        listed use ``1e-6``.
    rel_std_floor
        The standard deviation is also floored at this fraction of ``|reference mean|`` (a few
        warm-up values can underestimate it badly).
    confirm_alpha
        Significance level of the KS confirmation.
    semantic_max_z
        Largest |z| of ``id_entropy`` / ``low_score`` for a rate increase to be typed semantic.
    semantic_max_z_input
        Largest |z| of the input signals (``in_*``) for a shift to be typed semantic (unknown
        classes change the inputs' statistics a little, corruptions a lot).
    z_clip
        Standardised values are clipped to ``[-z_clip, z_clip]`` before the detector sees them
        (one extreme batch cannot dominate a cumulative detector).
    pending_extra
        A detector alarm stays pending (re-checked for confirmation every batch, reference
        frozen) for ``confirm_window + pending_extra`` batches.
    **detector_kw
        Passed to the river detector (over :data:`DETECTOR_DEFAULTS`).
    """

    def __init__(self, detector: str = "page_hinkley", signals: Iterable[str] = DEFAULT_SIGNALS,
                 cooldown_batches: int = 8, confirm: str | None = None, warmup_batches: int = 6,
                 reference_size: int = 64, confirm_window: int = 3, min_z: float = 3.0,
                 direction: str = "both", min_std: Mapping[str, float] | None = None, rel_std_floor: float = 0.01,
                 confirm_alpha: float = 0.01, semantic_max_z: float = 2.0, semantic_max_z_input: float = 6.0,
                 pending_extra: int = 2, z_clip: float = 10.0, seed: int = 0,
                 **detector_kw: Any) -> None:
        self.detector_name = _ALIASES.get(detector.lower(), detector.lower())
        if self.detector_name not in DETECTORS:
            raise ValueError(f"unknown shift detector {detector!r}; choose one of {DETECTORS}")
        self.signals = tuple(signals)
        if not self.signals:
            raise ValueError("ShiftMonitor needs at least one signal")
        if confirm not in (None, "ks"):
            raise ValueError(f"confirm must be 'ks' or None, got {confirm!r}")
        if direction not in ("both", "up"):
            raise ValueError(f"direction must be 'both' or 'up', got {direction!r}")
        if warmup_batches < 3 or confirm_window < 1 or reference_size < warmup_batches:
            raise ValueError(f"need warmup_batches >= 3, confirm_window >= 1, reference_size >= warmup_batches; got "
                             f"{warmup_batches}, {confirm_window}, {reference_size}")
        self.cooldown_batches = int(cooldown_batches)
        self.confirm = confirm
        self.warmup_batches = int(warmup_batches)
        self.reference_size = int(reference_size)
        self.confirm_window = int(confirm_window)
        self.min_z = float(min_z)
        self.direction = direction
        self.min_std = {"ood_rate": 0.01, "unknown_hits": 0.01, **dict(min_std or {})}
        self.rel_std_floor = float(rel_std_floor)
        self.confirm_alpha = float(confirm_alpha)
        self.semantic_max_z = float(semantic_max_z)
        self.pending_extra = int(pending_extra)
        self.semantic_max_z_input = float(semantic_max_z_input)
        if z_clip <= 0:
            raise ValueError(f"z_clip must be > 0, got {z_clip}")
        self.z_clip = float(z_clip)
        self.seed = int(seed)
        self.detector_kw = dict(detector_kw)
        make_detector(self.detector_name, seed, **self.detector_kw)  # validate settings now
        self.reset()

    # -- state ---------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything (references, detectors, cooldown, history)."""
        self.tracks: dict[str, _Track] = {}
        self.cooldown_until = -1
        self.n_events = 0
        self.last_event: ShiftEvent | None = None
        self.history: deque[tuple[int, dict[str, float]]] = deque(maxlen=self.reference_size + self.confirm_window)

    def reset_reference(self) -> None:
        """Re-learn every reference from the next batches (call after a re-adaptation)."""
        for name in list(self.tracks):
            self.tracks[name] = _Track(make_detector(self.detector_name, self.seed, **self.detector_kw))

    def _track(self, name: str) -> _Track:
        if name not in self.tracks:
            self.tracks[name] = _Track(make_detector(self.detector_name, self.seed, **self.detector_kw))
        return self.tracks[name]

    def _stats(self, values: Iterable[float], name: str) -> tuple[float, float]:
        v = np.fromiter(values, float)
        mean = float(v.mean())
        floor = max(self.min_std.get(name, 1e-6), self.rel_std_floor * abs(mean))
        return mean, float(max(v.std(ddof=1) if len(v) > 1 else 0.0, floor))

    def zscores(self, window: int | None = None) -> dict[str, float]:
        """Mean standardised deviation of the last ``window`` batches per tracked signal."""
        window = window or self.confirm_window
        out = {}
        for name, tr in self.tracks.items():
            if len(tr.ref) >= 2 and tr.recent:
                mu, sd = self._stats(tr.ref, name)
                rec = list(tr.recent)[-window:]
                out[name] = float((np.mean(rec) - mu) / sd)
        return out

    # -- main entry ----------------------------------------------------------------------
    def update(self, signals: Mapping[str, float], batch_index: int) -> ShiftEvent | None:
        """Feed one batch's signals; returns a :class:`ShiftEvent` when a shift is confirmed."""
        clean = {k: float(v) for k, v in signals.items() if v is not None and math.isfinite(float(v))}
        self.history.append((int(batch_index), clean))
        for name, x in clean.items():
            tr = self._track(name)
            if len(tr.ref) >= self.warmup_batches:
                mu, sd = self._stats(tr.ref, name)
                z = (x - mu) / sd
                tr.detector.update(float(np.clip(z, -self.z_clip, self.z_clip)))
                if tr.detector.drift_detected and name in self.signals:
                    # latch the alarm: confirmation may need a few more post-change batches
                    tr.pending_until = int(batch_index) + self.confirm_window + self.pending_extra
            tr.recent.append(x)
            while len(tr.recent) > self.confirm_window:
                tr.recent.popleft()
            tr.lag.append(x)
            if len(tr.lag) > self.confirm_window:
                v = tr.lag.popleft()
                if tr.pending_until < batch_index:  # the reference is frozen while an alarm is pending
                    tr.ref.append(v)
                    while len(tr.ref) > self.reference_size:
                        tr.ref.popleft()
            tr.n_since_reset += 1
        if batch_index <= self.cooldown_until:
            return None
        pending = [n for n, tr in self.tracks.items() if tr.pending_until >= batch_index and n in clean]
        if not pending:
            return None
        z = self.zscores()
        strong = [n for n in pending if self._passes(n, z.get(n, 0.0))]
        pvals = {n: self._ks(n) for n in strong} if self.confirm == "ks" else {}
        if self.confirm == "ks":
            strong = [n for n in strong if pvals[n] <= self.confirm_alpha]
        if not strong:
            return None
        kind = self.classify(z)
        evidence = {
            "z": {k: round(v, 4) for k, v in z.items()},
            "reference_mean": {n: round(self._stats(t.ref, n)[0], 6) for n, t in self.tracks.items() if t.ref},
            "reference_std": {n: round(self._stats(t.ref, n)[1], 6) for n, t in self.tracks.items() if t.ref},
            "recent_mean": {n: round(float(np.mean(t.recent)), 6) for n, t in self.tracks.items() if t.recent},
            "onset_batch": self._onset(strong, batch_index),
            "detector": self.detector_name,
        }
        if pvals:
            evidence["ks_pvalue"] = {n: float(pvals[n]) for n in strong}
        event = ShiftEvent(kind=kind, signals=tuple(strong), batch_index=int(batch_index), evidence=evidence,
                           detector=self.detector_name)
        self.n_events += 1
        self.last_event = event
        self.cooldown_until = int(batch_index) + self.cooldown_batches
        self.reset_reference()
        return event

    def _passes(self, name: str, z: float) -> bool:
        if self.direction == "up":
            return z >= self.min_z
        return abs(z) >= self.min_z

    def _ks(self, name: str) -> float:
        tr = self.tracks[name]
        return float(ks_2samp(np.fromiter(tr.ref, float), np.fromiter(tr.recent, float)).pvalue)

    def _onset(self, names: list[str], batch_index: int) -> int:
        """First batch of the recent window that already deviates by ``min_z / 2``."""
        onset = batch_index
        for name in names:
            tr = self.tracks[name]
            mu, sd = self._stats(tr.ref, name)
            rec = list(tr.recent)
            for k, v in enumerate(rec):
                if abs(v - mu) / sd >= self.min_z / 2:
                    onset = min(onset, batch_index - (len(rec) - 1 - k))
                    break
        return int(onset)

    def classify(self, z: Mapping[str, float]) -> str:
        """``"semantic"`` or ``"covariate"`` from the signals' standardised deviations."""
        rate_up = max(z.get("ood_rate", 0.0), z.get("unknown_hits", 0.0), z.get("mean_score", 0.0)) >= self.min_z
        id_same = all(abs(z[k]) < self.semantic_max_z for k in ("id_entropy", "low_score") if k in z)
        has_id_view = any(k in z for k in ("id_entropy", "low_score"))
        inputs_same = all(abs(z[k]) < self.semantic_max_z_input for k in INPUT_SIGNALS if k in z)
        return "semantic" if (rate_up and id_same and has_id_view and inputs_same) else "covariate"

    # -- persistence ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain data plus the river detectors as pickled bytes."""
        return {
            "tracks": {n: {"detector": pickle.dumps(t.detector), "ref": list(t.ref), "lag": list(t.lag),
                           "recent": list(t.recent), "n_since_reset": t.n_since_reset,
                           "pending_until": t.pending_until}
                       for n, t in self.tracks.items()},
            "cooldown_until": self.cooldown_until,
            "n_events": self.n_events,
            "history": list(self.history),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.reset()
        for n, t in state["tracks"].items():
            tr = _Track(pickle.loads(t["detector"]))
            tr.ref, tr.lag, tr.recent = deque(t["ref"]), deque(t["lag"]), deque(t["recent"])
            tr.n_since_reset = int(t["n_since_reset"])
            tr.pending_until = int(t.get("pending_until", -1))
            self.tracks[n] = tr
        self.cooldown_until = int(state["cooldown_until"])
        self.n_events = int(state["n_events"])
        self.history.extend((int(b), dict(s)) for b, s in state["history"])


class OODBurstRule:
    """Fires once when the OOD-flag rate stays at or above ``level`` for ``n_batches`` batches.

    It re-arms after the rate has fallen below ``level * rearm_fraction`` (hysteresis).

    >>> rule = OODBurstRule(level=0.5, n_batches=3)
    >>> [b for b, r in enumerate([0.1, 0.6, 0.7, 0.8, 0.9, 0.2, 0.6, 0.6, 0.6]) if rule.update(r, b)]
    [3, 8]
    """

    def __init__(self, level: float = 0.5, n_batches: int = 3, rearm_fraction: float = 0.8) -> None:
        if not 0.0 < level <= 1.0:
            raise ValueError(f"level must be in (0, 1], got {level}")
        if n_batches < 1:
            raise ValueError(f"n_batches must be >= 1, got {n_batches}")
        self.level = float(level)
        self.n_batches = int(n_batches)
        self.rearm_fraction = float(rearm_fraction)
        self.reset()

    def reset(self) -> None:
        self.run = 0
        self.armed = True
        self.rates: deque[float] = deque(maxlen=self.n_batches)

    def update(self, ood_rate: float, batch_index: int) -> "OODBurstEvent | None":
        from streamtta.alerts.events import OODBurstEvent

        r = float(ood_rate)
        if not math.isfinite(r):
            return None
        self.rates.append(r)
        self.run = self.run + 1 if r >= self.level else 0
        if not self.armed and r < self.level * self.rearm_fraction:
            self.armed = True
        if self.armed and self.run >= self.n_batches:
            self.armed = False
            return OODBurstEvent(batch_index=int(batch_index), rate=float(np.mean(self.rates)), n_batches=self.run,
                                 level=self.level, evidence={"rates": [round(v, 4) for v in self.rates]})
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"run": self.run, "armed": self.armed, "rates": list(self.rates)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.run, self.armed = int(state["run"]), bool(state["armed"])
        self.rates = deque(state["rates"], maxlen=self.n_batches)
