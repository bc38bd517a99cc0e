"""The Kafka state store: chunked versions in a changelog, torn and corrupt versions skipped, the local
cache used only when it is at least as new, rejects shared by every store of the group."""
from __future__ import annotations

import uuid

import numpy as np
import pytest

from streamtta.checkpoints import CheckpointError, CheckpointStore, encode_checkpoint
from streamtta.config import Config
from streamtta.state_store import KafkaStateStore, make_state_store
from streamtta.stream.kafka import MissingTopicError, make_producer
from streamtta.stream.kafka.changelog import (
    Changelog,
    ChangelogIndex,
    changelog_topic,
    split,
)

LIMIT = 16_384  # the producer's message.max.bytes in these tests


def _index(*versions: tuple[str, int, str, int, bytes, int, list[int] | None]) -> ChangelogIndex:
    """An index fed with the chunks of ``(key, seq, vid, slot, data, chunk_bytes, chunks written or None=all)``."""
    idx, off = ChangelogIndex(), 0
    for key, seq, vid, slot, data, size, only in versions:
        for i, (_, _, headers) in enumerate(split(key, data, seq=seq, vid=vid, slot=slot, chunk_bytes=size)):
            if only is None or i in only:
                idx.add(0, off, headers)
            off += 1
    return idx


def test_index_prefers_the_newest_complete_version_and_picks_the_other_slot():
    idx = _index(("k", 1, "a", 0, b"x" * 10, 4, None), ("k", 2, "b", 1, b"y" * 10, 4, [0, 2]),
                 ("other", 5, "c", 0, b"z", 4, None))
    assert [(v.seq, v.vid) for v in idx.candidates("k")] == [(1, "a")]  # seq 2 is torn (chunk 1 missing)
    assert idx.newest_seq("k") == 2  # the next version gets seq 3 ...
    assert idx.free_slot("k") == 1  # ... in the slot not holding seq 1, so compaction keeps seq 1
    idx.add(0, 99, [("streamtta.state.key", b"k"), ("streamtta.state.seq", b"1"), ("streamtta.state.type", b"rejected")])
    assert idx.candidates("k") == [] and idx.newest_seq("k") == 2
    assert [v.seq for v in idx.candidates("other")] == [5]


def test_index_keeps_the_last_complete_versions_through_many_torn_ones():
    versions = [("k", 1, "ok", 0, b"abcdef", 2, None)] + [("k", s, f"t{s}", 1, b"abcdef", 2, [0]) for s in range(2, 30)]
    idx = _index(*versions)
    assert [v.vid for v in idx.candidates("k")] == ["ok"] and idx.newest_seq("k") == 29


def test_foreign_or_malformed_records_are_ignored_never_raised():
    h = "streamtta.state."
    junk = [
        [(h + "key", b"\xff\xfe"), (h + "seq", b"1")],  # not UTF-8: another producer's bytes
        [(h + "key", b"k"), (h + "seq", b"\xc3")],  # a truncated UTF-8 sequence
        [(h + "key", b"k"), (h + "seq", b"9"), (h + "id", b"z"), (h + "slot", b"0"), (h + "chunk", b"0"),
         (h + "chunks", b"0"), (h + "sha256", b"e3b0"), (h + "size", b"0")],  # zero chunks: never complete
        [(h + "key", b"k"), (h + "seq", b"9"), (h + "id", b"y"), (h + "slot", b"7"), (h + "chunk", b"0"),
         (h + "chunks", b"1"), (h + "sha256", b"e3b0"), (h + "size", b"0")],  # a slot that is not 0 or 1
        [(h + "key", b"k"), (h + "seq", b"-3"), (h + "type", b"rejected")],  # a negative seq
    ]
    idx = _index(("k", 1, "a", 0, b"abc", 2, None))
    for off, headers in enumerate(junk, start=100):
        idx.add(0, off, headers)
    assert [(v.seq, v.vid) for v in idx.candidates("k")] == [(1, "a")]
    assert idx.newest_seq("k") == 1 and idx.free_slot("k") == 1 and idx.rejected("k") == 0


