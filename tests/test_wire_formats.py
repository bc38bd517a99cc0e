"""The README's wire formats: its producer example (a plain confluent_kafka.Producer, JSON rows and a tensor
envelope written without streamtta) runs against the embedded broker and the engine predicts its records;
object rows follow the declared feature order (the calibration data's column names), else sorted keys."""
from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from confluent_kafka import Consumer, TopicPartition

from streamtta.config import load_config
from streamtta.runner import build_pipeline, consume
from streamtta.stream.envelope import DecodeLimits, decode_value, encode_tensor

README = Path(__file__).resolve().parent.parent / "README.md"


def wire_formats_block() -> str:
    text = README.read_text()
    start = text.index("## Wire formats")
    section = text[start:text.index("\n## ", start + 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    return blocks[0]


def read_all(bootstrap: str, topic: str, n: int) -> list:
    """The records of every partition of ``topic`` (waits up to 10 s for ``n`` of them)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex, "enable.auto.commit": False})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        out: list = []
        for _ in range(20):
            out += [m for m in c.consume(100, timeout=0.5) if not m.error()]
            if len(out) >= n:
                break
        return out
    finally:
        c.close()


def run_engine(bootstrap: str, topic: str, tmp_path: Path, model: torch.nn.Module, calibration, **cfg_over):
    cfg = load_config(overrides={"kafka": {"topic": topic, "group_id": f"g-{topic}", "stop_at_end": True},
                                 "engine": {"checkpoint_dir": str(tmp_path / "ckpt")}, "alerts": {"jsonl": False},
                                 **cfg_over}, env=False)
    pipe = build_pipeline(cfg, model=model, calibration=calibration)
    return consume(cfg, bootstrap, pipeline=pipe, progress=False)


def test_the_handwritten_envelope_decodes_like_the_codec():
    ns: dict = {}
    block = wire_formats_block()
    exec(compile(block[:block.index("producer = Producer")], "README.md", "exec"), ns)  # definitions only
    x = np.linspace(-1, 1, 8)
    mine, codec = (decode_value(v) for v in (ns["tensor_envelope"](x, "m-3", label=0, domain="d"),
                                             encode_tensor(x.astype(np.float32), "m-3", label=0, domain="d")))
    assert np.array_equal(mine.x, codec.x) and (mine.stream_id, mine.label, mine.domain) == ("m-3", 0, "d")


def test_object_rows_without_a_declared_order_are_sorted_by_key():
    row = b'{"stream_id": "s", "features": {"temp": 21.5, "rpm": 900}}'
    assert decode_value(row).x.tolist() == [900.0, 21.5]
    assert decode_value(row, DecodeLimits(feature_names=("temp", "rpm"))).x.tolist() == [21.5, 900.0]


def test_the_readme_producer_example_is_predicted(embedded_broker, unique_name, tmp_path):
    bs = embedded_broker.bootstrap_servers
    block = wire_formats_block().replace('"localhost:9092"', repr(bs)).replace('"sensors"', repr(unique_name))
    exec(compile(block, "README.md", "exec"), {})
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                              torch.nn.Linear(16, 3)).eval()
    result = run_engine(bs, unique_name, tmp_path, net, np.random.default_rng(0).normal(size=(200, 8)))
    assert result.stats["samples"] == 3 and result.stats["dead_letters"] == 1
    preds = sorted((json.loads(m.value()) for m in read_all(bs, f"{unique_name}.predictions", 3)), key=lambda p: p["stream_id"])
    assert [p["stream_id"] for p in preds] == ["machine-1", "machine-2", "machine-3"]  # one prediction per record
    assert preds[0]["event_time"] == 1.5 and all(p["pred"] in (0, 1, 2) for p in preds)
    (dead,) = read_all(bs, f"{unique_name}.dlq", 1)
    assert dead.key() == b"machine-4" and b"does not match expected_shape (8,)" in dict(dead.headers())["dlq.error"]


def test_object_rows_follow_the_calibration_data_column_order(embedded_broker, unique_name, tmp_path):
    from confluent_kafka import Producer

    bs = embedded_broker.bootstrap_servers
    net = torch.nn.Linear(2, 2)
    with torch.no_grad():  # prediction = index of the larger feature (in the model's input order)
        net.weight.copy_(torch.eye(2))
        net.bias.zero_()
    rng = np.random.default_rng(0)
    csv = tmp_path / "clean.csv"
    np.savetxt(csv, rng.uniform(0, 1, (60, 2)), delimiter=",", header="temp,rpm", comments="")
    producer = Producer({"bootstrap.servers": bs})
    for sid, feats in (("a", {"rpm": 1.0, "temp": 5.0}), ("b", {"temp": 1.0, "rpm": 5.0, "extra": 0.0}),
                       ("c", {"temp": 1.0})):
        producer.produce(unique_name, value=json.dumps({"stream_id": sid, "features": feats}))
    producer.flush()
    result = run_engine(bs, unique_name, tmp_path, net.eval(), csv, adapter={"spec": "source"},
                        scorer={"name": "energy", "gate": "none"})
    assert result.stats["samples"] == 2 and result.stats["dead_letters"] == 1
    preds = sorted((json.loads(m.value()) for m in read_all(bs, f"{unique_name}.predictions", 2)), key=lambda p: p["stream_id"])
    assert [(p["stream_id"], p["pred"]) for p in preds] == [("a", 0), ("b", 1)]  # temp first, as in the CSV header (sorted keys would flip both)
    (dead,) = read_all(bs, f"{unique_name}.dlq", 1)
    assert b"lacks feature(s)" in dict(dead.headers())["dlq.error"]


@pytest.mark.parametrize("bad", ['{"stream_id": "s", "features": [1, 2], "colour": "red"}',
                                 '{"stream_id": "s", "features": [1, 2], "schema_version": 2}'])
def test_unknown_keys_and_versions_are_refused_as_documented(bad):
    from streamtta.stream.envelope import DecodeError

    with pytest.raises(DecodeError):
        decode_value(bad.encode())
