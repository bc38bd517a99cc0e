"""``streamtta bench``: methods side by side on identical streams.

For every scenario and seed the stream is built once and replayed to every method through the same
engine code path as live Kafka (in-memory source), so methods see byte-identical records in the same
order. Metrics come from :func:`streamtta.metrics.summarize`; the JSON layout is documented in
:mod:`streamtta.reports.bench_json` (``BENCH_SCHEMA_VERSION``).
"""
from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from streamtta.config import Config

Variant = tuple[str, dict[str, Any]]
#: ``(display name, adapter spec, configuration)`` of one method x variant run.
Run = tuple[str, str, Config]


def parse_variant(text: str) -> Variant:
    """``"LABEL:section.key=value;section.key=value"`` -> ``(LABEL, nested overrides)``.

    A variant runs every method again with some configuration changed (a scorer, re-adaptation on or
    off, a detector); its label is appended to the method name in the results.

    >>> parse_variant("readapt:monitor.readapt=true;monitor.detector=adwin")
    ('readapt', {'monitor': {'readapt': True, 'detector': 'adwin'}})
    >>> parse_variant("plain:")
    ('plain', {})
    """
    from streamtta.config import ConfigError, parse_set_option

    label, sep, rest = text.partition(":")
    if not sep or not label.strip():
        raise ConfigError(f"--variant expects LABEL:section.key=value[;...], got {text!r}")
    return label.strip(), parse_set_option([t.strip() for t in rest.split(";") if t.strip()])


def scorer_variants(names: list[str]) -> list[Variant]:
    """One variant per OOD scorer name (``--scorers energy,msp``)."""
    return [(n, {"scorer": {"name": n}}) for n in names]


def _variant_configs(cfg: Config, variants: list[Variant] | None) -> list[tuple[str, Config]]:
    """``(label, validated config)`` per variant (one unlabelled variant when none is given).

    Every config is validated here, before anything runs, so a typo fails at once.
    """
    from pydantic import ValidationError

    from streamtta.config import ConfigError, _format_errors, deep_merge

    base = cfg.model_dump(mode="json")
    out = []
    for label, ov in list(variants or [("", {})]):
        if "spec" in (ov.get("adapter") or {}):  # each method sets the spec: the variant's would be lost
            raise ConfigError(f"bench variant {label!r} sets adapter.spec, which every method replaces; "
                              f"give the spec as a method instead (--methods \"default,{ov['adapter']['spec']}\")")
        try:
            out.append((label, Config.model_validate(deep_merge(base, ov))))
        except ValidationError as e:
            raise ConfigError(_format_errors(e, f"bench variant {label!r}")) from None
    return out


def _scenario_model(cfg: Config, scenario: Any, models: dict[str, Any]) -> tuple[str, Any, Any]:
    """Name, model and metadata of the scenario's source model (``cfg.model.source`` wins); loaded once."""
    from streamtta import runner

    model_name = cfg.model.source or getattr(scenario, "model", None) or runner.DEFAULT_MODEL
    lcfg = cfg.model_copy(deep=True)
    lcfg.model.source = model_name
    if model_name not in models:
        models[model_name] = runner.load_source_model(lcfg)
    model, meta = models[model_name]
    return model_name, model, meta