@pytest.fixture
def bs(embedded_broker):
    return embedded_broker.bootstrap_servers


def _store(bs: str, topic: str, directory, **kw) -> KafkaStateStore:
    return KafkaStateStore(directory, Changelog(bs, topic, partitions=2, producer_config={"message.max.bytes": LIMIT},
                                                timeout_s=20, **kw))


def test_a_state_larger_than_the_message_limit_is_chunked_and_restored_elsewhere(bs, tmp_path):
    topic = f"big-{uuid.uuid4().hex[:8]}.state"
    state = {"means": np.random.default_rng(0).normal(size=20_000).astype(np.float32), "n": 7}
    a = _store(bs, topic, tmp_path / "a")
    a.save("t:0", state)
    written = a.changelog.index.candidates("t:0")[0]
    assert written.size > LIMIT and written.count == -(-written.size // a.changelog.chunk_bytes) > 1
    b = _store(bs, topic, tmp_path / "b")  # another machine: an empty cache
    got = b.load("t:0")
    assert np.array_equal(got["means"], state["means"]) and got["n"] == 7
    assert b.restores[-1]["source"] == "changelog" and b.restores[-1]["seq"] == 1
    a.close(), b.close()


def test_a_torn_or_corrupt_version_is_ignored_for_the_previous_complete_one(bs, tmp_path):
    topic = f"torn-{uuid.uuid4().hex[:8]}.state"
    a = _store(bs, topic, tmp_path / "a")
    a.save("k", {"v": np.arange(10_000.0)})  # seq 1, several chunks
    prod, part = make_producer(bs), a.changelog.partition_of("k")
    newer = encode_checkpoint("k", {"v": np.zeros(10_000)}, seq=2)
    torn = split("k", newer, seq=2, vid="torn", slot=1, chunk_bytes=a.changelog.chunk_bytes)
    corrupt = split("k", newer, seq=3, vid="bad", slot=1, chunk_bytes=a.changelog.chunk_bytes)
    flipped = bytes([corrupt[1][1][0] ^ 0xFF]) + corrupt[1][1][1:]  # right length, wrong bytes
    corrupt[1] = (corrupt[1][0], flipped, corrupt[1][2])
    for key, value, headers in torn[:-1] + corrupt:  # the writer died before its last chunk; then bit rot
        prod.produce(topic, key=key, value=value, headers=headers, partition=part)
    assert prod.flush(10) == 0
    b = _store(bs, topic, tmp_path / "b")
    assert np.array_equal(b.load("k")["v"], np.arange(10_000.0))
    assert b.restores[-1]["seq"] == 1
    b.save("k", {"v": np.ones(3)})  # continues after the newest seq the changelog holds
    assert b.changelog.index.candidates("k")[0].seq == 4
    a.close(), b.close()


def test_local_cache_is_used_only_when_at_least_as_new_as_the_changelog(bs, tmp_path):
    topic = f"cache-{uuid.uuid4().hex[:8]}.state"
    a, b = _store(bs, topic, tmp_path / "a"), _store(bs, topic, tmp_path / "b")
    a.save("k", {"who": "a"})  # seq 1: changelog and a's cache
    assert a.load("k") == {"who": "a"} and a.restores[-1]["source"] == "local"  # same seq, same bytes
    assert b.load("k") == {"who": "a"} and b.restores[-1]["source"] == "changelog"
    b.save("k", {"who": "b"})  # seq 2, in the changelog: a's cache is stale now
    assert a.load("k") == {"who": "b"} and a.restores[-1]["source"] == "changelog"
    a.save_bytes("k", encode_checkpoint("k", {"who": "a-local"}, seq=5))  # newer than the changelog
    assert a.load("k") == {"who": "a-local"} and a.restores[-1]["source"] == "local"
    a.save_bytes("k", encode_checkpoint("k", {"who": "same seq, other bytes"}, seq=2))
    assert a.load("k") == {"who": "b"} and a.restores[-1]["source"] == "changelog"
    a.path("k").write_bytes(b"garbage")  # a broken cache file: the changelog has the state
    assert a.load("k") == {"who": "b"}
    legacy = CheckpointStore(tmp_path / "b")  # a plain local checkpoint (no version): used while the changelog has none
    legacy.save("old", {"who": "local store"})
    assert b.load("old") == {"who": "local store"} and b.restores[-1]["source"] == "local"
    b.path("other").write_bytes(b"garbage")  # nothing in the changelog: the CheckpointError stands
    with pytest.raises(CheckpointError):
        b.load("other")
    assert b.reject("other").read_bytes() == b"garbage" and not b.path("other").exists()
    a.close(), b.close()


def test_reject_hides_a_bad_version_from_every_store_of_the_group(bs, tmp_path):
    topic = f"reject-{uuid.uuid4().hex[:8]}.state"
    a = _store(bs, topic, tmp_path / "a")
    a.changelog.put_many({"k": (1, b"not a checkpoint")})  # hash-matching bytes that are not plain data
    with pytest.raises(CheckpointError, match="cannot be loaded as plain data"):
        a.load("k")
    assert a.reject("k").read_bytes() == b"not a checkpoint"  # kept aside for inspection
    b = _store(bs, topic, tmp_path / "b")
    assert b.load("k") is None  # the marker hides it
    b.save("k", {"fresh": 1})
    assert _store(bs, topic, tmp_path / "c").load("k") == {"fresh": 1}
    assert b.changelog.index.candidates("k")[0].seq == 2
    a.close(), b.close()


def test_make_state_store_follows_engine_state_store(bs, tmp_path):
    cfg = Config(engine={"checkpoint_dir": str(tmp_path)}, kafka={"topic": f"in-{uuid.uuid4().hex[:6]}", "group_id": "g"})
    assert type(make_state_store(cfg, bs)) is CheckpointStore  # "local" is the default
    store = KafkaStateStore.from_config(cfg, bs)
    assert store.changelog.topic == changelog_topic(cfg.kafka.topic, "g") and store.directory.parent == tmp_path
    store.close()


def test_junk_in_the_changelog_is_data_the_store_skips(bs, tmp_path):
    topic = f"junk-{uuid.uuid4().hex[:8]}.state"
    a = _store(bs, topic, tmp_path / "a")
    a.save("k", {"n": 1})
    prod = make_producer(bs)
    for p in range(a.changelog.partitions):  # a record another client wrote, headers not UTF-8
        prod.produce(topic, key=b"k#0.0", value=b"\x80junk", headers=[("streamtta.state.key", b"\xff"),
                                                                      ("streamtta.state.seq", b"\xfe")], partition=p)
    assert prod.flush(10) == 0
    b = _store(bs, topic, tmp_path / "b")
    assert b.load("k") == {"n": 1} and b.restores[-1]["source"] == "changelog"
    a.close(), b.close()


def test_a_restored_states_bytes_are_not_kept_once_the_next_state_is_loaded(bs, tmp_path, monkeypatch):
    """A worker that evicts and restores many states (engine.max_states) must not keep each one's bytes."""
    import tracemalloc

    from streamtta import state_store

    topic = f"mem-{uuid.uuid4().hex[:8]}.state"
    a = _store(bs, topic, tmp_path / "a")
    size = 400_000  # about one digits-resnet state
    keys = [f"s{i}" for i in range(12)]
    a.save_many({k: {"w": np.full(size // 8, i, dtype=np.float64)} for i, k in enumerate(keys)})
    monkeypatch.setattr(state_store, "RESTORES_KEPT", 5)
    b = _store(bs, topic, tmp_path / "b")
    b.load(keys[0])  # the first read of the changelog to its end, outside the measurement
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for k in keys[1:]:
            assert b.load(k)["w"].nbytes == size
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 4 * size, f"{grown:,} bytes kept after {len(keys) - 1} loads of {size:,}-byte states"
    assert len(b.restores) == 5 and b.restores[-1]["key"] == keys[-1]  # the last RESTORES_KEPT loads
    a.close(), b.close()


def test_a_restore_is_a_structured_log_event(bs, tmp_path, caplog):
    topic = f"event-{uuid.uuid4().hex[:8]}.state"
    a = _store(bs, topic, tmp_path / "a")
    a.save("t:3", {"n": 1})
    b = _store(bs, topic, tmp_path / "b")
    with caplog.at_level("INFO", logger="streamtta.engine"):
        b.load("t:3")
        a.load("t:3")
    got = [(r.event, r.stream, r.source, r.seq) for r in caplog.records if getattr(r, "event", None) == "restore"]
    assert got == [("restore", "t:3", "changelog", 1), ("restore", "t:3", "local", 1)]
    assert "restored from the changelog" in caplog.records[0].getMessage()
    assert "restored from the local cache" in caplog.records[1].getMessage()
    a.close(), b.close()


def test_a_group_id_that_cannot_name_a_topic_is_a_config_error(tmp_path):
    from streamtta.config import ConfigError

    cfg = Config(engine={"checkpoint_dir": str(tmp_path)},
                 kafka={"topic": "in", "group_id": "team/a", "connect_timeout_s": 1})
    with pytest.raises(ConfigError, match="'in.team/a.state' is not a legal Kafka topic name"):
        KafkaStateStore.from_config(cfg, "127.0.0.1:1")  # refused before any connection


def test_changelog_failures_end_the_command_like_other_kafka_failures(monkeypatch, capsys):
    """A changelog that cannot be read or created ends ``streamtta`` with exit 1 and one message, no traceback."""
    from streamtta import cli
    from streamtta.cli import top
    from streamtta.stream.kafka import changelog

    def unreadable(args):
        raise changelog.ChangelogError("could not read the changelog 'in.g.state' to its end within 30 s")

    monkeypatch.setattr(top, "cmd_top", unreadable)  # any command: the error path of cli.main is the same
    assert cli.main(["top", "--once"]) == 1
    assert capsys.readouterr().err.startswith("streamtta: could not read the changelog")

    class Refused:
        def result(self, timeout=None):
            raise changelog.KafkaException(changelog.KafkaError(changelog.KafkaError.TOPIC_AUTHORIZATION_FAILED))

    class Admin:
        def list_topics(self, timeout=None):
            return type("Md", (), {"topics": {}})()

        def create_topics(self, topics, **kw):
            return {t.topic: Refused() for t in topics}

    monkeypatch.setattr(changelog, "admin_client", lambda *a, **kw: Admin())
    with pytest.raises(MissingTopicError, match="could not create changelog topic 'in.g.state'"):
        changelog.ensure_changelog_topic("127.0.0.1:1", "in.g.state", 1)


def test_a_changelog_topic_that_is_not_compacted_is_warned_about(bs, tmp_path, caplog):
    """A changelog deleted by age loses the state of a partition idle for longer than retention.ms."""
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"in-{uuid.uuid4().hex[:6]}"
    admin = AdminClient({"bootstrap.servers": bs})  # kept: the futures need a live client
    fut = admin.create_topics([NewTopic(changelog_topic(topic, "g"), 1, -1, config={"cleanup.policy": "delete"})])
    for f in fut.values():
        f.result(20)
    cfg = Config(engine={"checkpoint_dir": str(tmp_path)}, kafka={"topic": topic, "group_id": "g"})
    with caplog.at_level("WARNING", logger="streamtta.engine"):
        KafkaStateStore.from_config(cfg, bs).close()
        assert "has cleanup.policy=delete" in caplog.text
        caplog.clear()
        KafkaStateStore.from_config(cfg.model_copy(update={"kafka": cfg.kafka.model_copy(update={"group_id": "h"})}),
                                    bs).close()  # created by streamtta: compacted, nothing to say
    assert "cleanup.policy" not in caplog.text
