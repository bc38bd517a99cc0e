"""``streamtta`` command line.

Commands: run, simulate, produce, bench, broker, train-source, meta-train, config show.
Run ``streamtta COMMAND --help`` for the flags of each.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from streamtta.config import Config, ConfigError, deep_merge, load_config, parse_set_option, set_nested

log = logging.getLogger("streamtta")


# ----------------------------------------------------------------------------------------------
# shared flags
# ----------------------------------------------------------------------------------------------
#: dedicated flags -> dotted config field
FLAG_FIELDS = {
    "bootstrap_servers": "kafka.bootstrap_servers",
    "topic": "kafka.topic",
    "group_id": "kafka.group_id",
    "partitions": "kafka.partitions",
    "adapter": "adapter.spec",
    "scorer": "scorer.name",
    "model": "model.source",
    "batch_size": "engine.batch_size",
    "seed": "engine.seed",
    "checkpoint_dir": "engine.checkpoint_dir",
    "output_dir": "run.output_dir",
    "rate": "run.rate",
}


def add_config_flags(p: argparse.ArgumentParser, *, kafka: bool = True) -> None:
    g = p.add_argument_group("configuration (precedence: flags > STREAMTTA_* env > --config file > defaults)")
    g.add_argument("--config", "-c", type=Path, help="TOML config file")
    g.add_argument("--set", dest="set_items", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config field, e.g. --set engine.batch_size=32 (repeatable)")
    if kafka:
        g.add_argument("--bootstrap-servers", help="Kafka bootstrap servers (default: embedded broker)")
        g.add_argument("--topic", help="input topic")
        g.add_argument("--group-id", help="consumer group id")
        g.add_argument("--partitions", type=int, help="partitions of the input topic when created")
    g.add_argument("--adapter", help="adapter spec, e.g. unmix-tns+tent+conf-drop, bn, source")
    g.add_argument("--scorer", help="OOD scorer name")
    g.add_argument("--model", help="builtin model name, checkpoint, TorchScript file or module:factory")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--checkpoint-dir", type=Path)
    g.add_argument("--output-dir", type=Path, help="parent folder of run folders (default runs/)")
    g.add_argument("--rate", type=float, help="replay rate, records/s (default: as fast as possible)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("-v", "--verbose", action="count", default=0)


def resolve_config(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Config:
    overrides = parse_set_option(args.set_items)
    for flag, dotted in FLAG_FIELDS.items():
        v = getattr(args, flag, None)
        if v is not None:
            set_nested(overrides, dotted.split("."), str(v) if isinstance(v, Path) else v)
    if getattr(args, "no_progress", False):
        set_nested(overrides, ["run", "progress"], False)
    if extra:
        overrides = deep_merge(extra, overrides)
    return load_config(args.config, overrides)


def _setup_logging(verbose: int) -> None:
    from rich.logging import RichHandler

    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(show_path=False)])


def _console() -> Any:
    from rich.console import Console

    return Console()


# ----------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------
def cmd_config_show(args: argparse.Namespace) -> int:
    import tomli_w

    from streamtta.runner import _drop_none

    cfg = resolve_config(args)
    if args.format == "json":
        print(json.dumps(cfg.to_dict(), indent=2))
    else:
        print(tomli_w.dumps(_drop_none(cfg.to_dict())), end="")
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    from streamtta.stream.broker import EmbeddedBroker

    with EmbeddedBroker(port=args.port) as broker:
        print(f"embedded Kafka-protocol broker (Tansu, memory storage) at {broker.bootstrap_servers}", flush=True)
        print("Ctrl-C to stop.", flush=True)
        try:
            while broker.is_running():
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from streamtta.runner import resolve_scenario
    from streamtta.simulations.scenario import build_stream, load_scenario
    from streamtta.stream.kafka import ensure_topics
    from streamtta.stream.producer import replay

    cfg = resolve_config(args)
    if not cfg.kafka.bootstrap_servers:
        raise ConfigError("produce needs --bootstrap-servers (or kafka.bootstrap_servers)")
    scenario = load_scenario(resolve_scenario(args.scenario))
    stream = build_stream(scenario, cfg.engine.seed)
    ensure_topics(cfg.kafka.bootstrap_servers, {cfg.kafka.topic: cfg.kafka.partitions})
    n = replay(stream.iter_samples(), cfg.kafka.bootstrap_servers, cfg.kafka.topic, rate=cfg.run.rate,
               progress=cfg.run.progress, total=len(stream))
    print(f"produced {n} records of scenario {scenario.name!r} to {cfg.kafka.topic}")
    return 0


def _print_summary(summary: dict[str, Any], stats: dict[str, Any], run_dir: Path | None) -> None:
    from rich.table import Table

    t = Table(title="streamtta run summary", show_header=False)
    rows = [
        ("samples", stats.get("samples")),
        ("samples/s (end to end)", stats.get("samples_per_s")),
        ("samples/s after the first record", stats.get("steady_samples_per_s")),
        ("start-up: group join to first record (s)", stats.get("startup_s")),
        ("bare model forward samples/s", stats.get("bare_forward_samples_per_s")),
        ("bare adapter step samples/s", stats.get("bare_step_samples_per_s")),
        ("online accuracy, known classes (%)", _fmt(summary.get("acc"))),
        ("OOD flagged (%)", _fmt(summary.get("ood_rate"))),
        ("OOD AUROC (%)", _fmt(summary.get("auroc"))),
        ("open-set ACC_H (%)", _fmt(summary.get("acc_h"))),
        ("shifts detected / scheduled", _ratio(summary.get("n_detected"), summary.get("n_changes"))),
        ("alerts", summary.get("n_alerts")),
        ("batch latency p50 / p99 ms", _ratio(summary.get("latency_p50_ms"), summary.get("latency_p99_ms"))),
        ("dead letters", stats.get("dead_letters")),
        ("peak RSS MB", stats.get("peak_rss_mb")),
        ("results", str(run_dir) if run_dir else None),
    ]
    for k, v in rows:
        if v is not None:
            t.add_row(k, str(v))
    _console().print(t)


def _fmt(v: Any) -> str | None:
    return None if v is None else f"{v:.2f}"


def _ratio(a: Any, b: Any) -> str | None:
    return None if a is None or b is None else f"{_fmt(a) if isinstance(a, float) else a} / " \
                                              f"{_fmt(b) if isinstance(b, float) else b}"


def cmd_run(args: argparse.Namespace) -> int:
    """Main job: embedded broker (unless --bootstrap-servers) + replay of the scenario + engine to the end."""
    from streamtta import runner
    from streamtta.metrics import summarize
    from streamtta.reports import plot_run

    replay_flag = {} if args.no_replay is None else {"run": {"replay": not args.no_replay}}
    if args.scenario:
        replay_flag = deep_merge(replay_flag, {"run": {"scenario": args.scenario}})
    cfg = resolve_config(args, replay_flag)
    progress = cfg.run.progress
    run_dir = runner.new_run_dir(cfg.run.output_dir)
    if cfg.engine.checkpoint_dir == Path(".streamtta/checkpoints") and not cfg.kafka.bootstrap_servers:
        cfg.engine.checkpoint_dir = run_dir / "checkpoints"  # fresh embedded broker: fresh state
    console = _console()
    console.print(f"[bold]streamtta run[/] -> {run_dir}")

    stream = None
    if cfg.run.replay or args.scenario:
        from streamtta.simulations.scenario import build_stream, load_scenario

        scenario = load_scenario(runner.resolve_scenario(cfg.run.scenario))
        runner.use_scenario_model(cfg, scenario)
        stream = build_stream(scenario, cfg.engine.seed) if cfg.run.replay else None
    pipeline = runner.build_pipeline(cfg)
    runner.write_manifest(run_dir, cfg, seed=cfg.engine.seed, stream=stream.describe() if stream else None)

    from contextlib import ExitStack

    with ExitStack() as stack:
        bootstrap = cfg.kafka.bootstrap_servers
        if not bootstrap:
            from streamtta.stream.broker import EmbeddedBroker

            broker = stack.enter_context(EmbeddedBroker(log_dir=run_dir))
            bootstrap = broker.bootstrap_servers
            console.print(f"embedded broker at {bootstrap}")
            cfg.kafka.stop_at_end = True
        if stream is not None:
            from streamtta.stream.kafka import ensure_topics
            from streamtta.stream.producer import replay

            ensure_topics(bootstrap, {cfg.kafka.topic: cfg.kafka.partitions})
            replay(stream.iter_samples(), bootstrap, cfg.kafka.topic, rate=cfg.run.rate, progress=progress,
                   total=len(stream))
            cfg.kafka.stop_at_end = True
        result = runner.consume(cfg, bootstrap, pipeline=pipeline, run_dir=run_dir,
                                total=len(stream) if stream is not None else None, progress=progress,
                                max_records=args.max_records)
    runlog = result.log
    if stream is not None:
        runlog.change_points = list(stream.change_points)
        x_sample = stream.materialize(0, 4096)[0]
        if len(x_sample):
            bs = cfg.engine.batch_size
            result.stats["bare_forward_samples_per_s"] = round(runner.bare_model_throughput(pipeline.blueprint.model, x_sample, bs), 1)
            result.stats["bare_step_samples_per_s"] = round(_bare_step_throughput(pipeline, x_sample, bs), 1)
    summary = summarize(runlog, known_classes=set(pipeline.classes))
    runlog.to_json(run_dir / "runlog.json")
    (run_dir / "metrics.json").write_text(json.dumps({"summary": summary, "stats": result.stats}, indent=2,
                                                     default=str))
    if runlog.batches:
        plot_run(runlog, run_dir / "run.png", title=f"streamtta run: {cfg.run.scenario}")
    _print_summary(summary, result.stats, run_dir)
    return 0


def _bare_step_throughput(pipeline: Any, x: Any, batch_size: int) -> float:
    """samples/s of the run's adapter alone (fresh from the source state: no scoring, no monitor)."""
    import torch

    adapter = pipeline.spawn().adapter
    xt = torch.as_tensor(x, dtype=torch.float32)
    adapter.step(xt[:batch_size])
    t0 = time.perf_counter()
    for i in range(0, len(xt), batch_size):
        adapter.step(xt[i:i + batch_size])
    return len(xt) / (time.perf_counter() - t0)


