"""What a dead-lettered record looks like on the DLQ topic (shared by the Kafka and the in-memory DLQ).

A bad record is re-published with its original key, value and headers, plus these headers
(:data:`DLQ_HEADERS`): ``dlq.origin.topic``, ``dlq.origin.partition``, ``dlq.origin.offset`` (decimal
strings), ``dlq.error`` (the error message, UTF-8, at most 4000 characters) and ``dlq.timestamp``
(milliseconds since the epoch when dead-lettered).

A record too large to re-publish is cut down so the dead letter always fits in a producer's
``message.max.bytes`` (librdkafka refuses a larger message locally, ``MSG_SIZE_TOO_LARGE``): a value over
``max_value_bytes`` keeps its first ``max_value_bytes`` bytes, a key over :data:`MAX_KEY_BYTES` its first
:data:`MAX_KEY_BYTES` bytes, and original headers are kept in order while they fit in
:data:`MAX_ORIGINAL_HEADER_BYTES` (the rest are dropped). Such a dead letter also carries
(:data:`DLQ_TRUNCATION_HEADERS`) ``dlq.truncated`` = ``true``, ``dlq.size`` (the original value's byte
count) and ``dlq.sha256`` (hex SHA-256 of the whole original value), plus ``dlq.key.size`` when the key was
cut and ``dlq.headers.dropped`` (how many original headers were dropped) when headers were.

>>> from streamtta.types import RawRecord
>>> rec = RawRecord(topic="in", partition=0, offset=7, value=b"x" * 10, key=b"k")
>>> msg = dead_letter_message(rec, "bad record", max_value_bytes=4, now_ms=0)
>>> msg.value, msg.header("dlq.truncated"), msg.header("dlq.size"), msg.header("dlq.origin.offset")
(b'xxxx', b'true', b'10', b'7')
>>> dead_letter_message(rec, "bad record", now_ms=0).header("dlq.truncated") is None
True
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from streamtta.types import RawRecord

__all__ = ["DLQ_HEADERS", "DLQ_TRUNCATION_HEADERS", "DEFAULT_MAX_VALUE_BYTES", "MAX_KEY_BYTES",
           "MAX_ORIGINAL_HEADER_BYTES", "DeadLetterMessage", "dead_letter_message", "max_value_bytes_for"]

#: Headers every dead-lettered record carries, in addition to its original headers.
DLQ_HEADERS = ("dlq.origin.topic", "dlq.origin.partition", "dlq.origin.offset", "dlq.error", "dlq.timestamp")
#: Headers added when the original was too large and was cut (``dlq.key.size`` / ``dlq.headers.dropped``
#: too when the key / headers were cut).
DLQ_TRUNCATION_HEADERS = ("dlq.truncated", "dlq.size", "dlq.sha256")
#: librdkafka's default ``message.max.bytes``.
LIBRDKAFKA_MESSAGE_MAX_BYTES = 1_000_000
#: Room kept under ``message.max.bytes`` for the key, the headers and the record overhead.
HEADROOM_BYTES = 100_000
#: Largest value re-published unchanged when the producer's ``message.max.bytes`` is not known.
DEFAULT_MAX_VALUE_BYTES = LIBRDKAFKA_MESSAGE_MAX_BYTES - HEADROOM_BYTES
#: Longest key re-published unchanged.
MAX_KEY_BYTES = 16 * 1024
#: Most bytes of original headers (names + values) re-published.
MAX_ORIGINAL_HEADER_BYTES = 64 * 1024
MAX_ERROR_CHARS = 4000


def max_value_bytes_for(message_max_bytes: int | None) -> int:
    """The value limit for a producer whose ``message.max.bytes`` is ``message_max_bytes`` (None: librdkafka's
    default): :data:`HEADROOM_BYTES` below it, at least 1 KiB.

    >>> max_value_bytes_for(None), max_value_bytes_for(2_000_000)
    (900000, 1900000)
    """
    limit = LIBRDKAFKA_MESSAGE_MAX_BYTES if message_max_bytes is None else int(message_max_bytes)
    return max(1024, limit - HEADROOM_BYTES)


@dataclass(frozen=True)
class DeadLetterMessage:
    """A dead letter as published: value, key and headers."""

    value: bytes | None
    key: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]

    def header(self, name: str) -> bytes | None:
        """The last value of header ``name`` (None if absent)."""
        found = [v for k, v in self.headers if k == name]
        return found[-1] if found else None

    @property
    def truncated(self) -> bool:
        return self.header("dlq.truncated") == b"true"


def dead_letter_message(record: RawRecord, error: str, *, max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
                        now_ms: int | None = None) -> DeadLetterMessage:
    """The dead letter of ``record`` failed with ``error`` (format in the module docstring)."""
    if max_value_bytes < 1:
        raise ValueError(f"max_value_bytes must be >= 1, got {max_value_bytes}")
    value, key = record.value, record.key
    kept: list[tuple[str, bytes | None]] = []
    used = 0
    for name, hv in record.headers:
        used += len(str(name).encode("utf-8", "replace")) + (len(hv) if hv is not None else 0)
        if used > MAX_ORIGINAL_HEADER_BYTES:
            break
        kept.append((name, hv))
    cut_value = value is not None and len(value) > max_value_bytes
    cut_key = key is not None and len(key) > MAX_KEY_BYTES
    dropped = len(record.headers) - len(kept)
    extra: list[tuple[str, bytes | None]] = []
    if cut_value or cut_key or dropped:
        extra.append(("dlq.truncated", b"true"))
        if value is not None:
            extra += [("dlq.size", str(len(value)).encode()),
                      ("dlq.sha256", hashlib.sha256(value).hexdigest().encode())]
        if cut_key:
            extra.append(("dlq.key.size", str(len(key)).encode()))
        if dropped:
            extra.append(("dlq.headers.dropped", str(dropped).encode()))
    if cut_value:
        value = bytes(value[:max_value_bytes])
    if cut_key:
        key = bytes(key[:MAX_KEY_BYTES])
    stamp = int(time.time() * 1000) if now_ms is None else int(now_ms)
    headers = kept + [
        ("dlq.origin.topic", record.topic.encode("utf-8", "replace")),
        ("dlq.origin.partition", str(record.partition).encode()),
        ("dlq.origin.offset", str(record.offset).encode()),
        ("dlq.error", str(error)[:MAX_ERROR_CHARS].encode("utf-8", "replace")),
        ("dlq.timestamp", str(stamp).encode()),
    ] + extra
    return DeadLetterMessage(value=value, key=key, headers=tuple(headers))
