"""Evaluation metrics over a :class:`~streamtta.runlog.RunLog`: accuracy, OOD, open-set, shift detection, speed.

Everything here is a pure function over numpy arrays, plus :func:`summarize`, which reads a run log and
returns one JSON-ready dict. Labels, domains and ``is_unknown`` are evaluation-only fields; the engine
never adapts on them, and every metric that needs them returns ``None`` when they are absent (live
streams), instead of raising.

Units
-----
* The pure functions return **fractions** in ``[0, 1]``, like scikit-learn.
* :func:`summarize` reports every rate (accuracy, error, AUROC, FPR, AUPR, ACC_S/N/H, OOD rate) in
  **percent** (0-100), as papers do, so that ``tol=3.0`` in :func:`recovery_batches` means 3 points.

OOD polarity
------------
Scores follow the project convention (``streamtta.types.OOD_HIGHER_IS_MORE_OOD``): **higher = more
OOD**. The positive class of AUROC and AUPR-Out is the *unknown* (OOD) sample. Since AUROC is symmetric,
this AUROC equals the usual "ID positive, confidence score" AUROC of the literature.

* ``auroc``: ``roc_auc_score(is_unknown, score)``; 1 = every unknown scores above every known sample.
* ``fpr95``: FPR at 95 % TPR with **OOD positive**. Let ``t`` be the largest threshold such that at least
  95 % of the unknown samples have ``score >= t``; ``fpr95`` is the fraction of *known* samples with
  ``score >= t`` (known samples that a detector catching 95 % of unknowns would wrongly flag).
* ``fpr95_id``: the classic OOD-literature variant (ID positive, e.g. ODIN/KNN papers). Let ``t`` be the
  smallest threshold such that at least 95 % of known samples have ``score <= t``; ``fpr95_id`` is the
  fraction of *unknown* samples with ``score <= t`` (unknowns accepted as ID). Use it to compare with
  published FPR95 numbers.
* ``aupr_in``: average precision with known samples positive and ``-score`` as the ranking.
* ``aupr_out``: average precision with unknown samples positive and ``score`` as the ranking.

Shift-detection matching rule
-----------------------------
Change points ``tau_1 < ... < tau_m`` and detections are **sample indices** (0-based position in the
stream; a detection produced by batch ``b`` is stamped with the last sample index of ``b``). Change
point ``tau_i`` owns the window ``[tau_i, end_i)`` with ``end_i = min(tau_{i+1}, tau_i + horizon)``
(``horizon=None``: up to the next change point, or the end of the stream). The first detection inside the
window detects ``tau_i`` with delay ``a - tau_i`` samples (and ``batch(a) - batch(tau_i)`` batches);
later detections inside the same window are *redundant* (counted, not false alarms). A window with no
detection is a *missed* shift. A detection outside every window is a *false alarm*; false alarms are
also reported per 10,000 processed samples.

Example
-------
>>> import numpy as np
>>> round(auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([False, False, True, True])), 3)
1.0
>>> r = match_detections([100, 300], [120, 150, 50], n_samples=400)
>>> r["delays"], r["n_missed"], r["n_false_alarms"], r["n_redundant"]
([20, None], 1, 1, 1)
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from streamtta.runlog import RunLog

#: Alert kinds that count as shift detections in :func:`summarize`.
SHIFT_ALERT_KINDS: frozenset[str] = frozenset({"covariate_shift", "semantic_shift"})

__all__ = [
    "SHIFT_ALERT_KINDS",
    "accuracy",
    "auroc",
    "fpr_at_tpr",
    "fpr_at_tpr_id",
    "aupr_in",
    "aupr_out",
    "ood_metrics",
    "harmonic_mean",
    "open_set_accuracy",
    "match_detections",
    "change_points_from_domains",
    "sample_to_batch",
    "rolling_mean",
    "recovery_batches",
    "latency_percentiles",
    "throughput",
    "batch_series",
    "alert_batches",
    "summarize",
    "scalar_metrics",
]


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------
def _as_bool(a: Any, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype != bool:
        if arr.size and not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must be boolean (or 0/1), got values {np.unique(arr)[:5]!r}")
        arr = arr.astype(bool)
    return arr.ravel()


def _check_same_len(**arrays: np.ndarray) -> None:
    lens = {k: len(v) for k, v in arrays.items()}
    if len(set(lens.values())) > 1:
        raise ValueError(f"arrays must have the same length, got {lens}")


def _pct(x: float | None) -> float | None:
    return None if x is None else 100.0 * float(x)


def _finite_or_none(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# ----------------------------------------------------------------------------------------------
# classification
# ----------------------------------------------------------------------------------------------
def accuracy(preds: Any, labels: Any, mask: Any = None) -> float | None:
    """Fraction of ``preds == labels`` over ``mask`` (default: all samples with ``label >= 0``).

    Returns ``None`` when no sample is selected.

    >>> accuracy([1, 2, 3, 0], [1, 2, 0, -1])
    0.6666666666666666
    """
    p = np.asarray(preds).ravel()
    y = np.asarray(labels).ravel()
    _check_same_len(preds=p, labels=y)
    m = (y >= 0) if mask is None else _as_bool(mask, "mask")
    _check_same_len(preds=p, mask=m)
    if not m.any():
        return None
    return float((p[m] == y[m]).mean())


# ----------------------------------------------------------------------------------------------
# OOD detection (higher score = more OOD; positive = unknown)
# ----------------------------------------------------------------------------------------------
def _ood_inputs(scores: Any, is_unknown: Any) -> tuple[np.ndarray, np.ndarray] | None:
    s = np.asarray(scores, dtype=np.float64).ravel()
    u = _as_bool(is_unknown, "is_unknown")
    _check_same_len(scores=s, is_unknown=u)
    keep = np.isfinite(s)
    s, u = s[keep], u[keep]
    if u.all() or not u.any():  # need both classes
        return None
    return s, u


def auroc(scores: Any, is_unknown: Any) -> float | None:
    """Area under the ROC curve, unknown = positive, higher score = more OOD. ``None`` if one class is absent.

    >>> auroc([0.9, 0.8, 0.2, 0.1], [False, False, True, True])
    0.0
    """
    from sklearn.metrics import roc_auc_score

    d = _ood_inputs(scores, is_unknown)
    return None if d is None else float(roc_auc_score(d[1], d[0]))


def fpr_at_tpr(scores: Any, is_unknown: Any, tpr: float = 0.95) -> float | None:
    """Fraction of known samples flagged at the largest threshold that flags ``>= tpr`` of unknowns.

    A sample is flagged when ``score >= t``. This is FPR@95TPR with OOD positive (see module docstring).

    >>> fpr_at_tpr([0.1, 0.5, 0.6, 0.7, 0.9], [False, False, True, True, True], tpr=0.95)
    0.0
    """
    from sklearn.metrics import roc_curve

    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr!r}")
    d = _ood_inputs(scores, is_unknown)
    if d is None:
        return None
    fpr_c, tpr_c, _ = roc_curve(d[1], d[0], drop_intermediate=False)
    idx = int(np.searchsorted(tpr_c, tpr - 1e-12, side="left"))  # tpr_c is non-decreasing
    return float(fpr_c[min(idx, len(fpr_c) - 1)])


def fpr_at_tpr_id(scores: Any, is_unknown: Any, tpr: float = 0.95) -> float | None:
    """Classic FPR@95TPR with ID positive: fraction of unknowns accepted when ``>= tpr`` of knowns are.

    A sample is accepted as ID when ``score <= t``, ``t`` the smallest threshold accepting ``>= tpr`` of
    known samples.

    >>> fpr_at_tpr_id([0.1, 0.2, 0.3, 0.25, 0.9], [False, False, False, True, True], tpr=0.95)
    0.5
    """
    from sklearn.metrics import roc_curve

    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr!r}")
    d = _ood_inputs(scores, is_unknown)
    if d is None:
        return None
    fpr_c, tpr_c, _ = roc_curve(~d[1], -d[0], drop_intermediate=False)
    idx = int(np.searchsorted(tpr_c, tpr - 1e-12, side="left"))
    return float(fpr_c[min(idx, len(fpr_c) - 1)])


def aupr_in(scores: Any, is_unknown: Any) -> float | None:
    """Average precision with known samples positive, ranked by ``-score``."""
    from sklearn.metrics import average_precision_score

    d = _ood_inputs(scores, is_unknown)
    return None if d is None else float(average_precision_score(~d[1], -d[0]))


def aupr_out(scores: Any, is_unknown: Any) -> float | None:
    """Average precision with unknown samples positive, ranked by ``score``."""
    from sklearn.metrics import average_precision_score

    d = _ood_inputs(scores, is_unknown)
    return None if d is None else float(average_precision_score(d[1], d[0]))


def ood_metrics(scores: Any, is_unknown: Any, tpr: float = 0.95) -> dict[str, float | None]:
    """``{auroc, fpr95, fpr95_id, aupr_in, aupr_out}`` as fractions; all ``None`` if a class is absent."""
    return {
        "auroc": auroc(scores, is_unknown),
        "fpr95": fpr_at_tpr(scores, is_unknown, tpr),
        "fpr95_id": fpr_at_tpr_id(scores, is_unknown, tpr),
        "aupr_in": aupr_in(scores, is_unknown),
        "aupr_out": aupr_out(scores, is_unknown),
    }


# ----------------------------------------------------------------------------------------------
# open-set accuracy (OWTTT)
# ----------------------------------------------------------------------------------------------
def harmonic_mean(a: float | None, b: float | None) -> float | None:
    """``2ab / (a + b)``; 0 when both are 0; ``None`` when either is ``None``.

    >>> harmonic_mean(0.8, 0.5)
    0.6153846153846154
    """
    if a is None or b is None:
        return None
    return 0.0 if a + b == 0 else 2.0 * a * b / (a + b)


def open_set_accuracy(preds: Any, labels: Any, ood_flags: Any, is_unknown: Any) -> dict[str, float | None]:
    """OWTTT open-set accuracies as fractions.

    * ``acc_s``: over known samples with a label (``label >= 0`` and not unknown), correct iff the class
      is right **and** the sample is not flagged OOD;
    * ``acc_n``: fraction of unknown samples flagged OOD;
    * ``acc_h``: harmonic mean of the two.

    >>> r = open_set_accuracy([1, 2, 2, 0], [1, 2, 5, -1], [False, True, True, False], [False, False, True, True])
    >>> r["acc_s"], r["acc_n"], round(r["acc_h"], 3)
    (0.5, 0.5, 0.5)
    """
    p = np.asarray(preds).ravel()
    y = np.asarray(labels).ravel()
    f = _as_bool(ood_flags, "ood_flags")
    u = _as_bool(is_unknown, "is_unknown")
    _check_same_len(preds=p, labels=y, ood_flags=f, is_unknown=u)
    known = (y >= 0) & ~u
    acc_s = float(((p == y) & ~f)[known].mean()) if known.any() else None
    acc_n = float(f[u].mean()) if u.any() else None
    return {"acc_s": acc_s, "acc_n": acc_n, "acc_h": harmonic_mean(acc_s, acc_n)}


# ----------------------------------------------------------------------------------------------
# shift detection
# ----------------------------------------------------------------------------------------------
def sample_to_batch(sample_idx: Any, batch_sizes: Sequence[int]) -> np.ndarray:
    """Batch index holding each sample index (``-1`` for indices outside the stream).

    >>> sample_to_batch([0, 3, 4, 9], [4, 4]).tolist()
    [0, 0, 1, -1]
    """
    ends = np.cumsum(np.asarray(batch_sizes, dtype=np.int64))
    idx = np.asarray(sample_idx, dtype=np.int64)
    b = np.searchsorted(ends, idx, side="right")
    out = np.where((idx >= 0) & (b < len(ends)), b, -1)
    return out.astype(np.int64)


def match_detections(
    change_points: Iterable[int],
    detections: Iterable[int],
    *,
    n_samples: int | None = None,
    horizon: int | None = None,
    batch_sizes: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Match detections (sample indices) to ground-truth change points; rule in the module docstring.

    Returns ``delays`` (samples, ``None`` = missed, one per change point), ``delays_batches`` (when
    ``batch_sizes`` is given), ``detected_at``, ``n_changes``, ``n_detected``, ``n_missed``,
    ``missed_rate``, ``n_false_alarms``, ``false_alarms`` (their sample indices), ``n_redundant``,
    ``false_alarms_per_10k`` (needs ``n_samples``), ``delay_mean``/``delay_median``/``delay_p90``
    (samples, over detected changes) and ``delay_mean_batches``.

    >>> r = match_detections([10], [12, 13, 40], horizon=20, n_samples=100)
    >>> r["delays"], r["n_redundant"], r["n_false_alarms"], r["false_alarms_per_10k"]
    ([2], 1, 1, 100.0)
    """
    cps = sorted(int(c) for c in change_points)
    if len(set(cps)) != len(cps):
        raise ValueError(f"change_points must be distinct, got {cps}")
    dets = sorted(int(d) for d in detections)
    if horizon is not None and horizon <= 0:
        raise ValueError(f"horizon must be a positive number of samples or None, got {horizon!r}")
    if n_samples is not None and n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples!r}")
    stream_end = n_samples if n_samples is not None else (max(cps + dets) + 1 if cps or dets else 0)

    delays: list[int | None] = []
    detected_at: list[int | None] = []
    used = [False] * len(dets)
    n_redundant = 0
    for i, tau in enumerate(cps):
        end = cps[i + 1] if i + 1 < len(cps) else max(stream_end, tau + 1)
        if horizon is not None:
            end = min(end, tau + horizon)
        hit: int | None = None
        for j, a in enumerate(dets):
            if tau <= a < end:
                used[j] = True
                if hit is None:
                    hit = a
                else:
                    n_redundant += 1
        detected_at.append(hit)
        delays.append(None if hit is None else hit - tau)
    false = [a for a, u in zip(dets, used) if not u]
    got = [d for d in delays if d is not None]
    out: dict[str, Any] = {
        "change_points": cps,
        "detections": dets,
        "delays": delays,
        "detected_at": detected_at,
        "n_changes": len(cps),
        "n_detected": len(got),
        "n_missed": len(cps) - len(got),
        "missed_rate": (len(cps) - len(got)) / len(cps) if cps else None,
        "n_false_alarms": len(false),
        "false_alarms": false,
        "n_redundant": n_redundant,
        "false_alarms_per_10k": (1e4 * len(false) / n_samples) if n_samples else None,
        "delay_mean": float(np.mean(got)) if got else None,
        "delay_median": float(np.median(got)) if got else None,
        "delay_p90": float(np.percentile(got, 90)) if got else None,
    }
    if batch_sizes is not None:
        cp_b = sample_to_batch(cps, batch_sizes)
        db: list[int | None] = []
        for cb, hit in zip(cp_b.tolist(), detected_at):
            if hit is None:
                db.append(None)
            else:
                hb = int(sample_to_batch([hit], batch_sizes)[0])
                db.append(None if hb < 0 or cb < 0 else hb - cb)
        out["delays_batches"] = db
        gb = [d for d in db if d is not None]
        out["delay_mean_batches"] = float(np.mean(gb)) if gb else None
    return out


