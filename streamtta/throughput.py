"""``streamtta bench SCENARIO --throughput``: where a sample's time goes, from the bare model to the broker.

One run, one table. For every batch size (default 1, 16, 64, 256), on the same samples of the scenario's
stream (its model, its adapter spec from the configuration):

* ``forward``: the plain source model (``eval()``, ``no_grad``) on each batch -- the yardstick;
* ``step``: the bare adapter step (``Adapter.step``) of a fresh per-stream state, nothing else;
* ``pipeline``: :meth:`streamtta.Pipeline.process` in memory (step + scoring + monitor + re-adaptation);
* ``engine``: the real :class:`~streamtta.engine.Engine` over Kafka as ``streamtta run`` drives it
  (:func:`streamtta.runner.consume`: an embedded broker, a :class:`~streamtta.stream.kafka.KafkaSource`,
  prediction / alert / dead-letter producers, a checkpoint and a commit per ``engine.checkpoint_every``
  batches), records replayed into a fresh topic first. Its rate counts from the first record consumed
  (the consumer-group join is left out) to the end of the stream.

Per row: samples/s, the ratio to the bare forward and to the bare step of the same batch size, batch latency
p50/p99 (the call for in-memory rows; arrival to prediction written for the engine), the process's peak
RSS so far, torch's intra-op threads. Then ``workers``: the engine in 1 and in 2 processes of one consumer
group on a 4-partition topic (each process one torch thread), aggregate samples/s from the first record
any of them consumed to the end of the last. Then ``streams`` (``stream_counts``): the engine at batch 64 on
the records spread over 1,000 (say) stream ids, one pipeline per id vs one grouped pipeline for all
(:mod:`streamtta.throughput_streams`), against the single-stream engine.

The in-memory rows run on ``engine.device`` (on CUDA a batch's time ends when the GPU has finished it) and
skip one warm-up batch. Timings on a shared machine are noisy: repeat the command and
compare medians. Batch size ``b`` runs on ``min(samples, 64 * b)`` samples (batch 1 is slow through the
broker: one checkpoint and commit per record).

>>> ratio(300.0, 200.0), ratio(1.0, 0.0)
(1.5, None)
>>> throughput_markdown([{"batch_size": 64, "path": "step", "samples_per_s": 300.0, "vs_forward": 0.5,
...     "vs_step": 1.0, "p50_ms": 210.0, "p99_ms": 250.0, "peak_rss_mb": 500.0, "threads": 1}]).splitlines()[2]
'| 64 | step | 300.0 | 0.50x | 1.00x | 210.0 | 250.0 | 500 | 1 |'
"""
from __future__ import annotations

import itertools
import multiprocessing as mp
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from streamtta.config import Config
from streamtta.metrics import latency_percentiles

