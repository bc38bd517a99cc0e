"""Grouped mode: many stream ids through one forward, each with its own BatchNorm statistics."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

import streamtta
from streamtta.adapters.grouped import GroupedStats
from streamtta.adapters.norms.grouped import GroupedBatchNorm, route
from streamtta.checkpoints import CheckpointStore
from streamtta.config import ConfigError, load_config
from streamtta.engine import Engine, Outputs
from streamtta.grouped import GroupedPipeline
from streamtta.stream.envelope import encode_json_row
from streamtta.stream.memory import MemoryDeadLetter, MemorySink, MemorySource
from streamtta.types import RawRecord


def mlp(seed=0, d=6, k=3):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(d, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.BatchNorm1d(16),
                        nn.ReLU(), nn.Linear(16, k))
    net.train()
    with torch.no_grad():
        for _ in range(20):  # non-trivial running statistics
            net(torch.randn(64, d) * 2 + 1)
    return net.eval()


def use_batch_stats(bn):
    """``bn`` normalises every batch with its own statistics (train mode, no running statistics)."""
    bn.train()
    bn.track_running_stats = False
    bn.running_mean = bn.running_var = None


def convnet(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    net.train()
    with torch.no_grad():
        for _ in range(10):
            net(torch.randn(32, 1, 8, 8))
    return net.eval()


@pytest.mark.parametrize("make,shape", [(mlp, (6,)), (convnet, (1, 8, 8))])
def test_streams_in_one_batch_equal_each_stream_on_its_own(make, shape):
    """Sample i of stream k gets the same logits whether stream k shares the batch with others or not."""
    net = make()
    rng = np.random.default_rng(0)
    together = GroupedStats(net, alpha=0.05, prior=4)
    together.ensure(3)
    alone = [GroupedStats(net, alpha=0.05, prior=4) for _ in range(3)]
    for g in alone:
        g.ensure(1)
    offset = torch.tensor([0.0, 3.0, -2.0])
    for _ in range(5):
        rows = torch.from_numpy(rng.integers(0, 3, size=20))
        x = torch.randn((20,) + shape) + offset[rows].view((-1,) + (1,) * len(shape))
        keep = torch.from_numpy(rng.random(20) > 0.2)
        lg, ft = together.forward(x, rows)
        together.commit(keep)
        for k, g in enumerate(alone):
            m = rows == k
            if m.any():
                lk, fk = g.forward(x[m], torch.zeros(int(m.sum()), dtype=torch.long))
                g.commit(keep[m])
                torch.testing.assert_close(lg[m], lk, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(ft[m], fk, rtol=1e-4, atol=1e-5)
    assert together.seen.tolist() == [float(g.seen[0]) for g in alone]


def test_one_stream_with_full_weight_is_train_mode_batchnorm():
    """alpha=1 and no prior: a one-stream batch is normalised with its own batch statistics (BN-adapt)."""
    net = mlp()
    g = GroupedStats(net, alpha=1.0, prior=0)
    g.ensure(1)
    x = torch.randn(32, 6) * 3 + 2
    lg, _ = g.forward(x, torch.zeros(32, dtype=torch.long))
    ref = mlp()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm1d):
            use_batch_stats(m)
    with torch.no_grad():
        torch.testing.assert_close(lg, ref(x), rtol=1e-4, atol=1e-4)


def test_update_follows_the_running_average_then_the_moving_average():
    """One channel, one stream, one sample at a time, checked against the formula by hand."""
    bn = nn.BatchNorm1d(1).eval()
    layer = GroupedBatchNorm.from_bn(bn)
    layer.ensure(1)
    alpha, prior = 0.1, 3.0
    g = GroupedStats.__new__(GroupedStats)
    g.alpha, g.prior = alpha, prior
    mean, var, seen = 0.0, 1.0, 0.0
    for v in [2.0, -1.0, 4.0, 0.5, 3.0, 3.0, -2.0]:
        w = GroupedStats.weights(g, torch.tensor([seen], dtype=torch.float64), torch.tensor([1]))
        a = max(alpha, 1.0 / (seen + prior + 1))
        assert float(w) == pytest.approx(a)
        layer.route = route(torch.tensor([0]), w)
        layer(torch.tensor([[v]]))
        layer.commit(torch.tensor([True]))
        d = v - mean
        mean, var = mean + a * d, (1 - a) * (var + a * d * d)
        seen += 1
        assert float(layer.mean[0, 0]) == pytest.approx(mean, rel=1e-5)
        assert float(layer.var[0, 0]) == pytest.approx(var, rel=1e-5)


def test_samples_left_out_of_the_commit_never_move_the_statistics():
    g = GroupedStats(mlp(), alpha=0.5, prior=0)
    g.ensure(2)
    before = [(layer.mean.clone(), layer.var.clone()) for layer in g.layers]
    g.forward(torch.randn(8, 6) + 5, torch.tensor([0, 1] * 4))
    g.commit(torch.zeros(8, dtype=torch.bool))
    for layer, (m, v) in zip(g.layers, before):
        assert torch.equal(layer.mean, m) and torch.equal(layer.var, v)
    g.forward(torch.randn(8, 6) + 5, torch.tensor([0, 1] * 4))
    g.commit(torch.tensor([True, False] * 4))  # only stream 0's samples
    assert g.seen.tolist() == [4.0, 0.0]
    assert not torch.equal(g.layers[0].mean[0], before[0][0][0])
    assert torch.equal(g.layers[0].mean[1], before[0][0][1])


def test_models_without_batchnorm_or_compiled_are_refused_clearly():
    with pytest.raises(ValueError, match="BatchNorm"):
        GroupedStats(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)))
    with pytest.raises(ValueError, match="eager"):
        GroupedStats(torch.jit.script(mlp()))


def fitted_pipeline(**grouped):
    net = mlp()
    cfg = {"grouped": {"enabled": True, **grouped}, "engine": {"state_key": "stream_id"}}
    pipe = streamtta.Pipeline(net, num_classes=3, config=cfg)
    torch.manual_seed(1)
    pipe.fit_source(torch.randn(600, 6) * 2 + 1)
    return pipe


def test_least_recently_seen_stream_gives_its_row_to_a_newcomer():
    gp = GroupedPipeline.from_pipeline(fitted_pipeline(max_streams=3))
    for sid in ["a", "b", "c", "a"]:
        gp.process(torch.randn(4, 6) + 3, stream_ids=[sid] * 4)
    assert gp.stream_ids == ["b", "c", "a"] and gp.evicted == 0
    row_b = gp._ids["b"]
    gp.process(torch.randn(2, 6), stream_ids=["d", "d"])
    assert gp.stream_ids == ["c", "a", "d"] and gp.evicted == 1
    assert gp._ids["d"] == row_b and gp._count[row_b] == 2  # a fresh row: only d's samples
    assert float(gp.stats.seen[row_b]) <= 2.0
    assert gp.stats.rows <= 3


def test_state_round_trips_through_a_plain_data_checkpoint():
    rng = np.random.default_rng(0)
    gp = GroupedPipeline.from_pipeline(fitted_pipeline())
    ids = [f"m{k}" for k in range(20)]
    for _ in range(4):
        gp.process(torch.randn(32, 6) + 2, stream_ids=list(rng.choice(ids, 32)))
    buf = io.BytesIO()
    torch.save(gp.state_dict(), buf)
    buf.seek(0)
    other = gp.spawn()
    other.load_state_dict(torch.load(buf, weights_only=True))
    x, sids = torch.randn(32, 6) + 2, list(rng.choice(ids + ["new"], 32))
    a, b = gp.process(x, stream_ids=sids), other.process(x, stream_ids=sids)
    np.testing.assert_allclose(a.logits.numpy(), b.logits.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.ood_scores, b.ood_scores, rtol=1e-5, atol=1e-6)
    assert gp.stream_ids == other.stream_ids
    with pytest.raises(ValueError, match="per-stream pipeline"):
        other.load_state_dict(fitted_pipeline().state_dict())


def test_a_stream_that_turns_ood_raises_its_own_shift_alert():
    gp = GroupedPipeline.from_pipeline(fitted_pipeline())
    torch.manual_seed(3)
    alerts = []
    for b in range(30):
        sids = [f"s{k}" for k in range(8)] * 4
        x = torch.randn(32, 6) * 2 + 1
        if b >= 12:  # stream s3 starts sending something else
            x[torch.tensor([s == "s3" for s in sids])] += 25.0
        alerts += gp.process(x, stream_ids=sids).alerts
    covariate = [a for a in alerts if a.kind.value == "covariate_shift"]
    assert covariate, "no per-stream shift alert"
    assert {a.stream_id for a in covariate} == {"s3"}
    assert 12 * 32 <= covariate[0].offsets.first < 14 * 32  # within two batches of s3's change


def sensor_records(n, ids, topic="t"):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        k = i % ids
        x = rng.normal(size=6) * 2 + 1 + (k % 3)
        out.append(RawRecord(topic, 0, i, encode_json_row(x, f"m{k}")))
    return out


def test_engine_groups_stream_ids_per_partition_and_resumes_from_its_checkpoint(tmp_path):
    pipe = fitted_pipeline()
    cfg = load_config(overrides={"grouped": {"enabled": True}, "kafka": {"stop_at_end": True, "poll_timeout_s": 0.01},
                                 "engine": {"state_key": "stream_id", "batch_size": 32, "checkpoint_interval_s": 0,
                                            "checkpoint_dir": str(tmp_path / "ck")}}, env=False)
    recs = sensor_records(300, 50)
    store = CheckpointStore(tmp_path / "ck")
    out = Outputs(predictions=MemorySink(), alerts=[MemorySink()], dlq=MemoryDeadLetter())
    src = MemorySource(recs[:200], topic="t")
    eng = Engine(cfg, src, out, pipe, store=store)
    eng.run()
    assert len(eng.states) == 1 and list(eng.states) == ["t:0"]
    assert len(eng.states["t:0"].pipe.stream_ids) == 50
    assert sorted(p["offset"] for p in out.predictions.values) == list(range(200))
    assert {p["stream_id"] for p in out.predictions.values} == {f"m{k}" for k in range(50)}
    assert src.committed == {("t", 0): 200}
    # a new engine (the group resumes at the committed offset) restores the partition's state, all 50 streams
    out2 = Outputs(predictions=MemorySink(), alerts=[MemorySink()], dlq=MemoryDeadLetter())
    eng2 = Engine(cfg, MemorySource(recs[200:], topic="t"), out2, pipe, store=store)
    eng2.run()
    assert eng2.states.restored == 1 and not out2.alerts[0].values
    assert sorted(p["offset"] for p in out2.predictions.values) == list(range(200, 300))
    assert eng2.states["t:0"].pipe.n_samples == 300


def test_grouped_needs_stream_id_state_key():
    pipe = fitted_pipeline()
    cfg = load_config(overrides={"grouped": {"enabled": True}}, env=False)
    out = Outputs(predictions=MemorySink(), alerts=[MemorySink()], dlq=MemoryDeadLetter())
    with pytest.raises(ConfigError, match="state_key"):
        Engine(cfg, MemorySource([], topic="t"), out, pipe)
    with pytest.raises(ConfigError, match="detector"):
        load_config(overrides={"grouped": {"detector": {"treshold": 3}}}, env=False)


def test_fleet_gives_each_id_one_domain_and_keeps_its_order():
    from streamtta.simulations.fleet import FleetStream
    from streamtta.simulations.scenario import Scenario, build_stream

    sc = Scenario(name="f", dataset="digits-c", model="digits-resnet", domains=["fog", "contrast", "brightness"],
                  samples_per_domain=30, known_classes=list(range(8)))
    base = build_stream(sc, seed=0)
    fleet = FleetStream(base, streams=7, seed=1)
    samples = list(fleet.iter_samples())
    assert len(samples) == len(base) == 90
    assert sorted(s.meta["index"] for s in samples) == list(range(90))
    by_id: dict[str, list] = {}
    for s in samples:
        by_id.setdefault(s.stream_id, []).append(s)
    assert len(by_id) == 7
    for sid, ss in by_id.items():
        assert len({s.domain for s in ss}) == 1
        idx = [s.meta["index"] for s in ss]
        assert idx == sorted(idx)
    first_ids = [s.stream_id for s in samples[:20]]
    assert len(set(first_ids)) > 3  # interleaved, not one id after another


def test_only_the_first_layers_keep_per_stream_statistics():
    """layers=1, alpha=1, no prior: BN 1 normalises with the batch, BN 2 with the source statistics."""
    net = mlp()
    g = GroupedStats(net, alpha=1.0, prior=0, layers=1)
    g.ensure(1)
    assert len(g.layers) == 1
    x = torch.randn(32, 6) * 3 + 2
    lg, _ = g.forward(x, torch.zeros(32, dtype=torch.long))
    ref = mlp()
    use_batch_stats(ref[1])
    with torch.no_grad():
        torch.testing.assert_close(lg, ref(x), rtol=1e-4, atol=1e-4)


def test_source_weight_mixes_the_source_statistics_in():
    from streamtta.adapters.norms.base import affine_normalize

    bn = nn.BatchNorm1d(3).eval()
    bn.running_mean.fill_(1.0)
    bn.running_var.fill_(4.0)
    layer = GroupedBatchNorm.from_bn(bn)
    layer.ensure(1)
    layer.source_weight = 0.25
    x = torch.randn(16, 3) * 2 - 3
    layer.route = route(torch.zeros(16, dtype=torch.long), torch.tensor([1.0], dtype=torch.float64))
    y = layer(x)
    m, v = x.mean(0), x.var(0, unbiased=False)
    ref = affine_normalize(x, 0.75 * m + 0.25, 0.75 * v + 1.0, bn.weight, bn.bias, bn.eps)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)


def test_a_batch_with_more_ids_than_max_streams_never_mixes_two_ids_in_one_row():
    """5 ids in one batch, 3 rows: every sample is normalised with its own id's statistics, as alone."""
    x = torch.randn(5, 6) + 2
    gp = GroupedPipeline.from_pipeline(fitted_pipeline(max_streams=3))
    res = gp.process(x, stream_ids=["a", "b", "c", "d", "e"])
    assert gp.stats.rows <= 3 and len(gp.stream_ids) == 3
    for i, sid in enumerate("abcde"):
        alone = GroupedPipeline.from_pipeline(fitted_pipeline(max_streams=3)).process(x[i:i + 1], stream_ids=[sid])
        torch.testing.assert_close(res.logits[i:i + 1], alone.logits, rtol=1e-5, atol=1e-6)
    assert len(res) == 5 and res.keep.shape == (5,)


