"""Shift-detection metrics: matching detections to ground-truth change points.

Matching rule
-------------
Change points ``tau_1 < ... < tau_m`` and detections are **sample indices** (0-based position in the
stream; a detection produced by batch ``b`` is stamped with the last sample index of ``b``). Change
point ``tau_i`` owns the window ``[tau_i, end_i)`` with ``end_i = min(tau_{i+1}, tau_i + horizon)``
(``horizon=None``: up to the next change point, or the end of the stream). The first detection inside the
window detects ``tau_i`` with delay ``a - tau_i`` samples (and ``batch(a) - batch(tau_i)`` batches);
later detections inside the same window are *redundant* (counted, not false alarms). A window with no
detection is a *missed* shift. A detection outside every window is a *false alarm*; false alarms are
also reported per 10,000 processed samples.

>>> r = match_detections([100, 300], [120, 150, 50], n_samples=400)
>>> r["delays"], r["n_missed"], r["n_false_alarms"], r["n_redundant"]
([20, None], 1, 1, 1)
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


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


def _first_hits(cps: list[int], dets: list[int], stream_end: int,
                horizon: int | None) -> tuple[list[int | None], list[bool], int]:
    """First detection in every change point's window, which detections fell in a window, redundant count."""
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
    return detected_at, used, n_redundant


def _batch_delays(cps: list[int], detected_at: list[int | None], batch_sizes: Sequence[int]) -> list[int | None]:
    """Delay in batches of every detected change point (``None``: missed, or outside the batches)."""
    cp_b = sample_to_batch(cps, batch_sizes)
    db: list[int | None] = []
    for cb, hit in zip(cp_b.tolist(), detected_at):
        if hit is None:
            db.append(None)
        else:
            hb = int(sample_to_batch([hit], batch_sizes)[0])
            db.append(None if hb < 0 or cb < 0 else hb - cb)
    return db


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

    detected_at, used, n_redundant = _first_hits(cps, dets, stream_end, horizon)
    delays = [None if hit is None else hit - tau for tau, hit in zip(cps, detected_at)]
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
        db = _batch_delays(cps, detected_at, batch_sizes)
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
