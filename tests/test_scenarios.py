"""Scenario files, validation errors and the SimStream they build."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from streamtta.simulations.cifar_c import CIFAR_C_CORRUPTIONS
from streamtta.simulations.corruptions import CORRUPTIONS
from streamtta.simulations.scenario import (
    REPO_SCENARIO_DIR,
    Scenario,
    ScenarioError,
    build_stream,
    find_scenario,
    list_scenarios,
    load_scenario,
    parse_scenario,
)
from streamtta.types import Sample

torch.set_num_threads(1)

SHIPPED = list_scenarios()
EXTERNAL = sorted((REPO_SCENARIO_DIR / "external").glob("*.toml"))
HELDOUT = sorted((REPO_SCENARIO_DIR / "heldout").glob("*.toml"))
REQUIRED = {
    "digits-c-iid", "digits-c-noniid", "digits-c-sorted", "digits-c-continual-openset", "digits-c-long",
    "sensor-drift", "quickstart",
}
BASE = dict(name="t", dataset="digits-c", model="digits-resnet", samples_per_domain=50)


def small(**kw) -> Scenario:
    return parse_scenario({**BASE, **kw})


def fake_cifar_c(root: Path, per: int = 30, n_classes: int = 10) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in CIFAR_C_CORRUPTIONS:
        np.save(root / f"{name}.npy", rng.integers(0, 256, size=(5 * per, 32, 32, 3), dtype=np.uint8))
    np.save(root / "labels.npy", np.tile(np.arange(per) % n_classes, 5))
    return root


# -- shipped files -------------------------------------------------------------------------------------
def test_required_scenarios_are_shipped():
    assert REQUIRED <= {p.stem for p in SHIPPED}
    assert len(HELDOUT) >= 10 and all("HELD-OUT" in p.read_text() for p in HELDOUT)
    assert find_scenario("heldout-digits-cnn-iid").model == "digits-cnn"  # found by name in heldout/
    for p in SHIPPED + EXTERNAL + HELDOUT:
        text = p.read_text()
        assert text.startswith("#"), f"{p.name} has no header comment"
        assert load_scenario(p).name == p.stem, f"{p.name}: name field differs from the file name"


@pytest.mark.parametrize("path", SHIPPED + HELDOUT, ids=lambda p: p.stem)
def test_shipped_scenario_builds(path):
    sc = load_scenario(path)
    s = build_stream(sc)
    assert len(s) > 0 and s.stream_id == f"{sc.name}:{sc.seed}"
    assert s.labels.shape == s.is_unknown.shape == (len(s),) and len(s.domains) == len(s)
    json.dumps(s.describe())
    # change points are exactly where the schedule's segments change
    assert s.change_points == sorted(set(sc.schedule().change_points()) | {x["index"] for x in s.shifts() if x["kind"] == "semantic"})
    for cp in sc.schedule().change_points():
        seg = s.segment_id
        assert seg[cp] != seg[cp - 1]
    first = next(s.iter_samples())
    assert isinstance(first, Sample) and first.x.shape == s.sample_shape and first.x.dtype == np.float32
    known = set(sc.known())
    assert set(s.labels[~s.is_unknown].tolist()) <= known
    if sc.unknown_classes and sc.ood.ratio > 0:
        assert set(s.labels[s.is_unknown].tolist()) <= set(sc.unknown_classes)
        assert abs(s.is_unknown.mean() - sc.ood.ratio) < 0.01


@pytest.mark.parametrize("path", EXTERNAL, ids=lambda p: p.stem)
def test_external_scenarios_build_with_data(path, tmp_path):
    sc = load_scenario(path)
    with pytest.raises(FileNotFoundError, match="CIFAR-C directory not found"):
        build_stream(sc, data_dir=tmp_path / "missing")
    root = fake_cifar_c(tmp_path / "c10")
    s = build_stream(sc.model_copy(update={"samples_per_domain": 40}), data_dir=root)
    x, y = s.materialize(0, 50)
    assert x.shape == (50, 3, 32, 32) and (y == s.labels[:50]).all()


def test_quickstart_contents():
    s = build_stream("quickstart")
    assert 3000 <= len(s) <= 5000
    assert s.change_points == [2000]
    assert set(s.domains[:2000]) == {"gaussian_noise"} and set(s.domains[2000:]) == {"contrast"}
    assert 0 < s.is_unknown.mean() < 0.5


def test_single_domain_benchmarks():
    for name, kind in (("digits-c-iid", "iid"), ("digits-c-noniid", "dirichlet"), ("digits-c-sorted", "sorted")):
        sc = find_scenario(name)
        assert sc.ordering.kind == kind and sc.reset_each_domain and sc.severity == 5
        assert sc.domain_list() == list(CORRUPTIONS) and sc.known() == list(range(8)) and sc.ood.ratio == 0
        s = build_stream(sc)
        assert s.segment_starts == [i * sc.samples_per_domain for i in range(10)]
    noniid = build_stream("digits-c-noniid")
    iid = build_stream("digits-c-iid")
    runs = lambda y: 1 + np.count_nonzero(y[1:] != y[:-1])  # noqa: E731
    assert runs(noniid.labels[:2000]) * 10 < runs(iid.labels[:2000])
    srt = build_stream("digits-c-sorted").labels[:2000]
    assert (np.diff(srt) >= 0).all()


def test_long_scenario_is_long_and_cycles():
    sc = find_scenario("digits-c-long")
    s = build_stream(sc)
    assert len(s) >= 100_000
    assert sc.transition.kind == "ramp"
    counts = {d: s.domains.count(d) for d in CORRUPTIONS}
    assert min(counts.values()) > 0.8 * len(s) / 10
    assert all(x["transition"] == "gradual" for x in s.shifts())


def test_sensor_drift_scenario():
    s = build_stream("sensor-drift")
    assert s.sample_shape == (18,)
    assert s.change_points == [1000, 2000, 3000, 4000, 5000]
    x, _ = s.materialize(0, 2000)
    clean, offset = x[:1000], x[1000:2000]
    split_std = np.maximum(clean.std(0), 1e-6)
    assert np.median(np.abs(offset.mean(0) - clean.mean(0)) / split_std) > 0.5


# -- stream behaviour ----------------------------------------------------------------------------------
def test_iter_samples_matches_materialize_across_chunks():
    s = build_stream(small(domains=["fog", "gaussian_noise", "contrast"], samples_per_domain=300,
                           known_classes=list(range(8)), unknown_classes=[8, 9], ood={"ratio": 0.2}),
                     seed=3, chunk_size=128)
    xs = np.stack([smp.x for smp in s.iter_samples()])
    x_all, y_all = s.materialize()
    np.testing.assert_array_equal(xs, x_all)
    x_mid, y_mid = s.materialize(100, 333)  # crosses chunk boundaries
    np.testing.assert_array_equal(x_mid, x_all[100:333])
    np.testing.assert_array_equal(y_mid, y_all[100:333])
    part = list(s.iter_samples(250, 260))
    assert [p.meta["index"] for p in part] == list(range(250, 260))
    np.testing.assert_array_equal(part[0].x, x_all[250])
    unk = [p for p in s.iter_samples() if p.is_unknown]
    assert unk and all(p.label in (8, 9) for p in unk)


def test_streams_are_deterministic_by_seed():
    sc = small(domains=["impulse_noise", "motion_blur"], samples_per_domain=200, ordering={"kind": "dirichlet", "delta": 0.1})
    a, b, c = build_stream(sc, seed=5), build_stream(sc, seed=5), build_stream(sc, seed=6)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    np.testing.assert_array_equal(a.materialize(0, 400)[0], b.materialize(0, 400)[0])
    assert not np.array_equal(a.materialize(0, 400)[0], c.materialize(0, 400)[0])
    assert build_stream(sc).seed == sc.seed == 0


def test_reused_images_get_fresh_noise():
    s = build_stream(small(domains=["gaussian_noise"], samples_per_domain=1500), seed=0)
    x, _ = s.materialize()
    base = s.base
    dup = np.flatnonzero(base == base[0])
    assert len(dup) >= 2
    assert not np.array_equal(x[dup[0]], x[dup[1]])


def test_ood_window_adds_semantic_change_points():
    s = build_stream(small(domains=["fog", "contrast"], samples_per_domain=500, unknown_classes=[9],
                           ood={"ratio": 0.3, "start": 200, "stop": 700}))
    assert s.change_points == [200, 500, 700]
    kinds = {x["index"]: x["kind"] for x in s.shifts()}
    assert kinds == {200: "semantic", 500: "covariate", 700: "semantic"}
    assert not s.is_unknown[:200].any() and not s.is_unknown[700:].any()
    assert s.is_unknown[200:700].sum() == 150


def test_external_ood_sources_have_no_label():
    for src in ("uniform-noise", "smooth-noise", "patches"):
        s = build_stream(small(domains=["fog"], samples_per_domain=100, ood={"ratio": 0.25, "source": src}))
        assert (s.labels[s.is_unknown] == -1).all()
        smp = [p for p in s.iter_samples() if p.is_unknown][0]
        assert smp.label is None and smp.x.shape == (1, 32, 32)


def test_mixed_setting_and_gradual_severity():
    m = build_stream(small(setting="mixed", domains=["fog", "contrast", "clean"], n_samples=600))
    assert m.change_points == [] and set(m.domains) == {"fog", "contrast", "clean"}
    g = build_stream(small(domains=["fog"], severity=[1, 3, 5, 3, 1], samples_per_domain=20))
    assert g.severities.tolist() == sum(([v] * 20 for v in [1, 3, 5, 3, 1]), [])
    assert g.change_points == [20, 40, 60, 80]


def test_cifar_scenario_with_fake_files(tmp_path):
    root = fake_cifar_c(tmp_path / "c100", per=40, n_classes=100)
    sc = parse_scenario(dict(name="c", dataset="cifar100-c", model="m", domains=["fog", "snow"], samples_per_domain=40,
                             known_classes=list(range(30)), unknown_classes=[35], data_dir=str(root),
                             ood={"ratio": 0.1, "source": "heldout"}))
    s = build_stream(sc)
    assert s.change_points == [40]
    x, y = s.materialize()
    assert x.shape == (80, 3, 32, 32)
    # the image at each position is the file's image at that position of the severity-5 block
    raw = np.load(root / "fog.npy")[4 * 40 : 5 * 40].transpose(0, 3, 1, 2) / 255.0
    lbl = np.load(root / "labels.npy")[:40]
    for t in range(40):
        j = int(np.flatnonzero(np.isin(lbl, sc.unknown_classes if s.is_unknown[t] else sc.known()))[s.base[t]])
        np.testing.assert_allclose(x[t], raw[j], atol=1e-6)
        assert y[t] == lbl[j]
    with pytest.raises(ScenarioError, match="needs data_dir"):
        build_stream(sc.model_copy(update={"data_dir": None}))


# -- validation -----------------------------------------------------------------------------------------
def write(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "bad.toml"
    p.write_text(body)
    return p


HEAD = 'name = "x"\ndataset = "digits-c"\nmodel = "digits-resnet"\nsamples_per_domain = 10\n'


@pytest.mark.parametrize(
    "extra, field",
    [
        ("colour = 3\n", "colour"),
        ("severity = 7\n", "severity"),
        ("severity = [1, 9]\n", "severity"),
        ('domains = ["fogg"]\n', "domains"),
        ("unknown_classes = [12]\n", "unknown_classes"),
        ("known_classes = [1, 2]\nunknown_classes = [2]\n", "unknown_classes"),
        ("[ood]\nratio = 0.2\n", "ood.source"),
        ("[ood]\nratio = 1.5\n", "ood.ratio"),
        ('[ordering]\nkind = "dirichlet"\ndelta = -1\n', "ordering.delta"),
        ('[ordering]\nkind = "shuffled"\n', "ordering.kind"),
        ("[ordering]\nwobble = 1\n", "ordering.wobble"),
        ('[transition]\nkind = "ramp"\nlength = 50\n', "transition.length"),
        ('[sensor]\nsource = "segment"\n', "sensor"),
    ],
)
def test_validation_errors_name_field_and_file(tmp_path, extra, field):
    p = write(tmp_path, HEAD + extra)
    with pytest.raises(ScenarioError) as err:
        load_scenario(p)
    msg = str(err.value)
    assert str(p) in msg
    assert f"  {field}:" in msg or f"  {field}." in msg, msg


def test_missing_and_invalid_fields(tmp_path):
    with pytest.raises(ScenarioError, match=r"dataset: Field required"):
        load_scenario(write(tmp_path, 'name = "x"\nmodel = "m"\nsamples_per_domain = 3\n'))
    with pytest.raises(ScenarioError, match=r"dataset: Input should be"):
        load_scenario(write(tmp_path, HEAD.replace("digits-c", "mnist")))
    with pytest.raises(ScenarioError, match="samples_per_domain: set samples_per_domain or n_samples"):
        load_scenario(write(tmp_path, HEAD.replace("samples_per_domain = 10\n", "")))
    with pytest.raises(ScenarioError, match="invalid TOML in scenario .*bad.toml"):
        load_scenario(write(tmp_path, "name = \n"))
    with pytest.raises(ScenarioError, match="scenario file not found"):
        load_scenario(tmp_path / "nope.toml")
    with pytest.raises(ScenarioError, match="no scenario 'nope'; built-in scenarios: .*quickstart"):
        find_scenario("nope")


def test_scenario_round_trips_through_toml(tmp_path):
    sc = find_scenario("digits-c-long")
    p = tmp_path / "copy.toml"
    p.write_text(sc.to_toml())
    again = load_scenario(p)
    assert again == sc
    assert build_stream(again).fingerprint() == build_stream(sc).fingerprint()
