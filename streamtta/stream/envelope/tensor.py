"""The binary tensor envelope (format in :mod:`streamtta.stream.envelope`): encoding and decoding."""
from __future__ import annotations

import json
import math
import struct
from typing import Any, Mapping

import numpy as np

from streamtta.stream.envelope.bounded_json import check_strings, parse_json, short
from streamtta.stream.envelope.fields import common_fields, optional_fields
from streamtta.stream.envelope.limits import (
    DEFAULT_DTYPES,
    MAX_NDIM,
    SCHEMA_VERSION,
    DecodeError,
    DecodeLimits,
    check_finite,
    check_shape,
)
from streamtta.types import Sample

__all__ = ["MAGIC", "PREFIX", "encode_tensor", "decode_tensor"]

#: First four bytes of every tensor envelope.
MAGIC = b"STTA"
#: magic, schema version, header length.
PREFIX = struct.Struct("<4sBI")
_HEADER_KEYS = frozenset({"stream_id", "dtype", "shape", "label", "event_time", "domain", "is_unknown", "meta"})


def encode_tensor(x: Any, stream_id: str, *, label: int | None = None, event_time: float | None = None,
                  domain: str | None = None, is_unknown: bool | None = None,
                  meta: Mapping[str, Any] | None = None) -> bytes:
    """Encode one tensor sample as a binary envelope (format in the module docstring).

    ``x`` keeps its dtype on the wire (e.g. ``uint8`` images stay 1 byte per value); it must be one of
    :data:`DEFAULT_DTYPES`. Non-finite values are encoded as they are; rejecting them is the reader's job.
    """
    arr = np.asarray(x)
    name = arr.dtype.name
    if name not in DEFAULT_DTYPES:
        raise ValueError(f"cannot encode dtype {name!r}; supported: {sorted(DEFAULT_DTYPES)}")
    if not 1 <= arr.ndim <= MAX_NDIM:
        raise ValueError(f"cannot encode a {arr.ndim}-d tensor (1 to {MAX_NDIM} dims)")
    if arr.size == 0:
        raise ValueError(f"cannot encode an empty tensor of shape {arr.shape}")
    header = optional_fields(stream_id, label, event_time, domain, is_unknown, meta)
    header["dtype"] = name
    header["shape"] = [int(d) for d in arr.shape]
    hbytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    payload = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
    return PREFIX.pack(MAGIC, SCHEMA_VERSION, len(hbytes)) + hbytes + payload


def decode_tensor(value: bytes, limits: DecodeLimits) -> Sample:
    """Decode a value starting with :data:`MAGIC`; :class:`DecodeError` naming the problem."""
    n = len(value)
    if n < PREFIX.size:
        raise DecodeError(f"truncated tensor envelope: {n} bytes, shorter than the {PREFIX.size}-byte prefix")
    _, version, hlen = PREFIX.unpack_from(value)
    if version not in limits.schema_versions:
        raise DecodeError(f"unsupported envelope schema version {version}; this reader supports "
                          f"{sorted(limits.schema_versions)}")
    if hlen > limits.max_header_bytes:
        raise DecodeError(f"envelope header length {hlen} exceeds max_header_bytes={limits.max_header_bytes}")
    start = PREFIX.size
    if start + hlen > n:
        raise DecodeError(f"truncated tensor envelope: header says {hlen} header bytes but only {n - start} "
                          f"bytes follow the prefix")
    header = parse_json(value[start:start + hlen], limits, "envelope header")
    if not isinstance(header, dict):
        raise DecodeError(f"envelope header must be a JSON object, got {type(header).__name__}")
    unknown = sorted(set(header) - _HEADER_KEYS)
    if unknown:
        raise DecodeError(f"envelope header has unknown key(s) {short(unknown)} for schema version {version}")
    check_strings(header, limits, "envelope header")
    fields = common_fields(header, "envelope header", limits)
    sid = fields["stream_id"]

    dtype_name = header.get("dtype")
    if not isinstance(dtype_name, str):
        raise DecodeError(f"stream {sid!r}: envelope header needs a string 'dtype', got {short(dtype_name)}")
    if dtype_name not in limits.allowed_dtypes:
        raise DecodeError(f"stream {sid!r}: dtype {short(dtype_name)} is not allowed; allowed: "
                          f"{sorted(limits.allowed_dtypes)}")
    shape_raw = header.get("shape")
    if (not isinstance(shape_raw, list) or not 1 <= len(shape_raw) <= MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape_raw)):
        raise DecodeError(f"stream {sid!r}: envelope 'shape' must be a list of 1 to {MAX_NDIM} non-negative "
                          f"ints, got {short(shape_raw)}")
    shape = tuple(shape_raw)
    count = math.prod(shape)
    if count == 0:
        raise DecodeError(f"stream {sid!r}: tensor of shape {shape} has no elements")
    dtype = np.dtype(dtype_name).newbyteorder("<")
    expected_bytes = count * dtype.itemsize
    payload_len = n - start - hlen
    if payload_len != expected_bytes:
        raise DecodeError(f"stream {sid!r}: payload is {payload_len} bytes but shape {shape} x {dtype_name} "
                          f"needs {expected_bytes} bytes")
    check_shape(shape, limits, sid)
    arr = np.frombuffer(value, dtype=dtype, count=count, offset=start + hlen).reshape(shape)
    with np.errstate(over="ignore"):  # float64 beyond float32 range -> inf, rejected just below
        x = arr.astype(np.float32)  # copy: writable, native byte order
    check_finite(x, limits, sid)
    return Sample(x=x, **fields)
