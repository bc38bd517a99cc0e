"""Bench reports: aggregation over seeds, JSON results file, rich/markdown tables and PNG plots.

Bench JSON schema (``BENCH_SCHEMA_VERSION = 1``)
------------------------------------------------
One file per ``streamtta bench`` invocation, written by :func:`write_bench_json`::

    {
      "schema_version": 1,                    # int, BENCH_SCHEMA_VERSION
      "created_at": "2026-01-01T12:00:00Z",   # str, ISO-8601 UTC
      "command": "streamtta bench ...",       # str or null, the command line that produced the file
      "versions": {"streamtta": str, "torch": str, "numpy": str, "river": str,
                   "faiss": str, "python": str},         # null for a package that is not installed
      "results": [                            # one entry per scenario x method x seed
        {"scenario": str, "method": str, "seed": int,
         "metrics": {name: number | null},    # scalar entries of summarize(log); rates in percent
         "per_domain": {domain: {name: number | null}}}   # summarize(log)["per_domain"]
      ],
      "aggregate": [                          # one entry per scenario x method, order of first appearance
        {"scenario": str, "method": str, "n_seeds": int, "seeds": [int],
         "metrics_mean": {name: number | null},   # mean over the seeds where the metric is not null
         "metrics_std":  {name: number | null},   # sample std (ddof=1); null with fewer than 2 values
         "metrics_n":    {name: int},             # number of seeds with a non-null value
         "per_domain_mean": {domain: {name: number | null}}}
      ]
    }

Non-finite numbers are written as ``null`` (the file is strict JSON). Metric names and units are those of
:func:`streamtta.metrics.summarize`; :data:`METRICS` gives display labels and which direction is better.

Plots use matplotlib's object API with the Agg canvas (no pyplot, no global backend change).

Example
-------
>>> res = [make_result("s", "tent", seed, {"acc": a, "per_domain": {}, "series": {}})
...        for seed, a in [(0, 80.0), (1, 82.0)]]
>>> agg = aggregate(res)
>>> agg[0]["metrics_mean"]["acc"], agg[0]["metrics_std"]["acc"]
(81.0, 1.4142135623730951)
>>> print(bench_markdown(agg, metrics=("acc",)).splitlines()[2])
| s | tent | 2 | 81.0 ± 1.4 |
"""
from __future__ import annotations

import datetime as _dt
import enum
import importlib.metadata as _md
import json
import math
import platform
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console
    from rich.table import Table

    from streamtta.runlog import RunLog

BENCH_SCHEMA_VERSION = 1

#: display label, better direction ("higher" / "lower" / None) and decimals, per metric name.
METRICS: dict[str, tuple[str, str | None, int]] = {
    "acc": ("Acc %", "higher", 1),
    "err": ("Err %", "lower", 1),
    "acc_s": ("ACC_S %", "higher", 1),
    "acc_n": ("ACC_N %", "higher", 1),
    "acc_h": ("ACC_H %", "higher", 1),
    "auroc": ("AUROC %", "higher", 1),
    "fpr95": ("FPR95 %", "lower", 1),
    "fpr95_id": ("FPR95(ID+) %", "lower", 1),
    "aupr_in": ("AUPR-In %", "higher", 1),
    "aupr_out": ("AUPR-Out %", "higher", 1),
    "ood_rate": ("OOD rate %", None, 1),
    "update_rate": ("Upd rate %", None, 1),
    "mean_entropy": ("Entropy", None, 3),
    "n_alerts": ("Alerts", None, 1),
    "n_shift_alerts": ("Shift alerts", None, 1),
    "n_resets": ("Resets", None, 1),
    "n_detected": ("Detected", "higher", 1),
    "n_missed": ("Missed", "lower", 1),
    "missed_rate": ("Missed %", "lower", 1),
    "n_false_alarms": ("False alarms", "lower", 1),
    "false_alarms_per_10k": ("FA/10k", "lower", 2),
    "delay_mean_samples": ("Delay (smp)", "lower", 0),
    "delay_median_samples": ("Delay med (smp)", "lower", 0),
    "delay_mean_batches": ("Delay (bat)", "lower", 1),
    "recovery_mean_batches": ("Recovery (bat)", "lower", 2),
    "n_unrecovered": ("Unrecovered", "lower", 1),
    "max_batches_below_source": ("Max run < source (bat)", "lower", 0),
    "batches_below_source_pct": ("Batches < source %", "lower", 1),
    "samples_per_s": ("Samples/s", "higher", 0),
    "latency_p50_ms": ("p50 ms", "lower", 1),
    "latency_p99_ms": ("p99 ms", "lower", 1),
    "step_p50_ms": ("step p50 ms", "lower", 1),
    "step_p99_ms": ("step p99 ms", "lower", 1),
    "peak_rss_mb": ("RSS MB", "lower", 0),
    "wall_s": ("Wall s", "lower", 1),
}

