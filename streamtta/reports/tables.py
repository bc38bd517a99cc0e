"""Bench tables: metric display labels, a rich console table and a GitHub-markdown table."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console
    from rich.table import Table

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


def _cells(aggregated: Sequence[Mapping[str, Any]], metrics: Sequence[str], bold: str, end_bold: str) -> list[list[str]]:
    """Formatted ``mean ± std`` cells per row, the best mean per scenario wrapped in ``bold``/``end_bold``."""
    best = {m: _best_rows(aggregated, m) for m in metrics}
    rows = []
    for i, a in enumerate(aggregated):
        cells = []
        for m in metrics:
            dec = METRICS.get(m, ("", None, 2))[2]
            txt = _fmt(a["metrics_mean"].get(m), a["metrics_std"].get(m), dec)
            cells.append(f"{bold}{txt}{end_bold}" if i in best[m] else txt)
        rows.append(cells)
    return rows


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
    prev = None
    for i, (a, cells) in enumerate(zip(aggregated, _cells(aggregated, metrics, "[bold]", "[/bold]"))):
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
    for a, cells in zip(aggregated, _cells(aggregated, metrics, "**", "**")):
        lines.append("| " + " | ".join([str(a["scenario"]), str(a["method"]), str(a.get("n_seeds", "")), *cells]) + " |")
    return "\n".join(lines) + "\n"
