"""``streamtta bench SCENARIO --throughput --stream-counts 1,1000``: the engine with many stream ids.

The scenario's samples are spread over ``N`` interleaved stream ids
(:class:`~streamtta.simulations.fleet.FleetStream`), encoded as :func:`streamtta.runner.encoded_records`
encodes them, replayed into a fresh topic of the embedded broker and consumed by the engine at batch 64
(:func:`streamtta.runner.consume`, as the ``engine`` row of :mod:`streamtta.throughput`), in three modes:

* ``partition``: ``engine.state_key = "partition"`` with the configured adapter, on the records of one id
  -- the single-stream reference, run once;
* ``per-id``: ``state_key = "stream_id"``, ``grouped.enabled = false``: one full pipeline per stream id. It
  is slow with many ids, so it runs on at most ``PER_ID_CAP`` samples (the row says how many);
* ``grouped``: ``state_key = "stream_id"``, ``grouped.enabled = true``: one
  :class:`~streamtta.grouped.GroupedPipeline` per partition for all its ids.

Per row: the stream ids of the fleet, the distinct ids in the records consumed, samples, samples/s from the
first record to the end, its ratio to the ``partition`` row, batch latency p50/p99 (arrival to prediction),
the process's peak RSS so far, the states the engine held after its last batch (``states``) and the stream
ids those states served (``ids held``: one per state per id, the grouped pipeline's rows when grouped), and
the bytes of the checkpoints on disk at the end (local state store only).

>>> streams_markdown([{"stream_ids": 1000, "mode": "grouped", "ids_seen": 1000, "samples": 4096,
...     "samples_per_s": 900.0, "vs_partition": 0.9, "p50_ms": 70.0, "p99_ms": 90.0, "peak_rss_mb": 700.0,
...     "states": 1, "ids_held": 1000, "checkpoint_bytes": 123456}]).splitlines()[2]
'| 1000 | grouped | 1000 | 4096 | 900.0 | 0.90x | 70.0 | 90.0 | 700 | 1 | 1000 | 123456 |'
"""
from __future__ import annotations

import contextlib
import itertools
from pathlib import Path
from typing import Any, Sequence

from streamtta.config import Config
from streamtta.ops.observer import EngineObserver

__all__ = ["MODES", "PER_ID_CAP", "fleet_values", "print_streams", "stream_rows", "streams_markdown"]

MODES = ("partition", "per-id", "grouped")
#: the per-id mode runs on at most this many samples (about 100 records/s with 1,000 ids)
PER_ID_CAP = 1024
#: the consumed batch size of every row
BATCH = 64
_COLUMNS = ("stream ids", "mode", "ids seen", "samples", "samples/s", "vs partition", "p50 ms", "p99 ms",
            "peak RSS MB", "states", "ids held", "checkpoint bytes")


class _StateCount(EngineObserver):
    """After every batch: the engine's states in memory and the stream ids they serve."""

    states = ids = 0

    def batch(self, engine: Any, records: list[Any], seconds: float) -> None:
        self.states = len(engine.states)
        self.ids = sum(len(st.pipe.stream_ids) if hasattr(st.pipe, "stream_ids") else 1
                       for st in engine.states.values())


class _Watch:
    """What :func:`streamtta.runner.consume` asks of its ``telemetry``: here only an observer (no metrics
    served, no librdkafka statistics)."""

    url = None

    def __init__(self) -> None:
        self.metrics = _StateCount()

    def source_options(self) -> dict[str, Any]:
        return {}

    def consuming(self, source: Any) -> Any:
        return contextlib.nullcontext()


def fleet_values(stream: Any, streams: int, n: int, seed: int = 0) -> tuple[list[bytes], list[str]]:
    """The first ``n`` records of ``stream`` spread over ``streams`` ids, encoded, and their stream ids.

    >>> from streamtta.simulations.scenario import Scenario, build_stream
    >>> sc = Scenario(name="demo", dataset="digits-c", model="digits-resnet", domains=["fog"],
    ...               samples_per_domain=40, known_classes=list(range(8)))
    >>> values, ids = fleet_values(build_stream(sc, seed=0), 8, 32)
    >>> len(values), len(ids), len(set(ids))
    (32, 32, 8)
    """
    from streamtta import runner
    from streamtta.simulations.fleet import FleetStream

    fleet = FleetStream(stream, streams, seed)
    values = [r.value for r in itertools.islice(runner.encoded_records(fleet), n)]
    return values, [s.stream_id for s in itertools.islice(fleet.iter_samples(), n)]


