"""Tests for streamtta.metrics: hand-computed cases and direct numpy formulas written out here (not scikit-learn)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from streamtta import metrics as M
from streamtta.runlog import BatchRecord, RunLog


# ------------------------------------------------------------------------------------------------
# synthetic run log
# ------------------------------------------------------------------------------------------------
def make_log(*, n_batches=30, bs=10, labels=True, unknown=True, domains=("clean", "fog", "snow"),
             seed=0, alerts=None, shift_batches=(), change_points=None) -> RunLog:
    """Domains switch every n_batches/len(domains) batches; in the last domain every 5th sample is unknown."""
    rng = np.random.default_rng(seed)
    log = RunLog(wall_s=2.0, peak_rss_mb=321.0)
    per = n_batches // len(domains)
    off = 0
    for b in range(n_batches):
        dom = domains[min(b // per, len(domains) - 1)]
        y = rng.integers(0, 5, bs)
        p = np.where(rng.random(bs) < 0.7, y, (y + 1) % 5)
        unk = np.zeros(bs, bool)
        if unknown and dom == domains[-1]:
            unk[::5] = True
        sc = np.where(unk, rng.normal(2.0, 0.5, bs), rng.normal(0.0, 0.5, bs))
        log.append(BatchRecord(
            index=b, stream_id="s", topic="t", partition=0, first_offset=off, last_offset=off + bs - 1,
            offsets=list(range(off, off + bs)), preds=p.tolist(),
            labels=[int(v) if labels else None for v in y], ood_scores=sc.tolist(), ood_flags=(sc > 1.0).tolist(),
            is_unknown=[bool(u) if labels else None for u in unk], domains=[dom if labels else None] * bs,
            entropy=rng.random(bs).tolist(), updated=(rng.random(bs) < 0.5).tolist(),
            latency_s=0.001 * (b + 1), step_s=0.0005 * (b + 1), shift="covariate_shift" if b in shift_batches else None,
            reset=(b == 3)))
        off += bs
    log.alerts = list(alerts or [])
    if change_points is not None:
        log.change_points = list(change_points)
    return log


# ------------------------------------------------------------------------------------------------
# accuracy / OOD
# ------------------------------------------------------------------------------------------------
def test_accuracy_mask_and_empty():
    assert M.accuracy([1, 2, 3], [1, 0, 3]) == pytest.approx(2 / 3)
    assert M.accuracy([1, 2, 3], [1, 0, 3], mask=[True, False, False]) == 1.0
    assert M.accuracy([1, 2], [-1, -1]) is None
    with pytest.raises(ValueError, match="same length"):
        M.accuracy([1, 2], [1])


def auroc_by_pairs(s, u):
    """P(unknown scores above known) + 1/2 P(tie), over every (unknown, known) pair."""
    s, u = np.asarray(s, dtype=float), np.asarray(u, dtype=bool)
    diff = s[u][:, None] - s[~u][None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def average_precision_by_threshold(positive, ranking):
    """Sum over distinct thresholds t (descending) of (recall gain) x (precision of ``ranking >= t``)."""
    positive, ranking = np.asarray(positive, dtype=bool), np.asarray(ranking, dtype=float)
    ap, prev_recall = 0.0, 0.0
    for t in np.unique(ranking)[::-1]:
        sel = ranking >= t
        tp = (positive & sel).sum()
        recall = tp / positive.sum()
        ap += (recall - prev_recall) * tp / sel.sum()
        prev_recall = recall
    return float(ap)


def test_auroc_perfect_reversed_and_pair_count():
    s = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    u = np.array([False, False, False, True, True])
    assert M.auroc(s, u) == 1.0
    assert M.auroc(-s, u) == 0.0
    # by hand: pairs (unknown, known) = (0.4, 0.1) win, (0.4, 0.4) tie, (0.8, 0.1) win, (0.8, 0.4) win
    assert M.auroc([0.1, 0.4, 0.4, 0.8], [False, True, False, True]) == pytest.approx(3.5 / 4)
    rng = np.random.default_rng(1)
    s = np.round(rng.normal(size=300), 1)  # with ties
    u = rng.random(300) < 0.3
    s[u] += 1.0
    assert M.auroc(s, u) == pytest.approx(auroc_by_pairs(s, u))
    assert 0.5 < M.auroc(s, u) < 1.0


def test_ood_metrics_none_without_both_classes_and_nan_filtered():
    assert M.auroc([0.1, 0.2], [False, False]) is None
    assert all(v is None for v in M.ood_metrics([0.1, 0.2], [True, True]).values())
    assert M.auroc([0.1, np.nan, 0.9], [False, True, True]) == 1.0
    with pytest.raises(ValueError, match="is_unknown"):
        M.auroc([0.1, 0.2], [0, 2])


def test_fpr95_constructed():
    ood = np.arange(2.0, 22.0)  # 20 unknowns; catching 95% (19) needs t = 3.0
    idd = np.array([0.0, 1.0, 2.5, 3.0, 4.0, 10.0])  # scores >= 3.0: 3 of 6
    s = np.concatenate([idd, ood])
    u = np.r_[np.zeros(6, bool), np.ones(20, bool)]
    assert M.fpr_at_tpr(s, u) == pytest.approx(0.5)
    # perfect separation -> 0; reversed -> 1
    assert M.fpr_at_tpr(np.r_[np.zeros(5), np.ones(5)], np.r_[np.zeros(5, bool), np.ones(5, bool)]) == 0.0
    assert M.fpr_at_tpr(np.r_[np.ones(5), np.zeros(5)], np.r_[np.zeros(5, bool), np.ones(5, bool)]) == 1.0
    with pytest.raises(ValueError, match="tpr"):
        M.fpr_at_tpr(s, u, tpr=0.0)


def _fpr_hand(s, u, tpr):
    ood = np.sort(s[u])[::-1]
    k = math.ceil(tpr * len(ood) - 1e-9)
    t = ood[k - 1]
    return float((s[~u] >= t).mean())


def _fpr_id_hand(s, u, tpr):
    idd = np.sort(s[~u])
    k = math.ceil(tpr * len(idd) - 1e-9)
    t = idd[k - 1]
    return float((s[u] <= t).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fpr_matches_hand_rule_with_ties(seed):
    rng = np.random.default_rng(seed)
    s = np.round(rng.normal(size=257), 1)  # many ties
    u = rng.random(257) < 0.4
    s[u] += 0.8
    assert M.fpr_at_tpr(s, u) == pytest.approx(_fpr_hand(s, u, 0.95))
    assert M.fpr_at_tpr(s, u, tpr=0.8) == pytest.approx(_fpr_hand(s, u, 0.8))
    assert M.fpr_at_tpr_id(s, u) == pytest.approx(_fpr_id_hand(s, u, 0.95))


def test_fpr95_id_constructed():
    idd = np.arange(20.0)  # 95% of 20 knowns accepted at t = 18
    ood = np.array([5.0, 18.0, 18.5, 30.0])  # <= 18: 2 of 4
    s = np.r_[idd, ood]
    u = np.r_[np.zeros(20, bool), np.ones(4, bool)]
    assert M.fpr_at_tpr_id(s, u) == pytest.approx(0.5)


def test_aupr_in_out_hand_example():
    s = [0.9, 0.8, 0.7, 0.6, 0.5]
    u = [True, False, True, False, False]
    # out (unknown positive, high score first): 0.9 hit P=1 R=1/2, 0.8 miss, 0.7 hit P=2/3 R=1
    assert M.aupr_out(s, u) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # in (known positive, low score first): 0.5 P=1 R=1/3, 0.6 P=1 R=2/3, 0.7 miss, 0.8 P=3/4 R=1
    assert M.aupr_in(s, u) == pytest.approx((1 + 1 + 3 / 4) / 3)


def test_aupr_in_out_match_threshold_formula_and_perfect():
    rng = np.random.default_rng(3)
    s = np.round(rng.normal(size=200), 1)  # with ties
    u = rng.random(200) < 0.25
    s[u] += 1.5
    assert M.aupr_out(s, u) == pytest.approx(average_precision_by_threshold(u, s))
    assert M.aupr_in(s, u) == pytest.approx(average_precision_by_threshold(~u, -s))
    sp = np.r_[np.zeros(4), np.ones(3)]
    up = np.r_[np.zeros(4, bool), np.ones(3, bool)]
    assert M.aupr_in(sp, up) == 1.0 and M.aupr_out(sp, up) == 1.0


# ------------------------------------------------------------------------------------------------
# open set
# ------------------------------------------------------------------------------------------------
def test_open_set_accuracy_hand_example():
    preds = [0, 1, 2, 3, 9, 9, 9, 9]
    labels = [0, 1, 2, 0, 7, 7, 7, -1]
    flags = [False, True, False, False, True, True, False, True]
    unk = [False, False, False, False, True, True, True, True]
    r = M.open_set_accuracy(preds, labels, flags, unk)
    # knowns: 0 ok, 1 right class but flagged, 2 ok, 3 wrong -> 2/4 ; unknowns flagged 3/4
    assert r["acc_s"] == pytest.approx(0.5)
    assert r["acc_n"] == pytest.approx(0.75)
    assert r["acc_h"] == pytest.approx(2 * 0.5 * 0.75 / 1.25)


def test_harmonic_mean_edges():
    assert M.harmonic_mean(0.0, 0.0) == 0.0
    assert M.harmonic_mean(1.0, 1.0) == 1.0
    assert M.harmonic_mean(None, 0.5) is None
    r = M.open_set_accuracy([1, 2], [1, 2], [False, False], [False, False])
    assert r == {"acc_s": 1.0, "acc_n": None, "acc_h": None}


# ------------------------------------------------------------------------------------------------
# shift detection
# ------------------------------------------------------------------------------------------------
def test_match_detections_constructed_timeline():
    cps = [1000, 2000, 3000]
    dets = [500, 1031, 1063, 2900, 3500]
    r = M.match_detections(cps, dets, n_samples=4000, batch_sizes=[32] * 125)
    assert r["delays"] == [31, 900, 500]
    assert r["n_redundant"] == 1 and r["n_false_alarms"] == 1 and r["false_alarms"] == [500]
    assert r["n_missed"] == 0 and r["missed_rate"] == 0.0
    assert r["false_alarms_per_10k"] == pytest.approx(2.5)
    # batches: 1000 in batch 31, 1031 in batch 32; 2000 in 62, 2900 in 90; 3000 in 93, 3500 in 109
    assert r["delays_batches"] == [1, 28, 16]
    assert r["delay_mean"] == pytest.approx((31 + 900 + 500) / 3)
    assert r["delay_median"] == 500.0

    h = M.match_detections(cps, dets, n_samples=4000, horizon=600, batch_sizes=[32] * 125)
    assert h["delays"] == [31, None, 500]
    assert h["n_missed"] == 1 and h["missed_rate"] == pytest.approx(1 / 3)
    assert sorted(h["false_alarms"]) == [500, 2900]
    assert h["delays_batches"] == [1, None, 16]


def test_match_detections_detection_before_change_is_false_alarm_and_empty_inputs():
    r = M.match_detections([100], [99], n_samples=200)
    assert r["delays"] == [None] and r["n_false_alarms"] == 1
    e = M.match_detections([], [], n_samples=0)
    assert e["n_changes"] == 0 and e["missed_rate"] is None and e["false_alarms_per_10k"] is None
    only_fa = M.match_detections([], [10, 20], n_samples=1000)
    assert only_fa["n_false_alarms"] == 2 and only_fa["false_alarms_per_10k"] == pytest.approx(20.0)
    with pytest.raises(ValueError, match="horizon"):
        M.match_detections([1], [2], horizon=0)
    with pytest.raises(ValueError, match="distinct"):
        M.match_detections([1, 1], [2])


def test_change_points_and_sample_to_batch():
    assert M.change_points_from_domains(["a"] * 3 + ["b"] * 2 + ["a"]) == [3, 5]
    assert M.change_points_from_domains([None, None]) == []
    assert M.sample_to_batch([0, 9, 10, 25, 30, -1], [10, 10, 10]).tolist() == [0, 0, 1, 2, -1, -1]


# ------------------------------------------------------------------------------------------------
# recovery
# ------------------------------------------------------------------------------------------------
def test_recovery_batches():
    acc = [80, 80, 80, 80, 40, 50, 60, 70, 78, 79, 80, 80]
    assert M.recovery_batches(acc, [4], pre_window=4, tol=3.0, window=1) == [4]  # 78 >= 77 at batch 8
    # window=3: rolling means after the shift: 40, 45, 50, 60, 69.3, 75.7, 79 (batch 10)
    assert M.recovery_batches(acc, [4], pre_window=4, tol=3.0, window=3) == [6]
    assert M.recovery_batches([80, 80, 79, 81], [2], pre_window=2) == [0]  # never dropped
    assert M.recovery_batches([80, 80, 10, 10], [2], pre_window=2) == [None]  # never recovers
    # the search stops at the next change batch
    acc2 = [90, 90, 50, 50, 90, 90, 90]
    assert M.recovery_batches(acc2, [2, 4], pre_window=2, window=1) == [None, 0]
    assert M.recovery_batches([np.nan, np.nan, 50.0], [2], pre_window=2) == [None]
    with pytest.raises(ValueError, match="pre_window"):
        M.recovery_batches(acc, [4], pre_window=0)


def test_rolling_mean_nan_aware():
    r = M.rolling_mean([np.nan, 2.0, 4.0, 6.0], 2)
    assert np.isnan(r[0]) and r[1:].tolist() == [2.0, 3.0, 5.0]


# ------------------------------------------------------------------------------------------------
# speed
# ------------------------------------------------------------------------------------------------
def test_latency_percentiles_and_throughput():
    lat = np.arange(1, 101) / 1000.0  # 1..100 ms
    p = M.latency_percentiles(lat)
    assert p["p50"] == pytest.approx(50.5)
    assert p["p99"] == pytest.approx(99.01)
    assert M.latency_percentiles([]) == {"p50": None, "p99": None}
    assert M.throughput(500, 0.25) == 2000.0
    assert M.throughput(500, 0.0) is None


# ------------------------------------------------------------------------------------------------
# summarize
# ------------------------------------------------------------------------------------------------
def test_summarize_labelled_run_matches_direct_computation():
    alerts = [{"kind": "covariate_shift", "batch_index": 11, "offsets": {"topic": "t", "partition": 0,
                                                                          "first": 110, "last": 119}},
              {"kind": "semantic_shift", "batch_index": None,
               "offsets": {"topic": "t", "partition": 0, "first": 200, "last": 215}},  # placed by offset: batch 21
              {"kind": "ood_burst", "batch_index": 25}]  # not a shift kind
    log = make_log(alerts=alerts, shift_batches=(11,))
    s = M.summarize(log)
    m = s
    preds, labels, unk = log.preds(), log.labels(), log.is_unknown()
    known = (labels >= 0) & ~unk
    assert m["acc"] == pytest.approx(100 * (preds[known] == labels[known]).mean())
    assert m["err"] == pytest.approx(100 - m["acc"])
    assert m["auroc"] == pytest.approx(100 * auroc_by_pairs(log.ood_scores(), unk))
    flags = log.ood_flags()
    acc_s = ((preds == labels) & ~flags)[known].mean()
    acc_n = flags[unk].mean()
    assert m["acc_s"] == pytest.approx(100 * acc_s)
    assert m["acc_n"] == pytest.approx(100 * acc_n)
    assert m["acc_h"] == pytest.approx(100 * 2 * acc_s * acc_n / (acc_s + acc_n))
    # per domain
    assert list(s["per_domain"]) == ["clean", "fog", "snow"]
    doms = np.array(log.domains())
    for d, row in s["per_domain"].items():
        k = known & (doms == d)
        assert row["n"] == int((doms == d).sum())
        assert row["acc"] == pytest.approx(100 * (preds[k] == labels[k]).mean())
        assert row["acc"] + row["err"] == pytest.approx(100.0)
    # change points derived from domains: samples 100 and 200 (batches 10 and 20)
    sh = s["shift"]
    assert sh["change_points"] == [100, 200] and sh["change_batches"] == [10, 20]
    assert sh["detections"] == [119, 219]  # batch 11 (alert + shift field, deduplicated) and batch 21
    assert sh["delays"] == [19, 19] and sh["delays_batches"] == [1, 1]
    assert m["n_false_alarms"] == 0 and m["n_missed"] == 0 and m["n_shift_alerts"] == 2 and m["n_alerts"] == 3
    # speed
    assert m["samples_per_s"] == pytest.approx(300 / 2.0)
    assert m["latency_p50_ms"] == pytest.approx(15.5)  # 1..30 ms: halfway between the 15th and 16th
    assert m["latency_p99_ms"] == pytest.approx(1 + 0.99 * 29)  # linear interpolation at rank 0.99 * (30 - 1)
    assert m["peak_rss_mb"] == 321.0 and m["n_resets"] == 1
    # series
    assert len(s["series"]["acc"]) == 30
    b0 = log.batches[0]
    assert s["series"]["acc"][0] == pytest.approx(100 * np.mean(np.array(b0.preds) == np.array(b0.labels)))
    json.dumps(s, allow_nan=False)  # strict JSON


def test_summarize_live_stream_without_labels():
    log = make_log(labels=False)
    s = M.summarize(log)
    m = s
    for k in ("acc", "err", "acc_s", "acc_n", "acc_h", "auroc", "fpr95", "aupr_in", "aupr_out"):
        assert m[k] is None, k
    assert s["per_domain"] == {}
    assert m["n_changes"] == 0 and m["missed_rate"] is None
    assert all(v is None for v in s["series"]["acc"])
    assert m["ood_rate"] is not None and m["samples_per_s"] is not None
    json.dumps(s, allow_nan=False)


def test_summarize_no_unknowns_no_change_points():
    log = make_log(unknown=False, domains=("clean",), shift_batches=(5,))
    m = M.summarize(log)
    assert m["auroc"] is None and m["acc_n"] is None and m["acc_h"] is None
    assert m["acc"] is not None and m["acc_s"] is not None
    assert m["n_changes"] == 0 and m["n_false_alarms"] == 1
    assert m["false_alarms_per_10k"] == pytest.approx(1e4 / 300)
    assert m["recovery_mean_batches"] is None


def test_summarize_known_classes_and_explicit_change_points_and_horizon():
    log = make_log(unknown=False, change_points=[150], shift_batches=(16, 29))
    s = M.summarize(log, known_classes={0, 1, 2, 3}, horizon=50)
    labels = log.labels()
    unk = labels == 4
    assert s["n_unknown"] == int(unk.sum())
    assert s["auroc"] == pytest.approx(100 * auroc_by_pairs(log.ood_scores(), unk))
    assert s["shift"]["change_points"] == [150]
    assert s["shift"]["delays"] == [19]  # batch 16 ends at sample 169
    assert s["shift"]["false_alarms"] == [299]  # batch 29 is beyond the 50-sample horizon


def test_summarize_roundtrip_through_runlog_json(tmp_path):
    log = make_log(alerts=[{"kind": "semantic_shift", "batch_index": 22}])
    p = tmp_path / "run.json"
    log.to_json(p)
    a = M.summarize(log)
    b = M.summarize(RunLog.from_json(p))
    assert a == b
    assert set(M.scalar_metrics(a)) == set(a) - {"per_domain", "series", "shift"}


def test_summarize_empty_log():
    s = M.summarize(RunLog())
    assert s["n_samples"] == 0 and s["acc"] is None
    assert s["samples_per_s"] is None and s["latency_p50_ms"] is None


def test_summarize_accepts_alert_model_dumps():
    from streamtta.alerts.schema import Alert, AlertKind, OffsetRange

    a = Alert.create(AlertKind.covariate_shift, "s", OffsetRange(topic="t", partition=0, first=100, last=109))
    b = Alert.create("semantic_shift", "s", OffsetRange(topic="t", partition=0, first=200, last=209), batch_index=20)
    log = make_log(alerts=[a.model_dump(mode="json"), b.model_dump()])  # json dump and enum-valued dump
    assert M.alert_batches(log) == [(10, "covariate_shift"), (20, "semantic_shift")]
    assert M.summarize(log)["shift"]["detections"] == [109, 209]


def test_shift_field_kinds_and_offsets_take_precedence_over_batch_index():
    log = make_log(change_points=[100])
    log.batches[12].shift = "ood_burst"  # not a shift kind by default
    # per-stream batch_index 3 disagrees with the log position; offsets place it in batch 14
    log.alerts = [{"kind": "semantic_shift", "batch_index": 3,
                   "offsets": {"topic": "t", "partition": 0, "first": 140, "last": 149}}]
    s = M.summarize(log)
    assert s["shift"]["detections"] == [149]
    s2 = M.summarize(log, shift_kinds={"ood_burst", "semantic_shift"})
    assert s2["shift"]["detections"] == [129, 149]
    assert s2["shift"]["n_redundant"] == 1
