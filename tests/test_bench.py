"""`streamtta bench`: methods x variants on identical streams, comparison with the source model, JSON."""
import json

import numpy as np
import pytest

from streamtta.bench import compare_to_source, parse_variant
from streamtta.cli import main
from streamtta.config import ConfigError
from streamtta.metrics import longest_run_below
from streamtta.reports import read_bench_json


def test_longest_run_below_and_source_comparison():
    src = np.array([80.0, 80, 80, 80, 80, 80, 80])
    acc = np.array([79.0, 78, 81, 70, 71, 72, np.nan])
    assert longest_run_below(acc, src) == 3
    assert longest_run_below(src, src) == 0  # equal is not below
    res = compare_to_source(acc, src)
    assert res["max_batches_below_source"] == 3
    assert res["batches_below_source_pct"] == pytest.approx(100 * 5 / 6)
    with pytest.raises(ValueError, match="differ in length"):
        longest_run_below([1.0], [1.0, 2.0])


def test_variant_parsing_errors():
    assert parse_variant("e: scorer.name=energy ; monitor.readapt=false") == (
        "e", {"scorer": {"name": "energy"}, "monitor": {"readapt": False}})
    with pytest.raises(ConfigError, match="LABEL"):
        parse_variant("monitor.readapt=true")
    with pytest.raises(ConfigError, match="dotted"):
        parse_variant("x:readapt=true")


def test_bench_runs_methods_and_variants_on_the_same_stream(tmp_path, capsys):
    out = tmp_path / "b.json"
    md = tmp_path / "b.md"
    rc = main(["bench", "quickstart", "--methods", "source,bn", "--seeds", "1", "--limit", "640",
               "--variant", "plain:", "--scorers", "msp", "--json", str(out), "--markdown", str(md),
               "--metrics", "acc,auroc,max_batches_below_source", "--no-progress", "--output-dir", str(tmp_path)])
    assert rc == 0
    doc = read_bench_json(out)
    names = [r["method"] for r in doc["results"]]
    assert names == ["source (plain)", "bn (plain)", "source (msp)", "bn (msp)"]
    by = {r["method"]: r["metrics"] for r in doc["results"]}
    # the same 10 batches went to every run: the source model never trails itself, and its accuracy does
    # not depend on the scorer
    assert by["source (plain)"]["max_batches_below_source"] == 0
    assert by["source (msp)"]["acc"] == by["source (plain)"]["acc"]
    assert 0 <= by["bn (plain)"]["max_batches_below_source"] <= 10
    assert by["bn (plain)"]["auroc"] != by["bn (msp)"]["auroc"]  # a different scorer ran
    table = md.read_text()
    assert "bn (msp)" in table and "Max run < source" in table
    assert json.loads(out.read_text())["command"]


def test_bench_rejects_a_bad_variant_before_running(tmp_path, capsys):
    rc = main(["bench", "quickstart", "--methods", "bn", "--limit", "64", "--no-progress", "--json",
               str(tmp_path / "never.json"), "--variant", "bad:engine.batch_size=0", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "engine.batch_size" in err and "'bad'" in err
    assert not (tmp_path / "never.json").exists()


def test_bench_rejects_a_variant_that_sets_the_spec_the_methods_replace(tmp_path, capsys):
    rc = main(["bench", "quickstart", "--methods", "default", "--limit", "64", "--no-progress", "--output-dir",
               str(tmp_path), "--variant", 'plain:adapter.spec="cb-stats(ema=0)+source-fallback"'])
    err = capsys.readouterr().err
    assert rc == 2 and "adapter.spec" in err and "--methods" in err and "cb-stats(ema=0)" in err


def test_bench_cost_mode_reports_forward_step_and_scoring(tmp_path):
    out = tmp_path / "cost.json"
    rc = main(["bench", "quickstart", "--cost", "--cost-samples", "384", "--methods", "source,bn,tent",
               "--scorers", "energy", "--json", str(out), "--no-progress", "--output-dir", str(tmp_path)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["kind"] == "cost" and doc["torch_threads"] >= 1
    rows = {r["spec"]: r for r in doc["rows"]}
    assert set(rows) == {"source", "bn", "tent"} and all(r["scorer"] == "energy" for r in rows.values())
    for r in rows.values():
        assert r["n_batches"] == 2 * (384 // 64 - 2)  # repeats x (batches - warm-up)
        assert r["forward_ms"] > 0 and r["step_ms"] > 0 and r["scoring_ms"] > 0
        assert r["step_ratio"] == pytest.approx(r["step_ms"] / r["forward_ms"], rel=1e-2)
    # TENT does a forward, a backward and an optimizer step: it costs more than BN-adapt's forward
    assert rows["tent"]["step_ms"] > rows["bn"]["step_ms"]


def test_bench_plots_accuracy_around_shifts(tmp_path, capsys):
    png = tmp_path / "shifts.png"
    args = ["bench", "quickstart", "--methods", "source", "--seeds", "1", "--no-progress",
            "--plot-shifts", str(png), "--output-dir", str(tmp_path)]
    assert main(args + ["--limit", "640"]) == 0  # the shift at sample 2,000 is cut off
    assert "no shift plot" in capsys.readouterr().out and not png.exists()
    assert main(args + ["--limit", "2560"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_soak_prints_memory_figures_of_a_bounded_run(tmp_path, capsys):
    import json

    from streamtta import cli

    out = tmp_path / "soak.json"
    assert cli.main(["bench", "--soak", "600", "--stream-ids", "30", "--set", "engine.max_states=8",
                     "--json", str(out), "--no-progress"]) == 0
    r = json.loads(out.read_text())
    assert r["records"] == r["predictions"] == 600 and r["max_states"] == 8 and r["evicted"] > 0
    assert r["rss_after_warmup_mb"] > 0 and len(r["rss_samples"]) == -(-600 // 64)  # one per batch here
    assert json.loads(capsys.readouterr().out)["records"] == 600
