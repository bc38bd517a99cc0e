"""Input checks and value conversions shared by the metric modules."""
from __future__ import annotations

import math
from typing import Any

import numpy as np


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


def _nan_to_none(a: np.ndarray) -> list[float | None]:
    return [None if not math.isfinite(float(v)) else float(v) for v in a]
