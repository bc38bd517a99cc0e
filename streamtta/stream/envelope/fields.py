r"""The sample fields both codecs carry besides the tensor: ``stream_id`` and the optional ``label``,
``event_time``, ``domain``, ``is_unknown`` and ``meta``; checked when encoding and when decoding.

A stream id is 1 to :attr:`~DecodeLimits.max_stream_id_chars` printable characters that encode to UTF-8
(it becomes a record key, a state key and part of file names); a label fits in an int64.

>>> stream_id_problem("cam-1", DEFAULT_LIMITS) is None
True
>>> stream_id_problem("bad\ud800", DEFAULT_LIMITS)
"stream_id 'bad\\ud800' is not encodable as UTF-8 (lone surrogate)"
>>> stream_id_problem("a\nb", DEFAULT_LIMITS)
"stream_id 'a\\nb' holds control characters"
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping

import numpy as np

from streamtta.stream import _json
from streamtta.stream.envelope.bounded_json import short
from streamtta.stream.envelope.limits import DEFAULT_LIMITS, DecodeError, DecodeLimits

__all__ = ["optional_fields", "common_fields", "stream_id_problem"]

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_INT64 = (-(2**63), 2**63 - 1)


def stream_id_problem(sid: Any, limits: DecodeLimits) -> str | None:
    """Why ``sid`` is not a valid stream id, or None when it is."""
    if not isinstance(sid, str) or not sid:
        return f"stream_id must be a non-empty string, got {short(sid)}"
    if len(sid) > limits.max_stream_id_chars:
        return f"stream_id is {len(sid)} chars, above max_stream_id_chars={limits.max_stream_id_chars}"
    if _SURROGATE.search(sid):
        return f"stream_id {short(sid)} is not encodable as UTF-8 (lone surrogate)"
    if _CONTROL.search(sid):
        return f"stream_id {short(sid)} holds control characters"
    return None


def optional_fields(stream_id: str, label: Any, event_time: Any, domain: Any, is_unknown: Any,
                     meta: Mapping[str, Any] | None) -> dict[str, Any]:
    problem = stream_id_problem(stream_id, DEFAULT_LIMITS)
    if problem is not None:
        raise ValueError(problem)
    out: dict[str, Any] = {"stream_id": stream_id}
    if label is not None:
        if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
            raise ValueError(f"label must be an int or None, got {label!r}")
        if not _INT64[0] <= int(label) <= _INT64[1]:
            raise ValueError(f"label {label} does not fit in an int64")
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


def common_fields(doc: dict[str, Any], where: str, limits: DecodeLimits) -> dict[str, Any]:
    """The shared fields of a parsed header / row, validated (strings were bounded by the parser)."""
    sid = doc.get("stream_id")
    problem = stream_id_problem(sid, limits)
    if problem is not None:
        raise DecodeError(f"{where}: {problem}")
    label = doc.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, int)
                              or not _INT64[0] <= label <= _INT64[1]):
        raise DecodeError(f"stream {sid!r}: 'label' must be an int64 or null, got {short(label)}")
    et = doc.get("event_time")
    if et is not None:
        if isinstance(et, bool) or not isinstance(et, (int, float)) or not math.isfinite(et):
            raise DecodeError(f"stream {sid!r}: 'event_time' must be a finite number or null, got {short(et)}")
        et = float(et)
    domain = doc.get("domain")
    if domain is not None and not isinstance(domain, str):
        raise DecodeError(f"stream {sid!r}: 'domain' must be a string or null, got {short(domain)}")
    unk = doc.get("is_unknown")
    if unk is not None and not isinstance(unk, bool):
        raise DecodeError(f"stream {sid!r}: 'is_unknown' must be a bool or null, got {short(unk)}")
    meta = doc.get("meta")
    if meta is None:
        meta = {}
    elif not isinstance(meta, dict):
        raise DecodeError(f"stream {sid!r}: 'meta' must be an object, got {type(meta).__name__}")
    return {"stream_id": sid, "label": label, "event_time": et, "domain": domain, "is_unknown": unk, "meta": meta}
