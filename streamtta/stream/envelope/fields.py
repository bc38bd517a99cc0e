"""The sample fields both codecs carry besides the tensor: ``stream_id`` and the optional ``label``,
``event_time``, ``domain``, ``is_unknown`` and ``meta``; checked when encoding and when decoding."""
from __future__ import annotations

import json
import math
from typing import Any, Mapping

import numpy as np

from streamtta.stream import _json
from streamtta.stream.envelope.limits import DecodeError

__all__ = ["optional_fields", "common_fields"]


def optional_fields(stream_id: str, label: Any, event_time: Any, domain: Any, is_unknown: Any,
                     meta: Mapping[str, Any] | None) -> dict[str, Any]:
    if not isinstance(stream_id, str) or not stream_id:
        raise ValueError(f"stream_id must be a non-empty str, got {stream_id!r}")
    out: dict[str, Any] = {"stream_id": stream_id}
    if label is not None:
        if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
            raise ValueError(f"label must be an int or None, got {label!r}")
        out["label"] = int(label)
    if event_time is not None:
        t = float(event_time)
        if not math.isfinite(t):
            raise ValueError(f"event_time must be finite, got {event_time!r}")
        out["event_time"] = t
    if domain is not None:
        if not isinstance(domain, str):
            raise ValueError(f"domain must be a str or None, got {domain!r}")
        out["domain"] = domain
    if is_unknown is not None:
        if not isinstance(is_unknown, (bool, np.bool_)):
            raise ValueError(f"is_unknown must be a bool or None, got {is_unknown!r}")
        out["is_unknown"] = bool(is_unknown)
    if meta:
        if not isinstance(meta, Mapping):
            raise ValueError(f"meta must be a mapping, got {type(meta).__name__}")
        try:
            out["meta"] = json.loads(_json.dumps(dict(meta)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"meta is not JSON serialisable: {e}") from e
    return out


def common_fields(doc: dict[str, Any], where: str) -> dict[str, Any]:
    sid = doc.get("stream_id")
    if not isinstance(sid, str) or not sid:
        raise DecodeError(f"{where} needs a non-empty string 'stream_id', got {sid!r}")
    label = doc.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
        raise DecodeError(f"stream {sid!r}: 'label' must be an int or null, got {label!r}")
    et = doc.get("event_time")
    if et is not None:
        if isinstance(et, bool) or not isinstance(et, (int, float)) or not math.isfinite(et):
            raise DecodeError(f"stream {sid!r}: 'event_time' must be a finite number or null, got {et!r}")
        et = float(et)
    domain = doc.get("domain")
    if domain is not None and not isinstance(domain, str):
        raise DecodeError(f"stream {sid!r}: 'domain' must be a string or null, got {domain!r}")
    unk = doc.get("is_unknown")
    if unk is not None and not isinstance(unk, bool):
        raise DecodeError(f"stream {sid!r}: 'is_unknown' must be a bool or null, got {unk!r}")
    meta = doc.get("meta")
    if meta is None:
        meta = {}
    elif not isinstance(meta, dict):
        raise DecodeError(f"stream {sid!r}: 'meta' must be an object, got {type(meta).__name__}")
    return {"stream_id": sid, "label": label, "event_time": et, "domain": domain, "is_unknown": unk, "meta": meta}
