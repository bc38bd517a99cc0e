"""``streamtta run`` (broker, replay, engine end to end, or consume an existing Kafka topic) and
``streamtta produce`` (replay a scenario into a topic)."""
from __future__ import annotations

import argparse
import json
import logging
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from streamtta.cli.common import resolve_config, say
from streamtta.cli.summary import print_summary
from streamtta.config import ConfigError, deep_merge
from streamtta.signals import on_signals

log = logging.getLogger("streamtta")


def cmd_produce(args: argparse.Namespace) -> int:
    from streamtta.runner import resolve_scenario
    from streamtta.simulations.scenario import build_stream, load_scenario
    from streamtta.stream.producer import replay

    cfg = resolve_config(args)
    k = cfg.kafka
    if not k.bootstrap_servers:
        raise ConfigError("produce needs --bootstrap-servers (or kafka.bootstrap_servers)")
    scenario = load_scenario(resolve_scenario(args.scenario))
    stream = build_stream(scenario, cfg.engine.seed)
    n = replay(stream.iter_samples(), k.bootstrap_servers, k.topic, rate=cfg.run.rate, progress=cfg.run.progress,
               total=len(stream), kafka=k)  # security settings, broker wait, input topic check
    say(f"produced {n} records of scenario {scenario.name!r} to {k.topic}", "produced", records=n, topic=k.topic)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Main job: embedded broker (unless --bootstrap-servers) + replay of the scenario + engine to the end.

    A scenario is replayed with ``--scenario``, or by default (``run.replay``) unless a model other than the
    scenario's is named (``--model`` / ``model.source``): then the run consumes the topic as it is (the
    scenario's records would not fit that model).

    With ``--metrics-port`` (``metrics.port``) ``/metrics``, ``/healthz`` and ``/readyz`` are served from
    the start (``/readyz`` answers 503 until the engine consumes) to the end of the command."""
    from streamtta.ops.telemetry import Telemetry

    replay_flag = {} if args.no_replay is None else {"run": {"replay": not args.no_replay}}
    if args.scenario:
        replay_flag = deep_merge(replay_flag, {"run": {"scenario": args.scenario}})
    cfg = resolve_config(args, replay_flag)
    if cfg.engine.state_store == "kafka":  # a changelog name Kafka refuses fails now, not after the model loads
        from streamtta.state_store import changelog_topic_of

        changelog_topic_of(cfg)
    telemetry = Telemetry.from_config(cfg)
    if telemetry is not None:
        try:
            telemetry.start()
        except OSError as e:
            raise ConfigError(f"cannot serve metrics on {cfg.metrics.host}:{cfg.metrics.port}: {e}") from e
        say(f"metrics on {telemetry.url}/metrics (health: /healthz, readiness: /readyz)", "metrics",
            url=f"{telemetry.url}/metrics")
    try:
        return _run(args, cfg, telemetry)
    finally:
        if telemetry is not None:
            telemetry.close()


def _run(args: argparse.Namespace, cfg: Any, telemetry: Any) -> int:
    from streamtta import runner
    from streamtta.stream.kafka.admin import wait_for_broker
    from streamtta.stream.kafka.settings import client_settings

    scenario = None
    if cfg.run.replay or args.scenario:
        from streamtta.simulations.scenario import load_scenario

        scenario = load_scenario(runner.resolve_scenario(cfg.run.scenario))
        if not args.scenario and cfg.model.source not in (None, getattr(scenario, "model", None)):
            cfg.run.replay = False  # a user's model: consume the topic, replay no built-in scenario into it
        else:
            runner.use_scenario_model(cfg, scenario)
    if not cfg.run.replay and not cfg.kafka.bootstrap_servers:
        raise ConfigError("nothing to consume: the embedded broker starts empty; give --bootstrap-servers (your "
                          "Kafka) or --scenario (a replay)")
    k, progress = cfg.kafka, cfg.run.progress
    if k.bootstrap_servers:  # an unreachable broker fails before the model is loaded
        wait_for_broker(k.bootstrap_servers, timeout=k.connect_timeout_s, config=client_settings(k, "admin"))
    stream = None
    if cfg.run.replay and scenario is not None:
        from streamtta.simulations.scenario import build_stream

        stream = build_stream(scenario, cfg.engine.seed)
    if args.calibrate_from:  # recorded in the run's config.toml / manifest.json
        cfg.model.calibration = str(args.calibrate_from)
    pipeline = runner.build_pipeline(cfg, labels=args.labels)
    run_dir = runner.new_run_dir(cfg.run.output_dir)  # once the model loaded and calibrated
    if cfg.engine.checkpoint_dir == Path(".streamtta/checkpoints") and not cfg.kafka.bootstrap_servers:
        cfg.engine.checkpoint_dir = run_dir / "checkpoints"  # fresh embedded broker: fresh state
    # what "default" resolved to; grouped mode does not use the spec (per-stream statistics instead)
    spec = "grouped-stats" if cfg.grouped.enabled else pipeline.blueprint.spec
    say(f"[bold]streamtta run[/] -> {run_dir}", "run_start", run_dir=str(run_dir), adapter_spec=spec)
    runner.write_manifest(run_dir, cfg, seed=cfg.engine.seed, stream=stream.describe() if stream else None,
                          extra={"adapter_spec": spec})

    finishing = ExitStack()  # once the engine is done, a signal no longer stops the results being written
    with ExitStack() as stack:
        bootstrap = cfg.kafka.bootstrap_servers
        if not bootstrap:
            from streamtta.stream.broker import EmbeddedBroker

            broker = stack.enter_context(EmbeddedBroker(log_dir=run_dir))
            bootstrap = broker.bootstrap_servers
            say(f"embedded broker at {bootstrap}", "broker", bootstrap_servers=bootstrap)
            k.stop_at_end = k.create_topics = True
        if stream is not None:
            from streamtta.stream.producer import replay

            replay(stream.iter_samples(), bootstrap, k.topic, rate=cfg.run.rate, progress=progress, total=len(stream), kafka=k)
            k.stop_at_end = True
        result = runner.consume(cfg, bootstrap, pipeline=pipeline, run_dir=run_dir,
                                total=len(stream) if stream is not None else None, progress=progress,
                                max_records=args.max_records, telemetry=telemetry)
        finishing.enter_context(on_signals(_results_first))
    with finishing:
        return _write_results(args, cfg, k, pipeline, result, stream, scenario, run_dir)


def _results_first(signum: int, frame: Any) -> None:
    log.warning("signal %d: the engine has stopped; writing the results first", signum)


def _write_results(args: argparse.Namespace, cfg: Any, k: Any, pipeline: Any, result: Any, stream: Any,
                   scenario: Any, run_dir: Path) -> int:
    """metrics.json, runlog.json, the plot and the summary of a finished (or stopped) run."""
    from streamtta import runner
    from streamtta.calibration import describe
    from streamtta.metrics import summarize
    from streamtta.reports import plot_run, run_title

    runlog = result.log
    result.stats["calibration"] = describe(pipeline)
    if stream is not None:
        runlog.change_points = list(stream.change_points)
        x_sample = stream.materialize(0, 4096)[0]
        if len(x_sample) and "stopped_by" not in result.stats:  # a stopped run writes its results at once
            bs = cfg.engine.batch_size
            result.stats["bare_forward_samples_per_s"] = round(runner.bare_model_throughput(pipeline.blueprint.model, x_sample, bs), 1)
            result.stats["bare_step_samples_per_s"] = round(bare_step_throughput(pipeline, x_sample, bs), 1)
    summary = summarize(runlog, known_classes=set(pipeline.classes))
    runlog.to_json(run_dir / "runlog.json")
    (run_dir / "metrics.json").write_text(json.dumps({"summary": summary, "stats": result.stats}, indent=2,
                                                     default=str))
    if runlog.batches:
        title = run_title("run", model=cfg.model.source or runner.DEFAULT_MODEL, topic=k.topic,
                          scenario=scenario.name if stream is not None else None)
        plot_run(runlog, run_dir / "run.png", title=title)
    print_summary(summary, result.stats, run_dir)
    return 0


def bare_step_throughput(pipeline: Any, x: Any, batch_size: int) -> float:
    """samples/s of the run's adapter alone (fresh from the source state: no scoring, no monitor)."""
    import torch

    adapter = pipeline.spawn().adapter
    xt = torch.as_tensor(x, dtype=torch.float32)
    adapter.step(xt[:batch_size])
    t0 = time.perf_counter()
    for i in range(0, len(xt), batch_size):
        adapter.step(xt[i:i + batch_size])
    return len(xt) / (time.perf_counter() - t0)
