"""The poison corpus: every kind of bad input record we know of, each with the :class:`DecodeError` message
it must be dead-lettered with.

:func:`build_corpus` returns :class:`Poison` entries ``(kind, value, headers, match)``: ``value`` is the
record value (``None`` = a tombstone), ``headers`` the Kafka headers it travels with, and ``match`` a
regular expression the decode error must match. The records are built by hand (not with the encoders,
which refuse to write most of them) for a model with ``n_features`` inputs; ``expected_shape`` is the
model's ``(n_features,)``.
"""
from __future__ import annotations

import json
import struct
from typing import Any, NamedTuple

import numpy as np

MAGIC = b"STTA"


class Poison(NamedTuple):
    kind: str
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    match: str


def envelope(header: dict[str, Any] | bytes, payload: bytes, *, version: int = 1, hlen: int | None = None,
             magic: bytes = MAGIC) -> bytes:
    """A tensor envelope with any header (a dict is written as JSON) and any header-length field."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<4sBI", magic, version, len(h) if hlen is None else hlen) + h + payload


def row(doc: dict[str, Any] | str) -> bytes:
    """A JSON row; a str is used verbatim (for JSON the encoder cannot write)."""
    return (doc if isinstance(doc, str) else json.dumps(doc)).encode("utf-8", "surrogatepass")


def build_corpus(n_features: int = 18) -> list[Poison]:
    """Every poison kind (>= 30), for a model with ``n_features`` inputs."""
    f32 = np.linspace(-1.0, 1.0, n_features, dtype=np.float32)
    payload = f32.tobytes()
    feats = [float(v) for v in f32]
    hdr = {"stream_id": "p", "dtype": "float32", "shape": [n_features]}

    def env(**changes: Any) -> bytes:
        h = {**hdr, **changes}
        return envelope({k: v for k, v in h.items() if v is not None}, payload)

    def rw(**changes: Any) -> bytes:
        return row({"stream_id": "p", "features": feats, **changes})

    nan = f32.copy()
    nan[3] = np.nan
    inf = f32.copy()
    inf[0] = -np.inf
    good_env = env()
    deep = 200_000
    shape_msg = r"does not match expected_shape"
    entries = [
        # the poison pills
        ("wrong_dim_tensor", envelope({**hdr, "shape": [5]}, payload[:20]), shape_msg),
        ("wrong_dim_row", row({"stream_id": "p", "features": feats[:5]}), shape_msg),
        ("wrong_ndim_tensor", envelope({**hdr, "shape": [1, n_features]}, payload), shape_msg),
        ("oversized_garbage_1_5MB", np.random.default_rng(0).bytes(1_500_000).replace(b"{", b"x").replace(b"S", b"s"),
         r"unknown record format"),
        ("oversized_json_1_2MB", b'{"stream_id": "p", "features": [' + b"1, " * 400_000 + b"]}",
         r"JSON row is not valid JSON"),
        ("json_nested_200k_row", b'{"stream_id": "p", "features": ' + b"[" * deep + b"]" * deep + b"}",
         rf"JSON row: JSON nesting depth {deep + 1} exceeds max_depth=32"),
        ("json_nested_header", envelope(b'{"stream_id": "p", "meta": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
                                        payload), r"envelope header: JSON nesting depth 30001 exceeds max_depth"),
        ("int_10_400_feature", row('{"stream_id": "p", "features": [1, ' + "1" + "0" * 400 + "]}"),
         r"integer with 401 digits exceeds max_int_digits=20"),
        ("int_10_400_label", row('{"stream_id": "p", "features": %s, "label": 1%s}' % (json.dumps(feats), "0" * 400)),
         r"integer with 401 digits exceeds max_int_digits"),
        ("stream_id_100k_chars_row", rw(stream_id="s" * 100_000), r"string at stream_id is 100000 chars"),
        ("stream_id_100k_chars_tensor", env(stream_id="s" * 100_000), r"exceeds max_header_bytes"),
        ("stream_id_300_chars", env(stream_id="s" * 300), r"stream_id is 300 chars, above max_stream_id_chars=256"),
        ("stream_id_lone_surrogate_row", row('{"stream_id": "bad\\ud800", "features": %s}' % json.dumps(feats)),
         r"lone surrogate"),
        ("stream_id_lone_surrogate_tensor", envelope(b'{"stream_id": "bad\\udc00", "dtype": "float32", "shape": [%d]}'
                                                     % n_features, payload), r"lone surrogate"),
        ("stream_id_control_chars", rw(stream_id="a\x00b\nc"), r"stream_id 'a\\x00b\\nc' holds control characters"),
        ("stream_id_empty", env(stream_id=""), r"stream_id must be a non-empty string"),
        ("stream_id_not_string", rw(stream_id=7), r"stream_id must be a non-empty string, got 7"),
        # non-finite values
        ("nan_tensor", envelope(hdr, nan.tobytes()), r"non-finite values \(1 NaN, 0 Inf\)"),
        ("inf_tensor", envelope(hdr, inf.tobytes()), r"non-finite values \(0 NaN, 1 Inf\)"),
        ("float64_beyond_float32", envelope({**hdr, "dtype": "float64"}, np.full(n_features, 1e300).tobytes()),
         r"non-finite values \(0 NaN, %d Inf\)" % n_features),
        ("nan_row", row('{"stream_id": "p", "features": [NaN, 1.0]}'), r"JSON constant NaN is not allowed"),
        ("inf_row", row('{"stream_id": "p", "features": [-Infinity]}'), r"JSON constant -Infinity is not allowed"),
        ("float_1e400_row", row('{"stream_id": "p", "features": [1e400]}'),
         r"number '1e400' is out of the float64 range"),
        ("float_1e300_row", rw(features=[1e300] * n_features), r"non-finite values \(0 NaN, %d Inf\)" % n_features),
        # finite but huge: float32 sums and squares of normalisation would overflow (a whole batch's outputs)
        ("float_3e38_row", rw(features=[3e38] * n_features), r"beyond max_abs=1e\+15"),
        ("float_1e20_row", rw(features=[1e20] * n_features), r"beyond max_abs=1e\+15"),
        ("int64_2_62_tensor", envelope({**hdr, "dtype": "int64"}, np.full(n_features, 2**62, "<i8").tobytes()),
         r"beyond max_abs=1e\+15"),
        # empty and unrecognisable values
        ("empty_value", b"", r"record value is empty \(0 bytes\)"),
        ("tombstone", None, r"null/tombstone"),
        ("whitespace_only", b"   \n", r"unknown record format"),
        ("plain_text", b"hello world", r"unknown record format"),
        # dtype and shape
        ("dtype_complex64", env(dtype="complex64"), r"dtype 'complex64' is not allowed"),
        ("dtype_unknown", env(dtype="bfloat17"), r"dtype 'bfloat17' is not allowed"),
        ("dtype_not_string", env(dtype=4), r"needs a string 'dtype', got 4"),
        ("dtype_big_endian", env(dtype=">f4"), r"dtype '>f4' is not allowed"),
        ("shape_bomb_product_overflow", env(shape=[2**62, 2**62, 2**62]), r"needs \d{50,} bytes"),
        ("shape_bomb_8_dims", env(shape=[10**19] * 8), r"payload is \d+ bytes but shape"),
        ("shape_bomb_digits", env(shape=[10**30]), r"integer with 31 digits"),
        ("shape_negative_dim", env(shape=[-n_features]), r"'shape' must be a list of 1 to 8 non-negative ints"),
        ("shape_bool_dim", env(shape=[True] * n_features), r"'shape' must be a list of 1 to 8"),
        ("shape_zero_dim", env(shape=[0, n_features]), r"has no elements"),
        ("shape_scalar", env(shape=[]), r"'shape' must be a list of 1 to 8"),
        ("shape_9_dims", env(shape=[1] * 8 + [n_features]), r"'shape' must be a list of 1 to 8"),
        ("shape_not_list", env(shape=str(n_features)), r"'shape' must be a list"),
        # schema versions
        ("schema_version_tensor", envelope(hdr, payload, version=9), r"unsupported envelope schema version 9"),
        ("schema_version_row", rw(schema_version=2), r"unsupported JSON row schema_version 2"),
        ("schema_version_row_bool", rw(schema_version=True), r"unsupported JSON row schema_version True"),
        # encodings
        ("non_utf8_header", envelope(b'{"stream_id": "\xff\xfe"}', payload), r"envelope header is not valid UTF-8"),
        ("non_utf8_row", b'{"stream_id": "p\xc3\x28", "features": [1]}', r"JSON row is not valid UTF-8"),
        # truncation and length lies
        ("truncated_prefix", MAGIC[:3], r"truncated tensor envelope: 3 bytes"),
        ("truncated_after_magic", MAGIC + b"\x01\x10", r"truncated tensor envelope: 6 bytes"),
        ("truncated_payload", good_env[:-4], r"payload is %d bytes but shape" % (4 * n_features - 4)),
        ("payload_too_long", good_env + b"\0" * 4, r"payload is %d bytes but shape" % (4 * n_features + 4)),
        ("header_length_beyond_value", envelope(hdr, payload, hlen=60_000), r"header says 60000 header bytes"),
        ("header_length_short", envelope(hdr, payload, hlen=10), r"envelope header is not valid JSON"),
        ("header_length_4GiB", envelope(hdr, payload, hlen=2**32 - 1),
         r"header length 4294967295 exceeds max_header_bytes"),
        ("header_not_object", envelope(b"[1, 2]", payload), r"header must be a JSON object, got list"),
        ("trailing_garbage_row", rw() + b" }{", r"JSON row is not valid JSON"),
        # field types and unknown keys
        ("unknown_header_key", env(lable=3), r"unknown key\(s\) \['lable'\]"),
        ("unknown_row_key", rw(colour="red"), r"unknown key\(s\) \['colour'\]"),
        ("label_string", env(label="3"), r"'label' must be an int64 or null, got '3'"),
        ("label_float", rw(label=2.5), r"'label' must be an int64 or null, got 2.5"),
        ("label_beyond_int64", rw(label=10**19), r"'label' must be an int64 or null"),
        ("event_time_string", rw(event_time="noon"), r"'event_time' must be a finite number"),
        ("is_unknown_string", env(is_unknown="no"), r"'is_unknown' must be a bool"),
        ("domain_object", rw(domain={"a": 1}), r"'domain' must be a string"),
        ("bool_features", rw(features=[True] * n_features), r"features must be numbers"),
        ("string_features", rw(features=["1.0"] * n_features), r"features must be numbers"),
        ("nested_features", rw(features=[[1.0]] * n_features), r"features must be numbers"),
        ("empty_features", rw(features=[]), r"has no features"),
        ("features_missing", row({"stream_id": "p"}), r"'features' as a list or an object"),
        # meta
        ("huge_meta", env(meta={f"k{i}": i for i in range(1000)}), r"'meta' holds more than max_meta_items=256"),
        ("deep_meta", rw(meta=json.loads("[" * 100 + "]" * 100)), r"nesting depth 101 exceeds max_depth"),
        ("meta_not_object", env(meta=[1, 2]), r"'meta' must be an object"),
        ("meta_long_string", rw(meta={"note": "x" * 5000}), r"string at meta.'note' is 5000 chars"),
        ("domain_long_string", env(domain="d" * 2000), r"string at domain is 2000 chars"),
    ]
    headers: dict[str, tuple[tuple[str, bytes], ...]] = {
        "oversized_garbage_1_5MB": (("trace", b"t" * 70_000), ("small", b"1")),
        "non_utf8_row": (("bin", b"\xff\xfe\x00"),),
    }
    return [Poison(kind, value, headers.get(kind, ()), match) for kind, value, match in entries]