def change_points_from_domains(domains: Sequence[str | None]) -> list[int]:
    """Sample indices where the domain label changes (``None`` entries are skipped, not a domain).

    >>> change_points_from_domains(["a", "a", "b", None, "b", "c"])
    [2, 5]
    """
    cps: list[int] = []
    prev: str | None = None
    for i, d in enumerate(domains):
        if d is None:
            continue
        if prev is not None and d != prev:
            cps.append(i)
        prev = d
    return cps


# ----------------------------------------------------------------------------------------------
# recovery after a shift
# ----------------------------------------------------------------------------------------------
def rolling_mean(x: Any, window: int) -> np.ndarray:
    """Trailing NaN-aware mean over the last ``window`` values (NaN where the window has no finite value).

    >>> rolling_mean([1.0, 3.0, float("nan"), 5.0], 2).tolist()
    [1.0, 2.0, 3.0, 5.0]
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window!r}")
    a = np.asarray(x, dtype=np.float64).ravel()
    out = np.full(a.shape, np.nan)
    for t in range(len(a)):
        w = a[max(0, t - window + 1): t + 1]
        w = w[np.isfinite(w)]
        if w.size:
            out[t] = w.mean()
    return out


def recovery_batches(
    acc_series: Any,
    change_batches: Iterable[int],
    pre_window: int,
    tol: float = 3.0,
    window: int = 3,
) -> list[int | None]:
    """Batches after each shift until rolling accuracy is back within ``tol`` of its pre-shift level.

    For change batch ``c`` the pre-shift level is the NaN-aware mean of ``acc_series[c - pre_window : c]``.
    Post-shift, the rolling mean at ``c + k`` averages ``acc_series[max(c, c + k - window + 1) : c + k + 1]``
    (pre-shift batches never enter it). The result is the first ``k >= 0`` with rolling mean
    ``>= level - tol`` (0 = never dropped), searched up to the next change batch; ``None`` when accuracy
    does not recover in that segment or the level/series is undefined. ``tol`` is in the units of
    ``acc_series`` (percentage points for the series :func:`summarize` produces).

    >>> recovery_batches([90, 90, 90, 60, 70, 85, 89, 90], [3], pre_window=3, tol=3.0, window=1)
    [3]
    """
    if pre_window < 1:
        raise ValueError(f"pre_window must be >= 1, got {pre_window!r}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window!r}")
    a = np.asarray(acc_series, dtype=np.float64).ravel()
    cbs = sorted(int(c) for c in change_batches)
    out: list[int | None] = []
    for i, c in enumerate(cbs):
        stop = cbs[i + 1] if i + 1 < len(cbs) else len(a)
        pre = a[max(0, c - pre_window): max(0, c)]
        pre = pre[np.isfinite(pre)]
        if c <= 0 or c >= len(a) or pre.size == 0:
            out.append(None)
            continue
        level = float(pre.mean())
        res: int | None = None
        for t in range(c, min(stop, len(a))):
            w = a[max(c, t - window + 1): t + 1]
            w = w[np.isfinite(w)]
            if w.size and w.mean() >= level - tol:
                res = t - c
                break
        out.append(res)
    return out


def longest_run_below(series: Any, reference: Any) -> int:
    """Longest run of consecutive positions where ``series < reference`` (positions where either is
    NaN break a run). Used as "batches in a row below the non-adapting source model".

    >>> longest_run_below([80, 70, 60, 90, 50, 40], [75, 75, 75, 75, 75, 75])
    2
    >>> longest_run_below([80.0, float("nan"), 60], [75, 75, 75])
    1
    """
    a = np.asarray(series, dtype=np.float64).ravel()
    b = np.asarray(reference, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"series and reference differ in length: {a.size} vs {b.size}")
    best = run = 0
    for below in (a < b) & np.isfinite(a) & np.isfinite(b):
        run = run + 1 if below else 0
        best = max(best, run)
    return best


# ----------------------------------------------------------------------------------------------
# speed
# ----------------------------------------------------------------------------------------------
def latency_percentiles(latencies_s: Any, qs: Sequence[float] = (50.0, 99.0)) -> dict[str, float | None]:
    """Percentiles of per-batch latencies, in **milliseconds** (``{"p50": ..., "p99": ...}``).

    Uses numpy's default linear interpolation. ``None`` values for an empty input.

    >>> latency_percentiles([0.001, 0.002, 0.003])["p50"]
    2.0
    """
    a = np.asarray(latencies_s, dtype=np.float64).ravel()
    a = a[np.isfinite(a)]
    keys = [f"p{q:g}" for q in qs]
    if a.size == 0:
        return dict.fromkeys(keys)
    return {k: float(np.percentile(a, q)) * 1e3 for k, q in zip(keys, qs)}


def throughput(n_samples: int, wall_s: float) -> float | None:
    """Samples per second, ``None`` when the wall time is not positive.

    >>> throughput(1000, 2.0)
    500.0
    """
    if wall_s is None or not wall_s > 0:
        return None
    return float(n_samples) / float(wall_s)


# ----------------------------------------------------------------------------------------------
# RunLog views
# ----------------------------------------------------------------------------------------------
def _unknown_mask(log: "RunLog", known_classes: set[int] | None) -> np.ndarray:
    u = log.is_unknown()
    if known_classes is not None:
        y = log.labels()
        kc = np.asarray(sorted(int(c) for c in known_classes), dtype=np.int64)
        u = u | ((y >= 0) & ~np.isin(y, kc))
    return u


def batch_series(log: "RunLog", *, known_classes: set[int] | None = None) -> dict[str, np.ndarray]:
    """Per-batch series: ``acc`` (percent over known labelled samples, NaN if none), ``entropy`` (mean),
    ``ood_rate`` (percent flagged), ``ood_score`` (mean), ``update_rate`` (percent used in the update),
    ``n`` (batch size), ``end`` (last sample index of the batch)."""
    sizes = np.asarray([len(b.preds) for b in log.batches], dtype=np.int64)
    n_b = len(sizes)
    unk = _unknown_mask(log, known_classes)
    preds, labels = log.preds(), log.labels()
    known = (labels >= 0) & ~unk
    correct = (preds == labels) & known
    ent, sc, fl = log.entropy(), log.ood_scores(), log.ood_flags().astype(np.float64)
    upd = np.asarray([bool(v) for b in log.batches for v in b.updated], dtype=np.float64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if n_b else np.zeros(0, np.int64)

    def seg_mean(v: np.ndarray) -> np.ndarray:
        out = np.full(n_b, np.nan)
        if v.size != sizes.sum():  # field not logged per sample
            return out
        for i, (s, n) in enumerate(zip(starts, sizes)):
            w = v[s:s + n]
            w = w[np.isfinite(w)]
            if w.size:
                out[i] = w.mean()
        return out

    acc = np.full(n_b, np.nan)
    for i, (s, n) in enumerate(zip(starts, sizes)):
        k = known[s:s + n]
        if k.any():
            acc[i] = 100.0 * correct[s:s + n][k].mean()
    return {
        "acc": acc,
        "entropy": seg_mean(ent),
        "ood_rate": 100.0 * seg_mean(fl),
        "ood_score": seg_mean(sc),
        "update_rate": 100.0 * seg_mean(upd),
        "n": sizes,
        "end": (np.cumsum(sizes) - 1) if n_b else np.zeros(0, np.int64),
    }


def alert_batches(log: "RunLog", kinds: Iterable[str] | None = None) -> list[tuple[int, str]]:
    """``(batch position, kind)`` for every alert in ``log.alerts`` (optionally only ``kinds``).

    An alert is placed by its ``offsets`` (``topic``, ``partition``, ``last`` inside a batch's offset
    range; with several matches, e.g. a replayed range, the one whose :attr:`BatchRecord.index` equals
    the alert's ``batch_index``, else the first). Alerts without usable offsets are placed by
    ``batch_index`` matched against :attr:`BatchRecord.index` (per-stream batch counters can differ from
    the log position when one log mixes several partitions, hence offsets first). Unplaceable alerts are
    dropped.
    """
    kinds_set = None if kinds is None else {str(getattr(k, "value", k)) for k in kinds}
    pos_of = {b.index: i for i, b in enumerate(log.batches)}
    out: list[tuple[int, str]] = []
    for a in log.alerts:
        kind = str(getattr(a.get("kind"), "value", a.get("kind")))
        if kinds_set is not None and kind not in kinds_set:
            continue
        bi = a.get("batch_index")
        bi = None if bi is None else int(bi)
        off = a.get("offsets") or {}
        cands: list[int] = []
        if off.get("last") is not None:
            cands = [i for i, b in enumerate(log.batches)
                     if b.topic == off.get("topic", b.topic) and b.partition == off.get("partition", b.partition)
                     and b.first_offset <= off["last"] <= b.last_offset]
        pos: int | None = None
        if cands:
            pos = next((i for i in cands if log.batches[i].index == bi), cands[0])
        elif bi is not None and bi in pos_of:
            pos = pos_of[bi]
        if pos is not None:
            out.append((pos, kind))
    return out


def _nan_to_none(a: np.ndarray) -> list[float | None]:
    return [None if not math.isfinite(float(v)) else float(v) for v in a]


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
    otherwise from domain changes (:func:`change_points_from_domains`); points at sample 0 or beyond the
    stream are ignored. Detections are the last sample index of every batch that emitted an alert whose
    kind is in ``shift_kinds`` or whose ``BatchRecord.shift`` is in ``shift_kinds`` (one detection per
    batch; a monitor event recorded in ``shift`` counts even if the alert policy suppressed the alert).

    Scalar keys (rates in percent, ``None`` when undefined):
    ``n_samples, n_batches, n_known, n_unknown, acc, err, acc_s, acc_n, acc_h, auroc, fpr95, fpr95_id,
    aupr_in, aupr_out, ood_rate, update_rate, mean_entropy, n_alerts, n_shift_alerts, n_resets,
    dead_letters, n_changes, n_detected, n_missed, missed_rate, n_false_alarms, false_alarms_per_10k,
    delay_mean_samples, delay_median_samples, delay_mean_batches, recovery_mean_batches, n_unrecovered,
    samples_per_s, latency_p50_ms, latency_p99_ms, step_p50_ms, step_p99_ms, wall_s, peak_rss_mb``.

    ``per_domain``: ``{domain: {n, n_known, n_unknown, acc, err, ood_rate}}`` in order of appearance.
    ``series``: per-batch lists ``acc, entropy, ood_rate, ood_score, update_rate``.
    ``shift``: the full :func:`match_detections` result plus ``change_batches`` and ``recovery``.
    """
    n = log.n_samples
    sizes = [len(b.preds) for b in log.batches]
    preds, labels = log.preds(), log.labels()
    unk = _unknown_mask(log, known_classes)
    known = (labels >= 0) & ~unk
    flags = log.ood_flags()
    scores = log.ood_scores()

    acc = accuracy(preds, labels, known) if n else None
    osa = open_set_accuracy(preds, labels, flags, unk) if n else dict.fromkeys(("acc_s", "acc_n", "acc_h"))
    # OOD metrics only over samples with ground truth (is_unknown given, or a label present)
    truth = np.asarray([v is not None for b in log.batches for v in b.is_unknown], dtype=bool)
    truth = (truth | (labels >= 0)) if truth.size == n else (labels >= 0)
    if n and scores.size == n and truth.any():
        ood = ood_metrics(scores[truth], unk[truth], tpr)
    else:
        ood = dict.fromkeys(("auroc", "fpr95", "fpr95_id", "aupr_in", "aupr_out"))
    ent = log.entropy()
    ent = ent[np.isfinite(ent)] if ent.size else ent
    upd = np.asarray([bool(v) for b in log.batches for v in b.updated], dtype=bool)

    # per domain
    per_domain: dict[str, dict[str, Any]] = {}
    doms = log.domains()
    if any(d is not None for d in doms):
        darr = np.asarray(["\x00none" if d is None else str(d) for d in doms], dtype=object)
        order = list(dict.fromkeys(str(d) for d in doms if d is not None))
        for d in order:
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

    # shift detection
    cps = [int(c) for c in log.change_points] if log.change_points else change_points_from_domains(doms)
    cps = sorted({c for c in cps if 0 < c < n})
    det_batches = {p for p, _ in alert_batches(log, shift_kinds)}
    kinds_set = {str(getattr(k, "value", k)) for k in shift_kinds}
    det_batches |= {i for i, b in enumerate(log.batches) if b.shift and str(b.shift) in kinds_set}
    ends = np.cumsum(sizes) - 1 if sizes else np.zeros(0, np.int64)
    dets = sorted(int(ends[p]) for p in det_batches)
    shift = match_detections(cps, dets, n_samples=n, horizon=horizon, batch_sizes=sizes)
    series = batch_series(log, known_classes=known_classes)
    change_batches = sample_to_batch(cps, sizes).tolist() if cps else []
    rec = recovery_batches(series["acc"], change_batches, recovery_pre_window, recovery_tol, recovery_window) \
        if change_batches and np.isfinite(series["acc"]).any() else [None] * len(change_batches)
    shift["change_batches"] = change_batches
    shift["recovery"] = rec
    rec_ok = [r for r in rec if r is not None]

    lat = latency_percentiles([b.latency_s for b in log.batches])
    stp = latency_percentiles([b.step_s for b in log.batches])
    n_shift_alerts = len(alert_batches(log, shift_kinds))
    metrics: dict[str, Any] = {
        "n_samples": n,
        "n_batches": len(log.batches),
        "n_known": int(known.sum()),
        "n_unknown": int(unk.sum()),
        "acc": _pct(acc),
        "err": None if acc is None else 100.0 * (1.0 - acc),
        "acc_s": _pct(osa["acc_s"]),
        "acc_n": _pct(osa["acc_n"]),
        "acc_h": _pct(osa["acc_h"]),
        **{k: _pct(v) for k, v in ood.items()},
        "ood_rate": _pct(float(flags.mean())) if flags.size and flags.size == n else None,
        "update_rate": _pct(float(upd.mean())) if upd.size and upd.size == n else None,
        "mean_entropy": float(ent.mean()) if ent.size else None,
        "n_alerts": len(log.alerts),
        "n_shift_alerts": n_shift_alerts,
        "n_resets": sum(1 for b in log.batches if b.reset),
        "dead_letters": int(log.dead_letters),
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
        "samples_per_s": throughput(n, log.wall_s),
        "latency_p50_ms": lat["p50"],
        "latency_p99_ms": lat["p99"],
        "step_p50_ms": stp["p50"],
        "step_p99_ms": stp["p99"],
        "wall_s": float(log.wall_s),
        "peak_rss_mb": float(log.peak_rss_mb) if log.peak_rss_mb else None,
    }
    metrics = {k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in metrics.items()}
    return {
        **metrics,
        "per_domain": per_domain,
        "series": {k: _nan_to_none(series[k]) for k in ("acc", "entropy", "ood_rate", "ood_score", "update_rate")},
        "shift": shift,
    }


def scalar_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The flat scalar metrics of a :func:`summarize` output (drops ``per_domain``, ``series``, ``shift``)."""
    return {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
