"""Poison records: every kind of :mod:`poison_corpus` is dead-lettered with an error naming the problem, the
partition moves on, no good record is lost; oversized originals fit in the DLQ; non-finite samples given
to a pipeline directly are flagged and never learned from."""
from __future__ import annotations

import hashlib
import re
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

import streamtta
from poison_corpus import build_corpus
from streamtta.checkpoints import CheckpointStore
from streamtta.config import load_config
from streamtta.engine import Engine, Outputs
from streamtta.models.registry import load_model
from streamtta.runner import build_pipeline
from streamtta.simulations.sensors import load_river_split
from streamtta.stream.envelope import DecodeError, DecodeLimits, decode_value, encode_json_row, encode_tensor
from streamtta.stream.memory import MemoryDeadLetter, MemorySink, MemorySource
from streamtta.types import RawRecord

N_FEATURES = 18  # segment-mlp
CORPUS = build_corpus(N_FEATURES)


@pytest.fixture(scope="module")
def segment():
    torch.set_num_threads(1)
    model, meta = load_model("segment-mlp")
    return model, meta, load_river_split("segment")


def test_corpus_has_at_least_30_distinct_kinds():
    kinds = [p.kind for p in CORPUS]
    assert len(kinds) >= 30 and len(set(kinds)) == len(kinds)


@pytest.mark.parametrize("poison", CORPUS, ids=[p.kind for p in CORPUS])
def test_every_kind_is_a_decode_error_naming_the_problem(poison):
    with pytest.raises(DecodeError, match=poison.match):
        decode_value(poison.value, DecodeLimits(expected_shape=(N_FEATURES,)))


def good_values(split, n: int) -> list[tuple[bytes, str]]:
    """``n`` good records of the segment test split: tensors and JSON rows, three stream ids."""
    out = []
    for i in range(n):
        j = i % len(split.x_test)
        x, y, sid = split.x_test[j], int(split.y_test[j]), f"s{i % 3}"
        value = encode_tensor(x, sid, label=y) if i % 2 else encode_json_row(x, sid, label=y)
        out.append((value, sid))
    return out


def interleaved(split, n_between: int = 2) -> tuple[list[RawRecord], set[int], dict[int, object]]:
    """Good records with one poison record after every ``n_between`` of them (topic ``t``, partition 0):
    ``(records, good offsets, poison by offset)``."""
    good = iter(good_values(split, n_between * (len(CORPUS) + 1)))
    records, good_offsets, poison_at = [], set(), {}

    def add(value, key, headers=()):
        records.append(RawRecord(topic="t", partition=0, offset=len(records), value=value, key=key,
                                 headers=tuple(headers)))

    for p in CORPUS + [None]:
        for _ in range(n_between):
            value, sid = next(good)
            good_offsets.add(len(records))
            add(value, sid.encode())
        if p is not None:
            poison_at[len(records)] = p
            add(p.value, b"poison", p.headers)
    return records, good_offsets, poison_at


def run_engine(cfg, pipe, records, store=None):
    src = MemorySource(records, topic="t")
    outputs = Outputs(predictions=MemorySink(), alerts=[MemorySink()], dlq=MemoryDeadLetter())
    eng = Engine(cfg, src, outputs, pipe, store=store)
    eng.run()  # returns: the worker survived every poison record
    return src, eng, outputs


def engine_cfg(tmp_path, state_key="partition"):
    return load_config(overrides={
        "model": {"source": "segment-mlp"},
        "engine": {"batch_size": 16, "state_key": state_key, "checkpoint_dir": str(tmp_path / "ck")},
        "kafka": {"stop_at_end": True, "poll_timeout_s": 0.01}}, env=False)


def check_outcome(src, eng, outputs, records, good_offsets, poison_at):
    dlq = outputs.dlq
    by_offset = {rec.offset: (rec, err) for rec, err in dlq.records}
    assert sorted(by_offset) == sorted(poison_at), "every poison record, and only those, dead-lettered"
    for off, p in poison_at.items():
        rec, err = by_offset[off]
        assert rec.origin == ("t", 0, off) and re.search(p.match, err), (p.kind, err[:300])
    for msg, (rec, err) in zip(dlq.messages, dlq.records):
        assert msg.header("dlq.origin.topic") == b"t"
        assert msg.header("dlq.origin.offset") == str(rec.offset).encode()
        assert msg.header("dlq.error") == err[:4000].encode("utf-8", "replace")
        big = rec.value is not None and len(rec.value) > dlq.max_value_bytes
        assert msg.truncated == (big or sum(len(v) for _, v in rec.headers) > 64 * 1024)
        if big:
            assert msg.value == rec.value[:dlq.max_value_bytes]
            assert msg.header("dlq.size") == str(len(rec.value)).encode()
            assert msg.header("dlq.sha256") == hashlib.sha256(rec.value).hexdigest().encode()
    assert dlq.truncated >= 2  # the 1.5 MB garbage and the 1.2 MB JSON row
    counts = Counter(d["offset"] for d in outputs.predictions.values)
    assert set(counts) == good_offsets and set(counts.values()) == {1}, "every good record predicted exactly once"
    assert src.committed == {("t", 0): len(records)}, "the final commit covers every offset"
    assert eng.dead_letters == len(poison_at)
    assert any(a["kind"] == "dead_letter" for a in outputs.alerts[0].values)


