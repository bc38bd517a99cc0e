"""Speed metrics: per-batch latency percentiles and throughput."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


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
