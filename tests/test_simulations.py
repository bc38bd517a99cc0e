"""Orderings, schedules, river sensor data and the CIFAR-C loader."""
from __future__ import annotations

import numpy as np
import pytest

from streamtta.simulations.cifar_c import CIFAR_C_CORRUPTIONS, cifar_c_labels, load_cifar_c
from streamtta.simulations.orderings import dirichlet_chunks, dirichlet_order, iid_order, make_order, sorted_order
from streamtta.simulations.schedules import (
    GRADUAL_SEVERITIES,
    Schedule,
    Segment,
    abrupt,
    concat,
    continual,
    mixed,
    ood_mask,
)
from streamtta.simulations.sensors import (
    SENSOR_SHIFTS,
    load_river_dataset,
    load_river_split,
    river_concept_stream,
    shift_features,
)


def n_runs(seq: np.ndarray) -> int:
    """Number of maximal constant runs."""
    return int(1 + np.count_nonzero(seq[1:] != seq[:-1])) if len(seq) else 0


# -- orderings ----------------------------------------------------------------------------------------
LABELS = np.repeat(np.arange(8), 60)
UNEVEN = np.concatenate([np.full(n, c) for c, n in enumerate([90, 40, 70, 10, 55, 33, 61, 25])])


@pytest.mark.parametrize("fn", [iid_order, sorted_order, lambda y, s: dirichlet_order(y, 0.1, s)])
@pytest.mark.parametrize("labels", [LABELS, UNEVEN])
def test_orders_are_permutations_and_seeded(fn, labels):
    o = fn(labels, 3)
    assert o.dtype == np.int64
    np.testing.assert_array_equal(np.sort(o), np.arange(len(labels)))
    np.testing.assert_array_equal(np.bincount(labels[o]), np.bincount(labels))
    np.testing.assert_array_equal(o, fn(labels, 3))
    assert not np.array_equal(o, fn(labels, 4))


def test_sorted_order_is_class_blocks_ascending():
    y = UNEVEN[iid_order(UNEVEN, 0)]
    o = sorted_order(y, 1)
    assert (np.diff(y[o]) >= 0).all()
    assert not np.array_equal(o, np.argsort(y, kind="stable"))  # random order inside each block


def test_dirichlet_delta_zero_is_sorted():
    np.testing.assert_array_equal(dirichlet_order(UNEVEN, 0.0, 5), sorted_order(UNEVEN, 5))


@pytest.mark.parametrize("seed", range(5))
def test_dirichlet_small_delta_gives_class_blocks(seed):
    o = dirichlet_order(LABELS, 1e-3, seed)
    # every class is one contiguous block
    assert n_runs(LABELS[o]) == 8


def test_dirichlet_correlation_decreases_with_delta():
    def mean_runs(delta: float) -> float:
        return float(np.mean([n_runs(LABELS[dirichlet_order(LABELS, delta, s)]) for s in range(8)]))

    tiny, small, big = mean_runs(0.01), mean_runs(0.1), mean_runs(10.0)
    assert tiny < small < big
    iid_runs = np.mean([n_runs(LABELS[iid_order(LABELS, s)]) for s in range(8)])
    assert big < iid_runs  # class pieces stay contiguous inside each chunk, even for a large delta


@pytest.mark.parametrize("seed", range(5))
def test_dirichlet_balances_chunks(seed):
    n, k = len(UNEVEN), 4
    chunks = dirichlet_chunks(UNEVEN, 0.1, seed, num_chunks=4)
    # the chunks are those of the order itself, and the order keeps every class count
    o = dirichlet_order(UNEVEN, 0.1, seed, num_chunks=4)
    np.testing.assert_array_equal(np.concatenate(chunks), o)
    np.testing.assert_array_equal(np.bincount(UNEVEN[o]), np.bincount(UNEVEN))
    assert len(chunks) == k
    cap = n / k  # a chunk that holds n / k samples receives no further class piece
    for c in chunks:
        y = UNEVEN[c]
        assert len(c) >= 10  # min_chunk_size
        # every class inside a chunk is one contiguous piece
        assert n_runs(y) == len(np.unique(y))
        # the chunk was still below the cap before its last piece arrived (so before its largest one)
        largest_piece = np.bincount(y).max()
        assert len(c) - largest_piece < cap


