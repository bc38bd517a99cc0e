"""JSON encoding shared by the sinks and codecs: numpy scalars/arrays, enums, paths and pydantic models
become plain JSON values; anything else is a :class:`TypeError` that names the offending type."""
from __future__ import annotations

import enum
import json
import math
from pathlib import PurePath
from typing import Any

import numpy as np


def json_default(obj: Any) -> Any:
    """``default=`` hook for :func:`json.dumps`."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    dump = getattr(obj, "model_dump", None)  # pydantic v2 models
    if callable(dump):
        return dump(mode="json")
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def dumps(value: Any) -> str:
    """Compact JSON text; NaN/Inf floats are written as ``null`` (strict JSON has no NaN)."""
    return json.dumps(_finite(value), default=json_default, separators=(",", ":"), allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.ndarray):
        return _finite(value.tolist())
    if isinstance(value, np.floating):
        f = float(value)
        return f if math.isfinite(f) else None
    return value
