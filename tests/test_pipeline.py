"""streamtta.Pipeline: the per-stream unit, tensors in, results out."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import streamtta
from streamtta.alerts import Alert
from streamtta.config import load_config
from streamtta.engine import Engine, Outputs
from streamtta.models.registry import load_model
from streamtta.runlog import RunLog
from streamtta.runner import build_pipeline
from streamtta.simulations.corruptions import corrupt
from streamtta.simulations.digits import load_digits_32
from streamtta.stream.envelope import encode_tensor
from streamtta.stream.memory import MemoryDeadLetter, MemorySink, MemorySource


def mlp(norm: type[nn.Module] = nn.BatchNorm1d, c: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), norm(16), nn.ReLU(), nn.Linear(16, c)).eval()


@pytest.fixture(scope="module")
def digits_model():
    torch.set_num_threads(1)
    return load_model("digits-resnet")


@pytest.fixture(scope="module")
def shifted():
    d = load_digits_32()  # 20 clean batches of 64 (the monitor's reference), then 5 of contrast
    idx = np.arange(1600) % len(d.x_test)
    x, y = d.x_test[idx].astype(np.float32), d.y_test[idx]
    x[1280:] = corrupt(x[1280:], "contrast", 5, 0)
    return x, y


def test_exports():
    assert set(streamtta.__all__) >= {"Pipeline", "build_adapter", "load_config", "Engine", "BatchResult"}
    for name in streamtta.__all__:
        assert getattr(streamtta, name) is not None


def test_classes_inferred_from_the_model_and_batch_size_one():
    pipe = streamtta.Pipeline(mlp(c=5), adapter="source", scorer="mahalanobis")
    res = pipe.process(np.random.default_rng(0).normal(size=(1, 8)).astype(np.float32))
    assert pipe.classes == [0, 1, 2, 3, 4] and res.predictions.shape == (1,) and res.ood_scores.shape == (1,)
    assert not pipe.calibrated and not res.ood_flags.any()  # nothing to calibrate on: no flags, said so
    pipe.fit_source(torch.randn(200, 8))
    assert pipe.calibrated and pipe.batch_index == 0  # fitting starts the stream afresh
    x = torch.cat([torch.randn(48, 8), torch.randn(16, 8) * 20])  # a quarter far from the source
    res = pipe.process(x)
    assert res.ood_scores[48:].mean() > res.ood_scores[:48].mean()  # higher = more OOD
    assert res.ood_flags[48:].mean() > res.ood_flags[:48].mean()


def test_state_dict_round_trip_restores_identical_outputs():
    rng = np.random.default_rng(1)
    batches = [rng.normal(size=(32, 8)).astype(np.float32) + (i > 3) * 2.0 for i in range(8)]
    pipe = streamtta.Pipeline(mlp(), adapter="rbn+tent", scorer="knn").fit_source(rng.normal(size=(300, 8)))
    for b in batches[:4]:
        pipe.process(b)
    snap = pipe.state_dict()
    torch.save(snap, buf := __import__("io").BytesIO())
    buf.seek(0)
    snap = torch.load(buf, weights_only=True)  # plain data only
    first = [pipe.process(b) for b in batches[4:]]
    other = pipe.spawn()
    other.load_state_dict(snap)
    again = [other.process(b) for b in batches[4:]]
    for a, b in zip(first, again):
        assert torch.equal(a.logits, b.logits) and np.array_equal(a.ood_scores, b.ood_scores)
    assert other.batch_index == pipe.batch_index == 8


def test_pipeline_matches_the_engine_on_the_same_stream(digits_model, shifted, tmp_path):
    """Offline (pipeline in a loop) and online (engine over a replayed source) give identical outputs."""
    x, y = shifted
    cfg = load_config(overrides={"engine": {"batch_size": 64}, "monitor": {"hold_batches": 0}})
    template = build_pipeline(cfg, *digits_model)
    direct = template.spawn()
    preds, scores, kinds = [], [], []
    for i in range(0, len(x), 64):
        res = direct.process(x[i:i + 64], stream_id="cam")
        preds += res.predictions.tolist()
        scores += res.ood_scores.tolist()
        kinds += [a.kind for a in res.alerts]
    out = Outputs(predictions=MemorySink(), alerts=[MemorySink()], dlq=MemoryDeadLetter())
    log = RunLog()
    Engine(cfg, MemorySource([encode_tensor(v, "cam") for v in x], topic="t"), out, template, runlog=log).run()
    assert [p["pred"] for p in sorted(out.predictions.values, key=lambda p: p["offset"])] == preds
    assert np.allclose(log.ood_scores(), scores)
    assert [a["kind"] for a in out.alerts[0].values] == kinds
    assert "covariate_shift" in kinds  # the change to contrast is confirmed
    assert (np.array(preds)[y < 8] == y[y < 8]).mean() > 0.8


def test_alerts_are_schema_objects_and_results_are_held_one_batch(digits_model, shifted):
    x, _ = shifted
    cfg = load_config(overrides={"engine": {"batch_size": 64}})
    pipe = build_pipeline(cfg, *digits_model)
    assert pipe.hold == 1
    released, alerts = [], []
    for i in range(0, len(x), 64):
        res = pipe.process(x[i:i + 64])
        alerts += res.alerts
        released += pipe.release()
        assert len(pipe.held) == 1 and pipe.held[0] is res  # the newest result waits one batch
    released += pipe.release(everything=True)
    assert [r.batch_index for r in released] == list(range(len(x) // 64)) and not pipe.held
    assert alerts and all(isinstance(a, Alert) for a in alerts)
    shift = next(a for a in alerts if a.kind == "covariate_shift")
    assert shift.model_dump(mode="json")["offsets"] == {"topic": "", "partition": 0, "first": shift.offsets.first,
                                                        "last": shift.offsets.first + 63}
    assert all(r.pre_state is None for r in released)  # no adapter copy outlives the hold


def test_same_seed_same_outputs():
    rng = np.random.default_rng(2)
    src, batch = rng.normal(size=(200, 8)), rng.normal(size=(16, 8))
    a = streamtta.Pipeline(mlp(), adapter="tent", scorer="energy").fit_source(src).process(batch)
    b = streamtta.Pipeline(mlp(), adapter="tent", scorer="energy").fit_source(src).process(batch)
    assert torch.equal(a.logits, b.logits) and np.array_equal(a.ood_scores, b.ood_scores)


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="at least 20"):
        streamtta.Pipeline(mlp(), adapter="bn").fit_source(np.zeros((5, 8), np.float32))
    with pytest.raises(ValueError, match="not a built-in model"):
        streamtta.Pipeline("no-such-model")


def test_memory_stays_bounded_when_results_are_never_released():
    pipe = streamtta.Pipeline(mlp(), adapter="bn", scorer="energy", hold_batches=1)
    pipe.fit_source(torch.randn(200, 8))
    for _ in range(1100):
        pipe.process(torch.randn(8, 8))
    assert len(pipe.held) == 1 and pipe.held[0].pre_state is not None
    ready = pipe.release()
    assert len(ready) == 1024 and ready[-1].batch_index == 1098 and all(r.pre_state is None for r in ready)


def test_config_choices_are_kept_unless_overridden():
    cfg = load_config(overrides={"adapter": {"spec": "tent"}, "scorer": {"name": "energy"}}, env=False)
    assert repr(streamtta.Pipeline(mlp(), config=cfg)).startswith("Pipeline(adapter='tent', scorer='energy'")
    assert repr(streamtta.Pipeline(mlp(), adapter="bn", config=cfg)).startswith("Pipeline(adapter='bn'")
    pipe = streamtta.Pipeline.from_config({"adapter": {"spec": "bn"}}, mlp())
    assert pipe.cfg.adapter.spec == "bn"


def test_engine_dead_letters_a_wrong_shape_record_for_a_user_model():
    rng = np.random.default_rng(0)
    template = streamtta.Pipeline(mlp(), adapter="bn", scorer="energy").fit_source(rng.normal(size=(300, 8)))
    vals = [encode_tensor(rng.normal(size=8).astype(np.float32), "s1") for _ in range(50)]
    vals.insert(20, encode_tensor(np.zeros(7, np.float32), "s1"))
    out = Outputs(predictions=MemorySink(), alerts=[MemorySink()], dlq=MemoryDeadLetter())
    src = MemorySource(vals, topic="t")
    Engine(load_config(overrides={"engine": {"batch_size": 16}}, env=False), src, out, template).run()
    assert [r.offset for r, _ in out.dlq.records] == [20]
    assert sorted(p["offset"] for p in out.predictions.values) == [i for i in range(51) if i != 20]
    assert src.committed == {("t", 0): 51}
