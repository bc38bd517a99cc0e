"""RunLog: in memory by default; with ``spool_dir`` bounded in memory, written through to JSONL, and the
same log for metrics, plots and files."""
from __future__ import annotations

import gc
import json
import weakref

import numpy as np
import pytest

from streamtta.metrics import summarize
from streamtta.runlog import ALERTS_FILE, BATCHES_FILE, BatchRecord, RecordSpool, RunLog


def make_batches(n_batches=300, **kw):
    return list(iter_batches(n_batches, **kw))


def iter_batches(n_batches, bs=8, seed=0, topics=("in",), n_classes=10, known=8):
    """Batches of a two-partition stream with a domain change half way, unknown classes and shifts."""
    rng = np.random.default_rng(seed)
    offsets = {}
    for i in range(n_batches):
        topic, part = topics[i % len(topics)], int(rng.integers(0, 2))
        first = offsets.get((topic, part), 0)
        offsets[(topic, part)] = first + bs
        labels = rng.integers(0, n_classes, bs)
        unk = labels >= known
        preds = np.where(rng.random(bs) < (0.8 if i < n_batches // 2 else 0.5), labels, rng.integers(0, known, bs))
        scores = rng.normal(np.where(unk, 2.0, 0.0), 1.0)
        yield BatchRecord(
            index=i, stream_id=f"{topic}:{part}", topic=topic, partition=part, first_offset=first,
            last_offset=first + bs - 1, offsets=list(range(first, first + bs)), preds=preds.tolist(),
            labels=[None if rng.random() < 0.1 else int(v) for v in labels], ood_scores=scores.tolist(),
            ood_flags=(scores > 1.0).tolist(), is_unknown=[bool(u) for u in unk],
            domains=["clean" if i < n_batches // 2 else "fog"] * bs, entropy=rng.random(bs).tolist(),
            updated=(rng.random(bs) < 0.7).tolist(), latency_s=float(rng.random() * 0.05),
            step_s=float(rng.random() * 0.01), shift="covariate_shift" if i == n_batches // 2 + 3 else None,
            reset=bool(i == n_batches // 2 + 4), info={"n_gated_out": int(rng.integers(0, 3)), "note": f"b{i}"})


def make_alerts(batches, every=25):
    return [{"kind": "covariate_shift" if k % 2 else "ood_burst", "batch_index": b.index, "stream_id": b.stream_id,
             "offsets": {"topic": b.topic, "partition": b.partition, "first": b.first_offset, "last": b.last_offset},
             "evidence": {"k": k}} for k, b in enumerate(batches[5::every])]


def pair(tmp_path, n_batches=300, max_batches=16, max_alerts=3, **kw):
    """The same records in an in-memory log and a spooled one."""
    batches = make_batches(n_batches, **kw)
    alerts = make_alerts(batches)
    mem = RunLog(change_points=[n_batches // 2 * 8], wall_s=3.0, peak_rss_mb=10.0, dead_letters=2)
    spool = RunLog(change_points=[n_batches // 2 * 8], wall_s=3.0, peak_rss_mb=10.0, dead_letters=2,
                   spool_dir=tmp_path / "run", max_batches=max_batches, max_alerts=max_alerts)
    for log in (mem, spool):
        for b in batches:
            log.append(b)
        for a in alerts:
            log.alerts.append(a)
    return mem, spool


def test_default_log_is_in_memory():
    log = RunLog()
    assert isinstance(log.batches, list) and isinstance(log.alerts, list) and not log.spooled


def test_spooled_log_keeps_a_bounded_window_in_memory(tmp_path):
    log = RunLog(spool_dir=tmp_path, max_batches=8, max_alerts=4)
    alive = []
    for i, b in enumerate(iter_batches(200)):  # no list of them outlives the loop
        log.append(b)
        alive.append(weakref.ref(b))
        log.alerts.append({"kind": "k", "batch_index": i})
        assert log.batches.in_memory <= 8 and log.alerts.in_memory <= 4
    del b
    gc.collect()
    assert len(log.batches) == 200 and len(log.alerts) == 200  # engine numbers records by len(batches)
    assert sum(r() is not None for r in alive) == 8  # older records are freed, only the window is held
    assert [b.index for b in log.batches.window] == list(range(192, 200))
    assert [a["batch_index"] for a in log.alerts.window] == [196, 197, 198, 199]
    log.flush()
    for name in (BATCHES_FILE, ALERTS_FILE):
        assert len((tmp_path / name).read_bytes().splitlines()) == 200


def test_spool_round_trips_exactly(tmp_path):
    mem, spool = pair(tmp_path)
    assert list(spool.batches) == mem.batches and list(spool.alerts) == mem.alerts
    spool.close()
    for path in (tmp_path / "run", tmp_path / "run" / BATCHES_FILE):
        back = RunLog.load(path)
        assert isinstance(back.batches, list) and back.batches == mem.batches and back.alerts == mem.alerts
    # indexing and slices read the same records from the file or the window
    n = len(mem.batches)
    for i in (0, 1, 255, 256, 257, n - 17, n - 16, n - 1, -1, -n):
        assert spool.batches[i] == mem.batches[i]
    assert spool.batches[250:290] == mem.batches[250:290] and spool.batches[::7] == mem.batches[::7]
    assert spool.batches[n - 3:n + 5] == mem.batches[n - 3:]
    with pytest.raises(IndexError):
        spool.batches[n]
    spool.append(make_batches(1, seed=9)[0])  # appending after close reopens the spool
    spool.flush()
    assert len(spool.batches) == n + 1 and RunLog.load(tmp_path / "run").batches[-1] == spool.batches[-1]


def test_to_json_of_a_spooled_log_is_the_same_file(tmp_path):
    mem, spool = pair(tmp_path)
    mem.to_json(tmp_path / "mem.json")
    spool.to_json(tmp_path / "spool.json")
    assert (tmp_path / "mem.json").read_bytes() == (tmp_path / "spool.json").read_bytes()
    d = json.loads((tmp_path / "mem.json").read_text())
    assert len(d["batches"]) == len(mem.batches) and d["dead_letters"] == 2
    assert RunLog.load(tmp_path / "spool.json") == mem


@pytest.mark.parametrize("known_classes", [None, set(range(8))])
def test_summarize_over_a_spooled_log_equals_in_memory(tmp_path, known_classes):
    mem, spool = pair(tmp_path, topics=("a", "b"))
    a = summarize(mem, known_classes=known_classes)
    b = summarize(spool, known_classes=known_classes)
    assert a["n_batches"] == len(mem.batches) and a["n_alerts"] == len(mem.alerts) and a["n_shift_alerts"] > 0
    assert json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)
    assert spool.batches.in_memory == 16


def test_plot_reads_a_spooled_log(tmp_path):
    from streamtta.reports import plot_run

    _, spool = pair(tmp_path, n_batches=60)
    plot_run(spool, tmp_path / "run.png")
    assert (tmp_path / "run.png").stat().st_size > 1000


def test_record_spool_of_plain_values(tmp_path):
    s = RecordSpool(tmp_path / "x.jsonl", 2, dict, dict, index_every=3)
    assert not s and list(s) == []
    docs = [{"i": i, "v": [i, None, 0.1 * i]} for i in range(10)]
    s.extend(docs)
    assert s and s == docs and s[4] == docs[4] and s[-2:] == docs[-2:] and s.in_memory == 2
    assert list(RecordSpool.read(tmp_path / "x.jsonl", dict)) == docs


def test_engine_writes_through_a_spooled_log(tmp_path):
    import torch

    from streamtta.config import load_config
    from streamtta.engine import Engine, Outputs
    from streamtta.models.registry import load_model
    from streamtta.runner import build_pipeline
    from streamtta.simulations.digits import load_digits_32
    from streamtta.stream.envelope import encode_tensor
    from streamtta.stream.memory import MemoryDeadLetter, MemorySink, MemorySource

    torch.set_num_threads(1)
    cfg = load_config(overrides={"adapter": {"spec": "bn"}, "engine": {"batch_size": 16},
                                 "kafka": {"stop_at_end": True, "poll_timeout_s": 0.01}}, env=False)
    d = load_digits_32()
    values = [b"not an envelope" if i == 3 else encode_tensor(d.x_test[i], "cam", label=int(d.y_test[i]))
              for i in range(160)]
    log = RunLog(spool_dir=tmp_path, max_batches=2, max_alerts=1)
    out = Outputs(predictions=MemorySink(), alerts=[MemorySink()], dlq=MemoryDeadLetter())
    Engine(cfg, MemorySource(values, topic="t"), out, build_pipeline(cfg, *load_model("digits-resnet")),
           runlog=log).run()
    assert log.batches.in_memory <= 2 and log.alerts.in_memory <= 1
    assert [b.index for b in log.batches] == list(range(len(log.batches)))
    assert sorted(o for b in log.batches for o in b.offsets) == sorted(set(range(160)) - {3})
    assert [a["kind"] for a in log.alerts] == [a["kind"] for a in out.alerts[0].values]
    log.close()
    assert any(a["kind"] == "dead_letter" for a in RunLog.load(tmp_path).alerts)
