"""Topic administration and the start-up connection: wait for a broker with backoff, check or create
topics and wait until the broker reports them.

Every function takes ``config``: librdkafka settings of the admin client (the run's
``client_settings(kafka, "admin")``, i.e. its ``kafka.security``), so topic checks and creation
authenticate like the run's consumer and producers.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ClusterMetadata, NewTopic

from streamtta.stream.kafka.errors import (
    BrokerUnavailable,
    ClientLog,
    MissingTopicError,
    quiet,
)
from streamtta.stream.kafka.settings import client_settings

__all__ = ["admin_client", "ensure_topics", "prepare_topics", "wait_for_broker"]

log = logging.getLogger(__name__)

#: First and longest pause between two connection attempts of :func:`wait_for_broker` (seconds).
BACKOFF_START_S, BACKOFF_MAX_S = 0.25, 4.0
#: Errors that retrying will not fix: wrong credentials or TLS set-up.
_NOT_RETRIED = frozenset({KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED, KafkaError._SSL,
                          KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED})


def admin_client(bootstrap_servers: str, config: Mapping[str, Any] | None = None, *,
                 client_log: ClientLog | None = None) -> AdminClient:
    """An admin client with ``config`` (security settings) whose librdkafka logs go through a
    :class:`~streamtta.stream.kafka.errors.ClientLog` (repeats at DEBUG)."""
    conf = {**{str(k): v for k, v in (config or {}).items()}, "bootstrap.servers": bootstrap_servers}
    return AdminClient(quiet(conf, client_log or ClientLog("admin")))


def wait_for_broker(bootstrap_servers: str, *, timeout: float, config: Mapping[str, Any] | None = None
                    ) -> ClusterMetadata:
    """Ask for the cluster metadata until a broker answers, for at most ``timeout`` seconds.

    The first failure logs one warning (``cannot reach Kafka at ...; retrying for up to N s``); each
    attempt waits up to 1 s or twice the pause that follows it, and the pauses back off from 0.25 s to 4 s. Raises
    :class:`~streamtta.stream.kafka.errors.BrokerUnavailable` with the last error once ``timeout`` has
    passed, or at once for an authentication or TLS error. librdkafka's own connection errors are
    logged at DEBUG only. Returns the metadata of the first answer.
    """
    cl = ClientLog("admin", quiet=True)
    admin = admin_client(bootstrap_servers, config, client_log=cl)
    deadline = time.monotonic() + timeout
    pause, warned = BACKOFF_START_S, False
    while True:
        left = deadline - time.monotonic()
        try:
            return admin.list_topics(timeout=max(min(left, max(1.0, 2.0 * pause)), 0.1))
        except KafkaException as e:
            err: KafkaError = e.args[0]
            admin.poll(0)  # serve the error callbacks: they hold the cause (connection refused, ...)
            reason = cl.last_error or err.str()
            if err.code() in _NOT_RETRIED:
                raise BrokerUnavailable(f"Kafka at {bootstrap_servers} refused the connection: {reason}") from None
        left = deadline - time.monotonic()
        if left <= 0:
            raise BrokerUnavailable(f"cannot reach Kafka at {bootstrap_servers} after {timeout:g} s "
                                    f"(kafka.connect_timeout_s): {reason}") from None
        if not warned:
            log.warning("cannot reach Kafka at %s (%s); retrying for up to %g s", bootstrap_servers, reason, timeout)
            warned = True
        time.sleep(min(pause, left))
        pause = min(pause * 2, BACKOFF_MAX_S)


def _present(md: ClusterMetadata, name: str) -> bool:
    t = md.topics.get(name)
    return t is not None and t.error is None and bool(t.partitions)


def ensure_topics(bootstrap_servers: str, topics: Mapping[str, int], *, timeout: float = 15.0,
                  replication_factor: int = -1, create: bool = True, config: Mapping[str, Any] | None = None
                  ) -> dict[str, int]:
    """Check that ``topics`` exist, creating missing ones when ``create`` (idempotent), and wait until all
    of them show in the metadata.

    ``topics`` maps name -> partition count. Existing topics are left as they are (a warning is logged
    when one has fewer partitions than requested). ``replication_factor=-1`` uses the broker default.
    With ``create=False`` a missing topic raises
    :class:`~streamtta.stream.kafka.errors.MissingTopicError` naming it (nothing is created, nothing
    waited for). ``config``: librdkafka settings of the admin client (security). Returns
    ``{name: partition count}`` as the broker reports it.
    """
    for name, n in topics.items():
        if not name or isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"ensure_topics: topic {name!r} needs a partition count >= 1, got {n!r}")
    if not topics:
        return {}
    admin = admin_client(bootstrap_servers, config)
    deadline = time.monotonic() + timeout
    md = admin.list_topics(timeout=timeout)
    missing = [name for name in topics if not _present(md, name)]
    if missing and not create:
        raise MissingTopicError(f"topic {', '.join(map(repr, missing))} does not exist on {bootstrap_servers} "
                                f"(misspelled?); create it, or let streamtta create it with --create-topics "
                                f"(kafka.create_topics=true)")
    if missing:
        futures = admin.create_topics([NewTopic(name, num_partitions=topics[name],
                                                replication_factor=replication_factor) for name in missing],
                                      operation_timeout=timeout, request_timeout=timeout)
        for name, fut in futures.items():
            try:
                fut.result(timeout=max(deadline - time.monotonic(), 0.1))
            except KafkaException as e:
                if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise RuntimeError(f"could not create topic {name!r}: {e.args[0].str()}") from e
        md = admin.list_topics(timeout=max(deadline - time.monotonic(), 0.5))
    while True:
        found = {name: len(md.topics[name].partitions) for name in topics if _present(md, name)}
        if len(found) == len(topics):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"topics {sorted(set(topics) - set(found))} did not appear within {timeout:g} s")
        time.sleep(0.1)
        md = admin.list_topics(timeout=max(deadline - time.monotonic(), 0.5))
    for name, n in found.items():
        if n < topics[name]:
            log.warning("topic %r exists with %d partition(s), fewer than the %d requested", name, n, topics[name])
    return found


def prepare_topics(kafka: Any, bootstrap_servers: str) -> None:
    """The topics of a run (``kafka`` is its :class:`~streamtta.config.KafkaConfig`): wait for the broker
    (up to ``kafka.connect_timeout_s``), check the input topic (created only with ``kafka.create_topics``,
    else :class:`~streamtta.stream.kafka.errors.MissingTopicError`), and create missing output topics
    (predictions, alerts, dead letters). The admin client uses ``client_settings(kafka, "admin")``."""
    admin = client_settings(kafka, "admin")
    wait_for_broker(bootstrap_servers, timeout=kafka.connect_timeout_s, config=admin)
    ensure_topics(bootstrap_servers, {kafka.topic: kafka.partitions}, create=kafka.create_topics, config=admin)
    ensure_topics(bootstrap_servers, {kafka.resolved_dlq_topic(): 1, kafka.resolved_predictions_topic(): kafka.partitions,
                                      kafka.resolved_alerts_topic(): 1}, config=admin)
