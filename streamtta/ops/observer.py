"""What the engine reports while it runs: :class:`EngineObserver`, a no-op base whose hooks the
:class:`~streamtta.engine.Engine` calls, and :class:`Observers`, which forwards each hook to several.

The hooks run on the engine's thread, inside its loop: they must be quick and must not raise (an
exception in a hook would fail the engine like any other).

>>> class Count(EngineObserver):
...     n = 0
...     def batch(self, engine, records, seconds):
...         self.n += len(records)
>>> c = Count()
>>> Observers([c, EngineObserver()]).batch(None, [1, 2, 3], 0.1); c.n
3
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["EngineObserver", "Observers", "timed"]


class EngineObserver:
    """Hooks the engine calls; each does nothing here. Offsets are ``{(topic, partition): offset}``."""

    def batch(self, engine: Any, records: list[Any], seconds: float) -> None:
        """A consumed batch went through decode, the pipelines, the sinks and (if due) checkpoint and
        commit in ``seconds``; ``engine`` holds the running counters."""

    def step(self, key: str, result: Any, pipeline: Any) -> None:
        """The pipeline of state ``key`` processed one batch of its records (a
        :class:`~streamtta.results.BatchResult`)."""

    def alert(self, alert: Any) -> None:
        """An :class:`~streamtta.alerts.Alert` went to the alert sinks."""

    def checkpoint(self, key: str, offsets: Mapping[tuple[str, int], int], seconds: float) -> None:
        """The state ``key`` was checkpointed (next offsets per partition) in ``seconds``."""

    def commit(self, offsets: Mapping[tuple[str, int], int], seconds: float, stored: bool) -> None:
        """The next offsets were committed (``stored`` False: skipped, the group moved on)."""


class Observers(EngineObserver):
    """Forwards every hook to each of ``observers`` in order."""

    def __init__(self, observers: Iterable[EngineObserver]) -> None:
        self.observers = list(observers)

    def batch(self, engine: Any, records: list[Any], seconds: float) -> None:
        for o in self.observers:
            o.batch(engine, records, seconds)

    def step(self, key: str, result: Any, pipeline: Any) -> None:
        for o in self.observers:
            o.step(key, result, pipeline)

    def alert(self, alert: Any) -> None:
        for o in self.observers:
            o.alert(alert)

    def checkpoint(self, key: str, offsets: Mapping[tuple[str, int], int], seconds: float) -> None:
        for o in self.observers:
            o.checkpoint(key, offsets, seconds)

    def commit(self, offsets: Mapping[tuple[str, int], int], seconds: float, stored: bool) -> None:
        for o in self.observers:
            o.commit(offsets, seconds, stored)


def timed(fn: Any, *args: Any) -> tuple[Any, float]:
    """``(fn(*args), seconds it took)``.

    >>> timed(sum, [1, 2])[0]
    3
    """
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0
