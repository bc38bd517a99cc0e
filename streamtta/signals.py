"""Signals for the command-line jobs: SIGINT/SIGTERM before an engine runs stop the command
(:class:`Interrupted`); while one runs, the first asks it to stop after the current batch
(:func:`graceful_shutdown`), a second aborts."""
from __future__ import annotations

import logging
import signal
from contextlib import contextmanager
from typing import Any, Iterator

log = logging.getLogger("streamtta")

__all__ = ["Interrupted", "graceful_shutdown", "on_signals", "raise_interrupted"]


class Interrupted(Exception):
    """SIGINT/SIGTERM (``args[0]``) arrived while no engine was running (start-up, replay), or twice."""


def raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum))


@contextmanager
def on_signals(handler: Any = raise_interrupted) -> Iterator[None]:
    """``handler`` serves SIGINT and SIGTERM inside the block (main thread only; elsewhere a no-op). The
    default raises :class:`Interrupted`, so a command's ``with`` blocks stop what they started."""
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, handler)
        except ValueError:  # not in the main thread
            pass
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


@contextmanager
def graceful_shutdown(engine: Any) -> Iterator[list[int]]:
    """While the engine runs, the first SIGINT/SIGTERM asks it to stop after the current batch (flush,
    checkpoint, commit); a second one raises :class:`Interrupted`. Yields the list of signals received."""
    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        if len(received) > 1:
            raise Interrupted(signal.Signals(signum))
        log.warning("%s: finishing the current batch, then stopping (again to abort)", signal.Signals(signum).name)
        engine.request_stop()

    with on_signals(handler):
        yield received