def test_dirichlet_min_chunk_size_is_met_when_possible():
    # a stricter minimum forces redraws (the first draw of seeds 1, 2 and 4 has a chunk below 70)
    for seed in range(5):
        chunks = dirichlet_chunks(UNEVEN, 0.1, seed, num_chunks=4, min_chunk_size=70)
        assert min(len(c) for c in chunks) >= 70
        np.testing.assert_array_equal(np.concatenate(chunks),
                                      dirichlet_order(UNEVEN, 0.1, seed, num_chunks=4, min_chunk_size=70))


def test_dirichlet_errors():
    with pytest.raises(ValueError, match="delta must be"):
        dirichlet_order(LABELS, -0.5, 0)
    with pytest.raises(ValueError, match="labels must be 1-d"):
        iid_order(LABELS.reshape(8, -1), 0)
    with pytest.raises(ValueError, match="unknown ordering kind 'shuffle'"):
        make_order(LABELS, "shuffle")


# -- schedules ------------------------------------------------------------------------------------------
def test_continual_change_points_and_cycling():
    s = continual(["a", "b", "c"], severity=5, samples_per_domain=100, n_samples=750)
    assert len(s) == 750
    assert [seg.conditions[0][0] for seg in s.segments] == ["a", "b", "c", "a", "b", "c", "a", "b"]
    assert s.segments[-1].n == 50
    assert s.change_points() == [100, 200, 300, 400, 500, 600, 700]
    conds, cid, seg = s.assign(0)
    names = np.array([conds[i][0] for i in cid])
    for cp in s.change_points():
        assert names[cp - 1] != names[cp]
    assert (names[:100] == "a").all() and (names[700:] == "b").all()


def test_gradual_severities_and_clean():
    s = continual(["clean", "fog"], severity=GRADUAL_SEVERITIES, samples_per_domain=10)
    sev = [seg.conditions[0] for seg in s.segments]
    assert sev[0] == ("clean", 0) and len(s.segments) == 1 + len(GRADUAL_SEVERITIES)
    assert [c[1] for c in sev[1:]] == list(GRADUAL_SEVERITIES)
    # the repeated clean segments collapse into one: no change point inside the clean part
    assert s.change_points()[0] == 10


def test_ramp_is_gradual():
    s = abrupt("a", "b", n_before=500, n_after=4000, ramp=3000)
    assert s.change_points() == [500]
    assert s.shifts()[0]["transition"] == "gradual"
    conds, cid, _ = s.assign(1)
    is_b = np.array([conds[i][0] == "b" for i in cid])
    assert not is_b[:500].any() and is_b[3500:].all()
    thirds = [is_b[500 + k * 1000 : 500 + (k + 1) * 1000].mean() for k in range(3)]
    assert thirds[0] < thirds[1] < thirds[2]
    np.testing.assert_array_equal(cid, s.assign(1)[1])


def test_mixed_and_concat():
    m = mixed(["a", "b", "c"], severity=[3, 5], n_samples=3000)
    conds, cid, _ = m.assign(0)
    assert len(conds) == 6 and m.change_points() == []
    assert np.bincount(cid).min() > 400
    both = concat(continual(["a"], 5, 100), m)
    assert both.change_points() == [100] and len(both) == 3100


def test_segment_validation():
    with pytest.raises(ValueError, match="ramp"):
        Segment((("a", 1),), 10, ramp=11)
    with pytest.raises(ValueError, match="condition"):
        Segment((), 10)
    with pytest.raises(ValueError, match="domains is empty"):
        continual([], 5, 10)
    assert len(Schedule()) == 0