@pytest.mark.parametrize("corrupt", ["row twice", "row held and free", "row lost", "nan statistics",
                                     "negative variance", "nan seen", "spread shape", "short counters"])
def test_a_corrupted_grouped_state_is_refused_and_changes_nothing(corrupt):
    gp = GroupedPipeline.from_pipeline(fitted_pipeline())
    for _ in range(3):
        gp.process(torch.randn(32, 6), stream_ids=[f"s{i % 8}" for i in range(32)])
    st = gp.state_dict()
    if corrupt == "row twice":
        st["ids"][1][1] = st["ids"][0][1]
    elif corrupt == "row held and free":
        st["free"].append(st["ids"][0][1])
    elif corrupt == "row lost":
        st["free"] = st["free"][1:]
    elif corrupt == "nan statistics":
        st["stats"]["mean"][0][0, 0] = float("nan")
    elif corrupt == "negative variance":
        st["stats"]["var"][0][0, 0] = -1.0
    elif corrupt == "nan seen":
        st["stats"]["seen"][0] = float("nan")
    elif corrupt == "spread shape":
        st["stats"]["log_spread"] = st["stats"]["log_spread"][:, :2]
    else:
        st["count"] = st["count"][:2]
    other = gp.spawn()
    other.process(torch.randn(4, 6), stream_ids=["x"] * 4)
    before = other.state_dict()
    with pytest.raises(ValueError):
        other.load_state_dict(st)
    after = other.state_dict()
    assert after["ids"] == before["ids"] and torch.equal(after["count"], before["count"])
    assert all(torch.equal(a, b) for a, b in zip(after["stats"]["mean"], before["stats"]["mean"]))


