"""JSON sensor rows (format in :mod:`streamtta.stream.envelope`): encoding and decoding."""
from __future__ import annotations

import json
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from streamtta.stream.envelope.bounded_json import check_strings, parse_json, short
from streamtta.stream.envelope.fields import common_fields, optional_fields
from streamtta.stream.envelope.limits import (
    SCHEMA_VERSION,
    DecodeError,
    DecodeLimits,
    check_finite,
    check_shape,
)
from streamtta.types import Sample

__all__ = ["encode_json_row", "decode_json_row"]

_ROW_KEYS = frozenset({"stream_id", "features", "label", "event_time", "domain", "is_unknown", "meta",
                       "schema_version"})


def encode_json_row(features: Sequence[float] | Mapping[str, float] | np.ndarray, stream_id: str, *,
                    label: int | None = None, event_time: float | None = None, domain: str | None = None,
                    is_unknown: bool | None = None, meta: Mapping[str, Any] | None = None) -> bytes:
    """Encode one tabular row as a JSON object (format in the module docstring).

    >>> encode_json_row({"rpm": 900, "temp": 21.5}, "m-1", label=0)
    b'{"stream_id":"m-1","label":0,"features":{"rpm":900.0,"temp":21.5}}'
    """
    doc = optional_fields(stream_id, label, event_time, domain, is_unknown, meta)
    if isinstance(features, Mapping):
        if not features:
            raise ValueError("features must not be empty")
        feats: Any = {}
        for k, v in features.items():
            if not isinstance(k, str) or not k:
                raise ValueError(f"feature names must be non-empty strings, got {k!r}")
            feats[k] = _finite_float(v, k)
    else:
        arr = np.asarray(features)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"JSON rows hold a non-empty 1-D feature vector, got shape {arr.shape}")
        feats = [_finite_float(v, i) for i, v in enumerate(arr.tolist())]
    doc["features"] = feats
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _finite_float(v: Any, where: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError) as e:
        raise ValueError(f"feature {where!r} is not a number: {v!r}") from e
    if not math.isfinite(f):
        raise ValueError(f"feature {where!r} is not finite ({f}); JSON rows carry finite numbers only")
    return f


def decode_json_row(value: bytes, limits: DecodeLimits) -> Sample:
    """Decode a JSON row value; :class:`DecodeError` naming the problem."""
    doc = parse_json(value, limits, "JSON row")
    if not isinstance(doc, dict):
        raise DecodeError(f"JSON row must be an object, got {type(doc).__name__}")
    version = doc.get("schema_version", SCHEMA_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version not in limits.schema_versions:
        raise DecodeError(f"unsupported JSON row schema_version {short(version)}; this reader supports "
                          f"{sorted(limits.schema_versions)}")
    unknown = sorted(set(doc) - _ROW_KEYS)
    if unknown:
        raise DecodeError(f"JSON row has unknown key(s) {short(unknown)}")
    feats = doc.get("features")
    check_strings(doc, limits, "JSON row", skip=("features",) if isinstance(feats, list) else ())
    fields = common_fields(doc, "JSON row", limits)
    sid = fields["stream_id"]
    if isinstance(feats, dict):
        if limits.feature_names is not None:
            missing = [k for k in limits.feature_names if k not in feats]
            if missing:
                raise DecodeError(f"stream {sid!r}: JSON row lacks feature(s) {short(missing)}")
            names: Iterable[str] = limits.feature_names
        else:
            names = sorted(feats)
        values = [feats[k] for k in names]
    elif isinstance(feats, list):
        values = feats
    else:
        raise DecodeError(f"stream {sid!r}: JSON row needs 'features' as a list or an object, got "
                          f"{type(feats).__name__}")
    if not values:
        raise DecodeError(f"stream {sid!r}: JSON row has no features")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float))]
    if bad:
        raise DecodeError(f"stream {sid!r}: features must be numbers, got {short(bad[:3])}")
    with np.errstate(over="ignore"):  # beyond the float32 range -> inf, rejected by check_finite
        x = np.asarray(values, dtype=np.float64).astype(np.float32)
    check_shape(x.shape, limits, sid)
    check_finite(x, limits, sid)
    return Sample(x=x, **fields)
