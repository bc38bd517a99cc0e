"""Readiness of a Kafka worker (what ``/readyz`` answers): :class:`Readiness`.

A worker is ready when all of these hold, and says which fail otherwise:

* it is **consuming**: its engine loop runs (set by :meth:`Readiness.consuming`; not before the model
  is loaded and the replay done, not once the engine stopped or failed);
* the consumer was **polled** recently: a librdkafka statistics report arrived within ``max_poll_age_s``
  (reports are served from inside ``consume()``, so a stuck loop stops them);
* a **broker was reachable** in that report (at least one broker connection ``UP``);
* **partitions are assigned** to it (the source's assignment, else the report's assignment size).

>>> r = Readiness(max_poll_age_s=30, clock=lambda: 100.0)
>>> r.check()[0], r.check()[1]["reasons"][0]
(False, 'the engine is not consuming')
>>> r.on_stats({"brokers": {"b:9092/1": {"nodeid": 1, "state": "UP"}}, "cgrp": {"assignment_size": 1}})
>>> r.running = True
>>> r.check()
(True, {'ready': True, 'reasons': [], 'partitions': 1, 'brokers_up': 1, 'last_poll_age_s': 0.0})
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from streamtta.ops.kstats import ConsumerStats

__all__ = ["Readiness"]


class Readiness:
    """Tracks what ``/readyz`` needs; :meth:`check` may be called from any thread."""

    def __init__(self, max_poll_age_s: float = 30.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_poll_age_s = float(max_poll_age_s)
        self.clock = clock
        #: the engine loop runs (see :meth:`consuming`)
        self.running = False
        self.source: Any = None
        self.stats: ConsumerStats | None = None
        self.stats_at: float | None = None

    def on_stats(self, stats: ConsumerStats | dict[str, Any] | str) -> None:
        """A statistics report of the consumer arrived (it was polled just now)."""
        self.stats = stats if isinstance(stats, ConsumerStats) else ConsumerStats.parse(stats)
        self.stats_at = self.clock()

    @contextmanager
    def consuming(self, source: Any = None) -> Iterator[None]:
        """Ready (as far as the engine goes) inside the block; ``source.assignment()`` gives the partitions."""
        self.source, self.running = source, True
        try:
            yield
        finally:
            self.running = False

    def _partitions(self) -> int:
        assignment = getattr(self.source, "assignment", None)
        if callable(assignment):
            try:
                return len(assignment())
            except Exception:  # noqa: BLE001 -- a closed consumer: fall back on the last report
                return self.stats.assigned if self.stats is not None else 0
        return self.stats.assigned if self.stats is not None else 0

    def check(self) -> tuple[bool, dict[str, Any]]:
        """``(ready, details)``; ``details["reasons"]`` says what is missing."""
        reasons = []
        if not self.running:
            reasons.append("the engine is not consuming")
        age = None if self.stats_at is None else max(0.0, self.clock() - self.stats_at)
        if age is None:
            reasons.append("no consumer statistics yet (the consumer has not been polled)")
        elif age > self.max_poll_age_s:
            reasons.append(f"the consumer was last polled {age:.1f} s ago (limit {self.max_poll_age_s:g} s)")
        up = self.stats.brokers_up if self.stats is not None else 0
        if self.stats is not None and up == 0:
            reasons.append("no broker reachable in the last poll")
        parts = self._partitions()
        if parts <= 0:
            reasons.append("no partitions assigned")
        return not reasons, {"ready": not reasons, "reasons": reasons, "partitions": max(parts, 0),
                             "brokers_up": up, "last_poll_age_s": None if age is None else round(age, 3)}