def test_ood_mask():
    m = ood_mask(1000, 0.2, seed=0, start=300, stop=800)
    assert m.sum() == 100 and not m[:300].any() and not m[800:].any()
    np.testing.assert_array_equal(m, ood_mask(1000, 0.2, seed=0, start=300, stop=800))
    assert not np.array_equal(m, ood_mask(1000, 0.2, seed=1, start=300, stop=800))
    with pytest.raises(ValueError, match="ood ratio"):
        ood_mask(10, 1.5)


# -- river sensors ------------------------------------------------------------------------------------
def test_load_river_dataset_segment():
    X, y, feats, classes = load_river_dataset("segment")
    assert X.shape == (2310, 18) and X.dtype == np.float32 and y.dtype == np.int64
    assert len(feats) == 18 and classes == sorted(classes) and len(classes) == 7
    assert set(y.tolist()) == set(range(7))
    X2, y2, _, _ = load_river_dataset("ImageSegments")
    np.testing.assert_array_equal(X, X2)
    X[0, 0] = -1e9  # returned arrays are copies
    assert load_river_dataset("segment")[0][0, 0] != -1e9


def test_load_river_dataset_shuttle_and_errors():
    X, y, feats, classes = load_river_dataset("shuttle")
    assert X.shape[1] == 9 and classes == ["0", "1"] and 0 < y.mean() < 0.2
    with pytest.raises(ValueError, match="unknown river dataset 'mnist'"):
        load_river_dataset("mnist")


def test_river_split_is_stratified_and_fixed():
    s = load_river_split("segment")
    assert len(s.y_train) + len(s.y_test) == 2310
    np.testing.assert_array_equal(np.bincount(s.y_test), np.full(7, 99))
    np.testing.assert_array_equal(s.x_test, load_river_split("segment").x_test)


@pytest.mark.parametrize("name", SENSOR_SHIFTS)
def test_shift_features(name):
    s = load_river_split("segment")
    mean, std = s.x_train.mean(0), s.x_train.std(0)
    rows = s.x_test[:200]
    diffs = []
    for sev in range(1, 6):
        a = shift_features(rows, name, sev, mean, std, domain_seed=1, sample_seed=2)
        np.testing.assert_array_equal(a, shift_features(rows, name, sev, mean, std, domain_seed=1, sample_seed=2))
        diffs.append(np.mean(np.abs((a - rows) / np.where(std > 0, std, 1))))
    assert all(np.diff(diffs) > 0), f"{name}: shift size {diffs} does not grow with severity"
    np.testing.assert_array_equal(shift_features(rows, "clean", 3, mean, std), rows)
    with pytest.raises(ValueError, match="unknown sensor shift"):
        shift_features(rows, "melt", 1, mean, std)


def test_river_concept_stream():
    s = river_concept_stream("sea", concepts=(0, 3, 1), samples_per_concept=300, width=100, seed=2)
    assert s.x.shape == (900, 3) and s.change_points == (300, 600)
    assert (s.concept[:300] == 0).all() and (s.concept[400:600] == 3).all() and (s.concept[700:] == 1).all()
    assert set(s.concept[300:400].tolist()) == {0, 3}
    again = river_concept_stream("sea", concepts=(0, 3, 1), samples_per_concept=300, width=100, seed=2)
    np.testing.assert_array_equal(s.x, again.x)
    samples = list(s.iter_samples("sea"))
    assert len(samples) == len(s) == 900 and samples[350].domain in ("concept-0", "concept-3")
    assert samples[0].label == int(s.y[0]) and samples[0].x.shape == (3,)
    a = river_concept_stream("agrawal", concepts=(0, 2), samples_per_concept=50, seed=0)
    assert a.x.shape == (100, 9) and a.change_points == (50,)
    with pytest.raises(ValueError, match="concept must be"):
        river_concept_stream("sea", concepts=(0, 9))


# -- CIFAR-C loader ----------------------------------------------------------------------------------
P = 20  # images per severity in the fake files