def _bench_seed(scenario: Any, path: Path, seed: int, runs: list[Run], model: Any, meta: Any, *,
                limit: int | None, progress: bool, console: Any, streams: int | None = None
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every run on the stream of one scenario and seed: result entries and accuracy windows per run name.

    The stream's records are rendered once and replayed to every run. With a ``source`` run, every result
    also gets :func:`compare_to_source` against it, batch by batch.
    """
    from streamtta import runner
    from streamtta.metrics import batch_series, summarize
    from streamtta.reports import shift_windows
    from streamtta.simulations.scenario import build_stream

    stream = build_stream(scenario, seed)
    if streams is not None:  # the scenario as a fleet of stream ids (streamtta.simulations.fleet)
        from streamtta.simulations.fleet import FleetStream

        stream = FleetStream(stream, streams, seed)
    records = list(itertools.islice(runner.encoded_records(stream), limit))  # render once, replay to all
    results: list[dict[str, Any]] = []
    windows: dict[str, Any] = {}
    acc_by_method: dict[str, Any] = {}
    for name, method, vcfg in runs:
        mc = vcfg.model_copy(deep=True)
        mc.adapter.spec = method
        mc.engine.seed = seed
        pipe = runner.build_pipeline(mc, model, meta)
        res = runner.simulate(mc, path, seed=seed, progress=progress, pipeline=pipe, stream=stream,
                              limit=limit, records=records)
        summary = summarize(res.log, known_classes=set(pipe.classes))
        console.print(f"[dim]{scenario.name} | {name} | seed {seed}: "
                      f"acc={_p(summary.get('acc'))} auroc={_p(summary.get('auroc'))} "
                      f"{res.stats['samples_per_s']} samples/s[/]")
        results.append({"scenario": scenario.name, "method": name, "seed": seed,
                        "metrics": {k: v for k, v in summary.items() if not isinstance(v, (dict, list))},
                        "per_domain": summary.get("per_domain", {}), "stats": res.stats})
        acc_by_method[name] = batch_series(res.log, known_classes=set(pipe.classes))["acc"]
        changes = (summary.get("shift") or {}).get("change_batches") or []
        if changes:
            windows[name] = shift_windows(acc_by_method[name], changes)
    src = next((n for n, m, _ in runs if m == "source"), None)
    if src is not None:  # same stream, same batches: compare batch by batch
        for r in results:
            r["metrics"].update(compare_to_source(acc_by_method[r["method"]], acc_by_method[src]))
    return results, windows


def run_bench(cfg: Config, scenarios: list[str], methods: list[str], seeds: list[int], *,
              json_out: Path | None = None, plot_out: Path | None = None, markdown_out: Path | None = None,
              progress: bool = True, limit: int | None = None, variants: list[Variant] | None = None,
              table_metrics: tuple[str, ...] | None = None, cost: bool = False, cost_samples: int = 2048,
              plot_shifts_out: Path | None = None, streams: int | None = None) -> int:
    """Run ``methods`` (adapter specs) x ``variants`` on every scenario and seed; print, write, plot.

    Every variant config is validated before anything runs, so a typo fails in a second, not after an
    hour of benchmarking. ``cost=True`` measures compute cost instead (:mod:`streamtta.costs`) on the
    first ``cost_samples`` samples of each scenario's stream (first seed). ``plot_shifts_out`` draws
    the mean accuracy around the scenarios' change points per method (:func:`~streamtta.reports.plot_shift_recovery`).
    ``streams`` runs every scenario as a fleet of that many stream ids (:mod:`streamtta.simulations.fleet`).
    """
    from rich.console import Console

    from streamtta import runner
    from streamtta.simulations.scenario import build_stream, load_scenario

    variant_cfgs = _variant_configs(cfg, variants)
    # a pipe or a log file gets the whole table, not one cut to 80 columns
    console = Console() if sys.stdout.isatty() else Console(width=220)
    results: list[dict[str, Any]] = []
    windows: dict[tuple[str, str], list[Any]] = {}
    cost_rows: list[dict[str, Any]] = []
    models: dict[str, Any] = {}
    t_start = time.perf_counter()
    for scen_name in scenarios:
        path = runner.resolve_scenario(scen_name)
        scenario = load_scenario(path)
        model_name, model, meta = _scenario_model(cfg, scenario, models)
        scen_cfgs = []
        for label, vcfg in variant_cfgs:
            c = vcfg.model_copy(deep=True)
            c.model.source = model_name
            scen_cfgs.append((label, c))
        if cost:
            from streamtta.costs import measure_costs

            x, _ = build_stream(scenario, seeds[0]).materialize(0, cost_samples)
            for row in measure_costs(scen_cfgs, methods, model, meta, x, batch_size=cfg.engine.batch_size):
                cost_rows.append({"scenario": scenario.name, **row})
            continue
        runs = [(f"{m} ({label})" if label else m, m, vcfg) for label, vcfg in scen_cfgs for m in methods]
        for seed in seeds:
            seed_results, seed_windows = _bench_seed(scenario, path, seed, runs, model, meta, limit=limit,
                                                     progress=progress, console=console, streams=streams)
            results += seed_results
            for name, w in seed_windows.items():
                windows.setdefault((scenario.name, name), []).append(w)
    if cost:
        return _finish_cost(cost_rows, console, json_out, markdown_out, t_start)
    _finish_bench(results, windows, console, table_metrics, json_out=json_out, plot_out=plot_out,
                  markdown_out=markdown_out, plot_shifts_out=plot_shifts_out)
    console.print(f"bench wall time {time.perf_counter() - t_start:.1f} s")
    return 0


def _finish_bench(results: list[dict[str, Any]], windows: dict[tuple[str, str], list[Any]], console: Any,
                  table_metrics: tuple[str, ...] | None, *, json_out: Path | None, plot_out: Path | None,
                  markdown_out: Path | None, plot_shifts_out: Path | None) -> None:
    """Aggregate over seeds, print the table and write the requested JSON, markdown and plots."""
    from streamtta.reports import (DEFAULT_TABLE_METRICS, aggregate, bench_markdown, plot_bench, plot_shift_recovery,
                                   print_bench_table, write_bench_json)

    agg = aggregate(results)
    cols = table_metrics or DEFAULT_TABLE_METRICS
    print_bench_table(agg, console=console, metrics=cols)
    if json_out is not None:
        write_bench_json(json_out, results, agg, command=_command_line())
        console.print(f"results JSON -> {json_out}")
    if plot_out is not None:
        plot_bench(agg, plot_out)
        console.print(f"plot -> {plot_out}")
    if markdown_out is not None:
        Path(markdown_out).write_text(bench_markdown(agg, metrics=cols))
        console.print(f"markdown -> {markdown_out}")
    if plot_shifts_out is not None:
        if windows:
            plot_shift_recovery({k: np.concatenate(v) for k, v in windows.items()}, plot_shifts_out)
            console.print(f"shift plot -> {plot_shifts_out}")
        else:
            console.print("[yellow]no scenario has change points: no shift plot[/]")


def _command_line() -> list[str]:
    """The command as the user typed it (``streamtta ...`` when run through the entry point)."""
    return ["streamtta", *sys.argv[1:]] if sys.argv and "streamtta" in sys.argv[0] else list(sys.argv)


def _finish_cost(rows: list[dict[str, Any]], console: Any, json_out: Path | None, markdown_out: Path | None,
                 t_start: float) -> int:
    import datetime as dt
    import json

    import torch

    from streamtta.costs import cost_markdown, print_cost_table
    from streamtta.reports import collect_versions, to_jsonable

    print_cost_table(rows, console=console)
    if json_out is not None:
        doc = {"schema_version": 1, "kind": "cost", "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
               "command": " ".join(_command_line()), "versions": collect_versions(), "torch_threads": torch.get_num_threads(),
               "rows": rows}
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(to_jsonable(doc), indent=2))
        console.print(f"cost JSON -> {json_out}")
    if markdown_out is not None:
        Path(markdown_out).write_text(cost_markdown(rows))
        console.print(f"markdown -> {markdown_out}")
    console.print(f"bench wall time {time.perf_counter() - t_start:.1f} s")
    return 0


def run_throughput(cfg: Config, scenarios: list[str], *, batch_sizes: list[int], samples: int, workers: list[int],
                   json_out: Path | None = None, markdown_out: Path | None = None,
                   stream_counts: list[int] | None = None) -> int:
    """``bench --throughput`` (:mod:`streamtta.throughput`) on each scenario: print, write JSON / markdown."""
    import datetime as dt
    import json

    from rich.console import Console

    from streamtta import runner
    from streamtta.reports import collect_versions, to_jsonable
    from streamtta.simulations.scenario import load_scenario
    from streamtta.throughput import measure_throughput, print_throughput, throughput_markdown

    console = Console() if sys.stdout.isatty() else Console(width=220)
    t_start = time.perf_counter()
    docs = []
    for name in scenarios:
        scenario = load_scenario(runner.resolve_scenario(name))
        scfg = cfg.model_copy(deep=True)
        runner.use_scenario_model(scfg, scenario)
        doc = measure_throughput(scfg, scenario, batch_sizes=batch_sizes, samples=samples, workers=workers,
                                 seed=scfg.engine.seed, stream_counts=stream_counts or (),
                                 say=lambda m: console.print(f"[dim]{m}[/]"))
        print_throughput(doc, console)
        docs.append(doc)
    if json_out is not None:
        out = {"schema_version": 1, "kind": "throughput", "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
               "command": " ".join(_command_line()), "versions": collect_versions(), "results": docs}
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(to_jsonable(out), indent=2))
        console.print(f"throughput JSON -> {json_out}")
    if markdown_out is not None:
        Path(markdown_out).write_text("\n".join(f"### {d['scenario']} ({d['adapter']})\n\n{throughput_markdown(d)}"
                                                for d in docs))
        console.print(f"markdown -> {markdown_out}")
    console.print(f"bench wall time {time.perf_counter() - t_start:.1f} s")
    return 0


def compare_to_source(acc: Any, source_acc: Any) -> dict[str, float]:
    """Per-batch accuracy against the non-adapting source model on the same batches: the longest run
    of consecutive batches below it and the share of batches below it (percent).

    >>> compare_to_source([80, 70, 60, 90], [75, 75, 75, 75])
    {'max_batches_below_source': 2, 'batches_below_source_pct': 50.0}
    """
    from streamtta.metrics import longest_run_below

    a, b = np.asarray(acc, dtype=np.float64), np.asarray(source_acc, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    pct = float(100.0 * (a[ok] < b[ok]).mean()) if ok.any() else float("nan")
    return {"max_batches_below_source": longest_run_below(a, b), "batches_below_source_pct": pct}


def _p(v: Any) -> str:
    return "n/a" if v is None else f"{v:.2f}"
