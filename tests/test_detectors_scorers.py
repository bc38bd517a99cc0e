"""OOD scorers: polarity, 95% TPR calibration, Otsu threshold, state, registry."""
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from streamtta.detectors import DEFAULT_SCORER, SCORERS, build_scorer, score_and_flag
from streamtta.detectors.ood.thresholds import OtsuThreshold, otsu_threshold, tpr_threshold

DIM, C = 16, 4


def id_data(n, seed):
    """ReLU features: class c is active on dims 3c..3c+2; logits from a matching linear head."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    mu = np.zeros((C, DIM))
    for c in range(C):
        mu[c, 3 * c : 3 * c + 3] = 3.0
    f = np.maximum(mu[y] + 0.5 * rng.normal(size=(n, DIM)), 0).astype(np.float32)
    return f, logits_of(f), y


def ood_data(n, seed):
    """Unknown class: active on dims 12..15 (no known class uses them), weaker overall."""
    rng = np.random.default_rng(seed)
    mu = np.zeros(DIM)
    mu[12:] = 2.0
    mu[:12] = 0.6
    f = np.maximum(mu + 0.5 * rng.normal(size=(n, DIM)), 0).astype(np.float32)
    return f, logits_of(f)


def logits_of(f):
    w = np.zeros((DIM, C), np.float32)
    for c in range(C):
        w[3 * c : 3 * c + 3, c] = 1.0
    return torch.from_numpy(f @ w * 1.5)


ALL = sorted(SCORERS)


@pytest.mark.parametrize("name", ALL)
def test_polarity_ood_scores_higher(name):
    f, lo, y = id_data(600, 0)
    s = build_scorer(name).fit(torch.from_numpy(f), lo, torch.from_numpy(y))
    fi, li, _ = id_data(300, 1)
    fo, lo_ = ood_data(300, 2)
    si, so = s.score(fi, li), s.score(fo, lo_)
    assert si.shape == (300,) and np.isfinite(si).all()
    assert so.mean() > si.mean()
    auc = roc_auc_score(np.r_[np.zeros(300), np.ones(300)], np.r_[si, so])
    assert auc > 0.9, f"{name}: AUROC {auc:.3f}"


@pytest.mark.parametrize("name", ALL)
def test_threshold_accepts_95_percent_of_id(name):
    f, lo, y = id_data(1000, 3)
    s = build_scorer(name, calib_fraction=0.3).fit(f, lo, y)
    fi, li, _ = id_data(3000, 4)  # fresh ID samples from the same distribution
    tpr = float((~s.is_ood(s.score(fi, li))).mean())
    assert 0.91 <= tpr <= 0.99, f"{name}: TPR {tpr:.3f}"
    # calibrate() sets the threshold exactly at the 95% quantile of the given scores
    s.calibrate(fi, li)
    assert abs(float((~s.is_ood(s.score(fi, li))).mean()) - 0.95) < 0.005


def test_tpr_threshold_and_errors():
    assert tpr_threshold(np.arange(101.0), 0.9) == pytest.approx(90.0)
    with pytest.raises(ValueError, match="tpr"):
        tpr_threshold([1.0, 2.0], 1.5)
    with pytest.raises(ValueError, match="unknown OOD scorer"):
        build_scorer("nope")
    with pytest.raises(ValueError, match="bad hyperparameters"):
        build_scorer("energy", colour="red")
    with pytest.raises(RuntimeError, match="not fitted"):
        build_scorer("prototype").score(np.ones((2, 3)), None)


def test_otsu_on_bimodal_queue():
    rng = np.random.default_rng(0)
    lo, hi = rng.normal(0.2, 0.03, 400), rng.normal(0.7, 0.04, 112)
    t = otsu_threshold(np.r_[lo, hi])
    assert lo.max() < t < hi.min()
    q = OtsuThreshold(queue_size=512, min_fill=64, fallback=5.0)
    assert q.update(lo[:10]) == 5.0  # not enough scores yet: fallback
    q.update(rng.permutation(np.r_[lo, hi]))
    assert lo.max() < q.value < hi.min()
    # FIFO: after a long run of low scores only, the old high mode is gone from the queue
    q.update(rng.normal(0.2, 0.03, 512))
    assert len(q.queue) == 512 and max(q.queue) < 0.5


def test_scorer_otsu_mode_uses_recent_scores():
    f, lo, y = id_data(600, 0)
    s = build_scorer("prototype", threshold_mode="otsu", otsu_min_fill=32).fit(f, lo, y)
    calibrated = s.threshold
    fi, li, _ = id_data(200, 1)
    fo, lo_ = ood_data(200, 2)
    x = np.r_[fi, fo]
    logits = torch.cat([li, lo_])
    scores, flags = s.score_and_flag(x, logits)
    assert s.threshold != calibrated
    assert flags[200:].mean() > 0.9 and flags[:200].mean() < 0.1


@pytest.mark.parametrize("name", ALL)
def test_state_round_trip(name):
    f, lo, y = id_data(400, 0)
    s = build_scorer(name).fit(f, lo, y)
    s.partial_fit(f[:64], lo[:64], torch.ones(64, dtype=torch.bool))
    t = build_scorer(name)
    t.load_state_dict(s.state_dict())
    fi, li, _ = id_data(50, 9)
    np.testing.assert_allclose(s.score(fi, li), t.score(fi, li), rtol=1e-6, atol=1e-6)
    assert t.threshold == s.threshold
    with pytest.raises(ValueError, match="cannot be loaded"):
        build_scorer("energy" if name != "energy" else "msp").load_state_dict(s.state_dict())


def test_prototype_partial_fit_follows_covariate_drift():
    f, lo, y = id_data(600, 0)
    s = build_scorer("prototype", momentum=0.9, update_min_conf=0.5).fit(f, lo, y)
    fi, li, _ = id_data(400, 5)
    drifted = fi + np.float32(1.0) * (np.arange(DIM) % 2)  # shift of the feature distribution
    before = s.score(drifted, li).mean()
    for i in range(0, 400, 50):
        s.partial_fit(drifted[i : i + 50], li[i : i + 50], torch.ones(50, dtype=torch.bool))
    assert s.score(drifted, li).mean() < before
    # samples the engine flagged OOD never move the prototypes
    s2 = build_scorer("prototype").fit(f, lo, y)
    v = s2.memory.vectors_.copy()
    s2.partial_fit(drifted[:50], li[:50], torch.zeros(50, dtype=torch.bool))
    np.testing.assert_array_equal(v, s2.memory.vectors_)


def test_recalibrate_keeps_classes_missing_from_buffer():
    f, lo, y = id_data(600, 0)
    s = build_scorer("prototype").fit(f, lo, y)
    keep = y != 3
    s.recalibrate(f[keep], lo[keep])
    assert sorted(set(s.memory.classes_.tolist())) == [0, 1, 2, 3]


def test_default_scorer_and_score_and_flag():
    assert DEFAULT_SCORER in SCORERS
    f, lo, y = id_data(400, 0)
    s = build_scorer(DEFAULT_SCORER).fit(f, lo, y)
    fo, lo_ = ood_data(10, 1)
    scores, flags = score_and_flag(s, torch.from_numpy(fo), lo_)
    assert scores.shape == (10,) and flags.dtype == bool and flags.shape == (10,)
    np.testing.assert_array_equal(flags, s.is_ood(scores))
    # the adaptive threshold is fed unless the batch is scored a second time
    t = build_scorer("energy", threshold_mode="otsu", otsu_min_fill=4).fit(f, lo, y)
    score_and_flag(t, fo, lo_, observe=False)
    assert len(t.otsu.queue) == 0
    score_and_flag(t, fo, lo_)
    assert len(t.otsu.queue) == 10


def test_fusion_online_standardisation_tracks_feature_component_only():
    f, lo, y = id_data(600, 0)
    s = build_scorer("fusion", online_momentum=0.5).fit(f, lo, y)
    loc0 = s.loc.copy()
    fi, li, _ = id_data(256, 1)
    shifted = fi + np.float32(0.8)  # feature-space offset (e.g. new normalisation statistics)
    for i in range(0, 256, 64):
        s.partial_fit(shifted[i : i + 64], li[i : i + 64], torch.ones(64, dtype=torch.bool))
    maha, energy = s.component_names.index("mahalanobis"), s.component_names.index("energy")
    assert s.loc[maha] > loc0[maha]
    assert s.loc[energy] == loc0[energy]
    static = build_scorer("fusion", online=()).fit(f, lo, y)
    # re-standardised: shifted ID data is accepted again at about the calibrated rate
    assert (~s.is_ood(s.score(shifted, li))).mean() > (~static.is_ood(static.score(shifted, li))).mean()
    with pytest.raises(ValueError, match="not components"):
        build_scorer("fusion", online=("knn",))


def test_contrast_learns_the_streams_unknowns():
    """Unknowns that look no farther from the source than hard ID samples: the memory of the stream's
    own unknowns is what separates them, and only after batches were seen."""
    from streamtta.detectors import ContrastScorer

    f, lo, y = id_data(600, 0)
    s = ContrastScorer(k=5, k_unknown=3, min_batch=16).fit(f, lo, y)
    fi, li, _ = id_data(200, 1)
    fo, lo_ = ood_data(200, 2)
    truth = np.r_[np.zeros(200), np.ones(200)]
    before = roc_auc_score(truth, np.r_[s.score(fi, li), s.score(fo, lo_)])
    assert len(s.unknown) == 0 and s.threshold == s.calibrated_threshold  # hold-out threshold until then
    rng = np.random.default_rng(3)
    for b in range(6):  # stream batches: 48 ID + 16 unknown
        bi, bli, _ = id_data(48, 10 + b)
        bo, blo = ood_data(16, 20 + b)
        x, lg = np.r_[bi, bo], torch.cat([bli, blo])
        perm = rng.permutation(64)
        x, lg = x[perm], lg[perm]
        s.partial_fit(x, lg, torch.ones(64, dtype=torch.bool))
    assert len(s.unknown) > 0 and len(s.known) > 0
    # the unknown memory holds (mostly) unknown samples: they sit on dims 12..15
    assert (s.unknown.vecs[:, 12:].mean(1) > s.unknown.vecs[:, :12].mean(1)).mean() > 0.9
    after = roc_auc_score(truth, np.r_[s.score(fi, li), s.score(fo, lo_)])
    assert after >= before and after > 0.99
    # flags: closer to the unknowns than to anything known (margin 0)
    assert s.threshold == 0.0
    assert s.is_ood(s.score(fo, lo_)).mean() > 0.9 and s.is_ood(s.score(fi, li)).mean() < 0.1


def test_contrast_small_batches_rank_against_recent_samples():
    from streamtta.detectors import ContrastScorer

    f, lo, y = id_data(400, 0)
    s = ContrastScorer(min_batch=16, queue_size=64).fit(f, lo, y)
    fi, li, _ = id_data(8, 1)
    s.partial_fit(fi, li)  # 8 samples < min_batch and nothing queued: nothing admitted yet
    assert len(s.unknown) == 0 and len(s.known) == 0 and len(s.queue) == 8
    fi, li, _ = id_data(8, 2)
    s.partial_fit(fi, li)  # 16 queued samples: the tails of the queue are admitted from now on
    for seed in (3, 4):
        fi, li, _ = id_data(8, seed)
        s.partial_fit(fi, li)
    n0 = len(s.unknown)
    for b in range(4):
        fo, lo_ = ood_data(1, 30 + b)
        s.partial_fit(fo, lo_)  # batches of one: ranked among the queued ID samples, at the top
    assert len(s.unknown) == n0 + 4
    assert (s.unknown.vecs[-4:, 12:].mean(1) > s.unknown.vecs[-4:, :12].mean(1)).all()
    with pytest.raises(ValueError, match="unknown_quantile"):
        ContrastScorer(unknown_quantile=1.5)
    with pytest.raises(ValueError, match="at least k"):
        ContrastScorer(k=10, known_size=5)


def test_engine_feeds_the_adaptive_threshold():
    """Pipeline.score goes through score_and_flag, so an Otsu threshold moves with the stream."""
    from torch import nn

    from streamtta.pipeline import Pipeline

    f, lo, y = id_data(600, 0)
    s = build_scorer("prototype", threshold_mode="otsu", otsu_min_fill=32).fit(f, lo, y)
    calibrated = s.threshold
    st = Pipeline(nn.Sequential(nn.Linear(4, lo.shape[1])), adapter="source", num_classes=lo.shape[1])
    st.parts.scorer, st.parts.gate_scorer, st.blueprint.calibrated = s, None, True
    fi, li, _ = id_data(200, 1)
    fo, lo_ = ood_data(200, 2)
    _, flags, keep = st.score(torch.from_numpy(np.r_[fi, fo]), torch.cat([li, lo_]))
    assert s.threshold != calibrated and len(s.otsu.queue) == 400
    assert flags[200:].mean() > 0.9 and np.array_equal(keep, ~flags)


def test_contrast_learns_from_the_scores_it_just_computed():
    """score(feats) then partial_fit(feats.detach()): one search, not two; a changed batch is re-scored."""
    from streamtta.detectors import ContrastScorer

    f, lo, y = id_data(300, 0)
    s = ContrastScorer().fit(f, lo, y)
    calls = []
    inner = s._score_z
    s._score_z = lambda z: calls.append(len(z)) or inner(z)
    fb, lb, _ = id_data(64, 1)
    t = torch.from_numpy(fb)
    s.score(t.detach(), lb)
    s.partial_fit(t.detach(), lb)
    assert calls == [64]
    s.score(t, lb)
    t.mul_(2.0)  # modified in place after scoring: the cached scores are stale
    s.partial_fit(t, lb)
    assert calls == [64, 64, 64]


def test_contrast_warm_up_keeps_one_scale_and_one_boundary():
    """Until ``min_unknown`` samples are stored the unknown term is the calibrated prior: the scores are
    the prior-less ones shifted by it, the boundary is 0 before and after the memory takes over, and a
    stream scored through its warm-up ranks unknowns above known samples better than with a 0 term."""
    from streamtta.detectors import ContrastScorer

    f, lo, y = id_data(600, 0)
    warm = ContrastScorer(k=5, k_unknown=3, min_unknown=24).fit(f, lo, y)
    cold = ContrastScorer(k=5, k_unknown=3, min_unknown=3, warm_prior=False, known_accepted_only=False).fit(f, lo, y)
    assert cold.prior == 0.0 and 0.5 < warm.prior < 1.0
    assert abs(warm.threshold) < 1e-6 and warm.threshold == warm.calibrated_threshold
    fi, li, _ = id_data(100, 1)
    fo, lo_ = ood_data(100, 2)
    x, lg = np.r_[fi, fo], torch.cat([li, lo_])
    np.testing.assert_allclose(warm.score(x, lg), cold.score(x, lg) + warm.prior, atol=1e-6)
    np.testing.assert_array_equal(warm.is_ood(warm.score(x, lg)), cold.is_ood(cold.score(x, lg)))

    rng = np.random.default_rng(5)
    scores: dict[str, list] = {"warm": [], "cold": []}
    truth = []
    for b in range(6):  # 48 ID + 16 unknown per batch, scored before each scorer learns from the batch
        bi, bli, _ = id_data(48, 40 + b)
        bo, blo = ood_data(16, 50 + b)
        perm = rng.permutation(64)
        xb, lb = np.r_[bi, bo][perm], torch.cat([bli, blo])[perm]
        truth.append((perm >= 48).astype(int))
        for name, s in (("warm", warm), ("cold", cold)):
            sb = s.score(xb, lb)
            scores[name].append(sb)
            s.partial_fit(xb, lb, torch.from_numpy(~s.is_ood(sb)))
        if b == 0:
            assert 0 < len(warm.unknown) < warm.min_unknown and warm.threshold == warm.calibrated_threshold
    assert len(warm.unknown) >= warm.min_unknown and warm.threshold == 0.0
    t = np.concatenate(truth)
    auc = {k: roc_auc_score(t, np.concatenate(v)) for k, v in scores.items()}
    assert auc["warm"] > auc["cold"], auc

    # the prior is part of the state: a restored copy scores the same
    other = ContrastScorer(k=5, k_unknown=3, min_unknown=24).fit(f[:300], lo[:300], y[:300])
    other.load_state_dict(warm.state_dict())
    assert other.prior == warm.prior
    np.testing.assert_allclose(other.score(x, lg), warm.score(x, lg))
    with pytest.raises(ValueError, match="min_unknown"):
        ContrastScorer(unknown_size=16)  # the default min_unknown (32) could never be reached
