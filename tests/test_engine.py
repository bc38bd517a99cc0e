"""Engine loop without a broker: same code path as Kafka with the in-memory source and sinks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from streamtta.config import load_config
from streamtta.checkpoints import CheckpointStore
from streamtta.engine import Engine, Outputs
from streamtta.pipeline import Pipeline
from streamtta.records import prediction_docs
from streamtta.runner import build_pipeline
from streamtta.models.registry import load_model
from streamtta.runlog import RunLog
from streamtta.simulations.digits import load_digits_32
from streamtta.stream.envelope import encode_tensor
from streamtta.stream.memory import MemoryDeadLetter, MemorySink, MemorySource, SimulatedCrash


@pytest.fixture(scope="module")
def model_meta():
    torch.set_num_threads(1)
    return load_model("digits-resnet")


def digit_values(n, poison=()):
    d = load_digits_32()
    out = []
    for i in range(n):
        if i in poison:
            out.append(b"not an envelope")
        else:
            j = i % len(d.x_test)
            out.append(encode_tensor(d.x_test[j], "cam", label=int(d.y_test[j]), is_unknown=bool(d.y_test[j] >= 8)))
    return out


def make_engine(cfg, source, comps, store=None, runlog=None):
    outputs = Outputs(predictions=MemorySink(), alerts=[MemorySink()], dlq=MemoryDeadLetter())
    return Engine(cfg, source, outputs, comps, store=store, runlog=runlog), outputs


def run_until_crash(cfg, comps, values, store, fail_after):
    """Run until the source crashes after ``fail_after`` records: ``(source, engine, offsets predicted)``."""
    src = MemorySource(values, topic="t", fail_after=fail_after)
    eng, out = make_engine(cfg, src, comps, store=store)
    with pytest.raises(SimulatedCrash):
        eng.run()
    return src, eng, {p["offset"] for p in out.predictions.values}


def cfg_for(tmp_path, spec="bn", bs=32):
    # checkpoint_interval_s=0: every batch checkpoints and commits (the restarts below land between batches)
    return load_config(overrides={"adapter": {"spec": spec}, "engine": {"batch_size": bs, "checkpoint_interval_s": 0,
                       "checkpoint_dir": str(tmp_path / "ck")}, "kafka": {"stop_at_end": True, "poll_timeout_s": 0.01}},
                       env=False)


def test_offline_run_predicts_every_record_and_dead_letters_bad_ones(tmp_path, model_meta):
    cfg = cfg_for(tmp_path)
    comps = build_pipeline(cfg, *model_meta)
    poison = {5, 70}
    src = MemorySource(digit_values(200, poison), topic="t")
    log = RunLog()
    eng, out = make_engine(cfg, src, comps, runlog=log)
    eng.run()
    preds = out.predictions.values
    assert sorted(p["offset"] for p in preds) == sorted(set(range(200)) - poison)
    assert [r.offset for r, _ in out.dlq.records] == sorted(poison)
    assert src.committed == {("t", 0): 200}
    assert any(a["kind"] == "dead_letter" for a in out.alerts[0].values)
    d = load_digits_32()
    labels = np.array([int(d.y_test[i % len(d.x_test)]) for i in range(200) if i not in poison])
    got = np.array([p["pred"] for p in sorted(preds, key=lambda p: p["offset"])])
    known = labels < 8
    assert (got[known] == labels[known]).mean() > 0.8  # clean digits, BN-adapt on mixed batches
    assert log.n_samples == 198


def test_restart_from_checkpoint_skips_what_was_already_output(tmp_path, model_meta):
    cfg = cfg_for(tmp_path, spec="unmix-tns+tent", bs=16)
    comps, values, store = build_pipeline(cfg, *model_meta), digit_values(160), CheckpointStore(cfg.engine.checkpoint_dir)
    src1, eng1, first = run_until_crash(cfg, comps, values, store, 80)
    committed = src1.committed[("t", 0)]
    assert committed == max(first) + 1
    # pretend the last commit was lost (a crash between checkpoint and commit): restart from the offset
    # committed before the last checkpoint; checkpointed records must not repeat
    src2 = MemorySource(values, topic="t", start_offsets={("t", 0): committed - 16})
    eng2, out2 = make_engine(cfg, src2, comps, store=store)
    eng2.run()
    second = [p["offset"] for p in out2.predictions.values]
    # the 16 commit-lost records, and the held batch (its predictions come from the checkpoint)
    assert cfg.monitor.hold_batches == 1 and eng2.skipped == 16 + 16
    assert sorted(first | set(second)) == list(range(160)) and not (first & set(second))
    # the restored adaptation state is the checkpointed one, not a fresh one
    st = eng2.states["t:0"].pipe
    assert st.batch_index == 10 and st.n_samples == 160


def test_checkpoint_store_is_atomic_and_round_trips(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save("t:0", {"a": torch.arange(3)})
    store.save("t:0", {"a": torch.arange(4)})
    assert torch.equal(store.load("t:0")["a"], torch.arange(4))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
    assert store.load("other") is None


def test_ood_samples_never_feed_adaptation(tmp_path, model_meta):
    cfg = cfg_for(tmp_path, spec="tent", bs=32)
    comps = build_pipeline(cfg, *model_meta)
    rng = np.random.default_rng(0)
    d = load_digits_32()
    vals = []
    for i in range(64):
        x = d.x_test[i] if i % 2 == 0 else rng.random((1, 32, 32), dtype=np.float32)  # noise = OOD
        vals.append(encode_tensor(x, "cam"))
    log = RunLog()
    eng, _ = make_engine(cfg, MemorySource(vals, topic="t"), comps, runlog=log)
    eng.run()
    flags, upd = log.ood_flags(), np.array([u for b in log.batches for u in b.updated])
    assert flags.any()
    assert not (flags & upd).any(), "an OOD-flagged sample fed the update"


def test_gate_scorer_also_keeps_its_flags_out_of_adaptation(tmp_path, model_meta):
    cfg = cfg_for(tmp_path, spec="tent", bs=32)
    cfg.scorer.name, cfg.scorer.gate = "energy", "mahalanobis"
    comps = build_pipeline(cfg, *model_meta)
    rng = np.random.default_rng(1)
    d = load_digits_32()
    vals = [encode_tensor(d.x_test[i] if i % 3 else rng.random((1, 32, 32), dtype=np.float32), "cam")
            for i in range(96)]
    log = RunLog()
    eng, _ = make_engine(cfg, MemorySource(vals, topic="t"), comps, runlog=log)
    eng.run()
    st = next(iter(eng.states.values())).pipe
    assert st.parts.gate_scorer is not None and st.parts.gate_scorer.name == "mahalanobis"
    flags, upd = log.ood_flags(), np.array([u for b in log.batches for u in b.updated])
    assert not (flags & upd).any()
    # the gate scorer removed samples that the main scorer accepted
    gated_out = sum(b.info["n_gated_out"] for b in log.batches)
    assert gated_out > int(flags.sum())
    # checkpointed with the rest of the stream state
    saved = st.state_dict()
    assert saved["gate_scorer"] is not None
    fresh = comps.spawn()
    fresh.load_state_dict(saved)
    assert fresh.parts.gate_scorer.state_dict().keys() == saved["gate_scorer"].keys()


def test_shift_inside_a_batch_is_reprocessed_in_two_parts(tmp_path, model_meta):
    """A confirmed shift whose change point lies inside the batch: that batch is processed again from the
    adapter state before it, as two batches, and its outputs are the two-part ones."""
    from streamtta.simulations.corruptions import corrupt

    d = load_digits_32()
    n, cp = 1664, 20 * 64 + 24  # 20 clean batches, then contrast from sample 24 of batch 20
    x = np.stack([d.x_test[i % len(d.x_test)] for i in range(n)]).astype(np.float32)
    y = np.array([int(d.y_test[i % len(d.x_test)]) for i in range(n)])
    x[cp:] = corrupt(x[cp:], "contrast", 5, 0)
    vals = [encode_tensor(x[i], "cam", label=int(y[i]), is_unknown=bool(y[i] >= 8)) for i in range(n)]
    change_acc = {}
    for readapt in (False, True):
        cfg = load_config(overrides={"engine": {"batch_size": 64, "checkpoint_dir": str(tmp_path / f"ck{readapt}")},
                                     "monitor": {"readapt": readapt},
                                     "kafka": {"stop_at_end": True, "poll_timeout_s": 0.01}}, env=False)
        log = RunLog()
        eng, out = make_engine(cfg, MemorySource(vals, topic="t"), build_pipeline(cfg, *model_meta), runlog=log)
        eng.run()
        assert sorted(p["offset"] for p in out.predictions.values) == list(range(n))
        b = log.batches[20]
        assert b.shift == "covariate_shift"  # confirmed on the batch that holds the change point
        known = [j for j in range(len(b.preds)) if b.labels[j] < 8]
        change_acc[readapt] = np.mean([b.preds[j] == b.labels[j] for j in known])
        shift_alerts = [a for a in out.alerts[0].values if a["kind"] == "covariate_shift"]
        split = shift_alerts[0]["evidence"].get("onset_split")
        if readapt:
            assert split is not None and abs(split["onset_index"] - 24) <= 1 and split["p_value"] < 0.01
            assert b.info["onset_index"] == split["onset_index"] and shift_alerts[0]["action"] == "onset_split"
        else:
            assert split is None and "onset_index" not in b.info
    # statistics of a batch straddling two domains fit neither part
    assert change_acc[True] > change_acc[False] + 0.15


def test_readapt_options_are_checked_before_anything_runs(tmp_path, model_meta):
    from streamtta.config import ConfigError

    with pytest.raises(ConfigError, match="split_onsets"):  # a typo: caught with the configuration
        load_config(overrides={"monitor": {"readapt_options": {"split_onsets": True}}}, env=False)
    cfg = cfg_for(tmp_path, spec="source")
    cfg.monitor.readapt_options = {"decay_batches": -1}  # a bad value: caught when the components are built
    with pytest.raises(ValueError, match="monitor.readapt_options"):
        build_pipeline(cfg, *model_meta)


def test_restart_learns_the_batch_before_the_scorer_is_refit(tmp_path, model_meta, monkeypatch):
    """With the meta restart on, the shift batch feeds the scorer memories and the buffer before the restart
    re-fits the scorer (not after, which would undo the re-fit), and only once."""
    from streamtta.readapt import ReAdapter
    from streamtta.simulations.corruptions import corrupt

    d = load_digits_32()
    n, cp = 1664, 20 * 64 + 24
    x = np.stack([d.x_test[i % len(d.x_test)] for i in range(n)]).astype(np.float32)
    x[cp:] = corrupt(x[cp:], "contrast", 5, 0)
    vals = [encode_tensor(x[i], "cam") for i in range(n)]
    calls = []
    learn, shift = Pipeline.learn_scores, ReAdapter.on_shift
    monkeypatch.setattr(Pipeline, "learn_scores", lambda self, *a: (calls.append(("learn", self.batch_index)),
                                                                        learn(self, *a))[1])
    monkeypatch.setattr(ReAdapter, "on_shift", lambda self, *a, **k: (calls.append(("restart", len(self))),
                                                                       shift(self, *a, **k))[1])
    cfg = load_config(overrides={"engine": {"batch_size": 64, "checkpoint_dir": str(tmp_path / "ck")},
                                 "monitor": {"readapt_options": {"restart": True, "steps": 1}},
                                 "kafka": {"stop_at_end": True, "poll_timeout_s": 0.01}}, env=False)
    eng, out = make_engine(cfg, MemorySource(vals, topic="t"), build_pipeline(cfg, *model_meta))
    eng.run()
    i = calls.index(next(c for c in calls if c[0] == "restart"))
    assert calls[i - 1] == ("learn", 20) and calls[i + 1] == ("learn", 21)  # batch 20 learned once, before
    assert calls[i][1] > 0  # the buffer already held batches up to the shift batch
    alert = next(a for a in out.alerts[0].values if a["kind"] == "covariate_shift")
    assert alert["evidence"]["onset_split"]["onset_index"] in (23, 24, 25)
    assert alert["action"] in ("readapted", "rolled_back")


def test_held_batch_is_reprocessed_when_the_shift_is_confirmed_one_batch_late(tmp_path, model_meta):
    """With ``monitor.hold_batches=1`` a change 10 samples before the end of batch 20, confirmed only on
    batch 21, is still split: batch 20 gets two-part predictions and keeps its first-pass scores."""
    from streamtta.simulations.corruptions import corrupt

    d = load_digits_32()
    n, cp = 1664, 20 * 64 + 54
    x = np.stack([d.x_test[i % len(d.x_test)] for i in range(n)]).astype(np.float32)
    y = np.array([int(d.y_test[i % len(d.x_test)]) for i in range(n)])
    x[cp:] = corrupt(x[cp:], "contrast", 5, 0)
    vals = [encode_tensor(x[i], "cam", label=int(y[i]), is_unknown=bool(y[i] >= 8)) for i in range(n)]
    logs, alerts = {}, {}
    for hold in (0, 1):
        cfg = load_config(overrides={"engine": {"batch_size": 64, "checkpoint_dir": str(tmp_path / f"ck{hold}")},
                                     "monitor": {"hold_batches": hold},
                                     "kafka": {"stop_at_end": True, "poll_timeout_s": 0.01}}, env=False)
        logs[hold] = log = RunLog()
        src = MemorySource(vals, topic="t")
        eng, out = make_engine(cfg, src, build_pipeline(cfg, *model_meta), runlog=log)
        eng.run()
        assert sorted(p["offset"] for p in out.predictions.values) == list(range(n)) and src.committed == {("t", 0): n}
        assert [b.first_offset for b in log.batches] == list(range(0, n, 64))  # emitted in order
        alerts[hold] = next(a for a in out.alerts[0].values if a["kind"] == "covariate_shift")
    assert logs[0].batches[21].shift == logs[1].batches[21].shift == "covariate_shift"  # one batch late
    assert "onset_split" not in alerts[0]["evidence"] and "onset_index" not in logs[0].batches[20].info
    split = alerts[1]["evidence"]["onset_split"]
    assert split["onset_batch"] == 20 and abs(split["onset_index"] - 54) <= 1 and split["batches"] == [20, 21]
    assert logs[1].batches[20].info["onset_index"] == split["onset_index"]
    # the held batch keeps the scores it was first given (the scorer memories learned them)
    assert np.allclose(logs[1].batches[20].ood_scores, logs[0].batches[20].ood_scores)

    def known_acc(b):
        known = [j for j in range(len(b.preds)) if b.labels[j] < 8]
        return np.mean([b.preds[j] == b.labels[j] for j in known])
    assert known_acc(logs[1].batches[20]) > known_acc(logs[0].batches[20]) + 0.05


def test_held_records_are_never_committed_and_their_predictions_survive_a_crash(tmp_path, model_meta):
    cfg = cfg_for(tmp_path, spec="bn", bs=16)
    cfg.monitor.hold_batches = 2
    comps, values, store = build_pipeline(cfg, *model_meta), digit_values(160), CheckpointStore(cfg.engine.checkpoint_dir)
    src1, eng1, first = run_until_crash(cfg, comps, values, store, 80)
    assert first == set(range(48))  # 5 batches processed, the last 2 held
    assert src1.committed[("t", 0)] == 48 and len(eng1.states["t:0"].pipe.held) == 2
    held = {p["offset"]: p for b in eng1.states["t:0"].pipe.held for p in prediction_docs(b)}
    # the restart writes the held predictions from the checkpoint and skips their records: the adapter,
    # which had adapted on them before the crash, does not adapt on them again
    src2 = MemorySource(values, topic="t", start_offsets=dict(src1.committed))
    eng2, out2 = make_engine(cfg, src2, comps, store=store)
    eng2.run()
    second = [p["offset"] for p in out2.predictions.values]
    assert sorted(first | set(second)) == list(range(160)) and not (first & set(second)) and len(second) == 112
    assert [p for p in out2.predictions.values if p["offset"] in held] == [held[o] for o in sorted(held)]
    assert eng2.skipped == 32 and src2.committed == {("t", 0): 160}
    st = eng2.states["t:0"].pipe
    assert st.held == [] and st.batch_index == 10 and st.n_samples == 160


def test_held_predictions_are_released_after_hold_max_s_and_checkpoints_follow(tmp_path, model_meta):
    seen = []
    for max_s, tag in ((60.0, "long"), (1e-9, "none")):
        cfg = cfg_for(tmp_path / tag, spec="bn", bs=16)
        cfg.monitor.hold_max_s = max_s
        store = CheckpointStore(cfg.engine.checkpoint_dir)
        eng, out = make_engine(cfg, MemorySource(digit_values(96), topic="t"), build_pipeline(cfg, *model_meta),
                               store=store)
        held_before, process = [], eng.process

        def probe(records, process=process, eng=eng, held_before=held_before):
            held_before.append(len(out.predictions.values))  # written when the next batch comes in
            process(records)
        eng.process = probe
        eng.run()
        seen.append(held_before)
        # the final checkpoint no longer carries held predictions (all were written)
        assert store.load("t:0")["held_predictions"] == [] and len(out.predictions.values) == 96
    assert seen[0] == [0, 0, 16, 32, 48, 64]  # one batch held until the next one is processed
    assert seen[1] == [0, 16, 32, 48, 64, 80]  # held past hold_max_s: written before the next poll


class _Exploit:
    """A pickle payload that would create a marker file if anything unpickled it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["pickle", "truncated", "garbage", "bad-array", "list-state", "no-state",
                                  "no-fingerprint"])
