"""Tests for streamtta.reports: aggregation, bench JSON, tables and PNG plots."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from streamtta import reports as R
from streamtta.metrics import summarize
from streamtta.runlog import BatchRecord, RunLog

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_log(n_batches=24, bs=8, labels=True, seed=0) -> RunLog:
    rng = np.random.default_rng(seed)
    log = RunLog(wall_s=1.0, peak_rss_mb=100.0)
    off = 0
    for b in range(n_batches):
        dom = "clean" if b < n_batches // 2 else "noise"
        y = rng.integers(0, 4, bs)
        p = np.where(rng.random(bs) < (0.9 if dom == "clean" else 0.5), y, (y + 1) % 4)
        unk = np.zeros(bs, bool)
        if dom == "noise":
            unk[::4] = True
        sc = np.where(unk, 1.5, 0.0) + rng.normal(0, 0.3, bs)
        log.append(BatchRecord(
            index=b, stream_id="s", topic="t", partition=0, first_offset=off, last_offset=off + bs - 1,
            offsets=list(range(off, off + bs)), preds=p.tolist(), labels=[int(v) if labels else None for v in y],
            ood_scores=sc.tolist(), ood_flags=(sc > 0.8).tolist(),
            is_unknown=[bool(u) if labels else None for u in unk], domains=[dom if labels else None] * bs,
            entropy=rng.random(bs).tolist(), updated=[True] * bs, latency_s=0.002, step_s=0.001,
            reset=(b == 20)))
        off += bs
    log.alerts = [{"kind": "covariate_shift", "batch_index": 13}, {"kind": "ood_burst", "batch_index": 15},
                  {"kind": "some_future_kind", "batch_index": 5}]
    return log


def fake_results():
    res = []
    for scen in ("digits-c", "digits-open"):
        for meth, base in (("source", 60.0), ("tent", 70.0)):
            for seed in (0, 1, 2):
                m = {"acc": base + seed, "auroc": None if scen == "digits-c" else 80.0 + 2 * seed,
                     "samples_per_s": 1000.0 + seed, "n_samples": 300, "note": "x"}
                res.append(R.make_result(scen, meth, seed, {"metrics": m,
                                                            "per_domain": {"d0": {"acc": base - seed}}}))
    return res


def test_aggregate_mean_std_over_seeds():
    agg = R.aggregate(fake_results())
    assert [(a["scenario"], a["method"]) for a in agg] == [
        ("digits-c", "source"), ("digits-c", "tent"), ("digits-open", "source"), ("digits-open", "tent")]
    a = agg[1]
    assert a["n_seeds"] == 3 and a["seeds"] == [0, 1, 2]
    assert a["metrics_mean"]["acc"] == pytest.approx(71.0)
    assert a["metrics_std"]["acc"] == pytest.approx(1.0)  # sqrt(((70-71)^2 + 0 + (72-71)^2) / (3 - 1))
    assert a["metrics_mean"]["auroc"] is None and a["metrics_n"]["auroc"] == 0
    assert agg[3]["metrics_mean"]["auroc"] == pytest.approx(82.0)
    assert "note" not in a["metrics_mean"]  # non-numeric metrics are not aggregated
    assert a["per_domain_mean"]["d0"]["acc"] == pytest.approx(69.0)
    single = R.aggregate(fake_results()[:1])
    assert single[0]["metrics_std"]["acc"] is None
    with pytest.raises(ValueError, match="missing"):
        R.aggregate([{"scenario": "s"}])


def test_bench_json_roundtrip_and_schema(tmp_path):
    res = fake_results()
    p = tmp_path / "out" / "bench.json"
    doc = R.write_bench_json(p, res, command=["streamtta", "bench", "--seeds", "3"])
    back = R.read_bench_json(p)
    assert back == doc
    assert set(back) == {"schema_version", "created_at", "command", "versions", "results", "aggregate"}
    assert back["schema_version"] == R.BENCH_SCHEMA_VERSION
    assert back["command"] == "streamtta bench --seeds 3"
    assert set(back["versions"]) == {"streamtta", "torch", "numpy", "river", "faiss", "python"}
    assert back["versions"]["numpy"] == np.__version__
    assert set(back["results"][0]) == {"scenario", "method", "seed", "metrics", "per_domain"}
    assert {"scenario", "method", "metrics_mean", "metrics_std", "n_seeds"} <= set(back["aggregate"][0])
    assert back["aggregate"] == json.loads(json.dumps(R.aggregate(res)))
    bad = dict(back)
    del bad["versions"]
    with pytest.raises(ValueError, match="versions"):
        R.validate_bench(bad)
    with pytest.raises(ValueError, match="schema_version"):
        R.validate_bench({**back, "schema_version": 99})


def test_bench_json_from_real_summaries_is_strict_json(tmp_path):
    res = [R.make_result("sc", "m", s, summarize(make_log(seed=s, labels=(s == 0)))) for s in (0, 1)]
    assert "series" not in res[0]["metrics"] and res[0]["metrics"]["n_samples"] == 192
    assert res[0]["per_domain"]["clean"]["n"] == 96
    doc = R.write_bench_json(tmp_path / "b.json", res, R.aggregate(res), versions={k: "x" for k in
                                                                    ("streamtta", "torch", "numpy", "river",
                                                                     "faiss", "python")})
    text = (tmp_path / "b.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    agg = doc["aggregate"][0]
    assert agg["metrics_n"]["acc"] == 1 and agg["metrics_n"]["samples_per_s"] == 2


def test_to_jsonable_rejects_unknown_objects():
    with pytest.raises(TypeError, match="object"):
        R.to_jsonable({"a": object()})


def test_markdown_table_shape_and_best_bold():
    agg = R.aggregate(fake_results())
    md = R.bench_markdown(agg, metrics=("acc", "auroc", "samples_per_s"))
    lines = md.strip().splitlines()
    assert len(lines) == 2 + len(agg)
    ncols = lines[0].count("|")
    assert all(line.count("|") == ncols for line in lines)
    assert ncols == 3 + 3 + 1
    assert "Acc % ↑" in lines[0]
    # tent wins accuracy in each scenario -> bold in the tent rows only
    tent_rows = [line for line in lines[2:] if "| tent |" in line]
    src_rows = [line for line in lines[2:] if "| source |" in line]
    assert all("**71.0 ± 1.0**" in line for line in tent_rows)
    assert not any("**" in line.split("|")[4] for line in src_rows)
    assert "–" in lines[2]  # auroc missing for digits-c


def test_print_bench_table_renders_all_rows():
    from rich.console import Console

    agg = R.aggregate(fake_results())
    buf = io.StringIO()
    table = R.print_bench_table(agg, console=Console(file=buf, width=200, color_system=None),
                                metrics=("acc", "auroc"))
    out = buf.getvalue()
    assert table.row_count == len(agg)
    assert "71.0 ± 1.0" in out and "digits-open" in out and "AUROC" in out


def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5000


def test_plot_run_png(tmp_path):
    log = make_log()
    p = R.plot_run(log, tmp_path / "plots" / "run.png", title="synthetic")
    _check_png(p)
    live = R.plot_run(make_log(labels=False), tmp_path / "live.png")
    _check_png(live)
    with pytest.raises(ValueError, match="empty"):
        R.plot_run(RunLog(), tmp_path / "empty.png")


def test_plot_bench_png(tmp_path):
    agg = R.aggregate(fake_results())
    _check_png(R.plot_bench(agg, tmp_path / "bench.png"))
    _check_png(R.plot_bench(agg, tmp_path / "bench_auroc.png", metric="auroc"))  # with n/a bars
    with pytest.raises(ValueError, match="at least one"):
        R.plot_bench([], tmp_path / "x.png")


def test_tables_drop_empty_columns_unless_asked():
    agg = R.aggregate(fake_results())
    md = R.bench_markdown(agg, metrics=("acc", "acc_h", "auroc"))
    assert "ACC_H" not in md and "AUROC" in md
    md_all = R.bench_markdown(agg, metrics=("acc", "acc_h", "auroc"), drop_empty=False)
    assert "ACC_H" in md_all


def test_shift_windows_align_on_the_change_batch_and_pad_with_nan():
    acc = np.arange(20, dtype=float)
    w = R.shift_windows(acc, [3, 18], before=4, after=3)
    assert w.shape == (2, 8)
    assert np.isnan(w[0, 0]) and w[0, 4] == 3.0 and w[0, 7] == 6.0  # batch -1 does not exist
    assert w[1, 4] == 18.0 and w[1, 5] == 19.0 and np.isnan(w[1, 6:]).all()
    assert R.shift_windows(acc, []).shape == (0, 16)
    with pytest.raises(ValueError):
        R.shift_windows(acc, [3], before=-1)


def test_plot_shift_recovery_png(tmp_path):
    rng = np.random.default_rng(0)
    w = {("scen", "a"): rng.uniform(50, 100, (6, 16)), ("scen", "b"): np.full((6, 16), np.nan),
         ("other", "a"): rng.uniform(50, 100, (3, 16))}
    _check_png(R.plot_shift_recovery(w, tmp_path / "shifts.png"))
    with pytest.raises(ValueError, match="at least one"):
        R.plot_shift_recovery({}, tmp_path / "none.png")
