"""One JSON-ready summary of a run: :func:`summarize` and :func:`scalar_metrics`.

Rates (accuracy, error, AUROC, FPR, AUPR, ACC_S/N/H, OOD rate, update rate, missed rate) are reported
in **percent** (0-100), so that ``recovery_tol=3.0`` means 3 points.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from ._common import _finite_or_none, _nan_to_none, _pct
from .classification import accuracy, open_set_accuracy
from .ood import ood_metrics
from .recovery import recovery_batches
from .shift import change_points_from_domains, match_detections, sample_to_batch
from .speed import latency_percentiles, throughput
from .views import _kind_names, _unknown_mask, alert_batches, batch_series

if TYPE_CHECKING:  # pragma: no cover
    from streamtta.runlog import RunLog

#: Alert kinds that count as shift detections in :func:`summarize`.
SHIFT_ALERT_KINDS: frozenset[str] = frozenset({"covariate_shift", "semantic_shift"})

_OOD_KEYS = ("auroc", "fpr95", "fpr95_id", "aupr_in", "aupr_out")
_SERIES_KEYS = ("acc", "entropy", "ood_rate", "ood_score", "update_rate")


def _accuracy_metrics(preds: np.ndarray, labels: np.ndarray, flags: np.ndarray, unk: np.ndarray,
                      known: np.ndarray, n: int) -> dict[str, Any]:
    """``acc, err, acc_s, acc_n, acc_h`` in percent."""
    acc = accuracy(preds, labels, known) if n else None
    osa = open_set_accuracy(preds, labels, flags, unk) if n else dict.fromkeys(("acc_s", "acc_n", "acc_h"))
    return {
        "acc": _pct(acc),
        "err": None if acc is None else 100.0 * (1.0 - acc),
        "acc_s": _pct(osa["acc_s"]),
        "acc_n": _pct(osa["acc_n"]),
        "acc_h": _pct(osa["acc_h"]),
    }


def _ood_summary(log: "RunLog", labels: np.ndarray, unk: np.ndarray, tpr: float) -> dict[str, Any]:
    """OOD metrics in percent, over the samples with ground truth (``is_unknown`` given, or a label)."""
    n = log.n_samples
    scores = log.ood_scores()
    truth = log.sample_column("has_truth")
    truth = (truth | (labels >= 0)) if truth.size == n else (labels >= 0)
    if n and scores.size == n and truth.any():
        ood = ood_metrics(scores[truth], unk[truth], tpr)
    else:
        ood = dict.fromkeys(_OOD_KEYS)
    return {k: _pct(v) for k, v in ood.items()}


def _per_domain(log: "RunLog", preds: np.ndarray, labels: np.ndarray, known: np.ndarray, unk: np.ndarray,
                flags: np.ndarray) -> dict[str, dict[str, Any]]:
    """``{domain: {n, n_known, n_unknown, acc, err, ood_rate}}`` in order of appearance."""
    n = log.n_samples
    per_domain: dict[str, dict[str, Any]] = {}
    doms = log.domains()
    if not any(d is not None for d in doms):
        return per_domain
    darr = np.asarray(["\x00none" if d is None else str(d) for d in doms], dtype=object)
    for d in dict.fromkeys(str(d) for d in doms if d is not None):
        m = darr == d
        a = accuracy(preds, labels, m & known)
        per_domain[d] = {
            "n": int(m.sum()),
            "n_known": int((m & known).sum()),
            "n_unknown": int((m & unk).sum()),
            "acc": _pct(a),
            "err": None if a is None else 100.0 * (1.0 - a),
            "ood_rate": _pct(float(flags[m].mean())) if flags.size == n and m.any() else None,
        }
    return per_domain


def _shift_summary(log: "RunLog", kinds: set[str], alert_pos: list[tuple[int, str]], acc_series: np.ndarray,
                   horizon: int | None, pre_window: int, tol: float, window: int) -> dict[str, Any]:
    """:func:`match_detections` of the run plus ``change_batches`` and ``recovery``.

    One detection per batch that emitted a shift alert or recorded a shift kind in ``BatchRecord.shift``.
    """
    n = log.n_samples
    sizes = log.batch_column("size").tolist()
    cps = [int(c) for c in log.change_points] if log.change_points else change_points_from_domains(log.domains())
    cps = sorted({c for c in cps if 0 < c < n})
    det_batches = {p for p, _ in alert_pos}
    det_batches |= {i for i, sh in enumerate(log.batch_column("shift")) if sh and str(sh) in kinds}
    ends = np.cumsum(sizes) - 1 if sizes else np.zeros(0, np.int64)
    dets = sorted(int(ends[p]) for p in det_batches)
    shift = match_detections(cps, dets, n_samples=n, horizon=horizon, batch_sizes=sizes)
    change_batches = sample_to_batch(cps, sizes).tolist() if cps else []
    if change_batches and np.isfinite(acc_series).any():
        rec = recovery_batches(acc_series, change_batches, pre_window, tol, window)
    else:
        rec = [None] * len(change_batches)
    shift["change_batches"] = change_batches
    shift["recovery"] = rec
    return shift


def _shift_metrics(shift: dict[str, Any]) -> dict[str, Any]:
    """The scalar shift-detection and recovery entries of a :func:`_shift_summary`."""
    rec = shift["recovery"]
    rec_ok = [r for r in rec if r is not None]
    return {
        "n_changes": shift["n_changes"],
        "n_detected": shift["n_detected"],
        "n_missed": shift["n_missed"],
        "missed_rate": _pct(shift["missed_rate"]),
        "n_false_alarms": shift["n_false_alarms"],
        "false_alarms_per_10k": shift["false_alarms_per_10k"],
        "delay_mean_samples": shift["delay_mean"],
        "delay_median_samples": shift["delay_median"],
        "delay_mean_batches": shift.get("delay_mean_batches"),
        "recovery_mean_batches": float(np.mean(rec_ok)) if rec_ok else None,
        "n_unrecovered": len(rec) - len(rec_ok),
    }


def _activity_metrics(log: "RunLog", flags: np.ndarray, n_shift_alerts: int) -> dict[str, Any]:
    """OOD and update rates (percent), mean entropy, alert / reset / dead-letter counts."""
    n = log.n_samples
    ent = log.entropy()
    ent = ent[np.isfinite(ent)] if ent.size else ent
    upd = log.sample_column("updated")
    return {
        "ood_rate": _pct(float(flags.mean())) if flags.size and flags.size == n else None,
        "update_rate": _pct(float(upd.mean())) if upd.size and upd.size == n else None,
        "mean_entropy": float(ent.mean()) if ent.size else None,
        "n_alerts": len(log.alerts),
        "n_shift_alerts": n_shift_alerts,
        "n_resets": int(log.batch_column("reset").sum()),
        "dead_letters": int(log.dead_letters),
    }


def _speed_metrics(log: "RunLog") -> dict[str, Any]:
    """Throughput, latency and step-time percentiles (ms), wall time and peak RSS."""
    lat = latency_percentiles(log.batch_column("latency_s").tolist())
    stp = latency_percentiles(log.batch_column("step_s").tolist())
    return {
        "samples_per_s": throughput(log.n_samples, log.wall_s),
        "latency_p50_ms": lat["p50"],
        "latency_p99_ms": lat["p99"],
        "step_p50_ms": stp["p50"],
        "step_p99_ms": stp["p99"],
        "wall_s": float(log.wall_s),
        "peak_rss_mb": float(log.peak_rss_mb) if log.peak_rss_mb else None,
    }


def summarize(
    log: "RunLog",
    *,
    known_classes: set[int] | None = None,
    shift_kinds: Iterable[str] = SHIFT_ALERT_KINDS,
    horizon: int | None = None,
    recovery_pre_window: int = 5,
    recovery_tol: float = 3.0,
    recovery_window: int = 3,
    tpr: float = 0.95,
) -> dict[str, Any]:
    """Summarize a run into one flat, JSON-ready dict (NaN -> ``None``).

    The dict holds the scalar metrics listed below at top level, plus three nested entries:
    ``per_domain``, ``series`` and ``shift`` (:func:`scalar_metrics` keeps only the scalars).

    ``known_classes``: when given, labelled samples whose label is not in the set count as unknown
    (in addition to ``is_unknown=True``). Change points come from ``log.change_points`` when non-empty,
    otherwise from domain changes (:func:`~streamtta.metrics.change_points_from_domains`); points at
    sample 0 or beyond the stream are ignored. Detections are the last sample index of every batch that
    emitted an alert whose kind is in ``shift_kinds`` or whose ``BatchRecord.shift`` is in ``shift_kinds``
    (one detection per batch; a monitor event recorded in ``shift`` counts even if the alert policy
    suppressed the alert).

    Scalar keys (rates in percent, ``None`` when undefined):
    ``n_samples, n_batches, n_known, n_unknown, acc, err, acc_s, acc_n, acc_h, auroc, fpr95, fpr95_id,
    aupr_in, aupr_out, ood_rate, update_rate, mean_entropy, n_alerts, n_shift_alerts, n_resets,
    dead_letters, n_changes, n_detected, n_missed, missed_rate, n_false_alarms, false_alarms_per_10k,
    delay_mean_samples, delay_median_samples, delay_mean_batches, recovery_mean_batches, n_unrecovered,
    samples_per_s, latency_p50_ms, latency_p99_ms, step_p50_ms, step_p99_ms, wall_s, peak_rss_mb``.

    ``per_domain``: ``{domain: {n, n_known, n_unknown, acc, err, ood_rate}}`` in order of appearance.
    ``series``: per-batch lists ``acc, entropy, ood_rate, ood_score, update_rate``.
    ``shift``: the full :func:`~streamtta.metrics.match_detections` result plus ``change_batches`` and
    ``recovery``.
    """
    n = log.n_samples
    preds, labels = log.preds(), log.labels()
    unk = _unknown_mask(log, known_classes)
    known = (labels >= 0) & ~unk
    flags = log.ood_flags()
    kinds = _kind_names(shift_kinds)
    shift_alerts = alert_batches(log, kinds)
    series = batch_series(log, known_classes=known_classes)
    shift = _shift_summary(log, kinds, shift_alerts, series["acc"], horizon,
                           recovery_pre_window, recovery_tol, recovery_window)
    metrics: dict[str, Any] = {
        "n_samples": n,
        "n_batches": len(log.batches),
        "n_known": int(known.sum()),
        "n_unknown": int(unk.sum()),
        **_accuracy_metrics(preds, labels, flags, unk, known, n),
        **_ood_summary(log, labels, unk, tpr),
        **_activity_metrics(log, flags, len(shift_alerts)),
        **_shift_metrics(shift),
        **_speed_metrics(log),
    }
    metrics = {k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in metrics.items()}
    return {
        **metrics,
        "per_domain": _per_domain(log, preds, labels, known, unk, flags),
        "series": {k: _nan_to_none(series[k]) for k in _SERIES_KEYS},
        "shift": shift,
    }


def scalar_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The flat scalar metrics of a :func:`summarize` output (drops ``per_domain``, ``series``, ``shift``)."""
    return {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
