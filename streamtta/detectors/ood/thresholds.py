"""Thresholds on OOD scores (higher = more OOD).

* :func:`tpr_threshold`: the score below which a fraction ``tpr`` of in-distribution hold-out
  samples fall (ID-TPR 95% by default), so about ``1 - tpr`` of ID samples get flagged.
* :func:`otsu_threshold` / :class:`OtsuThreshold`: OWTTT's adaptive split of a FIFO queue of recent
  scores, choosing the cut that minimises the within-group variance ``w0*var0 + w1*var1``.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> s = np.concatenate([rng.normal(0.2, 0.03, 300), rng.normal(0.7, 0.05, 100)])
>>> 0.3 < otsu_threshold(s) < 0.6
True
>>> round(float(tpr_threshold(np.arange(101.0), 0.95)), 1)
95.0
"""
from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from streamtta.detectors.ood.state import tensor_state


def tpr_threshold(id_scores: Any, tpr: float = 0.95) -> float:
    """``tpr`` quantile of in-distribution scores: flag ``score > threshold``."""
    s = np.asarray(id_scores, dtype=np.float64).reshape(-1)
    s = s[np.isfinite(s)]
    if len(s) == 0:
        raise ValueError("cannot calibrate a threshold on zero finite scores")
    if not 0.0 < tpr < 1.0:
        raise ValueError(f"tpr must be in (0, 1), got {tpr}")
    return float(np.quantile(s, tpr))


def otsu_threshold(scores: Any, n_bins: int = 100, grid: Any = None) -> float:
    """Otsu's cut of ``scores``: minimise ``w0*var(s < t) + w1*var(s >= t)`` over a grid.

    The default grid is ``n_bins`` evenly spaced cuts between the smallest and largest score
    (OWTTT scans 0..0.99 for cosine scores; pass ``grid=`` to reproduce that).
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    s = s[np.isfinite(s)]
    if len(s) < 2:
        raise ValueError(f"Otsu needs at least 2 finite scores, got {len(s)}")
    if grid is None:
        lo, hi = float(s.min()), float(s.max())
        if hi <= lo:
            return hi
        grid = lo + (hi - lo) * (np.arange(1, n_bins) / n_bins)
    grid = np.asarray(grid, dtype=np.float64)
    hi_mask = s[None, :] >= grid[:, None]  # (G, n)
    n1 = hi_mask.sum(1)
    n0 = len(s) - n1
    sum1 = (hi_mask * s).sum(1)
    sq1 = (hi_mask * s**2).sum(1)
    sum0, sq0 = s.sum() - sum1, (s**2).sum() - sq1
    with np.errstate(invalid="ignore", divide="ignore"):
        var1 = sq1 / n1 - (sum1 / n1) ** 2
        var0 = sq0 / n0 - (sum0 / n0) ** 2
        within = (n0 * var0 + n1 * var1) / len(s)
    within[(n0 == 0) | (n1 == 0)] = np.inf
    if not np.isfinite(within).any():
        return float(grid[-1])
    # cuts inside an empty gap tie; return the middle of the tied run (not its left edge)
    best = int(np.argmin(within))
    tol = 1e-9 * max(float(np.var(s)), 1e-300)
    last = best
    while last + 1 < len(grid) and within[last + 1] <= within[best] + tol:
        last += 1
    return float(0.5 * (grid[best] + grid[last]))


class OtsuThreshold:
    """Adaptive threshold over a FIFO queue of the last ``queue_size`` scores (OWTTT).

    ``value`` is ``fallback`` until ``min_fill`` scores were seen; afterwards the Otsu cut of the
    queue, never below ``floor`` when given.

    >>> th = OtsuThreshold(queue_size=8, min_fill=4, fallback=9.0)
    >>> th.update([0.1, 0.1, 0.1])
    9.0
    >>> round(th.update([0.9, 0.9]), 2)
    0.5
    """

    def __init__(self, queue_size: int = 512, min_fill: int = 64, n_bins: int = 100,
                 fallback: float = float("inf"), floor: float | None = None) -> None:
        if queue_size < 2 or min_fill < 2 or min_fill > queue_size:
            raise ValueError(f"need 2 <= min_fill <= queue_size, got min_fill={min_fill}, queue_size={queue_size}")
        self.queue_size = int(queue_size)
        self.min_fill = int(min_fill)
        self.n_bins = int(n_bins)
        self.fallback = float(fallback)
        self.floor = floor
        self.queue: deque[float] = deque(maxlen=self.queue_size)
        self.value = self.fallback

    def update(self, scores: Any) -> float:
        self.queue.extend(float(v) for v in np.asarray(scores, dtype=np.float64).reshape(-1) if np.isfinite(v))
        if len(self.queue) >= self.min_fill:
            self.value = otsu_threshold(np.fromiter(self.queue, float), self.n_bins)
            if self.floor is not None:
                self.value = max(self.value, float(self.floor))
        return self.value

    def reset(self) -> None:
        self.queue.clear()
        self.value = self.fallback

    def state_dict(self) -> dict[str, Any]:
        return {"queue": tensor_state(np.fromiter(self.queue, float)), "value": self.value, "fallback": self.fallback,
                "floor": self.floor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.queue = deque((float(v) for v in np.asarray(state["queue"]).reshape(-1)), maxlen=self.queue_size)
        self.value = float(state["value"])
        self.fallback = float(state["fallback"])
        self.floor = state.get("floor")