def test_bad_checkpoint_is_moved_aside_never_executed_and_the_stream_starts_fresh(tmp_path, model_meta, kind):
    import pickle

    cfg = cfg_for(tmp_path, spec="bn", bs=16)
    store = CheckpointStore(cfg.engine.checkpoint_dir)
    marker = tmp_path / "pwned"
    good, _ = make_engine(cfg, MemorySource(digit_values(32), topic="t"), build_pipeline(cfg, *model_meta), store=store)
    good.run()
    path = store.path("t:0")
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"pipeline": _Exploit(marker)}))
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "garbage":
        path.write_bytes(b"\x00garbage" * 50)
    else:  # well-formed files with a crafted payload
        head = {"format": "streamtta.checkpoint", "version": 2}
        state = {"bad-array": {"__ndarray__": "x"}, "list-state": [1, 2], "no-fingerprint": {"n": 1}}.get(kind)
        torch.save({**head, **({} if kind == "no-state" else {"state": state})}, path)
    eng, out = make_engine(cfg, MemorySource(digit_values(64), topic="t"), build_pipeline(cfg, *model_meta),
                           store=store)
    eng.run()
    assert not marker.exists()  # nothing in the file ran
    assert path.with_name(path.name + ".rejected").exists()
    alerts = [a for a in out.alerts[0].values if a["kind"] == "state_rejected"]
    assert len(alerts) == 1 and str(path) in alerts[0]["evidence"]["error"]
    # started fresh: every record predicted, the new checkpoint loads
    assert sorted(p["offset"] for p in out.predictions.values) == list(range(64))
    assert store.load("t:0")["pipeline"]["batch_index"] == 4


