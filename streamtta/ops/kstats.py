"""librdkafka statistics (the JSON a client emits every ``statistics.interval.ms``) reduced to what
operators watch: consumer lag per assigned partition, whether a broker is up, the group's assignment.

librdkafka's ``consumer_lag`` of a partition (since librdkafka 1.7) is its high watermark (the last stable
offset under ``isolation.level=read_committed``) minus the group's committed offset: the records not yet
committed, so it includes what the engine holds or has processed since its last commit; -1 while either
is unknown. Before the group's first commit on a partition the lag is taken from the consumer's position
instead (``ls_offset``, else ``hi_offset``, minus ``app_offset``: the records not yet consumed), so a new
group shows its backlog at once; partitions where neither is known are left out.
Partition ``-1`` (librdkafka's internal "unassigned" partition) is always left out.

>>> raw = {"ts": 5_000_000, "brokers": {"b:9092/1": {"nodeid": 1, "state": "UP"},
...        "GroupCoordinator": {"nodeid": -1, "state": "UP"}},
...        "topics": {"t": {"partitions": {"0": {"consumer_lag": 7, "desired": True},
...                                        "1": {"consumer_lag": -1, "desired": True},
...                                        "2": {"consumer_lag": -1, "ls_offset": 90, "app_offset": 40},
...                                        "-1": {"consumer_lag": 0, "desired": False}}}},
...        "cgrp": {"state": "up", "assignment_size": 2}}
>>> s = ConsumerStats.parse(raw)
>>> s.lag, s.brokers_up, s.assigned
({('t', 0): 7, ('t', 2): 50}, 1, 2)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ConsumerStats"]


@dataclass(frozen=True)
class ConsumerStats:
    """One statistics report of a consumer."""

    #: records between the committed offset and the end per assigned ``(topic, partition)`` (known ones only)
    lag: dict[tuple[str, int], int] = field(default_factory=dict)
    #: brokers (real nodes, not the bootstrap or coordinator placeholders) in state ``UP``
    brokers_up: int = 0
    #: partitions the group assigned to this consumer (-1: not reported)
    assigned: int = -1
    #: the group's state as librdkafka names it (``up``, ``wait-join``, ...; empty: not reported)
    group_state: str = ""

    @classmethod
    def parse(cls, stats: dict[str, Any] | str | bytes) -> ConsumerStats:
        """From the statistics JSON (text or already decoded)."""
        doc = json.loads(stats) if isinstance(stats, (str, bytes)) else stats
        lag: dict[tuple[str, int], int] = {}
        for topic, t in (doc.get("topics") or {}).items():
            for pid, p in (t.get("partitions") or {}).items():
                part, value = int(pid), int(p.get("consumer_lag", -1))
                end, pos = int(p.get("ls_offset", -1)), int(p.get("app_offset", -1))
                end = end if end >= 0 else int(p.get("hi_offset", -1))
                if value < 0 and end >= 0 and pos >= 0:  # nothing committed yet: what is not yet consumed
                    value = max(0, end - pos)
                if part >= 0 and value >= 0 and p.get("desired", True):
                    lag[(topic, part)] = value
        up = sum(1 for b in (doc.get("brokers") or {}).values()
                 if int(b.get("nodeid", -1)) >= 0 and b.get("state") == "UP")
        cgrp = doc.get("cgrp") or {}
        return cls(lag=lag, brokers_up=up, assigned=int(cgrp.get("assignment_size", -1)),
                   group_state=str(cgrp.get("state", "")))
