"""Shift detection on batch-level signals with river's change detectors.

:class:`ShiftMonitor` watches a few per-batch scalars (:mod:`~streamtta.detectors.shift.signals`; by
default :data:`~streamtta.detectors.shift.signals.DEFAULT_SIGNALS`). Each signal is standardised
against a rolling *reference* of its recent past values, clipped to ``[-z_clip, z_clip]`` and fed to
its own river detector (``PageHinkley`` by default, ``ADWIN`` or ``KSWIN``; river's implementations
are used as they are, see :mod:`~streamtta.detectors.shift.detectors`).

Why Page-Hinkley by default: on one value per batch, ADWIN's variance-based cut needs a window of
roughly ``2 ln(2 ln n / delta)`` (about 15) values in all before it can cut, and a large jump
inflates the window variance it compares against, so it reacts late or not at all to the abrupt
shifts of a stream. ADWIN remains available (``detector="adwin"``).

A detector alarm is latched for ``confirm_window + pending_extra`` batches (the reference is frozen
meanwhile) and becomes a :class:`ShiftEvent` only when

1. the mean standardised deviation of the last ``confirm_window`` batches is at least ``min_z``
   (hysteresis: a detector that fires on a blip is ignored), and
2. with ``confirm="ks"``, a two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``) of the
   reference values against those recent values rejects at ``confirm_alpha``, and
3. the monitor is not in its cooldown after the previous event.

After an event every detector is reset, the references are cleared and re-learnt from the next
``warmup_batches`` batches (the new regime becomes the reference), and nothing fires for
``cooldown_batches`` batches (default 8; the engine passes ``monitor.cooldown_batches`` of its
configuration): one shift gives one event.

Typing (:meth:`ShiftMonitor.classify`): a shift is *semantic* (new classes) when the OOD evidence
went up (OOD-flag rate, mean OOD score, or the rate of samples nearest an unknown prototype,
``unknown_hits``) while the ID part of the stream looks unchanged: the entropy of accepted samples
and the lower quartile of the scores (``low_score``) moved by less than ``semantic_max_z`` and the
input statistics (:func:`input_signals`) by less than ``semantic_max_z_input``. Otherwise it is
*covariate* (the known classes look different).

The state (:meth:`ShiftMonitor.state_dict`) is plain data: numbers, strings and lists; each river
detector is saved as the values it was fed (:class:`~streamtta.detectors.shift.detectors.ReplayDetector`).

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

import logging
import math
from collections import deque
from typing import Any, Iterable, Mapping

import numpy as np
from scipy.stats import ks_2samp

from streamtta.alerts.events import ShiftEvent
from streamtta.detectors.shift.detectors import DETECTOR_DEFAULTS, ReplayDetector, canonical_detector, make_detector
from streamtta.detectors.shift.signals import DEFAULT_SIGNALS, INPUT_SIGNALS, batch_signals, input_signals

# batch_signals, input_signals and make_detector are re-exported for callers that import them from here
__all__ = ["ShiftMonitor", "batch_signals", "input_signals", "make_detector"]

log = logging.getLogger(__name__)


class _Track:
    """Reference window, recent values and river detector of one signal."""

    def __init__(self, detector: ReplayDetector) -> None:
        self.detector = detector
        self.ref: deque[float] = deque()
        self.lag: deque[float] = deque()
        self.recent: deque[float] = deque()
        self.pending_until = -1


class ShiftMonitor:
    """River detectors on standardised batch signals, with confirmation, typing and cooldown.

    Parameters
    ----------
    detector
        ``"page_hinkley"`` (default; also ``"ph"``, ``"page-hinkley"``), ``"adwin"`` or ``"kswin"``.
    signals
        Names of the signals that drive detection (others passed to :meth:`update` are kept for
        typing only).
    cooldown_batches
        Batches after an event during which no new event is raised (default 8).
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
    seed
        Seed of the river detectors (KSWIN samples its reference window).
    replay_size
        Most values kept per detector for its saved state (see
        :class:`~streamtta.detectors.shift.detectors.ReplayDetector`): a detector fed more values
        than this without an alarm or a reset is rebuilt from the most recent half of them.
    **detector_kw
        Passed to the river detector (over :data:`DETECTOR_DEFAULTS`).
    """

    def __init__(self, detector: str = "page_hinkley", signals: Iterable[str] = DEFAULT_SIGNALS,
                 cooldown_batches: int = 8, confirm: str | None = None, warmup_batches: int = 6,
                 reference_size: int = 64, confirm_window: int = 3, min_z: float = 3.0,
                 direction: str = "both", min_std: Mapping[str, float] | None = None, rel_std_floor: float = 0.01,
                 confirm_alpha: float = 0.01, semantic_max_z: float = 2.0, semantic_max_z_input: float = 6.0,
                 pending_extra: int = 2, z_clip: float = 10.0, seed: int = 0, replay_size: int = 2048,
                 **detector_kw: Any) -> None:
        self.detector_name = canonical_detector(detector)
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
        self.replay_size = int(replay_size)
        self._new_detector()  # validate the settings now
        self.reset()

    # -- state ---------------------------------------------------------------------------
    def _new_detector(self) -> ReplayDetector:
        return ReplayDetector(self.detector_name, self.seed, max_values=self.replay_size, **self.detector_kw)

    def reset(self) -> None:
        """Forget everything (references, detectors, cooldown, event count)."""
        self.tracks: dict[str, _Track] = {}
        self.cooldown_until = -1
        self.n_events = 0

    def reset_reference(self) -> None:
        """Re-learn every reference from the next batches (call after a re-adaptation)."""
        for name in list(self.tracks):
            self.tracks[name] = _Track(self._new_detector())

    def _track(self, name: str) -> _Track:
        if name not in self.tracks:
            self.tracks[name] = _Track(self._new_detector())
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
        for name, x in clean.items():
            tr = self._track(name)
            if len(tr.ref) >= self.warmup_batches:
                mu, sd = self._stats(tr.ref, name)
                z = (x - mu) / sd
                alarm = tr.detector.update(float(np.clip(z, -self.z_clip, self.z_clip)))
                if alarm and name in self.signals:
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
        """Plain data only (numbers, strings, lists): each detector is saved as the values it was fed."""
        return {
            "detector": self.detector_name,
            "detector_params": {**DETECTOR_DEFAULTS[self.detector_name], **self.detector_kw},
            "seed": self.seed,
            "tracks": {n: {"detector_values": list(t.detector.values), "ref": list(t.ref), "lag": list(t.lag),
                           "recent": list(t.recent), "pending_until": t.pending_until}
                       for n, t in self.tracks.items()},
            "cooldown_until": self.cooldown_until,
            "n_events": self.n_events,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; detectors are rebuilt with this monitor's settings and fed
        the saved values (a state from another detector or seed is logged and replayed all the same)."""
        saved = (state.get("detector", self.detector_name), state.get("seed", self.seed))
        if saved != (self.detector_name, self.seed):
            log.warning("shift monitor state of detector %r (seed %s) loaded into %r (seed %s): detectors replayed "
                        "with the current settings", saved[0], saved[1], self.detector_name, self.seed)
        self.reset()
        for n, t in state["tracks"].items():
            tr = _Track(self._new_detector())
            if "detector_values" in t:
                tr.detector.load_values(t["detector_values"])
            else:  # an older state held the detector as a serialized object: never loaded, it starts afresh
                log.warning("shift monitor state without detector values for %r: its detector starts afresh", n)
            tr.ref, tr.lag, tr.recent = deque(t["ref"]), deque(t["lag"]), deque(t["recent"])
            tr.pending_until = int(t.get("pending_until", -1))
            self.tracks[n] = tr
        self.cooldown_until = int(state["cooldown_until"])
        self.n_events = int(state["n_events"])