def cmd_simulate(args: argparse.Namespace) -> int:
    from streamtta import runner
    from streamtta.metrics import summarize
    from streamtta.reports import plot_run

    cfg = resolve_config(args)
    path = runner.resolve_scenario(args.scenario)
    run_dir = runner.new_run_dir(cfg.run.output_dir, label=f"sim-{path.stem}")
    result = runner.simulate(cfg, path, progress=cfg.run.progress, run_dir=run_dir)
    runner.write_manifest(run_dir, cfg, seed=cfg.engine.seed, stream=result.stats.get("stream"))
    summary = summarize(result.log)
    result.log.to_json(run_dir / "runlog.json")
    (run_dir / "metrics.json").write_text(json.dumps({"summary": summary, "stats": result.stats}, indent=2,
                                                     default=str))
    plot_run(result.log, run_dir / "run.png", title=f"streamtta simulate: {path.stem}")
    _print_summary(summary, result.stats, run_dir)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from streamtta.bench import parse_variant, run_bench, scorer_variants

    cfg = resolve_config(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    variants = [parse_variant(v) for v in args.variants]
    if args.scorers:
        variants += scorer_variants([s.strip() for s in args.scorers.split(",") if s.strip()])
    return run_bench(cfg, args.scenarios, methods, seeds, json_out=args.json, plot_out=args.plot,
                     markdown_out=args.markdown, progress=cfg.run.progress, limit=args.limit,
                     variants=variants or None, table_metrics=args.metrics, cost=args.cost,
                     cost_samples=args.cost_samples, plot_shifts_out=args.plot_shifts)


def cmd_train_source(args: argparse.Namespace) -> int:
    from streamtta.models.train import train_source

    kw: dict[str, Any] = {"seed": args.seed, "out": args.out}
    if args.epochs is not None:
        kw["epochs"] = args.epochs
    if args.known_classes:
        kw["known_classes"] = [int(c) for c in args.known_classes.split(",")]
    _, meta = train_source(args.dataset, **kw)
    print(f"trained {meta.name}: clean accuracy {100 * meta.clean_accuracy:.2f}% -> {args.out}")
    return 0


def cmd_meta_train(args: argparse.Namespace) -> int:
    from streamtta.readapt import meta_train_cli

    return meta_train_cli(args.model, steps=args.steps, seed=args.seed, out=args.out)


# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamtta", description="Streaming test-time adaptation engine.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="main job: broker + replay + engine end to end (or consume an existing Kafka)")
    add_config_flags(r)
    r.add_argument("--scenario", help="scenario name or TOML path to replay (default quickstart)")
    r.add_argument("--no-replay", action="store_const", const=True, default=None,
                   help="consume the topic without replaying a scenario into it first")
    r.add_argument("--max-records", type=int, help="stop after this many records")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("simulate", help="run a scenario offline through the engine (no Kafka)")
    s.add_argument("scenario", help="scenario name or TOML path")
    add_config_flags(s, kafka=False)
    s.set_defaults(func=cmd_simulate)

    pr = sub.add_parser("produce", help="replay a scenario into a Kafka topic")
    pr.add_argument("scenario")
    add_config_flags(pr)
    pr.set_defaults(func=cmd_produce)

    b = sub.add_parser("bench", help="run methods side by side on identical streams")
    b.add_argument("scenarios", nargs="+")
    b.add_argument("--methods", default="source,bn", help="comma-separated adapter specs")
    b.add_argument("--seeds", default="1", help="comma-separated seeds")
    b.add_argument("--json", type=Path, help="write results JSON here")
    b.add_argument("--plot", type=Path, help="write a PNG comparison plot here")
    b.add_argument("--plot-shifts", type=Path, help="write a PNG of the mean accuracy around the change points here")
    b.add_argument("--markdown", type=Path, help="write the results table as Markdown here")
    b.add_argument("--limit", type=int, help="use only the first N samples of each stream (smoke runs)")
    b.add_argument("--scorers", help="comma-separated OOD scorers: every method runs once per scorer")
    b.add_argument("--variant", dest="variants", action="append", default=[], metavar="LABEL:KEY=V[;KEY=V]",
                   help="run every method again with these config overrides, e.g. "
                        "'no-readapt:monitor.readapt=false' (repeatable; the label is added to the method name)")
    b.add_argument("--cost", action="store_true",
                   help="measure compute cost instead: plain forward vs adapter step vs scoring, per batch (ms)")
    b.add_argument("--cost-samples", type=int, default=2048, help="samples per scenario for --cost")
    b.add_argument("--metrics", type=lambda s: tuple(m.strip() for m in s.split(",") if m.strip()),
                   help="table columns (metric names of metrics.summarize), e.g. acc,auroc,fpr95")
    add_config_flags(b, kafka=False)
    b.set_defaults(func=cmd_bench)

    br = sub.add_parser("broker", help="start the embedded Kafka-protocol broker (Tansu) until Ctrl-C")
    br.add_argument("--port", type=int, default=None, help="port (default: a free loopback port)")
    br.set_defaults(func=cmd_broker)

    t = sub.add_parser("train-source", help="train a built-in source model and save its checkpoint")
    t.add_argument("--dataset", default="digits", help="digits or segment")
    t.add_argument("--out", type=Path, required=True, help="checkpoint path (.pt)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--epochs", type=int)
    t.add_argument("--known-classes", help="comma-separated known class ids (default: dataset's)")
    t.set_defaults(func=cmd_train_source)

    m = sub.add_parser("meta-train", help="learn the meta-initialisation used for re-adaptation")
    m.add_argument("--model", default="digits-resnet")
    m.add_argument("--steps", type=int, default=200)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", type=Path, help="default: next to the source checkpoint")
    m.set_defaults(func=cmd_meta_train)

    c = sub.add_parser("config", help="configuration tools")
    csub = c.add_subparsers(dest="config_command", required=True)
    cs = csub.add_parser("show", help="print the resolved configuration")
    add_config_flags(cs)
    cs.add_argument("--format", choices=["toml", "json"], default="toml")
    cs.set_defaults(func=cmd_config_show)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "verbose", 0))
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"streamtta: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"streamtta: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
