"""Adapter-only accuracy of adapter specs on scenario streams, built *with* and *without* ``fit_source``.

``streamtta bench`` runs whole pipelines through the engine, which always fits the adapter on the model's
clean source data. A library user who calls :func:`~streamtta.adapters.build_adapter` alone gets an adapter
that never saw source data. This bench measures both ways on the same stream: every scenario's samples are
rendered once, then each spec steps over them batch by batch (``scenario.batch_size``), reset at every
domain when the scenario says so; the score is the accuracy on known classes of the pre-update predictions.
``--fit synthetic`` builds the adapter with ``fit_source_free`` instead (a class prior synthesised from the
model, no source data; see :mod:`streamtta.adapters.synthetic_prior`).

Command line (the held-out table of the README)::

    python -m streamtta.adaptbench simulations/heldout/heldout-digits-cnn-*.toml \\
        --methods source,bn,tent,rbn,default --markdown runs/heldout.md

>>> from streamtta.simulations.scenario import Scenario
>>> sc = Scenario(name="t", dataset="digits-c", model="digits-resnet", domains=["fog"], samples_per_domain=64,
...               known_classes=list(range(8)), batch_size=32)
>>> rows = adapter_accuracy(sc, ["source", "bn"], fit=(True,), progress=False)
>>> [(r["method"], r["fit"]) for r in rows]
[('source', True), ('bn', True)]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from streamtta.adapters.grammar import SpecError, parse_spec, split_specs

#: display name -> spec of the baselines the held-out criteria name
BASELINES = {"tent": "bn+tent", "ema-stats": "rbn"}


def render(scenario: Any, seed: int | None = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """``(x, labels, change points)`` of the scenario's whole stream."""
    from streamtta.simulations.scenario import build_stream

    stream = build_stream(scenario, scenario.seed if seed is None else seed)
    xs, ys = [], []
    for s in stream.iter_samples():
        xs.append(np.asarray(s.x, dtype=np.float32))
        ys.append(-1 if s.label is None else int(s.label))
    return np.stack(xs), np.asarray(ys), list(stream.change_points)


def run_spec(spec: str, model: torch.nn.Module, meta: Any, x: np.ndarray, y: np.ndarray, cuts: Sequence[int],
             *, fit: bool | str, batch_size: int, reset_each_domain: bool, seed: int = 0) -> float:
    """Known-class accuracy (%) of ``spec`` stepping over ``x`` (reset at ``cuts`` when asked). ``fit``: True =
    ``fit_source`` on the model's source data, ``"predicted"`` = the same without their labels (the source model's
    predictions stand in), ``"synthetic"`` = ``fit_source_free`` with the stream's first batch
    (no source data; the adapter must have norm layers with source statistics), False = neither."""
    from streamtta.adapters import build_adapter
    from streamtta.models.data import load_source_train

    torch.manual_seed(seed)
    adapter = build_adapter(spec, model, len(meta.classes))
    if fit == "synthetic":
        adapter.fit_source_free(torch.from_numpy(x[:batch_size]), seed=seed)
    elif fit:
        xs, ys = load_source_train(meta, as_index=True)
        adapter.fit_source(xs, "predicted" if fit == "predicted" else ys)
    index = {c: i for i, c in enumerate(meta.classes)}
    target = np.asarray([index.get(int(v), -1) for v in y])
    bounds = [0, *(cuts if reset_each_domain else []), len(x)]
    hits: list[np.ndarray] = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if reset_each_domain:
            adapter.reset()
        for i in range(a, b, batch_size):
            j = min(i + batch_size, b)
            pred = adapter.step(torch.from_numpy(x[i:j])).logits.argmax(1).numpy()
            hits.append(pred == target[i:j])
    correct = np.concatenate(hits)
    known = target >= 0
    return round(100.0 * float(correct[known].mean()), 2)


def adapter_accuracy(scenario: Any, methods: Iterable[str], *, fit: Iterable[bool | str] = (True, False),
                     seed: int | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """One row per ``(method, fit)`` on the scenario's stream (``source`` once: fitting changes nothing)."""
    from streamtta.models.registry import load_model

    model, meta = load_model(scenario.model)
    x, y, cuts = render(scenario, seed)
    rows = []
    for name in methods:
        spec = BASELINES.get(name, name)
        for f in fit:
            if name == "source" and f is not True and True in fit:
                continue
            t0 = time.perf_counter()
            acc = run_spec(spec, model, meta, x, y, cuts, fit=f, batch_size=scenario.batch_size,
                           reset_each_domain=scenario.reset_each_domain)
            rows.append({"scenario": scenario.name, "model": scenario.model, "method": name, "fit": f, "acc": acc,
                         "seconds": round(time.perf_counter() - t0, 1)})
            if progress:
                print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """Scenarios as rows, ``method`` / ``method (no fit)`` / ``method (predicted)`` / ``method (synthetic)`` as columns."""
    cols: list[tuple[str, bool]] = []
    for r in rows:
        if (r["method"], r["fit"]) not in cols:
            cols.append((r["method"], r["fit"]))
    head = ["scenario"] + [m if f is True else f"{m} ({f if isinstance(f, str) else 'no fit'})" for m, f in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for sc in dict.fromkeys(r["scenario"] for r in rows):
        got = {(r["method"], r["fit"]): r["acc"] for r in rows if r["scenario"] == sc}
        lines.append("| " + " | ".join([sc] + [f"{got[c]:.2f}" if c in got else "" for c in cols]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    from streamtta.simulations.scenario import find_scenario

    p = argparse.ArgumentParser(prog="python -m streamtta.adaptbench", description=__doc__.split("\n\n")[0])
    p.add_argument("scenarios", nargs="+", help="scenario names or TOML files")
    p.add_argument("--methods", default="source,bn,tent,ema-stats,default",
                   help="specs; 'tent' = bn+tent, 'ema-stats' = rbn (RoTTA's EMA statistics)")
    p.add_argument("--fit", default="both", choices=["both", "fit", "no-fit", "predicted", "synthetic", "all"],
                   help="with fit_source, without, with fit_source on unlabelled source data (predicted), or with "
                        "fit_source_free (synthetic; 'all': the four)")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--model", help="run the scenarios with this model instead of their own")
    p.add_argument("--samples-per-domain", type=int, help="shorter streams (smoke runs, tuning sweeps)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, help="draw the streams with this seed instead of the scenarios' own")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    fit = {"both": (True, False), "fit": (True,), "no-fit": (False,), "predicted": ("predicted",),
           "synthetic": ("synthetic",), "all": (True, False, "predicted", "synthetic")}[a.fit]
    methods = split_specs(a.methods)
    for m in methods:  # a typo in the last method stops before the first one runs
        try:
            parse_spec(BASELINES.get(m, m))
        except SpecError as e:
            p.error(str(e))
    rows: list[dict[str, Any]] = []
    for name in a.scenarios:
        sc = find_scenario(name)
        update = {k: v for k, v in (("model", a.model), ("samples_per_domain", a.samples_per_domain)) if v}
        if update:
            sc = type(sc).model_validate({**sc.model_dump(), **update, "name": sc.name + (f".{a.model}" if a.model else "")})
        rows += adapter_accuracy(sc, methods, fit=fit, seed=a.seed)
    table = markdown(rows)
    print(table)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rows, indent=2))
    if a.markdown:
        a.markdown.parent.mkdir(parents=True, exist_ok=True)
        a.markdown.write_text(table)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
