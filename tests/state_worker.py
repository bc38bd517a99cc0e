"""One streamtta worker for the state hand-over test: Engine + KafkaSource + KafkaStateStore, built directly.

    python tests/state_worker.py BOOTSTRAP TOPIC GROUP CHECKPOINT_DIR RESULT_JSON [--batch-size N]

Consumes TOPIC in GROUP with the segment-mlp model until SIGTERM, writes predictions to
``<TOPIC>.<GROUP>.predictions``, keeps its states in the changelog ``<TOPIC>.<GROUP>.state`` with
CHECKPOINT_DIR as the local cache, and on exit writes RESULT_JSON: every restore (key, source, seq,
seconds, wall time, the restored batch index and sample count) and the final states' counters. While
it runs, ``RESULT_JSON.assigned`` holds the partitions it is assigned (``[]`` after a revocation).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamtta.config import Config
from streamtta.engine import Engine, Outputs
from streamtta.runner import build_pipeline
from streamtta.state_store import KafkaStateStore
from streamtta.stream.kafka import (
    KafkaDeadLetter,
    KafkaSink,
    KafkaSource,
    make_producer,
)
from streamtta.stream.kafka.settings import client_settings


class RecordingStore(KafkaStateStore):
    """Remembers, per restore, when it happened and the restored state's counters."""

    def load(self, key: str) -> dict[str, Any] | None:
        state = super().load(key)
        entry = self.restores[-1]
        entry["at"] = time.time()
        if state is not None:
            entry.update(batch_index=state["pipeline"]["batch_index"], n_samples=state["pipeline"]["n_samples"],
                         next_offsets=state["next_offsets"])
        return state


def main() -> int:
    ap = argparse.ArgumentParser()
    for name in ("bootstrap", "topic", "group", "checkpoint_dir", "result"):
        ap.add_argument(name)
    ap.add_argument("--batch-size", type=int, default=16)
    a = ap.parse_args()
    cfg = Config(model={"source": "segment-mlp", "threads": 1},
                 engine={"batch_size": a.batch_size, "checkpoint_dir": a.checkpoint_dir, "record_log": False},
                 kafka={"topic": a.topic, "group_id": a.group, "poll_timeout_s": 0.2,
                        "consumer": {"session.timeout.ms": 6000}})
    pipeline = build_pipeline(cfg)
    k = cfg.kafka
    producer = make_producer(a.bootstrap, **client_settings(k, "producer"))
    outputs = Outputs(KafkaSink(producer, f"{a.topic}.{a.group}.predictions"), [],
                      KafkaDeadLetter(producer, f"{a.topic}.{a.group}.dlq"))
    source = KafkaSource(a.bootstrap, [a.topic], a.group, overrides=client_settings(k, "consumer"))
    store = RecordingStore.from_config(cfg, a.bootstrap)
    engine = Engine(cfg, source, outputs, pipeline, store=store)
    signal.signal(signal.SIGTERM, lambda *_: engine.request_stop())
    assigned = Path(a.result + ".assigned")
    source.on_assign(lambda parts: assigned.write_text(json.dumps(sorted(p for _, p in parts))))
    source.on_revoke(lambda parts: assigned.write_text("[]"))
    try:
        engine.run()
        final = {key: {"batch_index": engine.states[key].pipe.batch_index,
                       "n_samples": engine.states[key].pipe.n_samples} for key in engine.states}
    finally:
        source.close()
        producer.flush(30)
        store.close()
    result = {"restores": store.restores, "final": final, "records_seen": engine.records_seen,
              "samples": engine.samples_processed, "skipped": engine.skipped}
    Path(a.result).write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
