"""Source and sink protocols. Kafka and in-memory replay both implement them, so offline
simulations run through exactly the same engine code path as live Kafka."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from streamtta.types import RawRecord

TopicPartition = tuple[str, int]


class Source(Protocol):
    def consume(self, max_records: int, timeout: float) -> list[RawRecord]:
        """Return up to ``max_records`` records, waiting at most ``timeout`` seconds."""

    def commit(self, offsets: dict[TopicPartition, int]) -> bool | None:
        """Commit *next* offsets (last processed + 1) per partition, synchronously; ``False`` when the
        commit was skipped (the group moved on without this member), else ``True`` or ``None``."""

    def on_assign(self, cb: Callable[[list[TopicPartition]], None]) -> None: ...

    def on_revoke(self, cb: Callable[[list[TopicPartition]], None]) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def at_end(self) -> bool:
        """True once a bounded source (replay / ``stop_at_end``) has delivered everything."""

    def close(self) -> None: ...


class Sink(Protocol):
    def write(self, key: str, value: dict[str, Any]) -> None: ...

    def flush(self, timeout: float = 30.0) -> None: ...

    def close(self) -> None: ...


class DeadLetter(Protocol):
    def send(self, record: RawRecord, error: str) -> None: ...

    def flush(self, timeout: float = 30.0) -> None: ...


@dataclass
class Outputs:
    """Where the engine writes: predictions (None = not written), alert sinks, and the dead-letter queue."""

    predictions: Sink | None
    alerts: list[Sink]
    dlq: DeadLetter

    def all(self) -> list[Any]:
        return [s for s in [self.predictions, *self.alerts, self.dlq] if s is not None]
