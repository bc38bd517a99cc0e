"""Topic administration: create missing topics and wait until the broker reports them."""
from __future__ import annotations

import logging
import time
from typing import Mapping

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

__all__ = ["ensure_topics"]

log = logging.getLogger(__name__)


def ensure_topics(bootstrap_servers: str, topics: Mapping[str, int], *, timeout: float = 15.0,
                  replication_factor: int = -1) -> dict[str, int]:
    """Create missing topics (idempotent) and wait until all of them show in the metadata.

    ``topics`` maps name -> partition count. Existing topics are left as they are (a warning is logged
    when one has fewer partitions than requested). ``replication_factor=-1`` uses the broker default.
    Returns ``{name: partition count}`` as the broker reports it.
    """
    for name, n in topics.items():
        if not name or isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"ensure_topics: topic {name!r} needs a partition count >= 1, got {n!r}")
    if not topics:
        return {}
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    deadline = time.monotonic() + timeout
    md = admin.list_topics(timeout=timeout)
    missing = [name for name in topics if name not in md.topics or md.topics[name].error is not None]
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
    while True:
        md = admin.list_topics(timeout=max(deadline - time.monotonic(), 0.5))
        found = {name: len(md.topics[name].partitions) for name in topics
                 if name in md.topics and md.topics[name].error is None and md.topics[name].partitions}
        if len(found) == len(topics):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"topics {sorted(set(topics) - set(found))} did not appear within {timeout:g} s")
        time.sleep(0.1)
    for name, n in found.items():
        if n < topics[name]:
            log.warning("topic %r exists with %d partition(s), fewer than the %d requested", name, n, topics[name])
    return found
