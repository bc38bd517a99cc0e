"""High-level jobs behind the CLI: ``run`` (Kafka end to end), ``simulate`` (offline replay through the
same engine path) and the reproducibility manifest every run writes next to its results."""
from __future__ import annotations

import gc
import json
import logging
import platform
import resource
import signal
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from streamtta.config import Config
from streamtta.engine import Engine, Outputs
from streamtta.pipeline import Pipeline
from streamtta.progress import progress_bar
from streamtta.runlog import RunLog
from streamtta.signals import Interrupted, graceful_shutdown, on_signals, raise_interrupted  # noqa: F401  (re-exported)
from streamtta.types import RawRecord

log = logging.getLogger("streamtta")

SIM_TOPIC = "sim"
DEFAULT_MODEL = "digits-resnet"


def use_scenario_model(cfg: Config, scenario: Any) -> None:
    """A scenario names the model it was made for; it is used unless ``model.source`` is set."""
    if cfg.model.source is None and getattr(scenario, "model", None):
        cfg.model.source = scenario.model


# ----------------------------------------------------------------------------------------------
# reproducibility
# ----------------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    import faiss
    import river

    from streamtta.version import __version__

    out = {"streamtta": __version__, "python": platform.python_version(),
           "torch": torch.__version__, "numpy": np.__version__, "river": river.__version__,
           "faiss": faiss.__version__, "platform": platform.platform()}
    try:
        import confluent_kafka

        out["confluent_kafka"] = confluent_kafka.version()[0]
        out["librdkafka"] = confluent_kafka.libversion()[0]
    except Exception:  # pragma: no cover
        pass
    return out


def new_run_dir(base: str | Path, label: str | None = None) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{stamp}-{label}" if label else stamp
    d = Path(base) / name
    n = 1
    while d.exists():
        n += 1
        d = Path(base) / f"{name}-{n}"
    d.mkdir(parents=True)
    return d


def write_manifest(run_dir: Path, cfg: Config, *, seed: int, stream: dict[str, Any] | None,
                   command: list[str] | None = None, extra: dict[str, Any] | None = None) -> None:
    """Resolved config (TOML + JSON), seed, versions, device (:func:`streamtta.devices.describe_device`) and
    stream description next to the results.

    Secrets are redacted in both files (:func:`streamtta.config.redact`: secret keys of the config and
    of ``extra``, ``key=value`` pairs and the config's secret strings in the command line and every other
    string); ``cfg`` itself is not changed. The config's secret strings are also registered with the log
    filter (:func:`streamtta.config.install_redaction`), so the run's log never shows them either.
    """
    import tomli_w

    from streamtta.config.secrets import install_redaction, redact, redact_argv, redacted_config, secret_values

    install_redaction(cfg)
    values = secret_values(cfg)
    resolved = redacted_config(cfg)
    (run_dir / "config.toml").write_text(tomli_w.dumps(_drop_none(resolved)))
    argv = redact_argv(command if command is not None else sys.argv, values)
    from streamtta.devices import describe_device

    manifest = {"created_at": datetime.now().isoformat(timespec="seconds"), "seed": seed, "command": argv,
                "versions": versions(), "device": describe_device(cfg.engine.device), "config": resolved,
                "stream": stream, **(extra or {})}
    (run_dir / "manifest.json").write_text(json.dumps(redact(manifest, values), indent=2, default=str))


def _drop_none(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    return d


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------
def build_pipeline(cfg: Config, model: torch.nn.Module | None = None, meta: Any = None, *,
                   calibration: Any = None, labels: str | None = None) -> Pipeline:
    """The template pipeline of a run: model from ``cfg.model.source`` unless given, fitted on

    1. ``calibration`` (else ``model.calibration``: a data file, a calibration file or arrays:
       :meth:`Pipeline.calibrate`), else
    2. the model's calibration file when one exists next to it
       (:func:`~streamtta.calibration.default_calibration_path`; refused if made for other weights), else
    3. the model's own source data when it has streamtta metadata (built-in models), else
    4. nothing: a warning, and no OOD flags (the run summary says how to get them).

    The scorer is calibrated with ``scorer.calibrate``."""
    from streamtta.calibration import HOW_TO_CALIBRATE, default_calibration_path

    if model is None:
        model, meta = load_source_model(cfg)
    pipe = Pipeline.from_config(cfg, model, meta)
    calibration = cfg.model.calibration if calibration is None else calibration
    if calibration is None and cfg.model.source is not None:
        found = default_calibration_path(cfg.model.source, cfg.model.state_dict)
        if found.is_file():
            log.info("calibration file %s found next to the model", found)
            calibration = found
    if calibration is not None:
        pipe.calibrate(calibration, labels=labels)
    elif meta is not None:
        pipe.fit_source()
    else:
        log.warning("model without streamtta metadata and no calibration data: no OOD flags (%s)", HOW_TO_CALIBRATE)
    return pipe


def load_source_model(cfg: Config) -> tuple[torch.nn.Module, Any]:
    from streamtta.models.registry import load_model

    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)
    model, meta = load_model(cfg.model.source or DEFAULT_MODEL, state_dict=cfg.model.state_dict)
    return model.eval(), meta


