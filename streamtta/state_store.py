"""Per-stream state that moves between machines: checkpoints in a Kafka changelog, the local directory a cache.

:class:`KafkaStateStore` is a :class:`~streamtta.checkpoints.CheckpointStore` (same ``save`` / ``load`` /
``reject`` / ``path``, same data-only format and :class:`~streamtta.checkpoints.CheckpointError`
semantics) whose checkpoints go first to the changelog topic ``<input topic>.<group id>.state``
(:mod:`streamtta.stream.kafka.changelog`) and then to the local directory:

* **save** (:meth:`~KafkaStateStore.save`, or :meth:`~KafkaStateStore.save_many` for all the states of a
  checkpoint at once) returns only after every chunk of the new version is acknowledged by the broker
  (``acks=all``), so input offsets committed after it are covered by a durable state. The version's
  ``seq`` is one more than the newest the changelog (or the local file) knows for the key. The same
  bytes are then written to the local file; a local write that fails is logged and does not fail the
  checkpoint (the changelog holds the state).
* **load** reads the changelog to its end and takes its newest complete, hash-matching version, unless
  the local file is at least as new: a higher ``seq``, or the same ``seq`` and the same bytes (then the
  changelog's chunks are not fetched). A local file that is not a valid checkpoint is ignored when the
  changelog has a version (it raises :class:`CheckpointError` otherwise); one whose version a reject
  marker hides is not used.
* **reject** moves the local file aside (or writes the rejected bytes there when they came from the
  changelog) and writes a reject marker to the changelog, so no worker restores that version again.

:attr:`KafkaStateStore.restores` records the last :data:`RESTORES_KEPT` loads: key, where the state came
from (``"changelog"``, ``"local"`` or None), its seq and the seconds it took. Each restore is also a log
line at INFO with ``event`` ``"restore"`` and the fields ``stream``, ``source``, ``seq`` and ``seconds``.
The bytes of a loaded state are kept only until the next load (a :meth:`~KafkaStateStore.reject` follows
its load at once), so a long-running worker that evicts and restores many states holds none of them twice.
The changelog topic must be a legal Kafka topic name: :meth:`KafkaStateStore.from_config` raises
:class:`~streamtta.config.ConfigError` for a group id or input topic that makes an illegal one. It also
warns when an existing changelog topic is not compacted (``cleanup.policy`` without ``compact``): its
records are then deleted by age, and so is the state of a partition idle for longer than ``retention.ms``.

>>> check_topic_name("sensors.fleet.state")
'sensors.fleet.state'
>>> check_topic_name("sensors.team/a.state")
Traceback (most recent call last):
...
ValueError: 'sensors.team/a.state' is not a legal Kafka topic name (letters, digits, '.', '_' and '-' only, at most 249 characters)
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from streamtta.checkpoints import (
    CheckpointError,
    CheckpointStore,
    decode_checkpoint,
    encode_checkpoint,
)
from streamtta.stream.kafka.changelog import Changelog, changelog_topic

__all__ = ["RESTORES_KEPT", "KafkaStateStore", "check_topic_name", "make_state_store"]

log = logging.getLogger("streamtta.engine")

#: loads :attr:`KafkaStateStore.restores` remembers (the oldest are dropped)
RESTORES_KEPT = 1024
_LEGAL_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")


def changelog_topic_of(cfg: Any) -> str:
    """The changelog topic of a run's ``kafka.topic`` and ``kafka.group_id``; a ``ConfigError`` when Kafka
    would refuse its name (checked before the model loads: ``streamtta run`` calls it first)."""
    from streamtta.config import ConfigError

    k = cfg.kafka
    try:
        return check_topic_name(changelog_topic(k.topic, k.group_id))
    except ValueError as e:
        raise ConfigError(f"engine.state_store=kafka: the changelog topic of kafka.topic {k.topic!r} and "
                          f"kafka.group_id {k.group_id!r}: {e}") from None


def check_topic_name(name: str) -> str:
    """``name`` when Kafka accepts it as a topic name, else ``ValueError`` saying why."""
    if not _LEGAL_TOPIC.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"{name!r} is not a legal Kafka topic name (letters, digits, '.', '_' and '-' only, "
                         f"at most 249 characters)")
    return name


class KafkaStateStore(CheckpointStore):
    """Checkpoints in ``changelog`` (durable, shared by the group) and in ``directory`` (a local cache,
    in a sub-directory per ``namespace``). See the module docstring."""

    def __init__(self, directory: str | Path, changelog: Changelog, *, namespace: str | None = None) -> None:
        super().__init__(directory, namespace=namespace)
        self.changelog = changelog
        #: one entry per load, the last :data:`RESTORES_KEPT`: ``{"key", "source", "seq", "seconds"}``
        self.restores: list[dict[str, Any]] = []
        self._seen: dict[str, int] = {}  # key -> the newest seq this store has loaded or written
        # key -> (seq, bytes) of the state loaded last, for a reject right after it; one key at most
        self._loaded: dict[str, tuple[int, bytes]] = {}

    @classmethod
    def from_config(cls, cfg: Any, bootstrap_servers: str) -> KafkaStateStore:
        """The store of a run (``cfg``: a :class:`~streamtta.config.Config`): the changelog of
        ``kafka.topic`` and ``kafka.group_id`` with as many partitions as the input topic, every client
        with ``client_settings(kafka, role)``; the cache in ``engine.checkpoint_dir`` under the group."""
        from streamtta.stream.kafka.admin import admin_client
        from streamtta.stream.kafka.settings import client_settings

        k = cfg.kafka
        topic = changelog_topic_of(cfg)
        admin = client_settings(k, "admin")
        client = admin_client(bootstrap_servers, admin)
        md = client.list_topics(timeout=k.connect_timeout_s)
        found = md.topics.get(k.topic)
        partitions = max(k.partitions, len(found.partitions) if found is not None and found.error is None else 0)
        changelog = Changelog(bootstrap_servers, topic, partitions=partitions,
                              producer_config=client_settings(k, "producer"),
                              consumer_config=client_settings(k, "consumer"), admin_config=admin,
                              timeout_s=max(30.0, k.connect_timeout_s))
        _warn_unless_compacted(client, topic, k.connect_timeout_s)
        return cls(cfg.engine.checkpoint_dir, changelog, namespace=k.group_id)

    # -- save ------------------------------------------------------------------------------------
    def save(self, key: str, state: dict[str, Any]) -> None:
        self.save_many({key: state})

    def save_many(self, states: Mapping[str, dict[str, Any]]) -> None:
        """Write every state as a new version and wait once until all are acknowledged; then the cache."""
        encoded: dict[str, tuple[int, bytes]] = {}
        for key, state in states.items():
            seq = max(self.changelog.next_seq(key), self._seen.get(key, 0) + 1)
            encoded[key] = (seq, encode_checkpoint(key, state, seq=seq))
        self.changelog.put_many(encoded)
        for key, (seq, data) in encoded.items():
            self._seen[key] = seq
            try:
                self.save_bytes(key, data)
            except OSError as e:
                log.warning("state %s is in the changelog but its local cache file failed: %s", key, e)
                self.path(key).unlink(missing_ok=True)

    # -- load ------------------------------------------------------------------------------------
    def _local(self, key: str) -> tuple[dict[str, Any], int, bytes] | CheckpointError | None:
        data = self.load_bytes(key)
        if data is None:
            return None
        try:
            state, meta = decode_checkpoint(data, str(self.path(key)))
        except CheckpointError as e:
            return e
        return state, meta["seq"] or 0, data

    def load(self, key: str) -> dict[str, Any] | None:
        """The newest state of ``key`` (changelog or local cache, see the module docstring), None when
        neither has one; :class:`CheckpointError` when the newest is not a valid checkpoint."""
        t0 = time.perf_counter()
        self._loaded.clear()  # only the state loaded last may be rejected: no other state's bytes are kept
        local = self._local(key)
        versions = self.changelog.versions(key)
        self._seen[key] = max(self._seen.get(key, 0), self.changelog.index.newest_seq(key))
        newest = versions[0] if versions else None
        hidden = self.changelog.index.rejected(key)
        if isinstance(local, tuple) and hidden and local[1] <= hidden:
            log.info("the local checkpoint of %s (version %d) was rejected by another worker; not used", key, local[1])
            local = None
        elif isinstance(local, tuple):
            state, seq, data = local
            if newest is None or seq > newest.seq or (seq == newest.seq
                                                      and hashlib.sha256(data).hexdigest() == newest.sha256):
                return self._restored(key, "local", seq, data, state, t0)
        elif isinstance(local, CheckpointError):
            if newest is None:
                self._loaded[key] = (0, b"")
                raise local
            log.warning("%s; using the changelog's version %d instead", local, newest.seq)
        for v in versions:
            data = self.changelog.read(v)
            if data is None:
                log.warning("version %d of state %s is incomplete in the changelog; trying an older one", v.seq, key)
                continue
            self._loaded[key] = (v.seq, data)
            where = f"{self.changelog.topic}[{key!r} seq {v.seq}]"
            state = decode_checkpoint(data, where)[0]
            return self._restored(key, "changelog", v.seq, data, state, t0)
        if isinstance(local, tuple):  # no complete version in the changelog: the older cache is all there is
            return self._restored(key, "local", local[1], local[2], local[0], t0)
        self._record({"key": key, "source": None, "seq": None, "seconds": time.perf_counter() - t0})
        return None

    def _record(self, entry: dict[str, Any]) -> None:
        self.restores.append(entry)
        del self.restores[:-RESTORES_KEPT]  # a long-running worker keeps the last ones only

    def _restored(self, key: str, source: str, seq: int, data: bytes, state: dict[str, Any], t0: float
                  ) -> dict[str, Any]:
        self._loaded[key] = (seq, data)
        self._seen[key] = max(self._seen.get(key, 0), seq)
        dt = time.perf_counter() - t0
        self._record({"key": key, "source": source, "seq": seq, "seconds": dt})
        log.info("state %s: version %d restored from the %s (%.3f s)", key, seq,
                 "changelog" if source == "changelog" else "local cache", dt,
                 extra={"event": "restore", "stream": key, "source": source, "seq": seq, "seconds": round(dt, 6)})
        return state

    # -- reject ----------------------------------------------------------------------------------
    def reject(self, key: str) -> Path:
        """Move the bad checkpoint aside locally (``*.rejected``) and hide its version from every worker."""
        p = self.path(key)
        dest = p.with_name(p.name + ".rejected")
        seq, data = self._loaded.pop(key, (0, b""))
        local = self.load_bytes(key)
        if local is not None and (seq == 0 or local == data):
            os.replace(p, dest)
        elif data:
            dest.write_bytes(data)
        if seq > 0:
            self.changelog.reject(key, seq)
        return dest

    def close(self) -> None:
        self.changelog.close()


def _warn_unless_compacted(admin: Any, topic: str, timeout: float) -> None:
    """A warning when ``topic``'s ``cleanup.policy`` has no ``compact`` (nothing when it cannot be read)."""
    from confluent_kafka.admin import ConfigResource, ResourceType

    res = ConfigResource(ResourceType.TOPIC, topic)
    try:
        policy = str(getattr(admin.describe_configs([res])[res].result(timeout).get("cleanup.policy"), "value", ""))
    except Exception as e:  # noqa: BLE001 -- e.g. no DescribeConfigs right: the check is advice only
        log.debug("cleanup.policy of the changelog %s not read: %s", topic, e)
        return
    if policy and "compact" not in policy:
        log.warning("changelog topic %s has cleanup.policy=%s: its records are deleted by age (retention.ms), so "
                    "the state of a partition idle for longer is lost; set cleanup.policy=compact", topic, policy)


def make_state_store(cfg: Any, bootstrap_servers: str) -> CheckpointStore:
    """The checkpoint store of a Kafka run: ``engine.state_store`` ``"kafka"`` -> :class:`KafkaStateStore`,
    else (``"local"``, the default) a :class:`CheckpointStore` in ``engine.checkpoint_dir`` under the group."""
    if getattr(cfg.engine, "state_store", "local") == "kafka":
        return KafkaStateStore.from_config(cfg, bootstrap_servers)
    return CheckpointStore(cfg.engine.checkpoint_dir, namespace=cfg.kafka.group_id)
