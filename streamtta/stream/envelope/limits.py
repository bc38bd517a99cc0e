"""What a reader accepts: :class:`DecodeLimits`, the :class:`DecodeError` it raises, and the shape and
finiteness checks shared by both codecs."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SCHEMA_VERSION", "DEFAULT_DTYPES", "MAX_NDIM", "DecodeError", "DecodeLimits", "DEFAULT_LIMITS"]

#: Schema version written by :func:`~streamtta.stream.envelope.encode_tensor` / ``encode_json_row``.
SCHEMA_VERSION = 1
#: dtypes accepted by default (names as numpy spells them).
DEFAULT_DTYPES: frozenset[str] = frozenset(
    {"float16", "float32", "float64", "uint8", "int8", "int16", "int32", "int64"}
)
#: Most dimensions a tensor may have on the wire.
MAX_NDIM = 8
_MiB = 1024 * 1024


class DecodeError(ValueError):
    """A record value could not be decoded or failed validation; the message names the problem."""


@dataclass(frozen=True)
class DecodeLimits:
    """What :func:`~streamtta.stream.envelope.decode_value` accepts.

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
    max_abs
        Largest accepted magnitude of a value (default 1e15; ``None`` = any finite value). Larger finite
        values overflow the float32 sums and squares of normalisation, so such records are dead-lettered.
    schema_versions
        Envelope / row schema versions this reader understands.
    feature_names
        Feature order for JSON rows whose ``features`` is an object.
    max_header_bytes
        Largest accepted envelope header. Default 64 KiB.
    max_depth
        Deepest JSON nesting accepted in a header or a row (``{"meta": {"a": [1]}}`` is 3 deep). Default 32;
        checked before parsing, so a 200k-deep ``[[[...`` costs one pass over the bytes, never the stack.
    max_int_digits
        Longest JSON integer accepted, in digits. Default 20 (every int64 / uint64 fits); ``10**400`` is
        rejected while parsing. Floats beyond the float64 range and ``NaN`` / ``Infinity`` are rejected too.
    max_string_chars
        Longest JSON string accepted anywhere (keys, ``domain``, ``dtype``, ``meta`` values). Default 1024.
    max_stream_id_chars
        Longest ``stream_id``. Default 256: a stream id may name a state, a checkpoint or a record key.
        A stream id must also be printable (no control characters) and encode to UTF-8.
    max_meta_items
        Most JSON values (keys included, at any depth) in ``meta``. Default 256.

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
    max_abs: float | None = 1e15
    schema_versions: frozenset[int] = frozenset({SCHEMA_VERSION})
    feature_names: tuple[str, ...] | None = None
    max_header_bytes: int = 64 * 1024
    max_depth: int = 32
    max_int_digits: int = 20
    max_string_chars: int = 1024
    max_stream_id_chars: int = 256
    max_meta_items: int = 256

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_header_bytes", "max_depth", "max_int_digits", "max_string_chars",
                     "max_stream_id_chars", "max_meta_items"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"DecodeLimits.{name} must be a positive int, got {v!r}")
        if self.max_abs is not None and not (isinstance(self.max_abs, (int, float)) and self.max_abs > 0):
            raise ValueError(f"DecodeLimits.max_abs must be a positive number or None, got {self.max_abs!r}")
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


#: The limits :func:`~streamtta.stream.envelope.decode_value` uses when given none.
DEFAULT_LIMITS = DecodeLimits()


def check_shape(shape: tuple[int, ...], limits: DecodeLimits, sid: str) -> None:
    exp = limits.expected_shape
    if exp is None:
        return
    if len(shape) != len(exp) or any(e is not None and e != d for d, e in zip(shape, exp)):
        want = "(" + ", ".join("*" if e is None else str(e) for e in exp) + ("," if len(exp) == 1 else "") + ")"
        raise DecodeError(f"stream {sid!r}: shape {tuple(shape)} does not match expected_shape {want}")


def check_finite(x: np.ndarray, limits: DecodeLimits, sid: str) -> None:
    """Finite values within ``max_abs`` (NaN/Inf allowed only with ``allow_nonfinite``)."""
    finite = np.isfinite(x)
    if limits.max_abs is not None and x.size:
        with np.errstate(invalid="ignore"):
            big = finite & (np.abs(x) > limits.max_abs)
        if big.any():
            raise DecodeError(f"stream {sid!r}: {int(big.sum())} value(s) beyond max_abs={limits.max_abs:g} "
                              f"(largest {float(np.abs(x[big]).max()):.3g}); such values overflow float32 statistics")
    if limits.allow_nonfinite or finite.all():
        return
    n_nan = int(np.isnan(x).sum())
    n_inf = int(x.size - finite.sum()) - n_nan
    raise DecodeError(f"stream {sid!r}: tensor has non-finite values ({n_nan} NaN, {n_inf} Inf) and "
                      f"allow_nonfinite=False (values beyond the float32 range become Inf)")
