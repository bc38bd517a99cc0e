"""StreamPageHinkley against one river.drift.PageHinkley per row, fed the same interleaved values."""
import io

import numpy as np
import pytest
import torch
from river.drift import PageHinkley

from streamtta.detectors.shift.streams import StreamPageHinkley

N_ROWS = 50
SETTINGS = {"min_instances": 10, "delta": 0.005, "threshold": 8.0, "alpha": 1 - 0.0001}


def make_stream(seed, n_rows=N_ROWS, per_row=(120, 260), nan_rate=0.02):
    """Per-row sequences with level shifts (up and down), interleaved at random and cut into calls
    of random sizes (1 included); a few values are NaN or inf."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n_rows):
        n = int(rng.integers(*per_row))
        level = np.zeros(n)
        for cut in np.sort(rng.choice(np.arange(20, n), size=int(rng.integers(1, 5)), replace=False)):
            level[cut:] += rng.choice([-1.0, 1.0]) * rng.uniform(1.5, 4.0)
        x = level + rng.normal(0.0, 0.5, n)
        bad = rng.random(n) < nan_rate
        x[bad] = rng.choice([np.nan, np.inf, -np.inf], size=int(bad.sum()))
        seqs.append(x)
    arrival = np.concatenate([np.full(len(s), r) for r, s in enumerate(seqs)])
    rng.shuffle(arrival)
    taken = np.zeros(n_rows, dtype=int)
    values = np.empty(len(arrival))
    for i, r in enumerate(arrival):  # the k-th arrival of a row carries its k-th value
        values[i] = seqs[r][taken[r]]
        taken[r] += 1
    calls, i = [], 0
    while i < len(arrival):
        size = int(rng.choice([1, 2, 3, int(rng.integers(1, 200))]))
        calls.append((arrival[i:i + size], values[i:i + size]))
        i += size
    return calls


def river_step(dets, rows, values):
    out = np.zeros(len(rows), dtype=bool)
    for i, (r, v) in enumerate(zip(rows, values)):
        if np.isfinite(v):
            dets[r].update(float(v))
            out[i] = dets[r].drift_detected
    return out


def assert_same_state(sp, dets):
    assert sp.drift_detected.tolist() == [d.drift_detected for d in dets]
    st = sp.state_dict()
    assert st["n"].tolist() == [d._x_mean.n for d in dets]
    assert st["mean"].tolist() == [d._x_mean.get() for d in dets]
    assert st["sum_increase"].tolist() == [d._sum_increase for d in dets]
    assert st["sum_decrease"].tolist() == [d._sum_decrease for d in dets]
    assert st["min_increase"].tolist() == [d._min_increase for d in dets]
    assert st["max_decrease"].tolist() == [float(d._max_decrease) for d in dets]


@pytest.mark.parametrize("mode", ["up", "down", "both"])
def test_matches_river_step_by_step(mode):
    calls = make_stream(seed={"up": 1, "down": 2, "both": 3}[mode])
    sp = StreamPageHinkley(mode=mode, **SETTINGS)
    sp.ensure(N_ROWS)
    dets = [PageHinkley(mode=mode, **SETTINGS) for _ in range(N_ROWS)]
    hits_per_row = np.zeros(N_ROWS, dtype=int)
    assert any(len(set(r.tolist())) < len(r) for r, _ in calls)  # some calls repeat a row
    for rows, values in calls:
        got = sp.update(rows, values)
        want = river_step(dets, rows, values)
        assert got.dtype == bool and got.shape == rows.shape
        assert got.tolist() == want.tolist()
        assert sp.drift_detected.tolist() == [d.drift_detected for d in dets]
        np.add.at(hits_per_row, rows[got], 1)
    assert hits_per_row.sum() >= N_ROWS  # drifts really happen, repeatedly
    assert (hits_per_row >= 2).sum() >= 5
    assert_same_state(sp, dets)


def test_default_settings_match_river():
    calls = make_stream(seed=4, n_rows=20, per_row=(300, 500))
    calls = [(r, v * 10) for r, v in calls]
    sp, dets = StreamPageHinkley(capacity=20), [PageHinkley() for _ in range(20)]
    n_hits = 0
    for rows, values in calls:
        got = sp.update(rows, values)
        assert got.tolist() == river_step(dets, rows, values).tolist()
        n_hits += int(got.sum())
    assert n_hits > 0
    assert_same_state(sp, dets)


def test_reset_rows_matches_fresh_river_detectors():
    calls = make_stream(seed=5)
    sp = StreamPageHinkley(capacity=N_ROWS, **SETTINGS)
    dets = [PageHinkley(**SETTINGS) for _ in range(N_ROWS)]
    rng = np.random.default_rng(0)
    n_hits = 0
    for k, (rows, values) in enumerate(calls):
        if k % 7 == 3:
            reused = rng.choice(N_ROWS, size=int(rng.integers(1, 6)), replace=False)
            sp.reset_rows(reused)
            for r in reused:
                dets[r] = PageHinkley(**SETTINGS)
            assert not sp.drift_detected[reused].any()
        got = sp.update(rows, values)
        assert got.tolist() == river_step(dets, rows, values).tolist()
        n_hits += int(got.sum())
    assert n_hits > 0
    assert_same_state(sp, dets)


def test_state_round_trip_through_torch_save_continues_identically():
    calls = make_stream(seed=6)
    half = len(calls) // 2
    sp = StreamPageHinkley(mode="both", **SETTINGS)
    sp.ensure(N_ROWS)
    for rows, values in calls[:half]:
        sp.update(rows, values)
    buf = io.BytesIO()
    torch.save(sp.state_dict(), buf)
    buf.seek(0)
    loaded = StreamPageHinkley(mode="up", threshold=1.0)  # other settings: the saved ones apply
    loaded.load_state_dict(torch.load(buf, weights_only=True))
    assert (loaded.mode, loaded.threshold, loaded.n_rows) == ("both", SETTINGS["threshold"], N_ROWS)
    assert loaded.drift_detected.tolist() == sp.drift_detected.tolist()
    n_hits = 0
    for rows, values in calls[half:]:
        a, b = sp.update(rows, values), loaded.update(rows, values)
        assert a.tolist() == b.tolist()
        n_hits += int(a.sum())
    assert n_hits > 0
    for k, v in sp.state_dict().items():
        w = loaded.state_dict()[k]
        assert (torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w), k


def test_non_finite_values_are_skipped():
    sp = StreamPageHinkley(capacity=3, min_instances=1, threshold=0.5)
    sp.update(np.array([0, 1, 2]), np.array([0.0, 0.0, 0.0]))
    before = sp.state_dict()
    got = sp.update(np.array([0, 1, 2, 0]), np.array([np.nan, np.inf, -np.inf, np.nan]))
    assert got.tolist() == [False] * 4
    after = sp.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in ("n", "mean", "sum_increase", "drift"))
    got = sp.update(np.array([1, 1, 1]), np.array([np.nan, 10.0, np.nan]))
    assert got.tolist() == [False, True, False]
    assert sp.state_dict()["n"].tolist() == [1.0, 2.0, 1.0]


def test_ensure_grows_and_keeps_state():
    sp = StreamPageHinkley(min_instances=1, threshold=0.5)
    assert sp.n_rows == 0
    sp.ensure(2)
    sp.update(np.array([1, 1]), np.array([0.0, 5.0]))
    flags = sp.drift_detected.tolist()
    for n in range(3, 200, 7):
        sp.ensure(n)
        assert sp.n_rows == n
    sp.ensure(5)  # never shrinks
    assert flags == [False, True]
    assert sp.n_rows == 199 and sp.drift_detected[:2].tolist() == flags and not sp.drift_detected[2:].any()
    assert sp.state_dict()["n"][:3].tolist() == [0.0, 2.0, 0.0]
    with pytest.raises(ValueError, match="ensure"):
        sp.update(np.array([199]), np.array([1.0]))
    with pytest.raises(ValueError):
        sp.update(np.array([-1]), np.array([1.0]))
    with pytest.raises(ValueError, match="shape"):
        sp.update(np.array([0, 1]), np.array([1.0]))
    with pytest.raises(ValueError):
        sp.reset_rows(np.array([0.5]))
    assert sp.update(np.array([], dtype=int), np.array([])).tolist() == []


@pytest.mark.parametrize("kw", [{"mode": "sideways"}, {"threshold": 0.0}, {"threshold": -1.0},
                                {"alpha": 0.0}, {"alpha": 1.5}, {"min_instances": 0},
                                {"min_instances": 2.5}, {"delta": float("nan")}, {"capacity": -1}])
def test_bad_settings_raise(kw):
    with pytest.raises(ValueError):
        StreamPageHinkley(**kw)


def _bad_states():
    sp = StreamPageHinkley(capacity=4)
    sp.update(np.arange(4), np.ones(4))
    good = sp.state_dict()
    yield "not a dict", [1, 2]
    yield "missing field", {k: v for k, v in good.items() if k != "mean"}
    yield "format", {**good, "format": "other/9"}
    yield "mode", {**good, "mode": "sideways"}
    yield "alpha", {**good, "alpha": 2.0}
    yield "n_rows", {**good, "n_rows": -1}
    yield "shape", {**good, "n_rows": 5}
    yield "field shape", {**good, "sum_increase": torch.zeros(3, dtype=torch.float64)}
    yield "nan", {**good, "mean": torch.tensor([0.0, float("nan"), 0.0, 0.0], dtype=torch.float64)}
    yield "drift dtype", {**good, "drift": torch.zeros(4)}
    yield "negative n", {**good, "n": torch.full((4,), -1.0, dtype=torch.float64)}


@pytest.mark.parametrize("label,state", list(_bad_states()), ids=[k for k, _ in _bad_states()])
def test_bad_state_raises_and_changes_nothing(label, state):
    sp = StreamPageHinkley(capacity=2, min_instances=3)
    sp.update(np.array([0, 1]), np.array([1.0, 2.0]))
    before = sp.state_dict()
    with pytest.raises(ValueError):
        sp.load_state_dict(state)
    after = sp.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert (torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k]), label


def test_state_from_lists_loads():
    sp = StreamPageHinkley(capacity=3, min_instances=2, threshold=1.0)
    sp.update(np.array([0, 0, 2]), np.array([0.0, 4.0, 1.0]))
    plain = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in sp.state_dict().items()}
    other = StreamPageHinkley()
    other.load_state_dict(plain)
    assert other.drift_detected.tolist() == sp.drift_detected.tolist() == [True, False, False]
    assert other.update(np.array([0]), np.array([0.0])).tolist() == sp.update(np.array([0]), np.array([0.0])).tolist()
