"""Contract every registered OOD scorer must meet (river ``check_estimator`` spirit).

Parametrised from :data:`streamtta.detectors.SCORERS`, so a newly registered scorer is checked
without editing this file: plain-data state that restores identical scores, determinism for a
seed, batches of one sample, and polarity (higher = more OOD).
"""
import numpy as np
import pytest
import torch

from streamtta.detectors import SCORERS, build_scorer, score_and_flag

DIM, N_CLASSES = 16, 4


def head(features):
    """Logits of a fixed linear head: class c reads dims 3c..3c+2 (dims 12..15 belong to no class)."""
    w = np.zeros((DIM, N_CLASSES), np.float32)
    for c in range(N_CLASSES):
        w[3 * c:3 * c + 3, c] = 1.5
    return torch.from_numpy(np.asarray(features, np.float32) @ w)


def in_distribution(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, N_CLASSES, n)
    mu = np.zeros((N_CLASSES, DIM), np.float32)
    for c in range(N_CLASSES):
        mu[c, 3 * c:3 * c + 3] = 3.0
    f = np.maximum(mu[y] + 0.5 * rng.normal(size=(n, DIM)), 0).astype(np.float32)
    return torch.from_numpy(f), head(f), torch.from_numpy(y)


def far_away(n, seed):
    """Samples active only where no known class is: far from the fitted data in features and logits."""
    rng = np.random.default_rng(seed)
    mu = np.zeros(DIM, np.float32)
    mu[12:] = 3.0
    f = np.maximum(mu + 0.5 * rng.normal(size=(n, DIM)), 0).astype(np.float32)
    return torch.from_numpy(f), head(f)


def fitted(name, seed=0, **kw):
    f, lg, y = in_distribution(400, seed=10)
    scorer = build_scorer(name, seed=seed, **kw)
    assert scorer.fit(f, lg, y) is scorer
    return scorer


def stream_batch(seed, n=48):
    """A stream batch: mostly ID samples, a few far ones (exercises every online memory)."""
    fi, li, _ = in_distribution(n - 8, seed)
    fo, lo = far_away(8, seed + 1000)
    return torch.cat([fi, fo]), torch.cat([li, lo])


NAMES = sorted(SCORERS)


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trip_through_weights_only_load_gives_identical_scores(name, tmp_path):
    a = fitted(name)
    for b in range(3):
        f, lg = stream_batch(b)
        a.score_and_flag(f, lg)
        a.partial_fit(f, lg, torch.ones(len(f), dtype=torch.bool))
    torch.save(a.state_dict(), tmp_path / "scorer.pt")
    b = build_scorer(name)
    b.load_state_dict(torch.load(tmp_path / "scorer.pt", weights_only=True))
    probe_f, probe_lg = stream_batch(99)
    np.testing.assert_array_equal(a.score(probe_f, probe_lg), b.score(probe_f, probe_lg))
    assert a.threshold == b.threshold
    # the restored scorer also learns identically from the next batch
    f, lg = stream_batch(7)
    for s in (a, b):
        s.partial_fit(f, lg, torch.ones(len(f), dtype=torch.bool))
    np.testing.assert_array_equal(a.score(probe_f, probe_lg), b.score(probe_f, probe_lg))


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_gives_identical_scores(name):
    a, b = fitted(name, seed=3), fitted(name, seed=3)
    f, lg = stream_batch(5)
    np.testing.assert_array_equal(a.score(f, lg), b.score(f, lg))
    assert a.threshold == b.threshold


@pytest.mark.parametrize("name", NAMES)
def test_batch_of_one_sample(name):
    s = fitted(name)
    f, lg = stream_batch(6)
    scores, flags = score_and_flag(s, f[:1], lg[:1])
    assert scores.shape == (1,) and np.isfinite(scores).all() and flags.shape == (1,) and flags.dtype == bool
    s.partial_fit(f[:1], lg[:1], torch.ones(1, dtype=torch.bool))
    assert np.isfinite(s.score(f[:1], lg[:1])).all()


@pytest.mark.parametrize("name", NAMES)
def test_polarity_far_samples_score_higher(name):
    s = fitted(name)
    fi, li, _ = in_distribution(200, seed=21)
    fo, lo = far_away(200, seed=22)
    id_scores, far_scores = s.score(fi, li), s.score(fo, lo)
    assert far_scores.mean() > id_scores.mean(), f"{name}: far {far_scores.mean():.4f} <= ID {id_scores.mean():.4f}"
    assert np.median(far_scores) > np.quantile(id_scores, 0.9)


@pytest.mark.parametrize("name", NAMES)
def test_stream_copies_share_fixed_parts_learn_independently_and_restore(name, tmp_path):
    """``for_stream`` copies: the fixed source parts are left out of their state (and stay shared), each
    copy learns on its own (the fitted scorer is unchanged), and a copy's state, saved as plain data,
    restores into another copy with identical scores; the full state of the fitted scorer (an older
    checkpoint holding the fixed parts) loads into a copy too."""
    base = fitted(name)
    probe_f, probe_lg = stream_batch(99)
    base_scores = base.score(probe_f, probe_lg)
    a, b = base.for_stream(), base.for_stream()
    for k in base.fixed_keys:
        assert k not in a.state_dict() and k in base.state_dict()
    for i in range(3):
        for s, seed in ((a, i), (b, 50 + i)):
            f, lg = stream_batch(seed)
            s.score_and_flag(f, lg)
            s.partial_fit(f, lg, torch.ones(len(f), dtype=torch.bool))
    np.testing.assert_array_equal(base.score(probe_f, probe_lg), base_scores)
    torch.save(a.state_dict(), tmp_path / "a.pt")
    c = base.for_stream()
    c.load_state_dict(torch.load(tmp_path / "a.pt", weights_only=True))
    np.testing.assert_array_equal(a.score(probe_f, probe_lg), c.score(probe_f, probe_lg))
    d = base.for_stream()
    d.load_state_dict(base.state_dict())
    np.testing.assert_array_equal(d.score(probe_f, probe_lg), base_scores)
    assert d.shares_fixed == a.shares_fixed  # equal fixed parts in the state: still shared
