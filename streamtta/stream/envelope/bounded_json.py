"""Bounded JSON parsing for both codecs (the envelope header and JSON rows).

:func:`parse_json` turns UTF-8 bytes into a Python value without letting a record exhaust the stack or the
memory: the nesting depth is measured before parsing (in C-speed passes: strings are blanked, brackets
counted), integers longer than :attr:`DecodeLimits.max_int_digits` digits and floats beyond the float64
range are rejected while parsing, the JSON constants ``NaN`` / ``Infinity`` are rejected, and
:func:`check_strings` bounds the strings of a parsed document (length, UTF-8 encodability).
Every failure is a :class:`DecodeError` that names the problem.

>>> from streamtta.stream.envelope.limits import DecodeLimits
>>> parse_json(b'{"a": [1, 2.5, "x"]}', DecodeLimits(), "row")
{'a': [1, 2.5, 'x']}
>>> parse_json(b"[" * 100 + b"]" * 100, DecodeLimits(max_depth=32), "row")
Traceback (most recent call last):
...
streamtta.stream.envelope.limits.DecodeError: row: JSON nesting depth 100 exceeds max_depth=32
>>> parse_json(b'{"label": 1' + b"0" * 400 + b"}", DecodeLimits(), "row")
Traceback (most recent call last):
...
streamtta.stream.envelope.limits.DecodeError: row: integer with 401 digits exceeds max_int_digits=20
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Iterable

import numpy as np

from streamtta.stream.envelope.limits import DecodeError, DecodeLimits

__all__ = ["parse_json", "check_strings", "short"]

# a complete JSON string literal (escapes included); used to blank strings before counting brackets
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_SURROGATE = re.compile("[\ud800-\udfff]")
_OPEN = np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


def short(value: Any, n: int = 60) -> str:
    """``repr(value)`` cut to ``n`` characters (error messages never echo a huge value)."""
    r = repr(value)
    return r if len(r) <= n else f"{r[:n]}...({len(r)} chars)"


def json_depth(data: bytes) -> int:
    """Deepest bracket nesting of ``data`` outside string literals (an upper bound for malformed JSON)."""
    if b'"' in data:
        data = _STRING.sub(b'""', data)
    steps = _OPEN[np.frombuffer(data, np.uint8)]
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0))


def parse_json(data: bytes, limits: DecodeLimits, what: str) -> Any:
    """Parse UTF-8 JSON ``data`` within ``limits``; :class:`DecodeError` prefixed with ``what``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DecodeError(f"{what} is not valid UTF-8: {e}") from e
    if data.count(b"[") + data.count(b"{") > limits.max_depth:  # cheap test first: few brackets, shallow
        depth = json_depth(data)
        if depth > limits.max_depth:
            raise DecodeError(f"{what}: JSON nesting depth {depth} exceeds max_depth={limits.max_depth}")

    def parse_int(s: str) -> int:
        digits = len(s) - (s[0] == "-")
        if digits > limits.max_int_digits:
            raise DecodeError(f"{what}: integer with {digits} digits exceeds max_int_digits={limits.max_int_digits}")
        return int(s)

    def parse_float(s: str) -> float:
        f = float(s)
        if not math.isfinite(f):
            raise DecodeError(f"{what}: number {short(s, 40)} is out of the float64 range")
        return f

    def parse_constant(s: str) -> Any:
        raise DecodeError(f"{what}: JSON constant {s} is not allowed (numbers must be finite)")

    try:
        return json.loads(text, parse_int=parse_int, parse_float=parse_float, parse_constant=parse_constant)
    except DecodeError:
        raise
    except RecursionError as e:  # not reached below max_depth; kept as a last line of defence
        raise DecodeError(f"{what}: JSON nesting too deep to parse") from e
    except ValueError as e:
        raise DecodeError(f"{what} is not valid JSON: {e}") from e


def check_strings(doc: dict[str, Any], limits: DecodeLimits, what: str, skip: Iterable[str] = ()) -> None:
    """Every string of the object ``doc`` (nested keys included; values under the top-level keys in ``skip`` are
    not visited) is at most ``limits.max_string_chars`` long and encodes to UTF-8 (no lone surrogate), and
    ``meta`` holds at most ``limits.max_meta_items`` JSON values (keys included)."""
    for key, value in doc.items():  # the top-level keys were checked against the schema's keys
        if key in skip:
            continue
        budget = limits.max_meta_items if key == "meta" else None
        stack, seen = [(value, key)], 0
        while stack:
            v, path = stack.pop()
            if isinstance(v, str):
                _check_str(v, path, limits, what)
                continue
            if isinstance(v, (dict, list)):
                seen += len(v) * (2 if isinstance(v, dict) else 1)
                if budget is not None and seen > budget:
                    raise DecodeError(f"{what}: 'meta' holds more than max_meta_items={budget} values")
            if isinstance(v, dict):
                for k, item in v.items():
                    _check_str(k, f"a key of {path}", limits, what)
                    stack.append((item, f"{path}.{short(k, 20)}"))
            elif isinstance(v, list):
                stack.extend((item, f"{path}[{i}]") for i, item in enumerate(v))


def _check_str(s: str, path: str, limits: DecodeLimits, what: str) -> None:
    if len(s) > limits.max_string_chars:
        raise DecodeError(f"{what}: string at {path} is {len(s)} chars, above "
                          f"max_string_chars={limits.max_string_chars}")
    if _SURROGATE.search(s):
        raise DecodeError(f"{what}: string at {path} ({short(s)}) holds a lone surrogate, not encodable as UTF-8")
