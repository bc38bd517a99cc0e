"""Strong-OOD pool (FIFO bound, novel-cluster events) and the novel-class detector."""
import numpy as np
import torch

from streamtta.detectors import NovelClassDetector, StrongOODPool
from streamtta.detectors.ood.index import l2_normalize


def test_pool_is_bounded_fifo():
    rng = np.random.default_rng(0)
    pool = StrongOODPool(capacity=30, dedup_sim=0.999, min_cluster_size=10_000)
    first = None
    for b in range(10):
        pool.update(rng.normal(size=(8, 32)).astype(np.float32), batch_index=b)
        if first is None:
            first = pool.ids.copy()
    assert len(pool) == 30 and len(pool.index) == 30
    assert not np.isin(first, pool.ids).any()  # the oldest entries left first
    assert np.all(np.diff(pool.ids) > 0) and pool.birth.min() >= 6


def test_duplicates_are_hits_not_entries():
    pool = StrongOODPool(capacity=50, dedup_sim=0.95)
    v = l2_normalize(np.ones((1, 8)))
    pool.update(np.repeat(v, 5, 0), batch_index=0)
    assert len(pool) == 1
    pool.update(np.repeat(v, 3, 0), batch_index=1)
    assert len(pool) == 1 and int(pool.hits.sum()) == 3


def test_persistent_cluster_raises_one_event():
    rng = np.random.default_rng(0)
    pool = StrongOODPool(capacity=100, min_cluster_size=12, persist_batches=4, cluster_sim=0.8)
    centre = l2_normalize(rng.normal(size=(1, 32)))[0]
    events = []
    for b in range(12):
        z = centre + 0.08 * rng.normal(size=(4, 32))
        events += [(b, e) for e in pool.update(z, batch_index=b)]
    assert len(events) == 1
    b, ev = events[0]
    assert b == 3 and ev.size >= 12 and ev.evidence["span_batches"] >= 4
    assert ev.alert_kind == "novel_cluster"


def test_scattered_or_short_lived_outliers_raise_nothing():
    rng = np.random.default_rng(1)
    pool = StrongOODPool(capacity=100, min_cluster_size=8, persist_batches=3)
    events = []
    for b in range(20):  # unrelated far-away samples: no cluster
        events += pool.update(rng.normal(size=(4, 64)).astype(np.float32), batch_index=b)
    burst = StrongOODPool(min_cluster_size=8, persist_batches=3)
    c = l2_normalize(rng.normal(size=(1, 64)))
    events += burst.update(np.repeat(c, 30, 0), batch_index=0)  # one batch only: not persistent
    assert events == []


def test_pool_state_round_trip():
    rng = np.random.default_rng(2)
    pool = StrongOODPool(capacity=20, dedup_sim=0.999)
    for b in range(3):
        pool.update(rng.normal(size=(5, 16)).astype(np.float32), batch_index=b)
    other = StrongOODPool(capacity=20, dedup_sim=0.999)
    other.load_state_dict(pool.state_dict())
    q = rng.normal(size=(7, 16)).astype(np.float32)
    np.testing.assert_allclose(pool.similarity(q)[0], other.similarity(q)[0])
    assert other.next_id == pool.next_id


def test_novel_class_detector_end_to_end():
    rng = np.random.default_rng(0)
    known = np.abs(np.concatenate([rng.normal([5, 0, 0, 0, 0, 0], 0.5, (150, 6)),
                                   rng.normal([0, 5, 0, 0, 0, 0], 0.5, (150, 6))])).astype(np.float32)
    det = NovelClassDetector(n_per_class=2, min_cluster_size=15, persist_batches=3).fit(known, np.repeat([0, 1], 150))
    # ID batches flagged by a (noisy) scorer do not become strong OOD
    ev = det.update(known[:32], np.ones(32, bool), batch_index=0)
    assert ev == [] and len(det.pool) <= 2
    events = []
    for b in range(1, 8):
        new = np.abs(rng.normal([0, 0, 0, 5, 5, 0], 0.3, (10, 6))).astype(np.float32)
        x = np.r_[known[rng.integers(0, 300, 22)], new]
        flags = np.r_[np.zeros(22, bool), np.ones(10, bool)]
        events += det.update(x, flags, batch_index=b)
    assert len(events) == 1
    assert 0.2 < det.last_unknown_hits < 0.5  # ~10 of 32 samples sit next to unknown prototypes
    other = NovelClassDetector()
    other.load_state_dict(det.state_dict())
    np.testing.assert_allclose(other.distance(known[:5]), det.distance(known[:5]))


def test_pool_and_novelty_states_load_with_weights_only(tmp_path):
    rng = np.random.default_rng(1)
    known = np.abs(np.concatenate([rng.normal([5, 0, 0, 0], 0.5, (60, 4)),
                                   rng.normal([0, 5, 0, 0], 0.5, (60, 4))])).astype(np.float32)
    det = NovelClassDetector(n_per_class=2, min_cluster_size=4, persist_batches=2).fit(known, np.repeat([0, 1], 60))
    for b in range(3):
        det.update(np.abs(rng.normal([0, 0, 5, 5], 0.3, (6, 4))).astype(np.float32), np.ones(6, bool), batch_index=b)
    assert len(det.pool) > 0
    torch.save(det.state_dict(), tmp_path / "novelty.pt")
    other = NovelClassDetector(n_per_class=2, min_cluster_size=4, persist_batches=2)
    other.load_state_dict(torch.load(tmp_path / "novelty.pt", weights_only=True))
    probe = np.abs(rng.normal([0, 0, 5, 5], 0.3, (6, 4))).astype(np.float32)
    np.testing.assert_array_equal(other.distance(probe), det.distance(probe))
    np.testing.assert_array_equal(other.pool.similarity(probe)[0], det.pool.similarity(probe)[0])
    assert other.pool.next_id == det.pool.next_id and other.strong_threshold == det.strong_threshold