PATHS = ("forward", "step", "pipeline", "engine")


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` rounded to 3 digits; None when either is missing or ``b`` is not positive."""
    return None if a is None or b is None or not b > 0 else round(a / b, 3)


def _timed(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, bs: int, warmup: int = 1,
           device: torch.device | None = None) -> tuple[float, list[float]]:
    """samples/s of ``fn`` over the batches of ``x`` after ``warmup`` batches, and every batch's seconds.
    On a CUDA ``device`` each batch's time ends when the GPU has finished it (``torch.cuda.synchronize``)."""
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
    batches = [x[i:i + bs] for i in range(0, len(x), bs)]
    for b in batches[:warmup]:
        fn(b)
    sync()
    lat, n = [], 0
    for b in batches[warmup:] or batches:
        t0 = time.perf_counter()
        fn(b)
        sync()
        lat.append(time.perf_counter() - t0)
        n += len(b)
    return n / sum(lat), lat


def in_memory_rows(pipe: Any, x: torch.Tensor, bs: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The ``forward``, ``step`` and ``pipeline`` rows of ``pipe`` on the CPU batches of ``x``, on the
    pipeline's device (``engine.device``): forward and step include the batch's copy to the device (pinned,
    non-blocking on CUDA), as :meth:`~streamtta.pipeline.Pipeline.step` does; the pipeline row also
    brings the outputs back to the CPU and scores them."""
    from streamtta.devices import to_device

    dev = pipe.blueprint.device
    model = pipe.blueprint.model.eval()
    with torch.no_grad():
        fwd = _row(bs, "forward", *_timed(lambda b: model(to_device(b, dev)), x, bs, device=dev))
    adapter = pipe.spawn().adapter
    step = _row(bs, "step", *_timed(lambda b: adapter.step(to_device(b, dev)), x, bs, device=dev))
    pipeline = _row(bs, "pipeline", *_timed(pipe.spawn().process, x, bs, device=dev))
    return fwd, step, pipeline


def _row(bs: int, path: str, sps: float, lat: Sequence[float]) -> dict[str, Any]:
    from streamtta.runner import peak_rss_mb

    p = latency_percentiles(lat)
    return {"batch_size": bs, "path": path, "samples_per_s": round(sps, 1), "p50_ms": p["p50"], "p99_ms": p["p99"],
            "peak_rss_mb": round(peak_rss_mb(), 1), "threads": torch.get_num_threads()}


def _engine_cfg(cfg: Config, tmp: Path, topic: str, bs: int, partitions: int = 1) -> Config:
    c = cfg.model_copy(deep=True)
    c.engine.batch_size = bs
    c.engine.checkpoint_dir = tmp / f"checkpoints-{topic}"
    c.engine.record_log = True
    c.run.progress = False
    k = c.kafka
    k.topic, k.group_id, k.partitions = topic, f"{topic}-group", partitions
    k.predictions_topic = k.alerts_topic = k.dlq_topic = None  # derived from the input topic
    k.stop_at_end = k.create_topics = True
    return c


def produce_records(bootstrap: str, topic: str, values: Sequence[bytes], partitions: int) -> None:
    """``values`` into a new ``topic`` of ``partitions`` partitions, round robin (record i -> i mod n)."""
    from streamtta.stream.kafka import ensure_topics, make_producer

    ensure_topics(bootstrap, {topic: partitions})
    prod = make_producer(bootstrap)
    for i, v in enumerate(values):
        prod.produce(topic, v, partition=i % partitions)
        if i % 256 == 0:
            prod.poll(0)
    if prod.flush(60):
        raise RuntimeError(f"records not delivered to {topic}")


def engine_row(cfg: Config, pipe: Any, bootstrap: str, values: Sequence[bytes], bs: int, tmp: Path) -> dict[str, Any]:
    """The engine over the broker on ``values`` at batch size ``bs`` (a fresh topic and group)."""
    from streamtta import runner

    c = _engine_cfg(cfg, tmp, f"throughput.b{bs}", bs)
    produce_records(bootstrap, c.kafka.topic, values, 1)
    res = runner.consume(c, bootstrap, pipeline=pipe, run_dir=None, progress=False)
    lat = [b.latency_s for b in res.log.batches]
    return {**_row(bs, "engine", res.stats.get("steady_samples_per_s") or 0.0, lat),
            "startup_s": res.stats.get("startup_s")}


def _worker(cfg_json: str, bootstrap: str, ready: Any, go: Any, out: Any) -> None:
    """One engine process of the worker group: build the pipeline, wait for the others, consume to the end."""
    from streamtta import runner

    torch.set_num_threads(1)
    cfg = Config.model_validate_json(cfg_json)
    pipe = runner.build_pipeline(cfg)
    ready.release()
    go.wait()
    t0 = time.time()
    res = runner.consume(cfg, bootstrap, pipeline=pipe, run_dir=None, progress=False)
    st = res.stats
    first = t0 + (st.get("startup_s") if st.get("startup_s") is not None else st["wall_s"])
    out.put({"samples": st["samples"], "first": first, "end": t0 + st["wall_s"], "peak_rss_mb": st["peak_rss_mb"]})


def worker_rows(cfg: Config, bootstrap: str, values: Sequence[bytes], tmp: Path, counts: Sequence[int] = (1, 2),
                partitions: int = 4) -> list[dict[str, Any]]:
    """Aggregate samples/s of ``n`` engine processes in one consumer group on a ``partitions``-partition topic."""
    ctx = mp.get_context("spawn")
    rows = []
    for n in counts:
        c = _engine_cfg(cfg, tmp, f"throughput.w{n}", cfg.engine.batch_size, partitions)
        c.model.threads = 1
        produce_records(bootstrap, c.kafka.topic, values, partitions)
        ready, go, out = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(c.model_dump_json(), bootstrap, ready, go, out)) for _ in range(n)]
        for p in procs:
            p.start()
        for _ in procs:
            ready.acquire()
        go.set()  # all subscribe together: one group join, no rebalance while measuring
        res = [out.get(timeout=600) for _ in procs]
        for p in procs:
            p.join(30)
        done = [r for r in res if r["samples"]]
        span = max(r["end"] for r in done) - min(r["first"] for r in done) if done else 0.0
        total = sum(r["samples"] for r in res)
        rows.append({"workers": n, "partitions": partitions, "batch_size": c.engine.batch_size, "samples": total,
                     "samples_per_s": round(total / span, 1) if span > 0 else None,
                     "per_worker_samples": [r["samples"] for r in res],
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in res), "threads": 1})
    base = rows[0]["samples_per_s"] if rows else None
    for r in rows:
        r["speedup"] = ratio(r["samples_per_s"], base)
    return rows


def measure_throughput(cfg: Config, scenario: Any, *, batch_sizes: Sequence[int] = (1, 16, 64, 256),
                       samples: int = 2048, workers: Sequence[int] = (1, 2), seed: int = 0,
                       stream_counts: Sequence[int] = (), say: Callable[[str], Any] = print) -> dict[str, Any]:
    """Every row described in the module docstring: ``{"rows": [...], "workers": [...], "streams": [...]}``."""
    from streamtta import runner
    from streamtta.simulations.scenario import build_stream
    from streamtta.stream.broker import EmbeddedBroker
    from streamtta.throughput_streams import stream_rows

    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)
    pipe = runner.build_pipeline(cfg)
    stream = build_stream(scenario, seed)
    n_max = min(samples, 64 * max(batch_sizes), len(stream))
    values = [r.value for r in itertools.islice(runner.encoded_records(stream), n_max)]
    x_all = torch.as_tensor(np.asarray(stream.materialize(0, n_max)[0], dtype=np.float32))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="streamtta-throughput-") as d, EmbeddedBroker(log_dir=d) as broker:
        for bs in batch_sizes:
            n = min(n_max, 64 * bs)
            x = x_all[:n]
            fwd, step, pipeline = in_memory_rows(pipe, x, bs)
            eng = engine_row(cfg, pipe, broker.bootstrap_servers, values[:n], bs, Path(d))
            for r in (fwd, step, pipeline, eng):
                r.update(samples=n, vs_forward=ratio(r["samples_per_s"], fwd["samples_per_s"]),
                         vs_step=ratio(r["samples_per_s"], step["samples_per_s"]))
                rows.append(r)
            say(f"batch {bs}: forward {fwd['samples_per_s']}, step {step['samples_per_s']}, pipeline "
                f"{pipeline['samples_per_s']}, engine {eng['samples_per_s']} samples/s")
        wrows = worker_rows(cfg, broker.bootstrap_servers, values, Path(d), workers) if workers else []
        srows = stream_rows(cfg, pipe, stream, broker.bootstrap_servers, Path(d), counts=stream_counts,
                            samples=samples, seed=seed, say=say)
    return {"scenario": getattr(scenario, "name", str(scenario)), "adapter": pipe.blueprint.spec,
            "rows": rows, "workers": wrows, "streams": srows}


def print_throughput(doc: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    con = console or Console()
    t = Table(title=f"streamtta bench --throughput: {doc['scenario']}, adapter {doc['adapter']}")
    for col in ("batch", "path", "samples/s", "vs forward", "vs step", "p50 ms", "p99 ms", "peak RSS MB", "threads"):
        t.add_column(col, justify="left" if col == "path" else "right")
    for r in doc["rows"]:
        t.add_row(*_cells(r))
    con.print(t)
    if doc.get("workers"):
        w = Table(title="engine workers, one consumer group")
        for col in ("workers", "partitions", "batch", "samples", "samples/s", "speedup", "per worker"):
            w.add_column(col, justify="right")
        for r in doc["workers"]:
            w.add_row(str(r["workers"]), str(r["partitions"]), str(r["batch_size"]), str(r["samples"]),
                      _f(r["samples_per_s"]), _x(r["speedup"]), ",".join(map(str, r["per_worker_samples"])))
        con.print(w)
    from streamtta.throughput_streams import print_streams

    print_streams(doc.get("streams") or [], con)


def _f(v: Any, fmt: str = "{:.1f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def _x(v: Any) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _cells(r: dict[str, Any]) -> list[str]:
    return [str(r["batch_size"]), r["path"], _f(r["samples_per_s"]), _x(r["vs_forward"]), _x(r["vs_step"]),
            _f(r["p50_ms"]), _f(r["p99_ms"]), _f(r["peak_rss_mb"], "{:.0f}"), str(r["threads"])]


def throughput_markdown(doc_or_rows: Any) -> str:
    """The throughput table (and the workers and many-streams tables, when given a whole document) as
    GitHub markdown."""
    from streamtta.throughput_streams import streams_markdown

    rows = doc_or_rows["rows"] if isinstance(doc_or_rows, dict) else doc_or_rows
    lines = ["| batch | path | samples/s | vs forward | vs step | p50 ms | p99 ms | peak RSS MB | threads |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    if isinstance(doc_or_rows, dict) and doc_or_rows.get("workers"):
        lines += ["", "| workers | partitions | batch | samples | samples/s | speedup |", "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['workers']} | {r['partitions']} | {r['batch_size']} | {r['samples']} | "
                  f"{_f(r['samples_per_s'])} | {_x(r['speedup'])} |" for r in doc_or_rows["workers"]]
    if isinstance(doc_or_rows, dict) and doc_or_rows.get("streams"):
        lines += ["", streams_markdown(doc_or_rows["streams"]).rstrip("\n")]
    return "\n".join(lines) + "\n"