def test_detector_options_are_checked_and_one_option_keeps_the_other_defaults():
    assert load_config(overrides={"grouped": {"detector": {"threshold": 5}}}, env=False).grouped.detector == {
        "delta": 0.02, "threshold": 5, "min_instances": 30}
    with pytest.raises(ConfigError, match="threshold"):
        load_config(overrides={"grouped": {"detector": {"threshold": -1}}}, env=False)
    with pytest.raises(ConfigError, match="min_instances"):
        load_config(overrides={"grouped": {"detector": {"min_instances": 0}}}, env=False)


def test_a_finite_sample_whose_statistics_overflow_never_poisons_its_stream():
    """Uncalibrated (nothing flagged): a 1e20 sample overflows its instance variance; its row stays finite."""
    gp = GroupedPipeline.from_pipeline(streamtta.Pipeline(mlp(), num_classes=3))
    ids = [f"s{i % 4}" for i in range(16)]
    gp.process(torch.randn(16, 6), stream_ids=ids)
    x = torch.randn(16, 6)
    x[0] = 1e20
    with np.errstate(all="ignore"):
        gp.process(x, stream_ids=ids)
    assert all(bool(torch.isfinite(layer.mean).all() and torch.isfinite(layer.var).all()) for layer in gp.stats.layers)
    assert float(gp.stats.seen[gp._ids["s0"]]) < 8.0  # the 1e20 sample is not counted
    assert [float(gp.stats.seen[gp._ids[s]]) for s in ("s1", "s2", "s3")] == [8.0] * 3
    assert bool(torch.isfinite(gp.process(torch.randn(16, 6), stream_ids=ids).logits).all())


