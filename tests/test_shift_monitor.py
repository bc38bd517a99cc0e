"""ShiftMonitor (river detectors on batch signals), typing, cooldown, state; OOD burst rule."""
import copy

import numpy as np
import pytest
import torch

from streamtta.detectors import OODBurstRule, ShiftMonitor, batch_signals
from streamtta.detectors.shift import ReplayDetector, input_signals, make_detector


def run(mon, series, start=0):
    events = []
    for b, sig in enumerate(series, start=start):
        ev = mon.update(sig, b)
        if ev is not None:
            events.append(ev)
    return events


def step_series(n, cp, shift, seed, noise=1.0, name="mean_score"):
    rng = np.random.default_rng(seed)
    return [{name: float(rng.normal(0, noise) + (shift if b >= cp else 0.0))} for b in range(n)]


@pytest.mark.parametrize("detector,max_delay", [("page_hinkley", 3), ("adwin", 5), ("kswin", 8)])
def test_abrupt_shift_detected_quickly(detector, max_delay):
    delays = []
    for seed in range(5):
        mon = ShiftMonitor(detector=detector, signals=("mean_score",))
        ev = run(mon, step_series(150, 100, 8.0, seed))
        assert len(ev) >= 1 and ev[0].batch_index >= 100, f"{detector} seed {seed}: {[e.batch_index for e in ev]}"
        delays.append(ev[0].batch_index - 100)
    assert np.median(delays) <= max_delay, delays


def test_one_event_per_shift_and_next_shift_detected():
    series = step_series(200, 60, 6.0, 0)
    series = [{"mean_score": s["mean_score"] + (6.0 if b >= 130 else 0.0)} for b, s in enumerate(series)]
    mon = ShiftMonitor(signals=("mean_score",), cooldown_batches=8)
    ev = run(mon, series)
    assert [60 <= e.batch_index <= 63 for e in ev[:1]] == [True]
    assert len(ev) == 2 and 130 <= ev[1].batch_index <= 133, [e.batch_index for e in ev]


def test_no_event_on_long_stationary_signals():
    rng = np.random.default_rng(123)
    mon = ShiftMonitor()
    series = [{"ood_rate": float(rng.binomial(64, 0.05) / 64), "id_entropy": float(rng.normal(0.3, 0.05)),
               "mean_score": float(rng.normal(0.0, 1.0)), "in_mean": float(rng.normal(0.3, 0.002)),
               "in_hf": float(rng.normal(0.2, 0.003))} for _ in range(1500)]
    assert run(mon, series) == []


