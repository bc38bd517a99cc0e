"""Commands without Kafka: ``simulate``, ``bench``, ``train-source``, ``meta-train``."""
from __future__ import annotations

import argparse
import json
from typing import Any

from streamtta.cli.common import resolve_config
from streamtta.config import ConfigError
from streamtta.cli.summary import print_summary


def cmd_simulate(args: argparse.Namespace) -> int:
    from streamtta import runner
    from streamtta.metrics import summarize
    from streamtta.reports import plot_run, run_title

    cfg = resolve_config(args)
    path = runner.resolve_scenario(args.scenario)
    run_dir = runner.new_run_dir(cfg.run.output_dir, label=f"sim-{path.stem}")
    result = runner.simulate(cfg, path, progress=cfg.run.progress, run_dir=run_dir)
    runner.write_manifest(run_dir, cfg, seed=cfg.engine.seed, stream=result.stats.get("stream"))
    summary = summarize(result.log)
    result.log.to_json(run_dir / "runlog.json")
    (run_dir / "metrics.json").write_text(json.dumps({"summary": summary, "stats": result.stats}, indent=2,
                                                     default=str))
    model = cfg.model.source or getattr(_scenario(path), "model", None) or runner.DEFAULT_MODEL
    plot_run(result.log, run_dir / "run.png", title=run_title("simulate", model=model, scenario=path.stem))
    print_summary(summary, result.stats, run_dir)
    return 0


def _scenario(path: Any) -> Any:
    from streamtta.simulations.scenario import load_scenario

    return load_scenario(path)


def cmd_bench(args: argparse.Namespace) -> int:
    from streamtta.bench import parse_variant, run_bench, scorer_variants

    cfg = resolve_config(args)
    if args.soak:
        from streamtta.soak import main as soak_main

        extra = ["--json", str(args.json)] if args.json else []
        return soak_main(["--records", str(args.soak), "--stream-ids", str(args.stream_ids),
                          "--every", str(max(args.soak // 20, 1)), "--max-states", str(cfg.engine.max_states),
                          *extra, *(["--grouped"] if args.grouped else []),
                          *([] if cfg.run.progress else ["--no-progress"])])
    if not args.scenarios:
        raise ConfigError("bench needs at least one scenario (or --soak N)")
    if args.throughput:
        from streamtta.bench import run_throughput

        return run_throughput(cfg, args.scenarios, batch_sizes=_ints(args.batch_sizes),
                              samples=args.throughput_samples, workers=_ints(args.workers),
                              json_out=args.json, markdown_out=args.markdown,
                              stream_counts=_ints(args.stream_counts))
    from streamtta.adapters.grammar import parse_spec, split_specs

    methods = split_specs(args.methods)  # commas inside a term's (...) stay
    for m in methods:  # a typo in the last method stops the bench before the first one runs
        parse_spec(m)
    seeds = _ints(args.seeds)
    variants = [parse_variant(v) for v in args.variants]
    if args.scorers:
        variants += scorer_variants([s.strip() for s in args.scorers.split(",") if s.strip()])
    return run_bench(cfg, args.scenarios, methods, seeds, json_out=args.json, plot_out=args.plot,
                     markdown_out=args.markdown, progress=cfg.run.progress, limit=args.limit,
                     variants=variants or None, table_metrics=args.metrics, cost=args.cost,
                     cost_samples=args.cost_samples, plot_shifts_out=args.plot_shifts, streams=args.streams)


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def cmd_train_source(args: argparse.Namespace) -> int:
    from streamtta.models.train import train_source

    kw: dict[str, Any] = {"seed": args.seed, "out": args.out}
    if args.epochs is not None:
        kw["epochs"] = args.epochs
    if args.known_classes:
        kw["known_classes"] = [int(c) for c in args.known_classes.split(",")]
    if args.recipe:
        kw["recipe"] = kw["name"] = args.recipe
    _, meta = train_source(args.dataset, **kw)
    print(f"trained {meta.name}: clean accuracy {100 * meta.clean_accuracy:.2f}% -> {args.out}")
    return 0


def cmd_meta_train(args: argparse.Namespace) -> int:
    from streamtta.readapt import meta_train_cli

    return meta_train_cli(args.model, steps=args.steps, seed=args.seed, out=args.out)
