"""Contract every river detector must meet inside :class:`ShiftMonitor` (river ``check_estimator`` spirit).

Parametrised from :data:`streamtta.detectors.shift.DETECTORS` (the names ``make_detector`` accepts), so
a newly supported detector is checked without editing this file: a plain-data state that restores
identical future events, a clear mean shift detected, a stationary signal left alone.
"""
import numpy as np
import pytest
import torch

from streamtta.detectors.shift import DETECTORS, ShiftMonitor, make_detector

N, CHANGE = 200, 100
SIGNALS = ("mean_score", "ood_rate")


def series(seed, shift):
    """Two standardised-scale signals; both step up by ``shift`` noise units at batch ``CHANGE``."""
    rng = np.random.default_rng(seed)
    out = []
    for b in range(N):
        up = shift if b >= CHANGE else 0.0
        out.append({"mean_score": float(rng.normal(up, 1.0)), "ood_rate": float(rng.normal(0.05 + 0.02 * up, 0.02))})
    return out


def run(mon, batches, start=0):
    return [(e.batch_index, e.kind, e.signals, repr(e.evidence))
            for b, s in enumerate(batches, start) if (e := mon.update(s, b)) is not None]


@pytest.mark.parametrize("name", DETECTORS)
def test_make_detector_builds_a_river_detector(name):
    det = make_detector(name, seed=0)
    det.update(0.0)
    assert det.drift_detected in (False, True)


@pytest.mark.parametrize("name", DETECTORS)
@pytest.mark.parametrize("cut", [40, CHANGE, CHANGE + 1, CHANGE + 3, 170])
def test_state_round_trip_gives_identical_future_events(name, cut, tmp_path):
    batches = series(seed=1, shift=6.0)
    a = ShiftMonitor(detector=name, signals=SIGNALS, replay_size=64)
    run(a, batches[:cut])
    torch.save(a.state_dict(), tmp_path / "monitor.pt")
    b = ShiftMonitor(detector=name, signals=SIGNALS, replay_size=64)
    b.load_state_dict(torch.load(tmp_path / "monitor.pt", weights_only=True))
    assert run(a, batches[cut:], cut) == run(b, batches[cut:], cut)
    assert a.state_dict() == b.state_dict()


@pytest.mark.parametrize("name", DETECTORS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clear_mean_shift_is_detected_and_stationary_signal_is_not(name, seed):
    shifted = run(ShiftMonitor(detector=name, signals=SIGNALS), series(seed, shift=6.0))
    assert shifted, f"{name} seed {seed}: the shift at batch {CHANGE} was missed"
    assert CHANGE <= shifted[0][0] <= CHANGE + 15, f"{name} seed {seed}: first event at {shifted[0][0]}"
    assert run(ShiftMonitor(detector=name, signals=SIGNALS), series(seed, shift=0.0)) == []