@pytest.mark.parametrize("state_key", ["partition", "stream_id"])
def test_engine_dead_letters_every_kind_and_loses_no_good_record(tmp_path, segment, state_key):
    model, meta, split = segment
    cfg = engine_cfg(tmp_path, state_key)
    assert cfg.engine.expected_shape is None  # the input shape comes from the model
    records, good_offsets, poison_at = interleaved(split)
    src, eng, outputs = run_engine(cfg, build_pipeline(cfg, model, meta), records,
                                   CheckpointStore(cfg.engine.checkpoint_dir))
    check_outcome(src, eng, outputs, records, good_offsets, poison_at)
    if state_key == "stream_id":
        assert set(eng.states) == {"s0", "s1", "s2"}


def test_user_model_without_metadata_learns_the_shape_from_the_first_record(tmp_path, segment):
    _, _, split = segment
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(N_FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).eval()
    pipe = streamtta.Pipeline(net, adapter="bn", scorer="energy")
    cfg = engine_cfg(tmp_path)
    records, good_offsets, poison_at = interleaved(split)
    src, eng, outputs = run_engine(cfg, pipe, records)
    check_outcome(src, eng, outputs, records, good_offsets, poison_at)


def test_oversized_original_is_dead_lettered_cut_with_its_size_and_digest():
    value = np.random.default_rng(0).bytes(1_500_000)
    rec = RawRecord(topic="in", partition=2, offset=41, value=value, key=b"k" * 20_000,
                    headers=(("trace", b"t" * 70_000), ("small", b"1")))
    dlq = MemoryDeadLetter()
    dlq.send(rec, "unknown record format")
    msg = dlq.messages[0]
    assert dlq.records == [(rec, "unknown record format")] and dlq.truncated == 1
    assert msg.value == value[:900_000] and msg.key == b"k" * 16 * 1024
    assert msg.header("dlq.truncated") == b"true" and msg.header("dlq.size") == b"1500000"
    assert msg.header("dlq.sha256") == hashlib.sha256(value).hexdigest().encode()
    assert msg.header("dlq.key.size") == b"20000" and msg.header("dlq.headers.dropped") == b"2"
    assert msg.header("trace") is None and msg.header("dlq.origin.partition") == b"2"
    size = len(msg.value) + len(msg.key) + sum(len(k) + len(v or b"") for k, v in msg.headers)
    assert size < 1_000_000  # fits librdkafka's default message.max.bytes
    small = RawRecord(topic="in", partition=0, offset=1, value=b"x" * 100, headers=(("h", b"v"),))
    dlq.send(small, "bad")
    assert dlq.messages[1].value == small.value and not dlq.messages[1].truncated
    assert dlq.messages[1].headers[0] == ("h", b"v") and dlq.messages[1].header("dlq.size") is None


def test_nonfinite_samples_through_the_python_api_are_flagged_and_never_learned(segment):
    model, meta, split = segment
    cfg = load_config(overrides={"model": {"source": "segment-mlp"}}, env=False)
    pipe = build_pipeline(cfg, model, meta)
    x = np.array(split.x_test[:64], dtype=np.float32)
    bad = [3, 17, 40]
    x[3, 0], x[17, 5], x[40] = np.nan, np.inf, -np.inf
    res = pipe.process(x)
    expect = np.isin(np.arange(64), bad)
    assert (res.nonfinite == expect).all()
    assert res.ood_flags[bad].all() and not res.keep[bad].any() and not res.updated[bad].any()
    assert res.keep[~expect].any()  # the finite samples are still scored and kept as usual
    assert res.info["n_nonfinite_inputs"] == len(bad)
    assert np.isfinite(res.confidences).all() and res.predictions.shape == (64,)
    state = pipe.state_dict()

    def finite(v):
        if isinstance(v, torch.Tensor):
            return bool(torch.isfinite(v).all()) if v.is_floating_point() else True
        if isinstance(v, dict):
            return all(finite(u) for u in v.values())
        if isinstance(v, (list, tuple)):
            return all(finite(u) for u in v)
        if isinstance(v, float):
            return np.isfinite(v)
        return True
    assert finite(state), "no NaN/Inf reached any adapted or learned state"
    clean = pipe.process(np.array(split.x_test[64:96], dtype=np.float32))
    assert not clean.nonfinite.any() and np.isfinite(clean.confidences).all()