def _checkpoint_bytes(c: Config) -> int | None:
    if getattr(c.engine, "state_store", "local") != "local":
        return None
    d = Path(c.engine.checkpoint_dir)
    return sum(p.stat().st_size for p in d.rglob("*.pt") if not p.name.startswith(".")) if d.exists() else 0


def mode_row(cfg: Config, pipe: Any, bootstrap: str, values: Sequence[bytes], mode: str, streams: int,
             ids_seen: int, tmp: Path) -> dict[str, Any]:
    """One row: the engine in ``mode`` over ``values`` (a fresh topic and group, batch :data:`BATCH`)."""
    from streamtta import runner
    from streamtta.throughput import _engine_cfg, _row, produce_records

    c = _engine_cfg(cfg, tmp, f"throughput.streams{streams}.{mode}", BATCH)
    c.engine.state_key = "partition" if mode == "partition" else "stream_id"
    c.grouped.enabled = mode == "grouped"
    produce_records(bootstrap, c.kafka.topic, values, 1)
    watch = _Watch()
    res = runner.consume(c, bootstrap, pipeline=pipe, run_dir=None, progress=False, telemetry=watch)
    if res.stats["samples"] != len(values):
        raise RuntimeError(f"{mode} with {streams} ids consumed {res.stats['samples']} of {len(values)} samples")
    row = _row(BATCH, "engine", res.stats.get("steady_samples_per_s") or 0.0, [b.latency_s for b in res.log.batches])
    del row["path"]
    return {"stream_ids": streams, "mode": mode, "ids_seen": ids_seen, "samples": len(values), **row,
            "states": watch.metrics.states, "ids_held": watch.metrics.ids, "checkpoint_bytes": _checkpoint_bytes(c),
            "startup_s": res.stats.get("startup_s")}


def stream_rows(cfg: Config, pipe: Any, stream: Any, bootstrap: str, tmp: Path, *, counts: Sequence[int] = (1, 1000),
                samples: int = 2048, per_id_cap: int = PER_ID_CAP, seed: int = 0,
                say: Any = print) -> list[dict[str, Any]]:
    """The ``partition`` row, then ``grouped`` and ``per-id`` for every count of ``counts`` (see the module
    docstring); ``vs_partition`` is each row's samples/s over the ``partition`` row's."""
    if not counts:
        return []
    n = min(samples, len(stream))
    rows = [mode_row(cfg, pipe, bootstrap, fleet_values(stream, 1, n, seed)[0], "partition", 1, 1, tmp)]
    say(f"1 stream id, partition: {rows[-1]['samples_per_s']} samples/s on {n} samples")
    for k in counts:
        values, ids = fleet_values(stream, k, n, seed)
        for mode in ("grouped", "per-id"):
            m = min(n, per_id_cap) if mode == "per-id" else n
            rows.append(mode_row(cfg, pipe, bootstrap, values[:m], mode, k, len(set(ids[:m])), tmp))
            say(f"{k} stream ids, {mode}: {rows[-1]['samples_per_s']} samples/s on {m} samples")
    base = rows[0]["samples_per_s"]
    for r in rows:
        r["vs_partition"] = round(r["samples_per_s"] / base, 3) if base else None
    return rows


def _cells(r: dict[str, Any]) -> list[str]:
    from streamtta.throughput import _f, _x

    ck = r.get("checkpoint_bytes")
    return [str(r["stream_ids"]), r["mode"], str(r["ids_seen"]), str(r["samples"]), _f(r["samples_per_s"]),
            _x(r.get("vs_partition")), _f(r["p50_ms"]), _f(r["p99_ms"]), _f(r["peak_rss_mb"], "{:.0f}"),
            str(r["states"]), str(r["ids_held"]), "n/a" if ck is None else str(ck)]


def streams_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The many-streams table as GitHub markdown ('' without rows)."""
    if not rows:
        return ""
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|---:|---|" + "---:|" * (len(_COLUMNS) - 2)]
    return "\n".join(lines + ["| " + " | ".join(_cells(r)) + " |" for r in rows]) + "\n"


def print_streams(rows: Sequence[dict[str, Any]], console: Any) -> None:
    """The many-streams table with rich (nothing without rows)."""
    from rich.table import Table

    if not rows:
        return
    t = Table(title=f"engine with many stream ids, batch {BATCH} (per-id on fewer samples: it is slow)")
    for col in _COLUMNS:
        t.add_column(col, justify="left" if col == "mode" else "right")
    for r in rows:
        t.add_row(*_cells(r))
    console.print(t)