def resolve_scenario(name_or_path: str) -> Path:
    """A scenario name (``simulations/<name>.toml``, searched next to the package and in the cwd) or a path."""
    p = Path(name_or_path)
    if p.suffix == ".toml" and p.is_file():
        return p
    roots = [Path.cwd() / "simulations", Path(__file__).resolve().parent.parent / "simulations"]
    for root in roots:
        cand = root / f"{name_or_path}.toml"
        if cand.is_file():
            return cand
    known = sorted({q.stem for r in roots if r.is_dir() for q in r.glob("*.toml")})
    raise FileNotFoundError(f"scenario {name_or_path!r} not found; known scenarios: {', '.join(known) or 'none'}")


def encoded_records(stream: Any, topic: str = SIM_TOPIC) -> Iterator[RawRecord]:
    from streamtta.stream.envelope import encode_tensor

    for i, s in enumerate(stream.iter_samples()):
        yield RawRecord(topic=topic, partition=0, offset=i, key=s.stream_id.encode(),
                        value=encode_tensor(s.x, s.stream_id, label=s.label, event_time=s.event_time,
                                            domain=s.domain, is_unknown=s.is_unknown))


@dataclass
class RunResult:
    log: RunLog
    stats: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None


def engine_stats(engine: Engine, wall_s: float, started_at: float | None = None,
                 ended_at: float | None = None) -> dict[str, Any]:
    """Counters and throughput of one engine run.

    ``samples_per_s`` divides by the whole wall time (group join and end-of-stream detection
    included); ``steady_samples_per_s`` by the time from the first record to the end, i.e. the
    engine's own rate once it has partitions to read (needs ``started_at``/``ended_at``).
    """
    stats = {"records": engine.records_seen, "samples": engine.samples_processed,
             "dead_letters": engine.dead_letters, "skipped_already_checkpointed": engine.skipped,
             "batches": engine.batches, "wall_s": round(wall_s, 3),
             "samples_per_s": round(engine.samples_processed / wall_s, 1) if wall_s > 0 else None,
             "adapter_step_s": round(engine.step_time_s, 3), "peak_rss_mb": round(peak_rss_mb(), 1)}
    first = engine.first_record_at
    if started_at is not None and ended_at is not None and first is not None and ended_at > first:
        stats["startup_s"] = round(first - started_at, 3)
        stats["steady_samples_per_s"] = round(engine.samples_processed / (ended_at - first), 1)
    return stats