def test_a_conv_stream_whose_inputs_get_noisier_with_the_same_mean_is_detected():
    """The shift signal also reads each sample's spread at the first layer: added noise (mean unchanged)
    raises a covariate_shift alert for that stream, and only for it."""
    net = convnet()
    pipe = streamtta.Pipeline(net, num_classes=3, config={"grouped": {"enabled": True},
                                                         "engine": {"state_key": "stream_id"}})
    torch.manual_seed(1)
    smooth = lambda n: torch.nn.functional.avg_pool2d(torch.randn(n, 1, 10, 10), 3, 1)  # noqa: E731
    pipe.fit_source(smooth(400))
    gp = GroupedPipeline.from_pipeline(pipe)
    alerts = []
    for b in range(30):
        sids = [f"c{k}" for k in range(8)] * 4
        x = smooth(32)
        if b >= 12:
            noisy = torch.tensor([s == "c5" for s in sids])
            x[noisy] = x[noisy] + 1.5 * torch.randn(int(noisy.sum()), 1, 8, 8)
        alerts += gp.process(x, stream_ids=sids).alerts
    covariate = [a for a in alerts if a.kind.value == "covariate_shift"]
    assert {a.stream_id for a in covariate} == {"c5"}
    assert 12 * 32 <= covariate[0].offsets.first < 16 * 32


