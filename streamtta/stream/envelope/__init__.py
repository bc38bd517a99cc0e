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
count, expected shape, size limit, NaN/Inf) and is bounded in what it parses: JSON nesting depth (checked
before parsing), integer digits, float range, string lengths, ``meta`` size, UTF-8 everywhere, and a stream
id of 1 to 256 printable characters (limits and defaults on :class:`DecodeLimits`). Every failure raises
:class:`DecodeError` (a ``ValueError``) whose message names the problem -- never ``RecursionError``,
``OverflowError`` or ``UnicodeError``; the engine sends such records to the dead-letter topic.

The package is split by concept; everything is importable from here:

* :mod:`~streamtta.stream.envelope.tensor` -- the binary tensor envelope;
* :mod:`~streamtta.stream.envelope.rows` -- JSON rows;
* :mod:`~streamtta.stream.envelope.fields` -- the sample fields both formats share;
* :mod:`~streamtta.stream.envelope.limits` -- :class:`DecodeLimits`, :class:`DecodeError` and the shared checks;
* :mod:`~streamtta.stream.envelope.bounded_json` -- JSON parsing within the limits (depth, numbers, strings).

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
streamtta.stream.envelope.limits.DecodeError: unknown record format: value starts with b'not a re' (expected the b'STTA' tensor envelope or a JSON row starting with '{')
"""
from __future__ import annotations

import numpy as np

from streamtta.stream.envelope.limits import (
    DEFAULT_DTYPES,
    DEFAULT_LIMITS,
    SCHEMA_VERSION,
    DecodeError,
    DecodeLimits,
)
from streamtta.stream.envelope.rows import decode_json_row, encode_json_row
from streamtta.stream.envelope.tensor import MAGIC, PREFIX, decode_tensor, encode_tensor
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


def decode_value(value: bytes | bytearray | memoryview | None, limits: DecodeLimits = DEFAULT_LIMITS) -> Sample:
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
        return decode_tensor(value, limits)
    if value.lstrip()[:1] == b"{":
        return decode_json_row(value, limits)
    if MAGIC.startswith(value[:4]):
        raise DecodeError(f"truncated tensor envelope: {n} bytes, shorter than the {PREFIX.size}-byte prefix")
    raise DecodeError(f"unknown record format: value starts with {value[:8]!r} (expected the {MAGIC!r} tensor "
                      f"envelope or a JSON row starting with '{{')")
