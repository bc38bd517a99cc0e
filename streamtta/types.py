"""Plain data types shared by every layer of the engine.

The engine moves three kinds of objects:

* :class:`RawRecord` -- one message as it came off a source (Kafka or an in-memory replay),
  with its origin ``(topic, partition, offset)``;
* :class:`Sample` -- one decoded, validated record: a float32 tensor payload plus the optional
  evaluation fields (label, domain, ``is_unknown``) that replayed simulations carry along;
* :class:`StepOutput` -- what an :class:`~streamtta.adapters.base.Adapter` returns for one batch.

OOD-score polarity, stated once for the whole project: **higher score = more out-of-distribution**.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

#: Polarity of every OOD score in streamtta: higher = more out-of-distribution.
OOD_HIGHER_IS_MORE_OOD = True


@dataclass(frozen=True)
class RawRecord:
    """One message from a source, before decoding."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int | None = None

    @property
    def origin(self) -> tuple[str, int, int]:
        return (self.topic, self.partition, self.offset)


@dataclass
class Sample:
    """One decoded record.

    ``x`` holds the payload (e.g. ``(C, H, W)`` for images, ``(F,)`` for sensor rows). ``label``,
    ``domain`` and ``is_unknown`` are evaluation-only fields carried by replayed streams; the engine
    never uses them to adapt.
    """

    x: np.ndarray
    stream_id: str
    label: int | None = None
    event_time: float | None = None
    domain: str | None = None
    is_unknown: bool | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepOutput:
    """Result of one :meth:`Adapter.step` call.

    ``logits`` are computed *before* any parameter update on this batch (predict-then-adapt), so
    online accuracy measured on them is honest. ``update_mask[i]`` is True when sample ``i``
    contributed to the gradient update (always all-False for gradient-free adapters).
    """

    logits: torch.Tensor
    features: torch.Tensor
    update_mask: torch.Tensor
    loss: float | None = None
    reset: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def probs(self) -> torch.Tensor:
        return self.logits.softmax(dim=1)

    @property
    def entropy(self) -> torch.Tensor:
        logp = self.logits.log_softmax(dim=1)
        return -(logp.exp() * logp).sum(dim=1)