def write_fake_cifar_c(root, corruptions=("fog", "contrast"), n_classes=10, labels_len=5 * P):
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(corruptions):
        imgs = np.zeros((5 * P, 32, 32, 3), dtype=np.uint8)
        for k in range(5 * P):
            imgs[k, :, :, 0] = k % 256  # encodes the position
            imgs[k, :, :, 1] = (k // P) + 1  # encodes the severity
            imgs[k, :, :, 2] = i  # encodes the corruption
        np.save(root / f"{name}.npy", imgs)
    np.save(root / "labels.npy", (np.arange(labels_len) % n_classes).astype(np.int64))
    return root


def test_cifar_c_loads_severity_block(tmp_path):
    root = write_fake_cifar_c(tmp_path / "c10")
    x, y = load_cifar_c(root, "contrast", 3)
    assert x.shape == (P, 3, 32, 32) and x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_allclose(x[:, 1, 0, 0] * 255, 3)
    np.testing.assert_allclose(x[:, 2, 0, 0] * 255, 1)
    np.testing.assert_allclose(x[:, 0, 0, 0] * 255, np.arange(2 * P, 3 * P))
    np.testing.assert_array_equal(y, np.arange(2 * P, 3 * P) % 10)
    x4, y4 = load_cifar_c(root, "fog", 1, n_examples=4)
    assert x4.shape[0] == 4 and y4.tolist() == [0, 1, 2, 3]
    xi, yi = load_cifar_c(root, "fog", 2, indices=np.array([5, 1, 5]))
    np.testing.assert_allclose(xi[:, 0, 0, 0] * 255, [P + 5, P + 1, P + 5])
    assert yi.tolist() == [5, 1, 5]
    assert x.max() <= 1.0 and x.min() >= 0.0


def test_cifar_c_single_block_labels(tmp_path):
    root = write_fake_cifar_c(tmp_path / "c", labels_len=P)
    _, y = load_cifar_c(root, "fog", 5)
    np.testing.assert_array_equal(y, np.arange(P) % 10)
    np.testing.assert_array_equal(cifar_c_labels(root, 2, per_severity=P), np.arange(P) % 10)


def test_cifar_c_errors(tmp_path):
    root = write_fake_cifar_c(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="CIFAR-C directory not found"):
        load_cifar_c(tmp_path / "nope", "fog", 1)
    with pytest.raises(FileNotFoundError, match="corruption file for 'snow'"):
        load_cifar_c(root, "snow", 1)
    with pytest.raises(ValueError, match="unknown CIFAR-C corruption 'rain'"):
        load_cifar_c(root, "rain", 1)
    with pytest.raises(ValueError, match="severity must be an integer in 1..5, got 0"):
        load_cifar_c(root, "fog", 0)
    with pytest.raises(ValueError, match="n_examples must be in"):
        load_cifar_c(root, "fog", 1, n_examples=P + 1)
    np.save(root / "glass_blur.npy", np.zeros((5 * P, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="expected a uint8 array of shape"):
        load_cifar_c(root, "glass_blur", 1)
    np.save(root / "snow.npy", np.zeros((5 * P + 1, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="cannot be split into 5 severities"):
        load_cifar_c(root, "snow", 1)
    np.save(root / "labels.npy", np.arange(3 * P))
    with pytest.raises(ValueError, match="labels"):
        load_cifar_c(root, "fog", 1)
    (root / "labels.npy").unlink()
    with pytest.raises(FileNotFoundError, match="labels file not found"):
        load_cifar_c(root, "fog", 1)
    np.save(root / "labels.npy", np.full(5 * P, 10))
    with pytest.raises(ValueError, match=r"labels outside 0..9"):
        load_cifar_c(root, "fog", 1)
    load_cifar_c(root, "fog", 1, dataset="cifar100")  # 10 is a valid CIFAR-100 class
    assert "jpeg_compression" in CIFAR_C_CORRUPTIONS
