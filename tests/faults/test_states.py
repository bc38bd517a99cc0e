"""Per-stream states: bounded LRU table (evict to checkpoints, restore on demand) and the topic
incarnation check (a checkpoint's offsets are not applied to a recreated or reset partition)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from streamtta.checkpoints import CheckpointStore
from streamtta.config import load_config
from streamtta.engine import Engine, Outputs
from streamtta.models.registry import load_model
from streamtta.runner import build_pipeline
from streamtta.simulations.sensors import load_river_split
from streamtta.stream.envelope import encode_json_row
from streamtta.stream.memory import MemoryDeadLetter, MemorySink, MemorySource
from streamtta.types import RawRecord


@pytest.fixture(scope="module")
def template():
    torch.set_num_threads(1)
    model, meta = load_model("segment-mlp")
    return build_pipeline(make_cfg("unused"), model, meta)


def make_cfg(ckpt_dir, **engine):
    # checkpoint_interval_s=0: every batch checkpoints (the evictions and restarts land between batches)
    return load_config(overrides={"engine": {"batch_size": 16, "checkpoint_dir": str(ckpt_dir),
                                             "checkpoint_interval_s": 0, **engine},
                                  "kafka": {"stop_at_end": True, "poll_timeout_s": 0.001}}, env=False)


def rows(n, n_ids=1, start=0, topic="t"):
    x = load_river_split("segment").x_test
    return [RawRecord(topic=topic, partition=0, offset=i,
                      value=encode_json_row(x[(start + i) % len(x)], f"s{(i // 4) % n_ids}")) for i in range(n)]


def run(cfg, template, recs, store, start_offsets=None):
    outputs = Outputs(predictions=MemorySink(), alerts=[MemorySink()], dlq=MemoryDeadLetter())
    src = MemorySource(recs, start_offsets=start_offsets)
    eng = Engine(cfg, src, outputs, template, store=store)
    eng.run()
    eng.n_states = len(eng.states)  # before close: the revoke callback forgets the closed partitions
    eng.batch_index = {k: eng.states[k].pipe.batch_index for k in eng.states}
    src.close()
    return eng, src, outputs


@pytest.fixture(scope="module")
def unheld(template):
    """The template without held results (a state holding one stays in memory until monitor.hold_max_s)."""
    cfg = make_cfg("unused")
    cfg.monitor.hold_batches = 0
    return build_pipeline(cfg, template.blueprint.model, template.blueprint.meta)


def test_states_beyond_max_states_are_evicted_and_restored_without_changing_any_output(unheld, tmp_path):
    recs = rows(640, n_ids=40)  # 40 stream ids in runs of 4 records, each id coming back 4 times
    outs = {}
    for max_states in (1000, 6):
        cfg = make_cfg(tmp_path / f"ck{max_states}", state_key="stream_id", max_states=max_states)
        eng, src, out = run(cfg, unheld, recs, CheckpointStore(cfg.engine.checkpoint_dir))
        outs[max_states] = out.predictions.values
        if max_states == 6:
            # bounded after every checkpoint (here every batch): at most 6 + the ids of one batch (4)
            assert eng.n_states <= 6 + 4 and eng.states.evicted >= 40 - 10 and eng.states.restored > 0
        else:
            assert eng.n_states == 40 and eng.states.evicted == 0
        assert src.committed == {("t", 0): 640}
    a, b = outs[1000], outs[6]
    assert [d["offset"] for d in a] == [d["offset"] for d in b] == list(range(640))
    # an evicted state comes back exactly as it left: same predictions and scores, bit for bit
    assert [d["pred"] for d in a] == [d["pred"] for d in b]
    assert np.array_equal([d["ood_score"] for d in a], [d["ood_score"] for d in b])


def test_without_a_checkpoint_store_nothing_is_evicted(template, tmp_path, caplog):
    cfg = make_cfg(tmp_path / "ck", state_key="stream_id", max_states=2)
    eng, _, out = run(cfg, template, rows(64, n_ids=8), store=None)
    assert eng.n_states == 8 and len(out.predictions.values) == 64
    assert "no checkpoint store" in caplog.text


def test_a_recreated_topic_read_from_its_start_does_not_apply_the_old_offsets(template, tmp_path):
    cfg = make_cfg(tmp_path / "ck")
    store = CheckpointStore(cfg.engine.checkpoint_dir)
    run(cfg, template, rows(160), store)
    # the topic is deleted and created again: 48 new records from offset 0, the group reads from the start
    eng, src, out = run(cfg, template, rows(48, start=500), store)
    assert [d["offset"] for d in out.predictions.values] == list(range(48)) and eng.skipped == 0
    changed = [a for a in out.alerts[0].values if a["kind"] == "topic_changed"]
    assert len(changed) == 1 and "below the offset" in changed[0]["evidence"]["reason"]
    assert eng.batch_index["t:0"] == 10 + 3  # the adaptation state itself was kept
    assert src.committed == {("t", 0): 48}


def test_a_partition_that_ends_before_the_checkpoint_is_another_incarnation(template, tmp_path):
    # one checkpoint only, at the end (no commit before it): only the partition's end can tell
    cfg = make_cfg(tmp_path / "ck", checkpoint_every=1000)
    store = CheckpointStore(cfg.engine.checkpoint_dir)
    run(cfg, template, rows(160), store)
    assert store.load("t:0")["committed_offsets"] == []
    eng, _, out = run(cfg, template, rows(40, start=700), store)
    assert [d["offset"] for d in out.predictions.values] == list(range(40)) and eng.skipped == 0
    changed = [a for a in out.alerts[0].values if a["kind"] == "topic_changed"]
    assert len(changed) == 1 and "ends at offset 40" in changed[0]["evidence"]["reason"]


def test_held_predictions_of_an_old_incarnation_are_dropped(template, tmp_path):
    cfg = make_cfg(tmp_path / "ck")
    cfg.monitor.hold_batches = 2
    store = CheckpointStore(cfg.engine.checkpoint_dir)
    recs = rows(96)
    src = MemorySource(recs, fail_after=64)
    outputs = Outputs(predictions=MemorySink(), alerts=[], dlq=MemoryDeadLetter())
    with pytest.raises(Exception):
        Engine(cfg, src, outputs, template, store=store).run()
    n_held = len(store.load("t:0")["held_predictions"])
    assert n_held >= 16  # the checkpoint carries held predictions
    eng, _, out = run(cfg, template, rows(30, start=900), store)
    offsets = [d["offset"] for d in out.predictions.values]
    assert offsets == list(range(30))  # the new records, once each; none of the old held ones
    changed = [a for a in out.alerts[0].values if a["kind"] == "topic_changed"]
    assert changed and changed[0]["evidence"]["dropped_held_predictions"] == n_held


def test_a_checkpoint_of_another_adapter_or_model_starts_the_stream_fresh_with_an_alert(template, tmp_path):
    cfg = make_cfg(tmp_path / "ck")
    store = CheckpointStore(cfg.engine.checkpoint_dir)
    run(cfg, template, rows(96), store)
    other_cfg = make_cfg(tmp_path / "ck")
    other_cfg.adapter.spec = "bn"  # another adapter: its state has other parts
    other = build_pipeline(other_cfg, template.blueprint.model, template.blueprint.meta)
    eng, src, out = run(other_cfg, other, rows(160), store)
    # nothing skipped (the old offsets belong to the old state), nothing crashed, one alert
    assert [d["offset"] for d in out.predictions.values] == list(range(160)) and eng.skipped == 0
    rejected = [a for a in out.alerts[0].values if a["kind"] == "state_rejected"]
    assert len(rejected) == 1 and "another model, adapter" in rejected[0]["evidence"]["error"]
    assert list(store.directory.glob("*.rejected")) and eng.batch_index["t:0"] == 10
    # the new run's checkpoint is the one restored next time (read again from offset 0: a group reset)
    eng, _, out = run(other_cfg, other, rows(160), store)
    assert eng.batch_index["t:0"] == 20 and not [a for a in out.alerts[0].values if a["kind"] == "state_rejected"]


def test_checkpoints_are_kept_per_consumer_group(tmp_path):
    a = CheckpointStore(tmp_path, namespace="group-a")
    b = CheckpointStore(tmp_path, namespace="group-b")
    a.save("t:0", {"n": 1})
    assert a.load("t:0") == {"n": 1} and b.load("t:0") is None and a.directory != b.directory


def test_a_checkpoint_of_an_uncalibrated_run_is_not_restored_into_a_calibrated_one(tmp_path):
    """The calibration is part of the fingerprint: scorer memories of one calibration (or none) never
    replace those of another (this crashed with 'ContrastScorer is not fitted')."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(18, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                              torch.nn.Linear(16, 7)).eval()
    split = load_river_split("segment")
    cfg = make_cfg(tmp_path / "ck")
    store = CheckpointStore(cfg.engine.checkpoint_dir)
    bare = build_pipeline(cfg, net)
    assert not bare.calibrated
    run(cfg, bare, rows(64), store)
    calibrated = build_pipeline(cfg, net)
    calibrated.calibrate(split.x_train[:400], split.y_train[:400])
    eng, _, out = run(cfg, calibrated, rows(96), store)
    assert len(out.predictions.values) == 96
    rejected = [a for a in out.alerts[0].values if a["kind"] == "state_rejected"]
    assert len(rejected) == 1 and "calibration" in rejected[0]["evidence"]["error"]
    other = build_pipeline(cfg, net)
    other.calibrate(split.x_train[400:800], split.y_train[400:800])  # another calibration: fresh again
    _, _, out = run(cfg, other, rows(96), store)
    assert [a["kind"] for a in out.alerts[0].values].count("state_rejected") == 1