def test_a_state_with_other_detectors_is_refused_and_changes_nothing():
    """A state saved with both per-stream detectors, loaded under grouped.ood_detector=null, is refused before
    any statistics are touched."""
    gp = GroupedPipeline.from_pipeline(fitted_pipeline())
    gp.process(torch.randn(16, 6) + 3, stream_ids=["a"] * 16)
    one = GroupedPipeline.from_pipeline(fitted_pipeline(ood_detector=None))
    assert sorted(one.detectors) == ["input"]
    one.process(torch.randn(4, 6), stream_ids=["x"] * 4)
    before = one.state_dict()
    with pytest.raises(ValueError, match="per-stream detectors"):
        one.load_state_dict(gp.state_dict())
    after = one.state_dict()
    assert torch.equal(after["stats"]["seen"], before["stats"]["seen"])
    assert all(torch.equal(a, b) for a, b in zip(after["stats"]["mean"], before["stats"]["mean"]))


def test_set_null_turns_off_only_that_detector():
    """``--set grouped.ood_detector=null`` (TOML has no null, the value arrives as a string) turns that
    detector off and keeps the other."""
    from streamtta.config.overrides import parse_set_option

    for key, left in (("ood_detector", ["input"]), ("detector", ["ood"])):
        cfg = load_config(overrides=parse_set_option([f"grouped.{key}=null", "grouped.enabled=true",
                                                      "engine.state_key='stream_id'"]), env=False)
        assert getattr(cfg.grouped, key) is None
        gp = GroupedPipeline.from_pipeline(fitted_pipeline(**{key: None}))
        assert sorted(gp.detectors) == left
    with pytest.raises(ConfigError, match="dictionary"):
        load_config(overrides=parse_set_option(["grouped.detector=nothing"]), env=False)


def test_a_stream_that_goes_flat_learns_its_new_spread():
    """Flat frames (zero spread at the first layer), alone in their batch, move the row's log_spread too:
    once the row has adapted to them their surprise falls back."""
    g = GroupedStats(convnet(), alpha=0.1, prior=4)
    g.ensure(1)
    row = torch.zeros(1, dtype=torch.long)
    for _ in range(20):
        g.forward(torch.randn(1, 1, 8, 8), row)
        g.commit(torch.tensor([True]))
    surprise = []
    for _ in range(60):
        g.forward(torch.full((1, 1, 8, 8), 0.3), row)
        surprise.append(float(g.surprise[0]))
        g.commit(torch.tensor([True]))
    assert surprise[-1] < 0.2 * surprise[0]
    assert bool((g.layers[0].log_spread[0] < -5).all())  # close to log(eps)