DEFAULT_TABLE_METRICS: tuple[str, ...] = (
    "acc", "acc_h", "auroc", "fpr95", "delay_mean_batches", "false_alarms_per_10k", "max_batches_below_source",
    "samples_per_s",
)

#: colour per alert kind in :func:`plot_run` (unknown kinds get grey).
ALERT_COLOURS: dict[str, str] = {
    "covariate_shift": "tab:orange",
    "semantic_shift": "tab:red",
    "ood_burst": "tab:purple",
    "novel_cluster": "tab:brown",
    "collapse_guard": "tab:pink",
    "dead_letter": "tab:gray",
}

_REQUIRED_TOP = ("schema_version", "created_at", "command", "versions", "results", "aggregate")
_REQUIRED_RESULT = ("scenario", "method", "seed", "metrics", "per_domain")
_REQUIRED_AGG = ("scenario", "method", "metrics_mean", "metrics_std", "n_seeds")
_VERSION_KEYS = ("streamtta", "torch", "numpy", "river", "faiss", "python")


# ----------------------------------------------------------------------------------------------
# JSON helpers
# ----------------------------------------------------------------------------------------------
def to_jsonable(obj: Any) -> Any:
    """Recursively convert numpy types, enums, paths and tuples to strict-JSON values (NaN/inf -> None).

    >>> to_jsonable({"a": np.float32(1.5), "b": [np.nan, np.int64(2)], "c": (1, 2)})
    {'a': 1.5, 'b': [None, 2], 'c': [1, 2]}
    """
    if isinstance(obj, Mapping):
        return {str(getattr(k, "value", k)): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [to_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, str):
        return obj
    if hasattr(obj, "model_dump"):  # pydantic models (e.g. Alert)
        return to_jsonable(obj.model_dump(mode="json"))
    raise TypeError(f"cannot convert {type(obj).__name__} value {obj!r} to JSON")


def collect_versions() -> dict[str, str | None]:
    """Installed versions of streamtta, torch, numpy, river, faiss (any faiss wheel) and python."""

    def ver(*dists: str) -> str | None:
        for d in dists:
            try:
                return _md.version(d)
            except _md.PackageNotFoundError:
                continue
        return None

    return {
        "streamtta": ver("streamtta"),
        "torch": ver("torch"),
        "numpy": ver("numpy"),
        "river": ver("river"),
        "faiss": ver("faiss-cpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss-gpu", "faiss"),
        "python": platform.python_version(),
    }


def make_result(scenario: str, method: str, seed: int, summary: Mapping[str, Any]) -> dict[str, Any]:
    """One ``results`` entry from a :func:`streamtta.metrics.summarize` output.

    ``metrics`` gets the scalar entries of ``summary`` (or ``summary["metrics"]`` when that is a dict),
    ``per_domain`` its ``per_domain`` entry; ``series`` and ``shift`` are left out.
    """
    if isinstance(summary.get("metrics"), Mapping):
        metrics = dict(summary["metrics"])
    else:
        metrics = {k: v for k, v in summary.items() if not isinstance(v, (Mapping, list, tuple))}
    return {
        "scenario": str(scenario),
        "method": str(method),
        "seed": int(seed),
        "metrics": to_jsonable(metrics),
        "per_domain": to_jsonable(summary.get("per_domain", {})),
    }


# ----------------------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------------------
def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) \
        and math.isfinite(float(v))


def _mean_std(vals: list[float]) -> tuple[float | None, float | None]:
    if not vals:
        return None, None
    a = np.asarray(vals, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if a.size >= 2 else None)