# ----------------------------------------------------------------------------------------------
# offline simulation (same engine code path as Kafka)
# ----------------------------------------------------------------------------------------------
def simulate(cfg: Config, scenario_path: str | Path, *, seed: int | None = None, progress: bool = True,
             pipeline: Pipeline | None = None, run_dir: Path | None = None, stream: Any = None,
             limit: int | None = None, records: Sequence[RawRecord] | None = None) -> RunResult:
    """Replay a scenario through the engine with an in-memory source and sinks.

    ``stream`` reuses an already built stream and ``records`` its already encoded records
    (:func:`encoded_records`; benchmarks render and encode each (scenario, seed) stream once, so every
    method sees the same bytes and ``samples_per_s`` measures the engine, not the corruption library);
    ``limit`` keeps only the first samples. Scenarios with ``reset_each_domain`` start every domain
    from a fresh adaptation state (the oracle-boundary protocol of TTA benchmarks).
    """
    import itertools

    from streamtta.simulations.scenario import build_stream, load_scenario
    from streamtta.stream.memory import JsonlSink, MemoryDeadLetter, MemorySink, MemorySource

    scenario = load_scenario(scenario_path)
    seed = cfg.engine.seed if seed is None else seed
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    if stream is None:
        stream = build_stream(scenario, seed)
    if pipeline is None:
        cfg = cfg.model_copy(deep=True)
        use_scenario_model(cfg, scenario)
        pipeline = build_pipeline(cfg)
    alerts: list[Any] = [MemorySink()]
    if run_dir is not None and cfg.alerts.jsonl:
        alerts.append(JsonlSink(run_dir / "alerts.jsonl"))
    outputs = Outputs(predictions=None, alerts=alerts, dlq=MemoryDeadLetter())
    total = len(stream) if limit is None else min(limit, len(stream))
    records = itertools.islice(encoded_records(stream) if records is None else records, total)
    sim_cfg = cfg.model_copy(deep=True)
    sim_cfg.kafka.stop_at_end = True
    sim_cfg.kafka.poll_timeout_s = 0.001
    if getattr(scenario, "reset_each_domain", False) and not getattr(stream, "interleaved", False):
        segments = [list(g) for _, g in itertools.groupby(records, key=_record_domain)]
    else:
        segments = [records]
    runlog = RunLog(change_points=[c for c in stream.change_points if c < total])
    t0 = time.perf_counter()
    totals = {"records": 0, "samples": 0, "dead_letters": 0, "batches": 0, "step": 0.0}
    with progress_bar(total, f"simulate {scenario.name}", progress) as advance:
        for seg in segments:
            engine = Engine(sim_cfg, MemorySource(seg), outputs, pipeline, store=None, runlog=runlog,
                            on_batch=advance)
            engine.run()
            totals["records"] += engine.records_seen
            totals["samples"] += engine.samples_processed
            totals["dead_letters"] += engine.dead_letters
            totals["batches"] += engine.batches
            totals["step"] += engine.step_time_s
    wall = time.perf_counter() - t0
    runlog.wall_s = wall
    runlog.peak_rss_mb = peak_rss_mb()
    runlog.dead_letters = totals["dead_letters"]
    stats = {"records": totals["records"], "samples": totals["samples"], "dead_letters": totals["dead_letters"],
             "batches": totals["batches"], "wall_s": round(wall, 3),
             "samples_per_s": round(totals["samples"] / wall, 1) if wall > 0 else None,
             "adapter_step_s": round(totals["step"], 3), "peak_rss_mb": round(peak_rss_mb(), 1),
             "stream": stream.describe()}
    return RunResult(runlog, stats, run_dir)


def _record_domain(rec: RawRecord) -> str | None:
    from streamtta.stream.envelope import decode_value

    return decode_value(rec.value).domain


# ----------------------------------------------------------------------------------------------
# Kafka end to end
# ----------------------------------------------------------------------------------------------
def build_kafka_engine(cfg: Config, bootstrap: str, pipeline: Pipeline, run_dir: Path | None,
                       runlog: RunLog | None, telemetry: Any = None) -> tuple[Engine, ExitStack]:
    """The engine of a Kafka run; consumer and producer get ``client_settings(cfg.kafka, role)``. Its
    observer logs alerts, checkpoints and commits (:class:`~streamtta.ops.eventlog.EventLog`) and, with a
    :class:`~streamtta.ops.telemetry.Telemetry`, updates its metrics (the consumer then reports
    librdkafka statistics to it)."""
    from streamtta.ops.eventlog import EventLog
    from streamtta.ops.observer import Observers
    from streamtta.state_store import make_state_store
    from streamtta.stream.kafka import KafkaDeadLetter, KafkaSink, KafkaSource, make_producer
    from streamtta.stream.kafka.errors import ClientLog, quiet
    from streamtta.stream.kafka.settings import client_settings
    from streamtta.stream.memory import JsonlSink

    k = cfg.kafka
    stack = ExitStack()
    producer = make_producer(bootstrap, **quiet(client_settings(k, "producer"), ClientLog("producer")))
    stack.callback(producer.flush, 30)
    preds = KafkaSink(producer, k.resolved_predictions_topic()) if k.predictions else None
    alerts: list[Any] = []
    if cfg.alerts.kafka:
        alerts.append(KafkaSink(producer, k.resolved_alerts_topic()))
    if cfg.alerts.jsonl and run_dir is not None:
        alerts.append(JsonlSink(run_dir / "alerts.jsonl"))
    dlq = KafkaDeadLetter(producer, k.resolved_dlq_topic())
    # the store closes after the source: closing the source revokes partitions, which checkpoints through it
    store = make_state_store(cfg, bootstrap)  # the group's states: a local folder or the Kafka changelog
    stack.callback(getattr(store, "close", lambda: None))
    source = KafkaSource(bootstrap, [k.topic], k.group_id, overrides=client_settings(k, "consumer"),
                         stop_at_end=k.stop_at_end, retry_timeout_s=k.connect_timeout_s,
                         **(telemetry.source_options() if telemetry is not None else {}))
    stack.callback(source.close)
    observer = Observers([EventLog()] + ([telemetry.metrics] if telemetry is not None else []))
    engine = Engine(cfg, source, Outputs(preds, alerts, dlq), pipeline, store=store, runlog=runlog,
                    observer=observer)
    names = getattr(pipeline.calibration, "feature_names", None)
    if names and engine.limits.feature_names is None:  # object-style JSON rows: the calibration data's order
        engine.limits = replace(engine.limits, feature_names=tuple(names))
    return engine, stack


