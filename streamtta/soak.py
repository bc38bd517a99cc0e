"""``streamtta bench --soak``: resident memory over a long live-like run, and with many stream ids.

The engine runs over a generated stream (sensor rows of river's Segment data set, replayed in a loop,
never materialised) with a checkpoint store, predictions counted but not kept, and the run log spooled
to disk (:class:`~streamtta.runlog.RunLog` with ``spool_dir``), i.e. what a live run keeps in memory. Every ``every`` records the resident set size (RSS, from
``/proc/self/statm``) is sampled. The report gives the RSS after warm-up (the first ``warmup`` share of
the records), at the end and at its highest, and the growth after warm-up in percent.

>>> r = soak(records=2_000, stream_ids=10, every=500, progress=False)
>>> r["records"], r["predictions"], r["states_max"] <= r["max_states"] + 64
(2000, 2000, True)
"""
from __future__ import annotations

import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from streamtta.types import RawRecord

__all__ = ["rss_mb", "soak"]


def rss_mb() -> float:
    """Current resident set size of this process in MB (``/proc``; peak RSS where it is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _CountingSink:
    """A sink that counts what it is given and keeps nothing (memory of the engine alone)."""

    def __init__(self) -> None:
        self.count = 0

    def write(self, key: Any, value: Any) -> None:
        self.count += 1

    def flush(self, timeout: float = 30.0) -> None:
        pass

    def close(self) -> None:
        pass


def _records(n: int, stream_ids: int, topic: str = "soak") -> Iterator[RawRecord]:
    from streamtta.simulations.sensors import load_river_split
    from streamtta.stream.envelope import encode_json_row

    x = load_river_split("segment").x_test
    for i in range(n):
        yield RawRecord(topic=topic, partition=0, offset=i,
                        value=encode_json_row(x[i % len(x)], f"sensor-{i % stream_ids}" if stream_ids > 1 else "sensor"))


def soak(*, records: int = 1_000_000, stream_ids: int = 1, max_states: int | None = None, batch_size: int = 64,
         every: int = 50_000, warmup: float = 0.2, spec: str | None = None, checkpoint_every: int = 10,
         progress: bool = True, grouped: bool = False) -> dict[str, Any]:
    """Run the engine over ``records`` generated records of ``stream_ids`` ids (``state_key=stream_id``
    when more than one) and sample RSS; returns the figures (see the module docstring)."""
    import torch

    from streamtta.checkpoints import CheckpointStore
    from streamtta.config import load_config
    from streamtta.engine import Engine, Outputs
    from streamtta.models.registry import load_model
    from streamtta.runlog import RunLog
    from streamtta.progress import progress_bar
    from streamtta.runner import build_pipeline
    from streamtta.stream.memory import MemoryDeadLetter, MemorySource

    torch.set_num_threads(1)
    engine_cfg: dict[str, Any] = {"batch_size": batch_size, "checkpoint_every": checkpoint_every,
                                  "state_key": "stream_id" if stream_ids > 1 else "partition"}
    if max_states is not None:
        engine_cfg["max_states"] = max_states
    overrides: dict[str, Any] = {"engine": engine_cfg, "kafka": {"stop_at_end": True, "poll_timeout_s": 0.001},
                                 "grouped": {"enabled": grouped and stream_ids > 1}}
    if spec is not None:
        overrides["adapter"] = {"spec": spec}
    with tempfile.TemporaryDirectory(prefix="streamtta-soak-") as tmp:
        overrides["engine"]["checkpoint_dir"] = str(Path(tmp) / "checkpoints")
        cfg = load_config(overrides=overrides, env=False)
        model, meta = load_model("segment-mlp")
        template = build_pipeline(cfg, model, meta)
        sink = _CountingSink()
        outputs = Outputs(predictions=sink, alerts=[_CountingSink()], dlq=MemoryDeadLetter())
        samples: list[tuple[int, float]] = []
        seen = [0]
        rss0 = rss_mb()
        states_max = [0]
        with progress_bar(records, f"soak {stream_ids} id(s)", progress) as advance:
            def on_batch(n: int) -> None:
                before, seen[0] = seen[0], seen[0] + n
                states_max[0] = max(states_max[0], len(engine.states))
                if before // every != seen[0] // every:
                    samples.append((seen[0], rss_mb()))
                advance(n)

            runlog = RunLog(spool_dir=Path(tmp) / "runlog")
            engine = Engine(cfg, MemorySource(_records(records, stream_ids)), outputs, template,
                            store=CheckpointStore(Path(tmp) / "checkpoints"), runlog=runlog, on_batch=on_batch)
            t0 = time.perf_counter()
            engine.run()
            wall = time.perf_counter() - t0
            runlog.close()
        ckpt_mb = sum(p.stat().st_size for p in (Path(tmp) / "checkpoints").glob("*.pt")) / 2**20
    after = [r for n, r in samples if n >= warmup * records] or [rss_mb()]
    return {"records": engine.records_seen, "predictions": sink.count, "stream_ids": stream_ids,
            "max_states": cfg.engine.max_states, "states_max": states_max[0], "evicted": engine.states.evicted,
            "restored": engine.states.restored, "wall_s": round(wall, 1),
            "records_per_s": round(engine.records_seen / wall, 1) if wall > 0 else None,
            "rss_start_mb": round(rss0, 1), "rss_after_warmup_mb": round(after[0], 1),
            "rss_end_mb": round(after[-1], 1), "rss_max_mb": round(max(after), 1),
            "growth_after_warmup_pct": round(100.0 * (after[-1] - after[0]) / after[0], 2),
            "checkpoints_mb": round(ckpt_mb, 1), "rss_samples": [[n, round(r, 1)] for n, r in samples]}


def main(argv: list[str] | None = None) -> int:
    """``streamtta bench --soak`` / ``python -m streamtta.soak``: print the soak figures as JSON."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="streamtta bench --soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--stream-ids", type=int, default=1)
    p.add_argument("--max-states", type=int, default=None)
    p.add_argument("--every", type=int, default=50_000, help="records between two RSS samples")
    p.add_argument("--grouped", action="store_true", help="grouped.enabled: one forward per batch for all ids")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    r = soak(records=a.records, stream_ids=a.stream_ids, max_states=a.max_states, every=a.every,
             progress=not a.no_progress, grouped=a.grouped)
    text = json.dumps(r, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
