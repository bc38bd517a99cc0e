"""``streamtta bench --throughput`` (:mod:`streamtta.throughput`): the rows it measures are the ones it
says, over a real broker; nothing here asserts a speed."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

from streamtta import runner
from streamtta.cli import build_parser
from streamtta.config import load_config
from streamtta.simulations.scenario import build_stream, load_scenario
from streamtta.throughput import PATHS, engine_row, measure_throughput, throughput_markdown, worker_rows

SCENARIO = Path(__file__).resolve().parent.parent / "simulations" / "digits-c-iid.toml"


@pytest.fixture(scope="module")
def setup() -> tuple[Any, Any, Any, list[bytes]]:
    scenario = load_scenario(SCENARIO)
    cfg = load_config(env=False)
    runner.use_scenario_model(cfg, scenario)
    pipe = runner.build_pipeline(cfg)
    values = [r.value for r in itertools.islice(runner.encoded_records(build_stream(scenario, 0)), 64)]
    return cfg, scenario, pipe, values


def test_engine_row_consumes_every_record(setup: Any, embedded_broker: Any, tmp_path: Path) -> None:
    cfg, _, pipe, values = setup
    row = engine_row(cfg, pipe, embedded_broker.bootstrap_servers, values[:48], 16, tmp_path)
    assert row["path"] == "engine" and row["batch_size"] == 16
    assert row["samples_per_s"] > 0 and row["startup_s"] is not None
    assert row["p50_ms"] <= row["p99_ms"]
    assert row["threads"] == torch.get_num_threads()


def test_two_workers_share_the_partitions(setup: Any, embedded_broker: Any, tmp_path: Path) -> None:
    cfg, _, _, values = setup
    (row,) = worker_rows(cfg, embedded_broker.bootstrap_servers, values, tmp_path, counts=(2,), partitions=4)
    assert row["workers"] == 2 and row["samples"] == len(values)
    assert len(row["per_worker_samples"]) == 2 and all(n > 0 for n in row["per_worker_samples"])
    assert row["speedup"] == 1.0  # the first count is the base


def test_measure_throughput_rows(setup: Any) -> None:
    cfg, scenario, pipe, _ = setup
    doc = measure_throughput(cfg, scenario, batch_sizes=(8,), samples=24, workers=(), say=lambda m: None)
    assert [r["path"] for r in doc["rows"]] == list(PATHS)
    by = {r["path"]: r for r in doc["rows"]}
    assert by["forward"]["vs_forward"] == 1.0 and by["step"]["vs_step"] == 1.0
    assert all(r["samples"] == 24 and r["samples_per_s"] > 0 for r in doc["rows"])
    assert doc["workers"] == [] and doc["adapter"] == pipe.blueprint.spec
    md = throughput_markdown(doc).splitlines()
    assert len(md) == 2 + len(PATHS) and md[2].startswith("| 8 | forward |")


def test_bench_parser_throughput_flags() -> None:
    args = build_parser().parse_args(["bench", "digits-c-iid", "--throughput", "--batch-sizes", "1,64",
                                      "--throughput-samples", "128", "--workers", ""])
    assert args.throughput and args.batch_sizes == "1,64" and args.throughput_samples == 128 and args.workers == ""
