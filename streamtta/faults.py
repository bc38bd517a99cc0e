"""Fault injection for tests: make a named step of the record path fail on its n-th call.

The engine and the pipeline call :func:`point` at every step a record goes through (``decode``, ``step``,
``score``, ``predictions``, ``dlq``, ``alert``, ``flush``, ``checkpoint``, ``commit``). Nothing is armed in
a normal run, so :func:`point` only looks up an empty dict. A test arms one point with :func:`armed`; its
``nth`` call then raises :class:`InjectedFault`, and the test checks that a restart loses no record.

>>> with armed("checkpoint", nth=2):
...     point("checkpoint")
...     point("checkpoint")
Traceback (most recent call last):
...
streamtta.faults.InjectedFault: injected fault at 'checkpoint' (call 2)
>>> point("checkpoint")  # disarmed again
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

__all__ = ["POINTS", "InjectedFault", "armed", "point"]

#: Every step of the record path that calls :func:`point`, in the order a record meets them.
POINTS = ("decode", "step", "score", "predictions", "dlq", "alert", "flush", "checkpoint", "commit")

_armed: dict[str, list[int]] = {}  # point -> [calls so far, nth]


class InjectedFault(RuntimeError):
    """The failure :func:`armed` makes a step raise."""


def point(name: str) -> None:
    """Raise :class:`InjectedFault` when ``name`` is armed and this is its ``nth`` call; else nothing."""
    slot = _armed.get(name)
    if slot is None:
        return
    slot[0] += 1
    if slot[0] == slot[1]:
        raise InjectedFault(f"injected fault at {name!r} (call {slot[0]})")


@contextmanager
def armed(name: str, nth: int = 1) -> Iterator[None]:
    """Within the block, the ``nth`` call of :func:`point` ``(name)`` raises :class:`InjectedFault`."""
    if name not in POINTS:
        raise ValueError(f"unknown fault point {name!r}; known: {', '.join(POINTS)}")
    if nth < 1:
        raise ValueError(f"nth must be >= 1, got {nth}")
    _armed[name] = [0, nth]
    try:
        yield
    finally:
        _armed.pop(name, None)
