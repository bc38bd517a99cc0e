"""Accuracy after a shift: rolling means, batches until recovery, runs below a reference series."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np


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
    ``acc_series`` (percentage points for the series :func:`~streamtta.metrics.summarize` produces).

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
