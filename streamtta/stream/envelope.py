"""Wire formats of input records: a binary tensor envelope and JSON sensor rows.

Every input record value is one :class:`~streamtta.types.Sample`. Two codecs exist and
:func:`decode_value` picks one from the first bytes of the value, so both can share a topic:

**Tensor envelope** (images, sensor windows; anything with a shape), schema version 1:

======  ======  =====================================================================================
offset  size    field
======  ======  =====================================================================================
0       4       magic ``b"STTA"``
4       1       schema version, ``uint8`` (currently ``1``)
5       4       header length ``H`` in bytes, ``uint32`` little-endian
9       ``H``   header: a UTF-8 JSON object (keys below)
9 + H   ``N``   payload: the tensor in C order, **little-endian**, ``N = prod(shape) * itemsize``
======  ======  =====================================================================================

Header keys: ``stream_id`` (str, required), ``dtype`` (str, required; one of
:data:`DEFAULT_DTYPES`), ``shape`` (list of ints, required), and the optional ``label`` (int),
``event_time`` (number, seconds), ``domain`` (str), ``is_unknown`` (bool), ``meta`` (object).
Unknown keys are rejected (a new field means a new schema version).

**JSON row** (tabular sensor rows), recognised by a first non-blank byte ``{``::

    {"stream_id": "s1", "features": [0.1, 2.0, 3.5], "label": 2, "event_time": 1.5}
    {"stream_id": "s1", "features": {"temp": 21.5, "rpm": 900.0}}

``features`` is a list (kept in order) or an object; object rows are ordered by
:attr:`DecodeLimits.feature_names` when given (missing names are an error, extra names are ignored),
else by sorted key. Optional keys as in the envelope header, plus ``schema_version`` (default 1).

Decoding validates everything a poison record could break (magic, schema version, dtype, shape vs byte
count, expected shape, size limit, NaN/Inf) and raises :class:`DecodeError` (a ``ValueError``) whose
message names the problem; the engine sends such records to the dead-letter topic.

>>> import numpy as np
>>> value = encode_tensor(np.ones((1, 4, 4), np.float32), "cam-1", label=3, domain="clean")
>>> value[:4], value[4]
(b'STTA', 1)
>>> s = decode_value(value, DecodeLimits(expected_shape=(1, 4, 4)))
>>> s.stream_id, s.x.shape, s.x.dtype.name, s.label, s.domain
('cam-1', (1, 4, 4), 'float32', 3, 'clean')
>>> decode_value(encode_json_row([1.0, 2.5], "sensor-7")).x.tolist()
[1.0, 2.5]
>>> decode_value(b"not a record")
Traceback (most recent call last):
...
streamtta.stream.envelope.DecodeError: unknown record format: value starts with b'not a re' (expected the b'STTA' tensor envelope or a JSON row starting with '{')
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from streamtta.stream import _json
from streamtta.types import Sample

__all__ = [
    "MAGIC",
    "SCHEMA_VERSION",
    "DEFAULT_DTYPES",
    "DecodeError",
    "DecodeLimits",
    "encode_tensor",
    "encode_json_row",
    "encode_sample",
    "decode_value",
]

#: First four bytes of every tensor envelope.
MAGIC = b"STTA"
#: Schema version written by :func:`encode_tensor` / :func:`encode_json_row`.
SCHEMA_VERSION = 1
#: dtypes accepted by default (names as numpy spells them).
DEFAULT_DTYPES: frozenset[str] = frozenset(
    {"float16", "float32", "float64", "uint8", "int8", "int16", "int32", "int64"}
)

_PREFIX = struct.Struct("<4sBI")  # magic, version, header length
_MiB = 1024 * 1024
_HEADER_KEYS = frozenset({"stream_id", "dtype", "shape", "label", "event_time", "domain", "is_unknown", "meta"})
_ROW_KEYS = frozenset({"stream_id", "features", "label", "event_time", "domain", "is_unknown", "meta",
                       "schema_version"})
_MAX_NDIM = 8


class DecodeError(ValueError):
    """A record value could not be decoded or failed validation; the message names the problem."""


@dataclass(frozen=True)
class DecodeLimits:
    """What :func:`decode_value` accepts.

    Parameters
    ----------
    max_bytes
        Largest accepted record value (whole value, header included). Default 16 MiB.
    allowed_dtypes
        Payload dtypes accepted (numpy names). Everything is returned as float32.
    expected_shape
        Required shape of ``x`` (``None`` = any). ``None`` entries are wildcards:
        ``(None, 8)`` accepts any ``(T, 8)`` window.
    allow_nonfinite
        Accept NaN/Inf values (default False: such records are dead-lettered).
    schema_versions
        Envelope / row schema versions this reader understands.
    feature_names
        Feature order for JSON rows whose ``features`` is an object.
    max_header_bytes
        Largest accepted envelope header.

    >>> DecodeLimits(expected_shape=[1, 32, 32]).expected_shape
    (1, 32, 32)
    >>> DecodeLimits(allowed_dtypes={"complex64"})
    Traceback (most recent call last):
    ...
    ValueError: DecodeLimits.allowed_dtypes: unsupported dtype(s) ['complex64']; supported: ['float16', 'float32', 'float64', 'int16', 'int32', 'int64', 'int8', 'uint8']
    """

    max_bytes: int = 16 * _MiB
    allowed_dtypes: frozenset[str] = DEFAULT_DTYPES
    expected_shape: tuple[int | None, ...] | None = None
    allow_nonfinite: bool = False
    schema_versions: frozenset[int] = frozenset({SCHEMA_VERSION})
    feature_names: tuple[str, ...] | None = None
    max_header_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        if not isinstance(self.max_bytes, int) or self.max_bytes <= 0:
            raise ValueError(f"DecodeLimits.max_bytes must be a positive int, got {self.max_bytes!r}")
        if not isinstance(self.max_header_bytes, int) or self.max_header_bytes <= 0:
            raise ValueError(f"DecodeLimits.max_header_bytes must be a positive int, got {self.max_header_bytes!r}")
        dtypes = frozenset(str(d) for d in self.allowed_dtypes)
        bad = sorted(dtypes - DEFAULT_DTYPES)
        if bad or not dtypes:
            raise ValueError(f"DecodeLimits.allowed_dtypes: unsupported dtype(s) {bad}; "
                             f"supported: {sorted(DEFAULT_DTYPES)}")
        object.__setattr__(self, "allowed_dtypes", dtypes)
        if self.expected_shape is not None:
            shape = tuple(self.expected_shape)
            for d in shape:
                if d is not None and (isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1):
                    raise ValueError(f"DecodeLimits.expected_shape entries must be positive ints or None, "
                                     f"got {self.expected_shape!r}")
            object.__setattr__(self, "expected_shape", tuple(None if d is None else int(d) for d in shape))
        versions = frozenset(int(v) for v in self.schema_versions)
        if not versions:
            raise ValueError("DecodeLimits.schema_versions must not be empty")
        object.__setattr__(self, "schema_versions", versions)
        if self.feature_names is not None:
            names = tuple(self.feature_names)
            if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
                raise ValueError(f"DecodeLimits.feature_names must be distinct non-empty strings, "
                                 f"got {self.feature_names!r}")
            object.__setattr__(self, "feature_names", names)


_DEFAULT_LIMITS = DecodeLimits()


# ---------------------------------------------------------------------------------------------
# encoding
# ---------------------------------------------------------------------------------------------
def _optional_fields(stream_id: str, label: Any, event_time: Any, domain: Any, is_unknown: Any,
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
    if arr.ndim > _MAX_NDIM:
        raise ValueError(f"cannot encode a {arr.ndim}-d tensor (at most {_MAX_NDIM} dims)")
    if arr.size == 0:
        raise ValueError(f"cannot encode an empty tensor of shape {arr.shape}")
    header = _optional_fields(stream_id, label, event_time, domain, is_unknown, meta)
    header["dtype"] = name
    header["shape"] = [int(d) for d in arr.shape]
    hbytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    payload = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
    return _PREFIX.pack(MAGIC, SCHEMA_VERSION, len(hbytes)) + hbytes + payload


def encode_json_row(features: Sequence[float] | Mapping[str, float] | np.ndarray, stream_id: str, *,
                    label: int | None = None, event_time: float | None = None, domain: str | None = None,
                    is_unknown: bool | None = None, meta: Mapping[str, Any] | None = None) -> bytes:
    """Encode one tabular row as a JSON object (format in the module docstring).

    >>> encode_json_row({"rpm": 900, "temp": 21.5}, "m-1", label=0)
    b'{"stream_id":"m-1","label":0,"features":{"rpm":900.0,"temp":21.5}}'
    """
    doc = _optional_fields(stream_id, label, event_time, domain, is_unknown, meta)
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


def encode_sample(sample: Sample, codec: str = "tensor") -> bytes:
    """Encode a :class:`~streamtta.types.Sample` with ``codec`` = ``"tensor"`` or ``"json"`` (1-D ``x`` only)."""
    kw = dict(label=sample.label, event_time=sample.event_time, domain=sample.domain,
              is_unknown=sample.is_unknown, meta=sample.meta or None)
    if codec == "tensor":
        return encode_tensor(sample.x, sample.stream_id, **kw)
    if codec == "json":
        x = np.asarray(sample.x)
        if x.ndim != 1:
            raise ValueError(f"codec 'json' encodes 1-D sensor rows; sample {sample.stream_id!r} has shape "
                             f"{x.shape} (use codec 'tensor')")
        return encode_json_row(x, sample.stream_id, **kw)
    raise ValueError(f"unknown codec {codec!r}; expected 'tensor' or 'json'")


# ---------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------
def decode_value(value: bytes | bytearray | memoryview | None, limits: DecodeLimits = _DEFAULT_LIMITS) -> Sample:
    """Decode and validate one record value into a :class:`~streamtta.types.Sample` (``x`` float32).

    Raises :class:`DecodeError` naming the problem for anything malformed or outside ``limits``.
    """
    if value is None:
        raise DecodeError("record value is empty (null/tombstone record)")
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise DecodeError(f"record value must be bytes, got {type(value).__name__}")
    value = bytes(value)
    n = len(value)
    if n == 0:
        raise DecodeError("record value is empty (0 bytes)")
    if n > limits.max_bytes:
        raise DecodeError(f"record value is {n} bytes, above the limit max_bytes={limits.max_bytes}")
    if value[:4] == MAGIC:
        return _decode_tensor(value, limits)
    if value.lstrip()[:1] == b"{":
        return _decode_json_row(value, limits)
    if MAGIC.startswith(value[:4]):
        raise DecodeError(f"truncated tensor envelope: {n} bytes, shorter than the {_PREFIX.size}-byte prefix")
    raise DecodeError(f"unknown record format: value starts with {value[:8]!r} (expected the {MAGIC!r} tensor "
                      f"envelope or a JSON row starting with '{{')")


def _decode_tensor(value: bytes, limits: DecodeLimits) -> Sample:
    n = len(value)
    if n < _PREFIX.size:
        raise DecodeError(f"truncated tensor envelope: {n} bytes, shorter than the {_PREFIX.size}-byte prefix")
    _, version, hlen = _PREFIX.unpack_from(value)
    if version not in limits.schema_versions:
        raise DecodeError(f"unsupported envelope schema version {version}; this reader supports "
                          f"{sorted(limits.schema_versions)}")
    if hlen > limits.max_header_bytes:
        raise DecodeError(f"envelope header length {hlen} exceeds max_header_bytes={limits.max_header_bytes}")
    start = _PREFIX.size
    if start + hlen > n:
        raise DecodeError(f"truncated tensor envelope: header says {hlen} header bytes but only {n - start} "
                          f"bytes follow the prefix")
    try:
        header = json.loads(value[start:start + hlen].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise DecodeError(f"envelope header is not valid UTF-8 JSON: {e}") from e
    if not isinstance(header, dict):
        raise DecodeError(f"envelope header must be a JSON object, got {type(header).__name__}")
    unknown = sorted(set(header) - _HEADER_KEYS)
    if unknown:
        raise DecodeError(f"envelope header has unknown key(s) {unknown} for schema version {version}")
    fields = _common_fields(header, "envelope header")
    sid = fields["stream_id"]

    dtype_name = header.get("dtype")
    if not isinstance(dtype_name, str):
        raise DecodeError(f"stream {sid!r}: envelope header needs a string 'dtype', got {dtype_name!r}")
    if dtype_name not in limits.allowed_dtypes:
        raise DecodeError(f"stream {sid!r}: dtype {dtype_name!r} is not allowed; allowed: "
                          f"{sorted(limits.allowed_dtypes)}")
    shape_raw = header.get("shape")
    if (not isinstance(shape_raw, list) or len(shape_raw) > _MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape_raw)):
        raise DecodeError(f"stream {sid!r}: envelope 'shape' must be a list of at most {_MAX_NDIM} non-negative "
                          f"ints, got {shape_raw!r}")
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
    _check_shape(shape, limits, sid)
    arr = np.frombuffer(value, dtype=dtype, count=count, offset=start + hlen).reshape(shape)
    with np.errstate(over="ignore"):  # float64 beyond float32 range -> inf, rejected just below
        x = arr.astype(np.float32)  # copy: writable, native byte order
    _check_finite(x, limits, sid)
    return Sample(x=x, **fields)


def _decode_json_row(value: bytes, limits: DecodeLimits) -> Sample:
    try:
        doc = json.loads(value.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise DecodeError(f"JSON row is not valid UTF-8 JSON: {e}") from e
    if not isinstance(doc, dict):
        raise DecodeError(f"JSON row must be an object, got {type(doc).__name__}")
    version = doc.get("schema_version", SCHEMA_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version not in limits.schema_versions:
        raise DecodeError(f"unsupported JSON row schema_version {version!r}; this reader supports "
                          f"{sorted(limits.schema_versions)}")
    unknown = sorted(set(doc) - _ROW_KEYS)
    if unknown:
        raise DecodeError(f"JSON row has unknown key(s) {unknown}")
    fields = _common_fields(doc, "JSON row")
    sid = fields["stream_id"]
    feats = doc.get("features")
    if isinstance(feats, dict):
        if limits.feature_names is not None:
            missing = [k for k in limits.feature_names if k not in feats]
            if missing:
                raise DecodeError(f"stream {sid!r}: JSON row lacks feature(s) {missing}")
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
        raise DecodeError(f"stream {sid!r}: features must be numbers, got {bad[:3]!r}")
    x = np.asarray(values, dtype=np.float32)
    _check_shape(x.shape, limits, sid)
    _check_finite(x, limits, sid)
    return Sample(x=x, **fields)


def _common_fields(doc: dict[str, Any], where: str) -> dict[str, Any]:
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


def _check_shape(shape: tuple[int, ...], limits: DecodeLimits, sid: str) -> None:
    exp = limits.expected_shape
    if exp is None:
        return
    if len(shape) != len(exp) or any(e is not None and e != d for d, e in zip(shape, exp)):
        want = "(" + ", ".join("*" if e is None else str(e) for e in exp) + ("," if len(exp) == 1 else "") + ")"
        raise DecodeError(f"stream {sid!r}: shape {tuple(shape)} does not match expected_shape {want}")


def _check_finite(x: np.ndarray, limits: DecodeLimits, sid: str) -> None:
    if limits.allow_nonfinite:
        return
    finite = np.isfinite(x)
    if not finite.all():
        n_nan = int(np.isnan(x).sum())
        n_inf = int(x.size - finite.sum()) - n_nan
        raise DecodeError(f"stream {sid!r}: tensor has non-finite values ({n_nan} NaN, {n_inf} Inf) and "
                          f"allow_nonfinite=False")
