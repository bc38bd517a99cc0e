"""Progress bars of long jobs (rich)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator

__all__ = ["progress_bar"]


@contextmanager
def progress_bar(total: int | None, description: str, enabled: bool = True) -> Iterator[Any]:
    """A rich progress bar; yields ``advance(n)``."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*cols, transient=False) as prog:
        task = prog.add_task(description, total=total, rate="")
        t0 = time.perf_counter()
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            dt = time.perf_counter() - t0
            prog.update(task, advance=n, rate=f"{done[0] / dt:,.0f} rec/s" if dt > 0 else "")

        yield advance
