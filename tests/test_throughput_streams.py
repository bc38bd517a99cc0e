"""``streamtta bench --throughput --stream-counts`` (:mod:`streamtta.throughput_streams`): the engine over a
real broker with many stream ids, per id and grouped; nothing here asserts a speed."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from streamtta import runner
from streamtta.cli import build_parser
from streamtta.config import load_config
from streamtta.simulations.scenario import build_stream, load_scenario
from streamtta.throughput import throughput_markdown
from streamtta.throughput_streams import MODES, fleet_values, stream_rows, streams_markdown

SCENARIO = Path(__file__).resolve().parent.parent / "simulations" / "sensor-drift.toml"


@pytest.fixture(scope="module")
def setup() -> tuple[Any, Any, Any]:
    scenario = load_scenario(SCENARIO)
    cfg = load_config(env=False)
    runner.use_scenario_model(cfg, scenario)
    return cfg, runner.build_pipeline(cfg), build_stream(scenario, 0)


def test_fleet_values_spread_the_records(setup: Any) -> None:
    _, _, stream = setup
    one, ids1 = fleet_values(stream, 1, 100)
    many, ids8 = fleet_values(stream, 8, 100)
    assert len(one) == len(many) == 100 and len(set(ids1)) == 1 and len(set(ids8)) == 8
    assert one != many  # the same samples, dealt to other ids in another order


def test_stream_rows_per_id_and_grouped(setup: Any, embedded_broker: Any, tmp_path: Path) -> None:
    cfg, pipe, stream = setup  # one count only: every row waits ~3 s for its consumer group to form
    rows = stream_rows(cfg, pipe, stream, embedded_broker.bootstrap_servers, tmp_path, counts=(8,), samples=128,
                       per_id_cap=96, say=lambda m: None)
    assert [(r["stream_ids"], r["mode"]) for r in rows] == [(1, "partition"), (8, "grouped"), (8, "per-id")]
    assert {r["mode"] for r in rows} == set(MODES)
    part, g, p = rows
    assert all(r["samples_per_s"] > 0 and r["p50_ms"] <= r["p99_ms"] for r in rows)
    assert part["vs_partition"] == 1.0 and part["states"] == part["ids_held"] == 1
    assert g["vs_partition"] == round(g["samples_per_s"] / part["samples_per_s"], 3)
    assert part["samples"] == g["samples"] == 128 and p["samples"] == 96  # per-id is capped
    assert g["ids_seen"] == 8 and g["states"] == 1 and g["ids_held"] == 8  # one state serves every id
    assert p["states"] == p["ids_seen"] == p["ids_held"] == 8  # one state per id
    assert p["checkpoint_bytes"] > g["checkpoint_bytes"] > 0  # eight checkpoints against one
    md = streams_markdown(rows).splitlines()
    assert len(md) == 2 + len(rows) and md[0].startswith("| stream ids | mode |")
    assert md[3].startswith("| 8 | grouped | 8 | 128 |")
    doc = {"rows": [], "workers": [], "streams": rows}
    assert "| 8 | per-id | 8 | 96 |" in throughput_markdown(doc)


def test_no_counts_no_rows(setup: Any) -> None:
    cfg, pipe, stream = setup
    assert stream_rows(cfg, pipe, stream, "unused:9092", Path("."), counts=()) == []
    assert streams_markdown([]) == ""


def test_bench_parser_stream_counts() -> None:
    p = build_parser()
    assert p.parse_args(["bench", "x", "--throughput"]).stream_counts == "1,1000"
    assert p.parse_args(["bench", "x", "--throughput", "--stream-counts", ""]).stream_counts == ""