def covariate_and_semantic(kind, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for b in range(80):
        after = b >= 50
        ood_rate = rng.binomial(64, 0.05 if not after else (0.35 if kind == "semantic" else 0.3)) / 64
        out.append({
            "ood_rate": float(ood_rate),
            "mean_score": float(rng.normal(1.0 if after else 0.0, 0.2)),
            "id_entropy": float(rng.normal(0.6 if (after and kind == "covariate") else 0.3, 0.04)),
            "low_score": float(rng.normal(0.8 if (after and kind == "covariate") else -0.5, 0.2)),
            "in_hf": float(rng.normal(0.12 if (after and kind == "covariate") else 0.2, 0.003)),
        })
    return out


@pytest.mark.parametrize("kind", ["semantic", "covariate"])
def test_shift_typing(kind):
    ev = run(ShiftMonitor(), covariate_and_semantic(kind))
    assert len(ev) == 1 and 50 <= ev[0].batch_index <= 53
    assert ev[0].kind == kind, ev[0].evidence["z"]
    assert ev[0].alert_kind == f"{kind}_shift"
    assert 48 <= ev[0].onset_batch <= ev[0].batch_index


def test_direction_up_ignores_decreases():
    series = step_series(120, 80, -8.0, 1)
    assert run(ShiftMonitor(signals=("mean_score",), direction="up"), series) == []
    assert len(run(ShiftMonitor(signals=("mean_score",), direction="both"), series)) == 1


def test_ks_confirmation_option():
    ev = run(ShiftMonitor(signals=("mean_score",), confirm="ks"), step_series(140, 100, 8.0, 0))
    assert len(ev) == 1 and ev[0].evidence["ks_pvalue"]["mean_score"] <= 0.01


def test_state_round_trip_continues_identically():
    series = step_series(160, 110, 7.0, 4)
    a = ShiftMonitor(signals=("mean_score",))
    run(a, series[:100])
    b = ShiftMonitor(signals=("mean_score",))
    state = a.state_dict()
    values = state["tracks"]["mean_score"]["detector_values"]
    assert isinstance(values, list) and all(type(v) is float for v in values)
    b.load_state_dict(copy.deepcopy(state))
    ea = [e.batch_index for e in run(a, series[100:], start=100)]
    eb = [e.batch_index for e in run(b, series[100:], start=100)]
    assert ea == eb and len(ea) == 1


def test_reset_and_reset_reference():
    mon = ShiftMonitor(signals=("mean_score",))
    run(mon, step_series(40, 1000, 0.0, 0))
    assert len(mon.tracks["mean_score"].ref) > 0
    mon.reset_reference()
    assert len(mon.tracks["mean_score"].ref) == 0
    mon.reset()
    assert mon.tracks == {} and mon.n_events == 0


def test_nan_signals_are_skipped_and_bad_args_rejected():
    mon = ShiftMonitor()
    assert mon.update({"id_entropy": float("nan"), "ood_rate": 0.05}, 0) is None
    assert "id_entropy" not in mon.tracks
    with pytest.raises(ValueError, match="unknown shift detector"):
        ShiftMonitor(detector="cusum")
    with pytest.raises(ValueError, match="bad settings"):
        make_detector("adwin", colour=1)
    with pytest.raises(ValueError, match="confirm"):
        ShiftMonitor(confirm="t-test")


def test_batch_and_input_signals():
    s = batch_signals([0.0, 1.0, 2.0, 10.0], [False, False, False, True], [0.1, 0.2, 0.3, 2.0])
    assert s["ood_rate"] == 0.25 and s["id_entropy"] == pytest.approx(0.2) and s["mean_score"] == 3.25
    assert np.isnan(batch_signals([1.0], [True], [0.5])["id_entropy"])
    noisy = np.random.default_rng(0).random((8, 1, 16, 16))
    flat = np.full((8, 1, 16, 16), 0.5)
    assert input_signals(noisy)["in_hf"] > input_signals(flat)["in_hf"] == 0.0
    assert "in_hf" not in input_signals(np.ones((4, 6)))  # tabular rows: no spatial signal


def test_ood_burst_rule():
    rule = OODBurstRule(level=0.5, n_batches=3)
    rates = [0.1, 0.6, 0.7, 0.8, 0.9, 0.9, 0.3, 0.1, 0.7, 0.7, 0.7]
    fired = [b for b, r in enumerate(rates) if rule.update(r, b) is not None]
    assert fired == [3, 10]
    ev = OODBurstRule(level=0.5, n_batches=2)
    ev.update(0.9, 0)
    out = ev.update(0.8, 1)
    assert out.rate == pytest.approx(0.85) and out.alert_kind == "ood_burst"


def test_replay_detector_stays_bounded_and_restores_exactly_after_compaction():
    rng = np.random.default_rng(3)
    xs = rng.normal(0.0, 1.0, 300).tolist()
    live = ReplayDetector("kswin", seed=0, max_values=40)
    for x in xs[:200]:
        live.update(x)
        assert len(live.values) <= 40
    twin = ReplayDetector("kswin", seed=0, max_values=40)
    twin.load_values(list(live.values))
    assert [live.update(x) for x in xs[200:]] == [twin.update(x) for x in xs[200:]]
    assert live.values == twin.values


def test_monitor_state_is_plain_data_and_old_pickled_detectors_are_never_loaded(tmp_path):
    series = step_series(160, 110, 7.0, 4)
    a = ShiftMonitor(signals=("mean_score",), replay_size=64)
    run(a, series[:100])
    torch.save(a.state_dict(), tmp_path / "monitor.pt")
    b = ShiftMonitor(signals=("mean_score",), replay_size=64)
    b.load_state_dict(torch.load(tmp_path / "monitor.pt", weights_only=True))
    assert [e.batch_index for e in run(a, series[100:], 100)] == [e.batch_index for e in run(b, series[100:], 100)]
    # a state of the pickling format: the bytes are ignored (unpickling these would raise), the detector restarts
    old = a.state_dict()
    for t in old["tracks"].values():
        t["detector"] = b"\x80\x04not a pickle"
        del t["detector_values"]
    c = ShiftMonitor(signals=("mean_score",))
    c.load_state_dict(old)
    assert c.tracks["mean_score"].detector.values == [] and list(c.tracks["mean_score"].ref) == list(a.tracks["mean_score"].ref)


def test_burst_rule_state_round_trip(tmp_path):
    rule = OODBurstRule(level=0.5, n_batches=3)
    for b, r in enumerate([0.6, 0.7]):
        rule.update(r, b)
    torch.save(rule.state_dict(), tmp_path / "burst.pt")
    other = OODBurstRule(level=0.5, n_batches=3)
    other.load_state_dict(torch.load(tmp_path / "burst.pt", weights_only=True))
    assert other.update(0.8, 2) is not None and rule.update(0.8, 2) is not None
