"""Tensor envelope and JSON-row codec: round trips and every rejection path."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from streamtta.stream.envelope import (
    MAGIC,
    SCHEMA_VERSION,
    DecodeError,
    DecodeLimits,
    decode_value,
    encode_json_row,
    encode_sample,
    encode_tensor,
)
from streamtta.types import Sample


def _raw_envelope(header: dict, payload: bytes, *, magic: bytes = MAGIC, version: int = SCHEMA_VERSION) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<4sBI", magic, version, len(h)) + h + payload


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "uint8", "int8", "int16", "int32", "int64"])
@pytest.mark.parametrize("shape", [(1,), (7,), (1, 1), (1, 32, 32), (3, 4, 5), (1, 1, 8, 8), (16, 6)])
def test_tensor_round_trip(dtype, shape):
    rng = np.random.default_rng(hash((dtype, shape)) % 2**32)
    x = (rng.random(shape) * 100).astype(dtype)
    value = encode_tensor(x, "cam-1", label=4, event_time=12.5, domain="fog", is_unknown=False,
                          meta={"frame": 3, "score": np.float32(0.5)})
    s = decode_value(value)
    assert s.x.dtype == np.float32
    assert s.x.shape == shape
    np.testing.assert_array_equal(s.x, x.astype(np.float32))
    assert (s.stream_id, s.label, s.event_time, s.domain, s.is_unknown) == ("cam-1", 4, 12.5, "fog", False)
    assert s.meta == {"frame": 3, "score": 0.5}
    assert s.x.flags.writeable  # engine may normalise in place


def test_tensor_payload_is_little_endian_c_order():
    x = np.arange(6, dtype=">i4").reshape(2, 3)  # big-endian input
    value = encode_tensor(x, "s")
    hlen = struct.unpack_from("<I", value, 5)[0]
    payload = value[9 + hlen:]
    assert payload == np.arange(6, dtype="<i4").tobytes()
    np.testing.assert_array_equal(decode_value(value).x, np.arange(6).reshape(2, 3))
    # non-contiguous input is written in C order
    y = np.arange(12, dtype=np.float32).reshape(3, 4).T
    np.testing.assert_array_equal(decode_value(encode_tensor(y, "s")).x, y)


def test_optional_fields_default_to_none():
    s = decode_value(encode_tensor(np.ones((2, 2), np.float32), "only-id"))
    assert (s.label, s.event_time, s.domain, s.is_unknown, s.meta) == (None, None, None, None, {})


def test_expected_shape_accepts_matching_and_wildcards():
    x = np.zeros((1, 32, 32), np.float32)
    assert decode_value(encode_tensor(x, "s"), DecodeLimits(expected_shape=(1, 32, 32))).x.shape == (1, 32, 32)
    w = np.zeros((5, 8), np.float32)
    assert decode_value(encode_tensor(w, "s"), DecodeLimits(expected_shape=(None, 8))).x.shape == (5, 8)


def test_json_row_list_round_trip():
    value = encode_json_row([0.5, -1.0, 3], "sensor-7", label=2, event_time=3.0, domain="d1", is_unknown=True)
    s = decode_value(value)
    assert s.x.dtype == np.float32 and s.x.tolist() == [0.5, -1.0, 3.0]
    assert (s.stream_id, s.label, s.event_time, s.domain, s.is_unknown) == ("sensor-7", 2, 3.0, "d1", True)


def test_json_row_dict_order_by_feature_names_or_sorted_keys():
    value = encode_json_row({"temp": 21.5, "rpm": 900.0, "extra": 1.0}, "m-1")
    assert decode_value(value).x.tolist() == [1.0, 900.0, 21.5]  # sorted: extra, rpm, temp
    limits = DecodeLimits(feature_names=("temp", "rpm"))
    assert decode_value(value, limits).x.tolist() == [21.5, 900.0]  # extra names ignored
    with pytest.raises(DecodeError, match=r"lacks feature\(s\) \['vib'\]"):
        decode_value(value, DecodeLimits(feature_names=("temp", "vib")))


def test_json_row_with_leading_whitespace_and_expected_shape():
    value = b'  \n{"stream_id": "s", "features": [1, 2, 3]}'
    assert decode_value(value, DecodeLimits(expected_shape=(3,))).x.shape == (3,)
    with pytest.raises(DecodeError, match=r"shape \(3,\) does not match expected_shape \(4,\)"):
        decode_value(value, DecodeLimits(expected_shape=(4,)))


def test_encode_sample_codecs():
    s = Sample(x=np.array([1.0, 2.0], np.float32), stream_id="a", label=1, meta={"k": "v"})
    for codec in ("tensor", "json"):
        d = decode_value(encode_sample(s, codec))
        assert d.x.tolist() == [1.0, 2.0] and d.label == 1 and d.meta == {"k": "v"}
    img = Sample(x=np.zeros((1, 4, 4), np.float32), stream_id="b")
    with pytest.raises(ValueError, match="codec 'json' encodes 1-D"):
        encode_sample(img, "json")
    with pytest.raises(ValueError, match="unknown codec"):
        encode_sample(s, "avro")


@pytest.mark.parametrize("kwargs, match", [
    (dict(x=np.zeros(3, np.complex64)), "cannot encode dtype 'complex64'"),
    (dict(x=np.zeros(3, bool)), "cannot encode dtype 'bool'"),
    (dict(x=np.zeros((0, 3), np.float32)), "empty tensor"),
    (dict(stream_id=""), "stream_id must be a non-empty str"),
    (dict(label=True), "label must be an int"),
    (dict(label=1.5), "label must be an int"),
    (dict(event_time=float("nan")), "event_time must be finite"),
    (dict(is_unknown=1), "is_unknown must be a bool"),
    (dict(meta={"obj": object()}), "meta is not JSON serialisable"),
])
def test_encode_rejects_bad_input(kwargs, match):
    args = dict(x=np.zeros(3, np.float32), stream_id="s")
    args.update(kwargs)
    x, sid = args.pop("x"), args.pop("stream_id")
    with pytest.raises(ValueError, match=match):
        encode_tensor(x, sid, **args)


def test_encode_json_row_rejects_non_finite_and_bad_shapes():
    with pytest.raises(ValueError, match="not finite"):
        encode_json_row([1.0, float("inf")], "s")
    with pytest.raises(ValueError, match="1-D feature vector"):
        encode_json_row(np.zeros((2, 2)), "s")
    with pytest.raises(ValueError, match="not a number"):
        encode_json_row({"a": "x"}, "s")


# ---------------------------------------------------------------------------------------------
# decode errors: each names the problem
# ---------------------------------------------------------------------------------------------
GOOD = encode_tensor(np.arange(12, dtype=np.float32).reshape(3, 4), "cam-9")


def test_decode_rejects_none_and_empty():
    with pytest.raises(DecodeError, match="tombstone"):
        decode_value(None)
    with pytest.raises(DecodeError, match="empty"):
        decode_value(b"")


def test_decode_rejects_wrong_magic_and_garbage():
    with pytest.raises(DecodeError, match="unknown record format"):
        decode_value(b"XXXX" + GOOD[4:])
    with pytest.raises(DecodeError, match="unknown record format"):
        decode_value(bytes(range(40)))


@pytest.mark.parametrize("cut", [2, 6, 8, 9, 20])
def test_decode_rejects_truncated_prefix_or_header(cut):
    with pytest.raises(DecodeError, match="truncated tensor envelope"):
        decode_value(GOOD[:cut])


def test_decode_rejects_truncated_payload():
    with pytest.raises(DecodeError, match=r"payload is 44 bytes but shape \(3, 4\) x float32 needs 48 bytes"):
        decode_value(GOOD[:-4])
    with pytest.raises(DecodeError, match="payload is 52 bytes"):
        decode_value(GOOD + b"\0\0\0\0")


def test_decode_rejects_unsupported_schema_version():
    bad = GOOD[:4] + bytes([7]) + GOOD[5:]
    with pytest.raises(DecodeError, match=r"unsupported envelope schema version 7; this reader supports \[1\]"):
        decode_value(bad)
    # a reader configured for a future version only rejects version 1
    with pytest.raises(DecodeError, match="schema version 1"):
        decode_value(GOOD, DecodeLimits(schema_versions={2}))


def test_decode_rejects_disallowed_dtype():
    with pytest.raises(DecodeError, match=r"dtype 'float64' is not allowed; allowed: \['float32'\]"):
        decode_value(encode_tensor(np.zeros(3), "s"), DecodeLimits(allowed_dtypes={"float32"}))
    raw = _raw_envelope({"stream_id": "s", "dtype": "complex128", "shape": [1]}, b"\0" * 16)
    with pytest.raises(DecodeError, match="dtype 'complex128' is not allowed"):
        decode_value(raw)
    raw = _raw_envelope({"stream_id": "s", "dtype": "object", "shape": [1]}, b"\0" * 8)
    with pytest.raises(DecodeError, match="dtype 'object' is not allowed"):
        decode_value(raw)


@pytest.mark.parametrize("header, match", [
    ({"dtype": "float32", "shape": [1]}, "stream_id must be a non-empty string"),
    ({"stream_id": "s", "shape": [1]}, "string 'dtype'"),
    ({"stream_id": "s", "dtype": "float32"}, "'shape' must be a list"),
    ({"stream_id": "s", "dtype": "float32", "shape": [-1]}, "'shape' must be a list"),
    ({"stream_id": "s", "dtype": "float32", "shape": [1.5]}, "'shape' must be a list"),
    ({"stream_id": "s", "dtype": "float32", "shape": [1] * 9}, "1 to 8"),
    ({"stream_id": "s", "dtype": "float32", "shape": [0, 3]}, "has no elements"),
    ({"stream_id": "s", "dtype": "float32", "shape": [1], "label": "cat"}, "'label' must be an int"),
    ({"stream_id": "s", "dtype": "float32", "shape": [1], "label": True}, "'label' must be an int"),
    ({"stream_id": "s", "dtype": "float32", "shape": [1], "is_unknown": "no"}, "'is_unknown' must be a bool"),
    ({"stream_id": "s", "dtype": "float32", "shape": [1], "meta": [1]}, "'meta' must be an object"),
    ({"stream_id": "s", "dtype": "float32", "shape": [1], "lable": 3}, r"unknown key\(s\) \['lable'\]"),
])
def test_decode_rejects_bad_header_fields(header, match):
    with pytest.raises(DecodeError, match=match):
        decode_value(_raw_envelope(header, b"\0" * 4))


def test_decode_rejects_non_json_header():
    h = b"\xff\xfe not json"
    raw = struct.pack("<4sBI", MAGIC, 1, len(h)) + h + b"\0" * 4
    with pytest.raises(DecodeError, match="header is not valid UTF-8"):
        decode_value(raw)
    h = b"[1, 2]"
    raw = struct.pack("<4sBI", MAGIC, 1, len(h)) + h
    with pytest.raises(DecodeError, match="header must be a JSON object"):
        decode_value(raw)


def test_decode_rejects_expected_shape_mismatch():
    with pytest.raises(DecodeError, match=r"stream 'cam-9': shape \(3, 4\) does not match expected_shape \(1, 32, 32\)"):
        decode_value(GOOD, DecodeLimits(expected_shape=(1, 32, 32)))
    with pytest.raises(DecodeError, match=r"does not match expected_shape \(\*, 5\)"):
        decode_value(GOOD, DecodeLimits(expected_shape=(None, 5)))


@pytest.mark.parametrize("bad, match", [(np.nan, r"\(1 NaN, 0 Inf\)"), (np.inf, r"\(0 NaN, 1 Inf\)"),
                                        (-np.inf, r"\(0 NaN, 1 Inf\)")])
def test_decode_rejects_nonfinite_unless_allowed(bad, match):
    x = np.ones((2, 3), np.float32)
    x[1, 2] = bad
    value = encode_tensor(x, "s")
    with pytest.raises(DecodeError, match=match):
        decode_value(value)
    assert not np.isfinite(decode_value(value, DecodeLimits(allow_nonfinite=True)).x).all()


def test_decode_rejects_float64_overflowing_float32():
    with pytest.raises(DecodeError, match="non-finite"):
        decode_value(encode_tensor(np.array([1e300]), "s"))


def test_decode_rejects_oversized_value_and_header():
    big = encode_tensor(np.zeros(1000, np.float32), "s")
    with pytest.raises(DecodeError, match=rf"record value is {len(big)} bytes, above the limit max_bytes=1000"):
        decode_value(big, DecodeLimits(max_bytes=1000))
    fat = encode_tensor(np.zeros(1, np.float32), "s", meta={"pad": "x" * 2000})
    with pytest.raises(DecodeError, match="exceeds max_header_bytes=1024"):
        decode_value(fat, DecodeLimits(max_header_bytes=1024))


@pytest.mark.parametrize("value, match", [
    (b'{"stream_id": "s", "features": [1, "a"]}', "features must be numbers"),
    (b'{"stream_id": "s", "features": [true]}', "features must be numbers"),
    (b'{"stream_id": "s", "features": []}', "no features"),
    (b'{"stream_id": "s", "features": 3}', "'features' as a list or an object"),
    (b'{"stream_id": "s"}', "'features' as a list or an object"),
    (b'{"features": [1]}', "stream_id must be a non-empty string"),
    (b'{"stream_id": "s", "features": [NaN]}', "JSON constant NaN is not allowed"),
    (b'{"stream_id": "s", "features": [1], "schema_version": 9}', "unsupported JSON row schema_version 9"),
    (b'{"stream_id": "s", "features": [1], "colour": 1}', r"unknown key\(s\) \['colour'\]"),
    (b'{"stream_id": "s", "features": [1], "event_time": "noon"}', "'event_time' must be a finite number"),
    (b'{"stream_id": "s", "features": [1]', "JSON row is not valid JSON"),
])
def test_decode_rejects_bad_json_rows(value, match):
    with pytest.raises(DecodeError, match=match):
        decode_value(value)


def test_decode_error_is_value_error():
    assert issubclass(DecodeError, ValueError)


def test_decode_limits_validation():
    assert DecodeLimits(expected_shape=[1, None]).expected_shape == (1, None)
    for kwargs, match in [(dict(max_bytes=0), "max_bytes"), (dict(expected_shape=(0, 3)), "expected_shape"),
                          (dict(allowed_dtypes=set()), "allowed_dtypes"), (dict(schema_versions=()), "schema_versions"),
                          (dict(feature_names=("a", "a")), "feature_names")]:
        with pytest.raises(ValueError, match=match):
            DecodeLimits(**kwargs)


# ---------------------------------------------------------------------------------------------
# bounded decoding (the full poison corpus runs in tests/faults/test_poison.py)
# ---------------------------------------------------------------------------------------------
def test_brackets_and_quotes_inside_strings_do_not_count_as_nesting():
    meta = {"note": "[" * 500 + '\\"{{{' + "{" * 500, "k": ["]", '"[']}
    value = encode_json_row([1.0, 2.0], "s[0]", meta=meta)
    assert decode_value(value, DecodeLimits(max_depth=3)).meta == meta
    env = encode_tensor(np.ones(2, np.float32), "s{", meta={"a": "[[[[" * 100})
    assert decode_value(env, DecodeLimits(max_depth=2)).stream_id == "s{"


@pytest.mark.parametrize("limits, value, match", [
    (DecodeLimits(max_depth=3), b'{"stream_id": "s", "features": [1], "meta": {"a": [[1]]}}',
     "depth 4 exceeds max_depth=3"),
    (DecodeLimits(max_int_digits=3), b'{"stream_id": "s", "features": [1000]}', "4 digits exceeds max_int_digits=3"),
    (DecodeLimits(max_int_digits=3), b'{"stream_id": "s", "features": [-999]}', None),
    (DecodeLimits(max_string_chars=4), b'{"stream_id": "s", "features": [1], "domain": "fives"}', "5 chars"),
    (DecodeLimits(max_stream_id_chars=3), b'{"stream_id": "four", "features": [1]}', "max_stream_id_chars=3"),
    (DecodeLimits(max_meta_items=2), b'{"stream_id": "s", "features": [1], "meta": {"a": 1, "b": 2}}',
     "max_meta_items=2"),
    (DecodeLimits(max_meta_items=4), b'{"stream_id": "s", "features": [1], "meta": {"a": 1, "b": 2}}', None),
])
def test_each_limit_is_configurable(limits, value, match):
    if match is None:
        assert decode_value(value, limits).stream_id == "s"
    else:
        with pytest.raises(DecodeError, match=match):
            decode_value(value, limits)


@pytest.mark.parametrize("name", ["max_depth", "max_int_digits", "max_string_chars", "max_stream_id_chars",
                                  "max_meta_items", "max_header_bytes"])
@pytest.mark.parametrize("bad", [0, -1, True, 2.5])
def test_limits_must_be_positive_ints(name, bad):
    with pytest.raises(ValueError, match=f"DecodeLimits.{name} must be a positive int"):
        DecodeLimits(**{name: bad})


@pytest.mark.parametrize("sid, match", [("x" * 257, "max_stream_id_chars=256"), ("bad\ud800", "lone surrogate"),
                                        ("tab\there", "control characters"), ("", "non-empty string")])
def test_encoders_refuse_stream_ids_readers_would_reject(sid, match):
    with pytest.raises(ValueError, match=match):
        encode_tensor(np.ones(2, np.float32), sid)
    with pytest.raises(ValueError, match=match):
        encode_json_row([1.0], sid)
    assert decode_value(encode_tensor(np.ones(2, np.float32), "x" * 256)).stream_id == "x" * 256


def test_encoders_refuse_scalars_and_labels_beyond_int64():
    with pytest.raises(ValueError, match="0-d tensor"):
        encode_tensor(np.float32(1.0), "s")
    with pytest.raises(ValueError, match="does not fit in an int64"):
        encode_tensor(np.ones(2, np.float32), "s", label=2**63)
