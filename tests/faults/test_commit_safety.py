"""Never commit past an unwritten record: every step of the record path fails in turn, then a restart.

For each fault point (:data:`streamtta.faults.POINTS`) the engine runs over two partitions with a few
undecodable records until the armed step raises; the source is then closed (its revoke callback runs, as
on a real shutdown after a crash) and a second engine resumes from the committed offsets with the same
checkpoint directory and sinks. Checked: every commit of the failed run covers only records whose
outputs were written, nothing is committed or checkpointed after the failure, and after the restart every
good record has a prediction and every bad one is in the dead-letter queue (0 lost).
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from streamtta.checkpoints import CheckpointStore
from streamtta.config import load_config
from streamtta.engine import Engine, Outputs
from streamtta.faults import POINTS, InjectedFault, armed
from streamtta.models.registry import load_model
from streamtta.runner import build_pipeline
from streamtta.simulations.sensors import load_river_split
from streamtta.stream.envelope import encode_json_row
from streamtta.stream.memory import MemoryDeadLetter, MemorySink, MemorySource
from streamtta.types import RawRecord

N_PER_PARTITION = 96
BATCH = 16
BAD = {(0, 7), (0, 50), (1, 20), (1, 81)}  # (partition, offset) of undecodable records
_alerts: list[dict] = []  # the alerts of the last run_with_fault


@pytest.fixture(scope="module")
def template():
    torch.set_num_threads(1)
    model, meta = load_model("segment-mlp")
    return build_pipeline(make_cfg("unused"), model, meta)


def make_cfg(ckpt_dir, **engine):
    # checkpoint_interval_s=0: every batch checkpoints and commits, so the n-th call of a fault point lands
    # between commits (test_a_crash_within_the_checkpoint_interval_loses_nothing covers the default)
    return load_config(overrides={"engine": {"batch_size": BATCH, "checkpoint_dir": str(ckpt_dir),
                                             "checkpoint_interval_s": 0, **engine},
                                  "kafka": {"stop_at_end": True, "poll_timeout_s": 0.001}}, env=False)


def records():
    split = load_river_split("segment")
    x = split.x_test
    out = []
    for i in range(N_PER_PARTITION):  # interleave the partitions as a consumer would see them
        for p in (0, 1):
            value = b"\xff not a record" if (p, i) in BAD else encode_json_row(x[(2 * i + p) % len(x)], f"sensor-{p}")
            out.append(RawRecord(topic="t", partition=p, offset=i, value=value))
    return out


def written(outputs):
    preds = Counter((d["partition"], d["offset"]) for d in outputs.predictions.values)
    dead = Counter((r.partition, r.offset) for r, _ in outputs.dlq.records)
    return preds, dead


def run_with_fault(template, tmp_path, name, nth, **engine):
    cfg = make_cfg(tmp_path / "ck", **engine)
    store = CheckpointStore(cfg.engine.checkpoint_dir)
    outputs = Outputs(predictions=MemorySink(), alerts=[MemorySink()], dlq=MemoryDeadLetter())
    recs = records()
    src1 = MemorySource(recs)
    eng1 = Engine(cfg, src1, outputs, template, store=store)
    with armed(name, nth=nth), pytest.raises(InjectedFault):
        eng1.run()
    assert eng1.failed is not None
    preds1, dead1 = written(outputs)
    commits_before_close = len(src1.commit_history)
    ckpt_mtimes = {p: p.stat().st_mtime_ns for p in store.directory.glob("*")}
    src1.close()  # the revoke callback runs after the failure: it must not flush, checkpoint or commit
    assert len(src1.commit_history) == commits_before_close
    assert {p: p.stat().st_mtime_ns for p in store.directory.glob("*")} == ckpt_mtimes
    for (topic, part), nxt in src1.committed.items():  # every committed record had its output written
        missing = [o for o in range(nxt) if not preds1[(part, o)] and not dead1[(part, o)]]
        assert not missing, f"{name}: committed {topic}[{part}]@{nxt} past unwritten offsets {missing[:5]}"
    src2 = MemorySource(recs, start_offsets=dict(src1.committed))
    eng2 = Engine(cfg, src2, outputs, template, store=store)
    eng2.run()
    src2.close()
    preds, dead = written(outputs)
    _alerts[:] = outputs.alerts[0].values
    return recs, preds, dead, src1, src2


@pytest.mark.parametrize("name,nth", [("decode", 70), ("step", 10), ("score", 10), ("predictions", 90),
                                      ("dlq", 3), ("alert", 3), ("flush", 12), ("checkpoint", 12), ("commit", 5)])
def test_a_fault_at_any_step_loses_no_record_after_restart(template, tmp_path, name, nth):
    assert name in POINTS
    recs, preds, dead, src1, src2 = run_with_fault(template, tmp_path, name, nth)
    good = [(r.partition, r.offset) for r in recs if (r.partition, r.offset) not in BAD]
    lost = [k for k in good if not preds[k]] + [k for k in BAD if not dead[k]]
    assert lost == [], f"{name}: lost {lost[:5]}"
    assert src2.committed == {("t", 0): N_PER_PARTITION, ("t", 1): N_PER_PARTITION}
    assert not set(preds) & BAD and not set(dead) - BAD
    assert src2.delivered and "topic_changed" not in {a["kind"] for a in _alerts}
    # duplicates only from the outputs written after the last checkpoint: at most a batch and the held one
    dup = sum(c - 1 for c in preds.values())
    assert dup <= 2 * 2 * BATCH, f"{name}: {dup} duplicated predictions"


def test_the_fault_fires_mid_run_not_at_the_start(template, tmp_path):
    """The chosen call numbers hit after some commits (so the tests above exercise the restart)."""
    _, _, _, src1, _ = run_with_fault(template, tmp_path, "checkpoint", 12)
    assert src1.commit_history and all(v > 0 for v in src1.committed.values())


def test_a_failed_engine_refuses_further_batches(template, tmp_path):
    cfg = make_cfg(tmp_path / "ck")
    outputs = Outputs(predictions=MemorySink(), alerts=[], dlq=MemoryDeadLetter())
    src = MemorySource(records())
    eng = Engine(cfg, src, outputs, template, store=CheckpointStore(cfg.engine.checkpoint_dir))
    with armed("step", nth=1), pytest.raises(InjectedFault):
        eng.run()
    with pytest.raises(RuntimeError, match="failed earlier"):
        eng.process(src.consume(4, 0.0))
    assert src.committed == {} and outputs.predictions.values == []
    assert np.isfinite(eng.step_time_s)


def test_a_crash_within_the_checkpoint_interval_loses_nothing(template, tmp_path):
    """With a checkpoint interval longer than the run, the failed run commits and checkpoints nothing before
    its crash; the restart re-reads everything from the start: 0 lost, the duplicates are exactly the
    outputs the failed run had written (at-least-once)."""
    recs, preds, dead, src1, src2 = run_with_fault(template, tmp_path, "step", 10, checkpoint_interval_s=3600)
    assert src1.commit_history == [] and src1.committed == {}
    good = [(r.partition, r.offset) for r in recs if (r.partition, r.offset) not in BAD]
    assert [k for k in good if not preds[k]] + [k for k in BAD if not dead[k]] == []
    assert src2.committed == {("t", 0): N_PER_PARTITION, ("t", 1): N_PER_PARTITION}
    dup = sum(c - 1 for c in preds.values())
    assert 0 < dup <= 10 * BATCH  # what the first run wrote before its 10th step failed


def test_a_long_checkpoint_interval_commits_once_at_the_end(template, tmp_path):
    """An interval longer than the run: one commit (at the end) for all its batches, everything committed."""
    cfg = load_config(overrides={"engine": {"batch_size": BATCH, "checkpoint_dir": str(tmp_path / "ck"),
                                            "checkpoint_interval_s": 3600},
                                 "kafka": {"stop_at_end": True, "poll_timeout_s": 0.001}}, env=False)
    outputs = Outputs(predictions=MemorySink(), alerts=[], dlq=MemoryDeadLetter())
    src = MemorySource(records())
    eng = Engine(cfg, src, outputs, template, store=CheckpointStore(cfg.engine.checkpoint_dir))
    eng.run()
    assert eng.batches >= 10 and len(src.commit_history) == 1
    assert src.committed == {("t", 0): N_PER_PARTITION, ("t", 1): N_PER_PARTITION}
