"""``streamtta bench``: methods side by side on identical streams.

For every scenario and seed the stream is built once and replayed to every method through the same
engine code path as live Kafka (in-memory source), so methods see byte-identical records in the same
order. Metrics come from :func:`streamtta.metrics.summarize`; the JSON layout is documented in
:mod:`streamtta.reports` (``BENCH_SCHEMA_VERSION``).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from streamtta.config import Config


def run_bench(cfg: Config, scenarios: list[str], methods: list[str], seeds: list[int], *,
              json_out: Path | None = None, plot_out: Path | None = None, markdown_out: Path | None = None,
              progress: bool = True, limit: int | None = None) -> int:
    from rich.console import Console

    from streamtta import runner
    from streamtta.engine import Components
    from streamtta.metrics import summarize
    from streamtta.reports import aggregate, bench_markdown, plot_bench, print_bench_table, write_bench_json
    from streamtta.simulations.scenario import build_stream, load_scenario

    console = Console()
    results: list[dict[str, Any]] = []
    models: dict[str, Any] = {}
    t_start = time.perf_counter()
    for scen_name in scenarios:
        path = runner.resolve_scenario(scen_name)
        scenario = load_scenario(path)
        model_name = cfg.model.source or getattr(scenario, "model", None) or runner.DEFAULT_MODEL
        mcfg = cfg.model_copy(deep=True)
        mcfg.model.source = model_name
        if model_name not in models:
            models[model_name] = runner.load_source_model(mcfg)
        model, meta = models[model_name]
        for seed in seeds:
            stream = build_stream(scenario, seed)
            for method in methods:
                mc = mcfg.model_copy(deep=True)
                mc.adapter.spec = method
                mc.engine.seed = seed
                comps = Components(mc, model, meta)
                res = runner.simulate(mc, path, seed=seed, progress=progress, components=comps, stream=stream,
                                      limit=limit)
                summary = summarize(res.log, known_classes=set(comps.classes))
                console.print(f"[dim]{scenario.name} | {method} | seed {seed}: "
                              f"acc={_p(summary.get('acc'))} auroc={_p(summary.get('auroc'))} "
                              f"{res.stats['samples_per_s']} samples/s[/]")
                results.append({"scenario": scenario.name, "method": method, "seed": seed,
                                "metrics": {k: v for k, v in summary.items() if not isinstance(v, (dict, list))},
                                "per_domain": summary.get("per_domain", {}), "stats": res.stats})
    agg = aggregate(results)
    print_bench_table(agg, console=console)
    command = ["streamtta", *sys.argv[1:]] if sys.argv and "streamtta" in sys.argv[0] else sys.argv
    if json_out is not None:
        write_bench_json(json_out, results, agg, command=command)
        console.print(f"results JSON -> {json_out}")
    if plot_out is not None:
        plot_bench(agg, plot_out)
        console.print(f"plot -> {plot_out}")
    if markdown_out is not None:
        Path(markdown_out).write_text(bench_markdown(agg))
        console.print(f"markdown -> {markdown_out}")
    console.print(f"bench wall time {time.perf_counter() - t_start:.1f} s")
    return 0


def _p(v: Any) -> str:
    return "n/a" if v is None else f"{v:.2f}"