class LosingSource(MemorySource):
    """A memory source whose partitions can be lost (session timeout) mid-run, as a Kafka consumer's can."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._lost_cbs = []

    def on_lost(self, cb):
        self._lost_cbs.append(cb)

    def lose(self):
        for cb in self._lost_cbs:
            cb(sorted(self._assigned))


def test_lost_partitions_are_forgotten_without_a_checkpoint_or_commit(tmp_path, model_meta):
    """After a session timeout another worker may own the partition: the engine drops its state unsaved and
    never commits its pending offsets; a clean revoke still checkpoints."""
    cfg = load_config(overrides={"adapter": {"spec": "bn"}, "engine": {
        "batch_size": 32, "checkpoint_interval_s": 3600, "checkpoint_dir": str(tmp_path / "ck")},
        "kafka": {"stop_at_end": True, "poll_timeout_s": 0.01}}, env=False)
    comps = build_pipeline(cfg, *model_meta)
    store = CheckpointStore(cfg.engine.checkpoint_dir)
    src = LosingSource(digit_values(200), topic="t")
    eng, out = make_engine(cfg, src, comps, store=store)
    for _ in range(3):
        eng.process(src.consume(32, 0.0))
    assert eng._pending_commit and len(eng.states) == 1 and not list(store.directory.glob("*.pt"))
    src.lose()
    assert not eng._pending_commit and len(eng.states) == 0
    assert src.commit_history == [] and not list(store.directory.glob("*.pt"))  # nothing written for it
    eng2_src = MemorySource(digit_values(200), topic="t")
    eng2, _ = make_engine(cfg, eng2_src, comps, store=store)
    eng2.run()
    eng2_src.close()
    assert list(store.directory.glob("*.pt")) and eng2_src.committed == {("t", 0): 200}


def test_losing_one_partition_never_commits_the_kept_ones_past_held_outputs(tmp_path, model_meta):
    """state_key=stream_id: one stream spans partitions 0 and 1 and its last batch is held when partition 1
    is lost. The forgotten state's held predictions of partition 0 must still be written before partition 0
    is committed past them (they are never delivered again in this session)."""
    from streamtta.types import RawRecord

    cfg = load_config(overrides={"engine": {"batch_size": 64, "state_key": "stream_id", "checkpoint_interval_s": 3600,
                                            "checkpoint_dir": str(tmp_path / "ck")},
                                 "kafka": {"stop_at_end": True, "poll_timeout_s": 0.01}}, env=False)
    assert cfg.monitor.hold_batches >= 1
    vals = digit_values(128)
    recs = [RawRecord("t", i % 2, i // 2, v) for i, v in enumerate(vals)]  # 64 per partition, interleaved
    src = LosingSource(recs, topic="t")
    eng, out = make_engine(cfg, src, build_pipeline(cfg, *model_meta))
    eng.process(recs[:64])
    eng.process(recs[64:])  # the first batch is written, the second held
    assert any(st.pipe.held for st in eng.states.values())
    for cb in src._lost_cbs:
        cb([("t", 1)])
    eng._finish_batch(force=True)
    written = {(p["partition"], p["offset"]) for p in out.predictions.values}
    for (topic, part), nxt in src.committed.items():
        assert part == 0 and all((0, o) in written for o in range(nxt)), (nxt, sorted(written))
