"""PNG plots of runs and benches, drawn with matplotlib's object API on the Agg canvas
(no pyplot, no global backend change)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from streamtta.metrics import alert_batches, batch_series, change_points_from_domains, rolling_mean, sample_to_batch

from .tables import _label

if TYPE_CHECKING:  # pragma: no cover
    from streamtta.runlog import RunLog

#: colour per alert kind in :func:`plot_run` (unknown kinds get grey).
ALERT_COLOURS: dict[str, str] = {
    "covariate_shift": "tab:orange",
    "semantic_shift": "tab:red",
    "ood_burst": "tab:purple",
    "novel_cluster": "tab:brown",
    "collapse_guard": "tab:pink",
    "dead_letter": "tab:gray",
}


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


def _draw_series(axes: Any, s: Mapping[str, np.ndarray], window: int) -> None:
    """Accuracy (per batch and rolling), mean entropy and OOD rate panels."""
    x = np.arange(len(s["acc"]))
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


def _draw_events(axes: Any, log: "RunLog") -> dict[str, Any]:
    """Vertical markers for change points, alerts and resets; returns one legend handle per label."""
    handles: dict[str, Any] = {}
    n = log.n_samples
    sizes = [len(b.preds) for b in log.batches]
    cps = [int(c) for c in log.change_points] if log.change_points else change_points_from_domains(log.domains())
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
    return handles


def _draw_domain_names(ax: Any, log: "RunLog", max_segments: int = 12) -> None:
    """Write each domain's name over its run of batches (only when there are 1..``max_segments`` runs)."""
    bdom = [next((d for d in b.domains if d is not None), None) for b in log.batches]
    segs: list[tuple[int, int, str]] = []
    for i, d in enumerate(bdom):
        if d is None:
            continue
        if segs and segs[-1][2] == d and segs[-1][1] == i - 1:
            segs[-1] = (segs[-1][0], i, d)
        else:
            segs.append((i, i, d))
    if 0 < len(segs) <= max_segments:
        for a0, a1, d in segs:
            ax.text((a0 + a1) / 2, 1.01, str(d), transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=8, color="dimgray")


def run_title(command: str, *, model: str | None = None, topic: str | None = None,
              scenario: str | None = None) -> str:
    """The title of a run's plot: what ran on what (model, topic, replayed scenario; the parts known).

    >>> run_title("run", model="sensor.ts.pt", topic="sensors")
    'streamtta run: model sensor.ts.pt · topic sensors'
    >>> run_title("simulate", model="digits-resnet", scenario="quickstart")
    'streamtta simulate: model digits-resnet · scenario quickstart'
    """
    parts = [f"{k} {v}" for k, v in (("model", model), ("topic", topic), ("scenario", scenario)) if v]
    return f"streamtta {command}: " + " · ".join(parts) if parts else f"streamtta {command}"


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
    if not log.batches:
        raise ValueError("plot_run needs a RunLog with at least one batch, got an empty log")
    s = batch_series(log, known_classes=known_classes)
    fig = _new_figure((10, 7.5))
    axes = fig.subplots(3, 1, sharex=True)
    _draw_series(axes, s, window)
    handles = _draw_events(axes, log)
    _draw_domain_names(axes[0], log)

    leg = axes[0].get_legend_handles_labels()
    all_h = list(leg[0]) + list(handles.values())
    all_l = list(leg[1]) + list(handles.keys())
    if all_h:
        fig.legend(all_h, all_l, loc="outside lower center", fontsize=8, ncol=min(5, len(all_h)), frameon=False)
    for a in axes:
        a.grid(alpha=0.3)
    fig.suptitle(title or f"run: {log.n_samples} samples, {len(log.batches)} batches, {len(log.alerts)} alerts")
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
