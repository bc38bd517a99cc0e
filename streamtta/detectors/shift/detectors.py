"""river drift detectors by name, and :class:`ReplayDetector`, which saves one as plain data.

river's ADWIN, PageHinkley and KSWIN are deterministic given their parameters (KSWIN: its ``seed``)
and the values fed to them, and each starts afresh on the update after one of its own alarms. A
:class:`ReplayDetector` therefore keeps the values fed since its detector last started afresh and
restores a detector by feeding them to a new one: its state is a list of floats, never a serialized
object.

>>> d = ReplayDetector("page_hinkley")
>>> alarms = [b for b in range(40) if d.update(0.0 if b < 20 else 5.0)]
>>> alarms[0] >= 20
True
>>> e = ReplayDetector("page_hinkley")
>>> e.load_values(d.values)
>>> [d.update(5.0) for _ in range(3)] == [e.update(5.0) for _ in range(3)]
True
"""
from __future__ import annotations

from typing import Any, Iterable

#: Detector names :func:`make_detector` accepts (plus the aliases of :data:`ALIASES`).
DETECTORS = ("adwin", "page_hinkley", "kswin")
ALIASES = {"ph": "page_hinkley", "pagehinkley": "page_hinkley", "page-hinkley": "page_hinkley"}

#: Default river detector settings, tuned for *batch-level*, standardised signals (one value per
#: batch, so ADWIN's clock must be 1 and its minimum sub-window small).
DETECTOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "adwin": {"delta": 0.01, "clock": 1, "min_window_length": 1, "grace_period": 4},
    "page_hinkley": {"min_instances": 4, "delta": 0.5, "threshold": 8.0, "alpha": 1.0, "mode": "both"},
    "kswin": {"alpha": 0.01, "window_size": 30, "stat_size": 5},
}


def canonical_detector(name: str) -> str:
    """The canonical name of detector ``name`` (``"ph"`` -> ``"page_hinkley"``); ValueError if unknown."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in DETECTORS:
        raise ValueError(f"unknown shift detector {name!r}; choose one of {DETECTORS}")
    return key


def make_detector(name: str, seed: int | None = None, **kw: Any) -> Any:
    """A river drift detector by name (``adwin``, ``page_hinkley``/``ph``, ``kswin``).

    ``kw`` override :data:`DETECTOR_DEFAULTS`; ``seed`` is used by KSWIN only.
    """
    from river import drift

    key = canonical_detector(name)
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


class ReplayDetector:
    """A river drift detector whose state is the list of values it was fed (see the module docstring).

    Parameters
    ----------
    name, seed, **params
        As for :func:`make_detector`.
    max_values
        Bound of the kept values: once more than ``max_values`` values were fed without the
        detector starting afresh, it is rebuilt from the most recent ``max_values // 2`` of them
        (as if it had started there), so memory and restore time stay bounded.
    """

    def __init__(self, name: str, seed: int | None = None, max_values: int = 2048, **params: Any) -> None:
        if max_values < 2:
            raise ValueError(f"max_values must be >= 2, got {max_values}")
        self.name = canonical_detector(name)
        self.seed = seed
        self.params = dict(params)
        self.max_values = int(max_values)
        self.load_values(())

    @property
    def drift_detected(self) -> bool:
        return bool(self.detector.drift_detected)

    def update(self, x: float) -> bool:
        """Feed one value; returns whether the detector raised an alarm on it."""
        if self.detector.drift_detected:  # river starts the detector afresh on this update
            self.values = []
        x = float(x)
        self.detector.update(x)
        self.values.append(x)
        alarm = self.drift_detected
        if len(self.values) > self.max_values:
            self.load_values(self.values[-(self.max_values // 2):])
        return alarm

    def load_values(self, values: Iterable[float]) -> None:
        """A new detector fed ``values`` (the state of the detector that was fed them)."""
        self.detector = make_detector(self.name, self.seed, **self.params)
        self.values = [float(v) for v in values]
        for v in self.values:
            self.detector.update(v)