def consume(cfg: Config, bootstrap: str, *, pipeline: Pipeline | None = None, run_dir: Path | None = None,
            total: int | None = None, progress: bool = True, max_records: int | None = None,
            telemetry: Any = None) -> RunResult:
    """Run the engine against Kafka until the stream ends (``kafka.stop_at_end``), a signal or a limit
    (topics: :func:`~streamtta.stream.kafka.admin.prepare_topics`). On SIGINT/SIGTERM the engine finishes
    its batch, the consumer commits and closes, the producer flushes; ``stats["stopped_by"]`` names it.

    Metrics: the given (started) :class:`~streamtta.ops.telemetry.Telemetry`, else one built from
    ``cfg.metrics`` when ``metrics.port`` is set (served for this call only); ``stats["metrics_url"]``."""
    from streamtta.ops.telemetry import Telemetry
    from streamtta.stream.kafka.admin import prepare_topics

    if pipeline is None:
        pipeline = build_pipeline(cfg)
    k = cfg.kafka
    prepare_topics(k, bootstrap)
    runlog = (RunLog(spool_dir=run_dir) if run_dir is not None else RunLog()) if cfg.engine.record_log else None
    with ExitStack() as serving:
        if telemetry is None and (telemetry := Telemetry.from_config(cfg)) is not None:
            serving.callback(telemetry.start().close)
        engine, stack = build_kafka_engine(cfg, bootstrap, pipeline, run_dir, runlog, telemetry)
        t0 = time.perf_counter()
        with graceful_shutdown(engine) as signals, stack, progress_bar(total, f"consume {k.topic}", progress) as bar:
            engine.on_batch = bar
            with telemetry.consuming(engine.source) if telemetry is not None else ExitStack():
                engine.run(max_records=max_records)
        metrics_url = f"{telemetry.url}/metrics" if telemetry is not None else None
    t1 = time.perf_counter()
    wall = t1 - t0
    if runlog is not None:
        runlog.wall_s = wall
        runlog.peak_rss_mb = peak_rss_mb()
        runlog.dead_letters = engine.dead_letters
    stats = engine_stats(engine, wall, started_at=t0, ended_at=t1)
    stats["group_id"], stats["topic"] = k.group_id, k.topic
    if metrics_url is not None:
        stats["metrics_url"] = metrics_url
    if signals:
        stats["stopped_by"] = signal.Signals(signals[0]).name
    # engine <-> source callbacks form a cycle: collect it now so the producer/consumer handles close
    # while the broker is still up (no reconnect noise from librdkafka after an embedded broker stops)
    del engine, stack
    gc.collect()
    return RunResult(runlog or RunLog(), stats, run_dir)


def bare_model_throughput(model: torch.nn.Module, x: np.ndarray, batch_size: int, repeats: int = 1) -> float:
    """samples/s of the plain source model's forward pass on the same batches (engine-overhead baseline), on
    the model's device (batches copied there as the pipeline copies them; on CUDA timed to the GPU's end)."""
    from streamtta.devices import to_device

    model = model.eval()
    xt = torch.as_tensor(x, dtype=torch.float32)
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.no_grad():
        model(to_device(xt[:batch_size], dev))  # warm-up
        sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            for i in range(0, len(xt), batch_size):
                model(to_device(xt[i:i + batch_size], dev))
        sync()
        dt = time.perf_counter() - t0
    return repeats * len(xt) / dt
