"""Prototype memory and the FAISS index wrapper."""
import numpy as np
import pytest
import torch

from streamtta.detectors.ood.index import HAVE_FAISS, FlatIPIndex, l2_normalize
from streamtta.detectors.ood.prototypes import PrototypeMemory


def clusters(n_classes=3, per_class=60, dim=16, seed=0, modes=2):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes * modes, dim))
    x, y = [], []
    for c in range(n_classes):
        for m in range(modes):
            x.append(centres[c * modes + m] + 0.15 * rng.normal(size=(per_class // modes, dim)))
            y.append(np.full(per_class // modes, c))
    return np.concatenate(x).astype(np.float32), np.concatenate(y)


def test_build_unit_norm_and_classes():
    x, y = clusters()
    mem = PrototypeMemory(n_per_class=2, seed=0).fit(x, y)
    assert len(mem) == 6
    assert sorted(np.unique(mem.classes_).tolist()) == [0, 1, 2]
    assert np.bincount(mem.classes_).tolist() == [2, 2, 2]
    np.testing.assert_allclose(np.linalg.norm(mem.vectors_, axis=1), 1.0, atol=1e-5)
    # k-means found the two modes of each class: every sample is close to one prototype of its class
    sims, cls = mem.class_similarity(x)
    assert (cls[sims.argmax(1)] == y).mean() > 0.99
    assert sims.max(1).min() > 0.9


def test_few_samples_give_fewer_prototypes():
    x, y = clusters(per_class=12)
    mem = PrototypeMemory(n_per_class=4, min_per_prototype=10).fit(x, y)
    assert np.bincount(mem.classes_).tolist() == [1, 1, 1]


def test_ema_update_moves_nearest_prototype_of_the_class():
    x, y = clusters(modes=1)
    mem = PrototypeMemory(n_per_class=1, momentum=0.5).fit(x, y)
    target = l2_normalize(np.eye(16, dtype=np.float32)[:1])
    before = mem.vectors_.copy()
    info = mem.update(np.repeat(target, 4, 0), np.zeros(4, int))
    assert info == {"updated": 1, "spawned": 0}
    j = int(np.flatnonzero(mem.classes_ == 0)[0])
    assert mem.vectors_[j] @ target[0] > before[j] @ target[0]  # moved towards the samples
    np.testing.assert_allclose(np.linalg.norm(mem.vectors_[j]), 1.0, atol=1e-5)
    np.testing.assert_array_equal(mem.vectors_[mem.classes_ != 0], before[mem.classes_ != 0])
    # the FAISS copy follows the arrays
    np.testing.assert_allclose(mem.index.reconstruct(mem.ids_[j : j + 1])[0], mem.vectors_[j], atol=1e-6)
    # unknown classes are ignored
    assert mem.update(target, [7]) == {"updated": 0, "spawned": 0}


def test_spawning_is_bounded():
    x, y = clusters(modes=1)
    mem = PrototypeMemory(n_per_class=1, max_per_class=3, spawn_below=0.5).fit(x, y)
    rng = np.random.default_rng(1)
    for _ in range(10):  # far-away confident samples of class 0 keep arriving
        mem.update(rng.normal(size=(5, 16)).astype(np.float32), np.zeros(5, int))
    assert int((mem.classes_ == 0).sum()) == 3
    assert len(mem) == 3 + 2
    assert len(mem.index) == len(mem)


def test_state_round_trip_gives_identical_search():
    x, y = clusters()
    mem = PrototypeMemory(n_per_class=2, momentum=0.9).fit(x, y)
    mem.update(x[:20], y[:20])
    state = mem.state_dict()
    assert all(isinstance(state[k], torch.Tensor) for k in ("ids", "classes", "vectors", "counts"))
    other = PrototypeMemory()
    other.load_state_dict(state)
    q = x[::7]
    s1, i1 = mem.search(q, k=3)
    s2, i2 = other.search(q, k=3)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, atol=1e-6)
    mem.update(x[20:40], y[20:40])  # the copy is independent
    assert not np.allclose(mem.vectors_, other.vectors_)


@pytest.mark.skipif(not HAVE_FAISS, reason="faiss not installed")
def test_faiss_search_equals_bruteforce_torch():
    rng = np.random.default_rng(0)
    base = l2_normalize(rng.normal(size=(200, 32)))
    ids = rng.permutation(10_000)[:200]
    q = l2_normalize(rng.normal(size=(50, 32)))
    fa = FlatIPIndex(32, backend="faiss")
    fa.upsert(ids, base)
    th = FlatIPIndex(32, backend="torch")
    th.upsert(ids, base)
    s_f, i_f = fa.search(q, k=5)
    s_t, i_t = th.search(q, k=5)
    sims = torch.from_numpy(q) @ torch.from_numpy(base).T
    s_b, pos = sims.topk(5, dim=1)
    np.testing.assert_array_equal(i_f, ids[pos.numpy()])
    np.testing.assert_array_equal(i_t, ids[pos.numpy()])
    np.testing.assert_allclose(s_f, s_b.numpy(), atol=1e-5)
    # update in place (remove + add under the same id) and removal
    fa.upsert(ids[:1], q[:1])
    assert fa.search(q[:1], 1)[1][0, 0] == ids[0]
    assert fa.remove(ids[:10]) == 10 and len(fa) == 190
    assert not np.isin(ids[:10], fa.ids()).any()


def test_search_pads_when_fewer_than_k():
    idx = FlatIPIndex(4, backend="torch")
    sims, ids = idx.search(np.ones((2, 4), np.float32), k=3)
    assert (ids == -1).all() and np.isneginf(sims).all()
    idx.upsert([5], l2_normalize(np.ones((1, 4))))
    sims, ids = idx.search(np.ones((1, 4), np.float32), k=3)
    assert ids.tolist() == [[5, -1, -1]]


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="momentum"):
        PrototypeMemory(momentum=1.5)
    with pytest.raises(RuntimeError, match="empty"):
        PrototypeMemory().search(np.ones((1, 3)))
    idx = FlatIPIndex(3)
    with pytest.raises(ValueError, match="dimension"):
        idx.upsert([1], np.ones((1, 4)))
    with pytest.raises(ValueError, match="backend"):
        FlatIPIndex(3, backend="hnsw")
