"""Errors of the Kafka layer, which of librdkafka's error codes are worth a retry, and :class:`ClientLog`,
which keeps librdkafka's repeated log and error events (a broker that is down is reported on every
reconnect attempt) down to one line per kind of event.

>>> from confluent_kafka import KafkaError
>>> is_transient(KafkaError._TRANSPORT), is_transient(KafkaError.UNKNOWN_TOPIC_OR_PART)
(True, False)
"""
from __future__ import annotations

import logging
import re
import time
from typing import Any

from confluent_kafka import KafkaError

__all__ = [
    "BrokerUnavailable",
    "ClientLog",
    "CommitError",
    "DeliveryError",
    "MissingTopicError",
    "is_group_change",
    "is_transient",
    "quiet",
]


class CommitError(RuntimeError):
    """A synchronous offset commit failed (the offsets were not stored)."""


class DeliveryError(RuntimeError):
    """One or more produced records were not delivered (or still queued after the flush timeout)."""


class BrokerUnavailable(RuntimeError):
    """No broker answered within ``kafka.connect_timeout_s`` (or it refused the client's credentials)."""


class MissingTopicError(RuntimeError):
    """A topic the run reads from does not exist, and creating topics was not asked for."""


#: Error codes of a broker or coordinator that is away for a while (restart, network): worth retrying.
_TRANSIENT = frozenset({
    KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._WAIT_COORD, KafkaError._TIMED_OUT,
    KafkaError._RESOLVE, KafkaError.REQUEST_TIMED_OUT, KafkaError.NETWORK_EXCEPTION,
    KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
})
#: Error codes saying the group moved on without this member (a rebalance, an expired session).
_GROUP_CHANGE = frozenset({
    KafkaError.REBALANCE_IN_PROGRESS, KafkaError.UNKNOWN_MEMBER_ID, KafkaError.ILLEGAL_GENERATION,
    KafkaError._ASSIGNMENT_LOST,
})


def is_transient(code: int) -> bool:
    """True for error codes of an unreachable broker or coordinator (retry them with backoff)."""
    return code in _TRANSIENT


def is_group_change(code: int) -> bool:
    """True for error codes saying the consumer group rebalanced without this member."""
    return code in _GROUP_CHANGE


_SUFFIX = re.compile(r"\s*\(after \d+ms in state .*$")


def _kind(text: str) -> str:
    """What a librdkafka message is about, without its client, thread, broker, numbers and timings:
    ``FAIL [c#consumer-1] [thrd:b:9/1]: b:9/1: Connect to ipv4#b:9 failed: Connection refused (after 0ms
    in state CONNECT)`` -> ``Connection refused``."""
    return re.sub(r"\d+", "#", _SUFFIX.sub("", text).split(": ")[-1])


class ClientLog:
    """librdkafka ``logger`` and ``error_cb`` of one client: each kind of event (its cause, e.g.
    ``Connection refused``, whichever broker connection reports it) is logged at its own level once per
    ``every_s`` seconds; repeats go to DEBUG and are counted (:attr:`repeats`), so a broker that stays
    down yields a line or two, not one per reconnect attempt. Fatal errors are always logged.
    ``quiet=True`` logs even the first occurrence at DEBUG (for a caller that reports the failure itself).

    >>> from confluent_kafka import KafkaError
    >>> cl = ClientLog("admin", quiet=True)
    >>> for _ in range(3):
    ...     cl.error_cb(KafkaError(KafkaError._TRANSPORT, "127.0.0.1:1/bootstrap: Connect failed"))
    >>> cl.events, cl.repeats, cl.last_error
    (3, 2, '127.0.0.1:1/bootstrap: Connect failed')
    """

    def __init__(self, name: str, *, quiet: bool = False, every_s: float = 60.0,
                 logger: logging.Logger | None = None) -> None:
        self.name = name
        self.quiet = quiet
        self.every_s = every_s
        self._log = logger or logging.getLogger("streamtta.kafka.client")
        self._logged_at: dict[str, float] = {}
        #: Log and error events received; how many of them repeated an earlier kind of event.
        self.events = 0
        self.repeats = 0
        #: Text of the latest error event (None before any).
        self.last_error: str | None = None

    def _emit(self, level: int, text: str, *, always: bool = False) -> None:
        self.events += 1
        kind, now = _kind(text), time.monotonic()
        first = now - self._logged_at.get(kind, -self.every_s) >= self.every_s
        if first:
            self._logged_at[kind] = now
        else:
            self.repeats += 1
        if always or (first and not self.quiet):
            self._log.log(level, "Kafka %s: %s%s", self.name, text,
                          "" if always else " (repeats are logged at DEBUG)")
        else:
            self._log.debug("Kafka %s: %s", self.name, text)

    def log(self, level: int, fmt: str, *args: Any) -> None:
        """The ``logger`` interface librdkafka calls (``level`` is a :mod:`logging` level)."""
        text = fmt % args if args else fmt
        self._emit(min(int(level), logging.WARNING), text)

    def error_cb(self, err: KafkaError) -> None:
        """The ``error_cb`` librdkafka calls for client-wide errors (broker down, authentication, fatal)."""
        self.last_error = err.str()
        fatal = bool(err.fatal())
        self._emit(logging.ERROR if fatal else logging.WARNING, self.last_error, always=fatal)


def quiet(conf: dict[str, Any], client_log: ClientLog) -> dict[str, Any]:
    """``conf`` with ``client_log`` as its ``logger`` and ``error_cb``, unless the caller set their own."""
    out = dict(conf)
    out.setdefault("logger", client_log)
    out.setdefault("error_cb", client_log.error_cb)
    return out