def aggregate(results: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds of every numeric metric, per ``(scenario, method)``.

    Groups keep the order in which they first appear. ``None``/NaN values are skipped (``metrics_n``
    counts the seeds that had a value); ``metrics_std`` is ``None`` with fewer than two values.
    """
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in results:
        missing = [k for k in ("scenario", "method", "metrics") if k not in r]
        if missing:
            raise ValueError(f"result entry is missing {missing}: {sorted(r)}")
        groups.setdefault((str(r["scenario"]), str(r["method"])), []).append(r)
    out: list[dict[str, Any]] = []
    for (scen, meth), rs in groups.items():
        names = list(dict.fromkeys(k for r in rs for k in r["metrics"]))
        mean: dict[str, float | None] = {}
        std: dict[str, float | None] = {}
        cnt: dict[str, int] = {}
        for k in names:
            vals = [float(r["metrics"][k]) for r in rs if _is_num(r["metrics"].get(k))]
            if not vals and any(r["metrics"].get(k) is not None for r in rs):
                continue  # non-numeric metric (e.g. a string): not aggregated
            mean[k], std[k] = _mean_std(vals)
            cnt[k] = len(vals)
        pdm: dict[str, dict[str, float | None]] = {}
        doms = list(dict.fromkeys(d for r in rs for d in (r.get("per_domain") or {})))
        for d in doms:
            keys = list(dict.fromkeys(k for r in rs for k in (r.get("per_domain") or {}).get(d, {})))
            pdm[d] = {}
            for k in keys:
                vals = [float(r["per_domain"][d][k]) for r in rs
                        if d in (r.get("per_domain") or {}) and _is_num(r["per_domain"][d].get(k))]
                pdm[d][k] = _mean_std(vals)[0]
        out.append({
            "scenario": scen,
            "method": meth,
            "n_seeds": len(rs),
            "seeds": [r.get("seed") for r in rs],
            "metrics_mean": mean,
            "metrics_std": std,
            "metrics_n": cnt,
            "per_domain_mean": pdm,
        })
    return out


# ----------------------------------------------------------------------------------------------
# JSON file
# ----------------------------------------------------------------------------------------------
def validate_bench(doc: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first missing key or wrong schema version of a bench document."""
    missing = [k for k in _REQUIRED_TOP if k not in doc]
    if missing:
        raise ValueError(f"bench JSON is missing top-level keys {missing}")
    if doc["schema_version"] != BENCH_SCHEMA_VERSION:
        raise ValueError(f"bench JSON schema_version {doc['schema_version']!r} != {BENCH_SCHEMA_VERSION}")
    vmiss = [k for k in _VERSION_KEYS if k not in doc["versions"]]
    if vmiss:
        raise ValueError(f"bench JSON 'versions' is missing {vmiss}")
    for i, r in enumerate(doc["results"]):
        m = [k for k in _REQUIRED_RESULT if k not in r]
        if m:
            raise ValueError(f"bench JSON results[{i}] is missing {m}")
    for i, a in enumerate(doc["aggregate"]):
        m = [k for k in _REQUIRED_AGG if k not in a]
        if m:
            raise ValueError(f"bench JSON aggregate[{i}] is missing {m}")


def write_bench_json(
    path: str | Path,
    results: Sequence[Mapping[str, Any]],
    aggregated: Sequence[Mapping[str, Any]] | None = None,
    *,
    command: str | Sequence[str] | None = None,
    versions: Mapping[str, str | None] | None = None,
    created_at: str | None = None,
) -> dict[str, Any]:
    """Write the bench JSON (schema in the module docstring) and return the document.

    ``aggregated`` defaults to :func:`aggregate` of ``results``; ``versions`` to :func:`collect_versions`;
    ``command`` may be an argv list (joined with spaces).
    """
    if command is not None and not isinstance(command, str):
        command = " ".join(str(c) for c in command)
    doc = {
        "schema_version": BENCH_SCHEMA_VERSION,
        "created_at": created_at or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "versions": dict(versions) if versions is not None else collect_versions(),
        "results": [dict(r) for r in results],
        "aggregate": [dict(a) for a in (aggregated if aggregated is not None else aggregate(results))],
    }
    doc = to_jsonable(doc)
    validate_bench(doc)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    return doc


def read_bench_json(path: str | Path) -> dict[str, Any]:
    """Load and validate a bench JSON file."""
    doc = json.loads(Path(path).read_text())
    validate_bench(doc)
    return doc


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------
def _fmt(mean: float | None, std: float | None, decimals: int) -> str:
    if mean is None:
        return "–"
    s = f"{mean:.{decimals}f}"
    if std is not None:
        s += f" ± {std:.{decimals}f}"
    return s


def _best_rows(agg: Sequence[Mapping[str, Any]], metric: str) -> set[int]:
    """Row indices holding the best mean of ``metric`` within their scenario (only if >1 method has it)."""
    better = METRICS.get(metric, ("", None, 1))[1]
    if better is None:
        return set()
    best: set[int] = set()
    by_scen: dict[str, list[int]] = {}
    for i, a in enumerate(agg):
        by_scen.setdefault(a["scenario"], []).append(i)
    for rows in by_scen.values():
        vals = [(i, agg[i]["metrics_mean"].get(metric)) for i in rows]
        vals = [(i, v) for i, v in vals if v is not None]
        if len(vals) < 2:
            continue
        hi, lo = max(v for _, v in vals), min(v for _, v in vals)
        if hi == lo:  # all tied: nothing stands out
            continue
        target = hi if better == "higher" else lo
        best |= {i for i, v in vals if v == target}
    return best


def _present(agg: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> tuple[str, ...]:
    return tuple(m for m in metrics if any(a["metrics_mean"].get(m) is not None for a in agg))


def _label(metric: str) -> str:
    lab, better, _ = METRICS.get(metric, (metric, None, 2))
    return lab + (" ↑" if better == "higher" else " ↓" if better == "lower" else "")


def print_bench_table(
    aggregated: Sequence[Mapping[str, Any]],
    console: "Console | None" = None,
    metrics: Sequence[str] = DEFAULT_TABLE_METRICS,
    title: str | None = "streamtta bench",
    drop_empty: bool = True,
) -> "Table":
    """Print a rich table (rows = scenario x method, columns = metric mean ± std) and return it.

    The best mean per scenario of each metric with a known direction is shown in bold (ties across all
    methods are not). ``drop_empty`` leaves out metric columns that no row has a value for.
    """
    from rich.console import Console
    from rich.table import Table

    metrics = _present(aggregated, metrics) if drop_empty else tuple(metrics)

    table = Table(title=title, show_lines=False)
    table.add_column("Scenario", style="cyan", no_wrap=True)
    table.add_column("Method", style="magenta", no_wrap=True)
    table.add_column("Seeds", justify="right")
    for m in metrics:
        table.add_column(_label(m), justify="right")
    best = {m: _best_rows(aggregated, m) for m in metrics}
    prev = None
    for i, a in enumerate(aggregated):
        cells = []
        for m in metrics:
            dec = METRICS.get(m, ("", None, 2))[2]
            txt = _fmt(a["metrics_mean"].get(m), a["metrics_std"].get(m), dec)
            cells.append(f"[bold]{txt}[/bold]" if i in best[m] else txt)
        scen = a["scenario"] if a["scenario"] != prev else ""
        table.add_row(scen, a["method"], str(a.get("n_seeds", "")), *cells,
                      end_section=(i + 1 < len(aggregated) and aggregated[i + 1]["scenario"] != a["scenario"]))
        prev = a["scenario"]
    (console or Console()).print(table)
    return table


def bench_markdown(
    aggregated: Sequence[Mapping[str, Any]],
    metrics: Sequence[str] = DEFAULT_TABLE_METRICS,
    drop_empty: bool = True,
) -> str:
    """GitHub-markdown table (README results): header, separator, one row per scenario x method.

    Best mean per scenario in bold and empty columns dropped, as in :func:`print_bench_table`.
    """
    metrics = _present(aggregated, metrics) if drop_empty else tuple(metrics)
    head = ["Scenario", "Method", "Seeds", *(_label(m) for m in metrics)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---", "---:"] + ["---:"] * len(metrics)) + "|"]
    best = {m: _best_rows(aggregated, m) for m in metrics}
    for i, a in enumerate(aggregated):
        cells = []
        for m in metrics:
            dec = METRICS.get(m, ("", None, 2))[2]
            txt = _fmt(a["metrics_mean"].get(m), a["metrics_std"].get(m), dec)
            cells.append(f"**{txt}**" if i in best[m] else txt)
        lines.append("| " + " | ".join([str(a["scenario"]), str(a["method"]), str(a.get("n_seeds", "")), *cells]) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------
def _new_figure(figsize: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path, dpi: int) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=dpi, format="png")
    return p


def plot_run(
    log: "RunLog",
    path: str | Path,
    title: str | None = None,
    *,
    window: int = 5,
    known_classes: set[int] | None = None,
    dpi: int = 110,
) -> Path:
    """One PNG with stacked panels over batch index: rolling accuracy, mean entropy, OOD rate.

    Vertical markers: alerts (solid, coloured by kind, see :data:`ALERT_COLOURS`), ground-truth change
    points (black dashed; from ``log.change_points`` or domain changes), adapter resets (grey dotted).
    The accuracy panel says "no labels" on a live stream. Domain names are written over their segments
    (up to 12 segments). Returns the path.
    """
    from streamtta.metrics import alert_batches, batch_series, change_points_from_domains, rolling_mean, sample_to_batch

    if not log.batches:
        raise ValueError("plot_run needs a RunLog with at least one batch, got an empty log")
    s = batch_series(log, known_classes=known_classes)
    x = np.arange(len(log.batches))
    sizes = [len(b.preds) for b in log.batches]
    fig = _new_figure((10, 7.5))
    axes = fig.subplots(3, 1, sharex=True)

    ax = axes[0]
    if np.isfinite(s["acc"]).any():
        ax.plot(x, s["acc"], color="tab:blue", alpha=0.25, lw=0.8, label="per batch")
        ax.plot(x, rolling_mean(s["acc"], window), color="tab:blue", lw=1.8, label=f"rolling ({window})")
        ax.set_ylim(-2, 102)
    else:
        ax.text(0.5, 0.5, "no labels", transform=ax.transAxes, ha="center", va="center", color="gray")
        ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy %")
    axes[1].plot(x, s["entropy"], color="tab:green", lw=1.2)
    axes[1].set_ylabel("mean entropy")
    axes[2].plot(x, s["ood_rate"], color="tab:red", lw=1.2)
    axes[2].set_ylabel("OOD rate %")
    axes[2].set_xlabel("batch")

    handles: dict[str, Any] = {}
    n = log.n_samples
    doms = log.domains()
    cps = [int(c) for c in log.change_points] if log.change_points else change_points_from_domains(doms)
    cps = [c for c in cps if 0 < c < n]
    for cb in sample_to_batch(cps, sizes).tolist() if cps else []:
        for a in axes:
            h = a.axvline(cb - 0.5, color="black", ls="--", lw=1.0, alpha=0.8)
        handles.setdefault("change point", h)
    for pos, kind in alert_batches(log):
        col = ALERT_COLOURS.get(kind, "tab:gray")
        for a in axes:
            h = a.axvline(pos, color=col, lw=1.2, alpha=0.7)
        handles.setdefault(f"alert: {kind}", h)
    for i, b in enumerate(log.batches):
        if b.reset:
            for a in axes:
                h = a.axvline(i, color="gray", ls=":", lw=1.0)
            handles.setdefault("reset", h)

    # domain names over their segments
    bdom = [next((d for d in b.domains if d is not None), None) for b in log.batches]
    segs: list[tuple[int, int, str]] = []
    for i, d in enumerate(bdom):
        if d is None:
            continue
        if segs and segs[-1][2] == d and segs[-1][1] == i - 1:
            segs[-1] = (segs[-1][0], i, d)
        else:
            segs.append((i, i, d))
    if 0 < len(segs) <= 12:
        for a0, a1, d in segs:
            axes[0].text((a0 + a1) / 2, 1.01, str(d), transform=axes[0].get_xaxis_transform(),
                         ha="center", va="bottom", fontsize=8, color="dimgray")

    leg = axes[0].get_legend_handles_labels()
    all_h = list(leg[0]) + list(handles.values())
    all_l = list(leg[1]) + list(handles.keys())
    if all_h:
        fig.legend(all_h, all_l, loc="outside lower center", fontsize=8, ncol=min(5, len(all_h)), frameon=False)
    for a in axes:
        a.grid(alpha=0.3)
    fig.suptitle(title or f"run: {n} samples, {len(log.batches)} batches, {len(log.alerts)} alerts")
    return _save(fig, path, dpi)


def plot_bench(
    aggregated: Sequence[Mapping[str, Any]],
    path: str | Path,
    metric: str = "acc",
    title: str | None = None,
    *,
    dpi: int = 110,
) -> Path:
    """Grouped bars of ``metric`` (default accuracy): one group per scenario, one bar per method, ±std bars.

    Missing values are drawn as an empty slot labelled "n/a". Returns the path.
    """
    if not aggregated:
        raise ValueError("plot_bench needs at least one aggregate row, got none")
    scens = list(dict.fromkeys(a["scenario"] for a in aggregated))
    meths = list(dict.fromkeys(a["method"] for a in aggregated))
    table = {(a["scenario"], a["method"]): a for a in aggregated}
    fig = _new_figure((min(20.0, max(6.0, 1.5 + len(scens) * (0.6 + 0.35 * len(meths)))), 4.5))
    ax = fig.subplots()
    width = 0.8 / max(1, len(meths))
    xs = np.arange(len(scens))
    for j, m in enumerate(meths):
        means, stds = [], []
        for sc in scens:
            a = table.get((sc, m))
            mu = None if a is None else a["metrics_mean"].get(metric)
            sd = None if a is None else a["metrics_std"].get(metric)
            means.append(np.nan if mu is None else mu)
            stds.append(0.0 if sd is None else sd)
        pos = xs - 0.4 + width * (j + 0.5)
        ax.bar(pos, np.nan_to_num(means), width, yerr=stds, capsize=3, label=m,
               color=f"C{j % 10}", edgecolor="black", lw=0.4)
        for p, mu in zip(pos, means):
            if not np.isfinite(mu):
                ax.text(p, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(xs, scens, rotation=20 if len(scens) > 4 else 0, ha="right" if len(scens) > 4 else "center")
    ax.set_ylabel(_label(metric))
    fig.legend(loc="outside lower center", fontsize=8, ncol=min(6, len(meths)), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or f"{_label(metric)} by scenario and method")
    return _save(fig, path, dpi)


def shift_windows(acc_series: Any, change_batches: Iterable[int], before: int = 5, after: int = 10) -> np.ndarray:
    """Per-batch accuracy around each change batch: ``(n_changes, before + 1 + after)``, column ``before``
    is the batch holding the change point; positions outside the series are NaN.

    >>> shift_windows([90, 91, 40, 80, 90], [2], before=2, after=3).tolist()
    [[90.0, 91.0, 40.0, 80.0, 90.0, nan]]
    """
    if before < 0 or after < 0:
        raise ValueError(f"before and after must be >= 0, got {before}, {after}")
    a = np.asarray(acc_series, dtype=np.float64).ravel()
    cbs = [int(c) for c in change_batches]
    out = np.full((len(cbs), before + 1 + after), np.nan)
    for i, c in enumerate(cbs):
        for j, t in enumerate(range(c - before, c + after + 1)):
            if 0 <= t < len(a):
                out[i, j] = a[t]
    return out


def plot_shift_recovery(
    windows: Mapping[tuple[str, str], np.ndarray],
    path: str | Path,
    before: int = 5,
    title: str | None = None,
    *,
    dpi: int = 110,
) -> Path:
    """Mean accuracy around shifts: one panel per scenario, one line per method, x = batches from the
    batch holding the change point (0), band = ± standard error over shifts (and seeds).

    ``windows[(scenario, method)]`` stacks :func:`shift_windows` rows. Returns the path.
    """
    scens = list(dict.fromkeys(s for s, _ in windows))
    if not scens:
        raise ValueError("plot_shift_recovery needs the windows of at least one scenario with shifts")
    fig = _new_figure((max(6.0, 5.5 * len(scens)), 4.2))
    axes = np.atleast_1d(fig.subplots(1, len(scens), squeeze=False)[0])
    for ax, sc in zip(axes, scens):
        meths = [m for s, m in windows if s == sc]
        for j, m in enumerate(meths):
            w = np.asarray(windows[(sc, m)], dtype=np.float64)
            if w.size == 0:
                continue
            xs = np.arange(w.shape[1]) - before
            n = np.isfinite(w).sum(0)
            with np.errstate(invalid="ignore", divide="ignore"):
                mu = np.nansum(w, 0) / np.where(n > 0, n, np.nan)
                sd = np.sqrt(np.nansum((w - mu) ** 2, 0) / np.where(n > 1, n - 1, np.nan))
                se = sd / np.sqrt(np.where(n > 0, n, np.nan))
            ax.plot(xs, mu, marker="o", ms=3, lw=1.4, color=f"C{j % 10}", label=f"{m} ({len(w)} shifts)")
            ax.fill_between(xs, mu - se, mu + se, color=f"C{j % 10}", alpha=0.15, lw=0)
        ax.axvline(0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("batches from the batch holding the change point")
        ax.set_ylabel("accuracy % (known classes)")
        ax.set_title(sc, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False, loc="lower right")
    fig.suptitle(title or "accuracy around shifts (mean ± s.e.)")
    return _save(fig, path, dpi)
