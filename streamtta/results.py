"""What a pipeline returns for one batch: :class:`BatchResult`.

A result is final once the pipeline releases it (:meth:`streamtta.pipeline.Pipeline.release`). Until
then -- only with re-adaptation and ``hold_batches > 0`` -- a shift confirmed on a later batch may process
it again and replace its predictions (``revised`` becomes True); its scores and flags stay those it was
first given.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from streamtta.types import StepOutput


@dataclass
class BatchResult:
    """One batch through a pipeline.

    ``predictions`` are class labels (the model's classes), ``ood_scores`` higher = more OOD,
    ``ood_flags`` the samples the scorer calls unknown, ``alerts`` the :class:`~streamtta.alerts.Alert`
    objects this batch raised (the ``alerts.jsonl`` schema), ``shift`` the kind of a shift confirmed on
    it. ``tag`` is whatever the caller passed to ``process`` (the engine keeps its records there).
    """

    batch_index: int
    x: torch.Tensor
    out: StepOutput
    ood_scores: np.ndarray
    ood_flags: np.ndarray
    keep: np.ndarray
    classes: np.ndarray
    alerts: list[Any] = field(default_factory=list)
    shift: str | None = None
    step_s: float = 0.0
    revised: bool = False
    tag: Any = None
    #: the adapter's state before this batch, while a re-processing may still need it
    pre_state: dict[str, Any] | None = None
    #: ``time.perf_counter()`` when the batch arrived (latency) and when it was processed (hold timeout)
    received_at: float = field(default_factory=time.perf_counter)
    done_at: float = field(default_factory=time.perf_counter)

    def __len__(self) -> int:
        return len(self.ood_scores)

    @property
    def logits(self) -> torch.Tensor:
        return self.out.logits

    @property
    def features(self) -> torch.Tensor:
        return self.out.features

    @property
    def predictions(self) -> np.ndarray:
        return self.classes[self.out.logits.argmax(1).numpy()]

    @property
    def confidences(self) -> np.ndarray:
        return self.out.logits.softmax(1).max(1).values.numpy()

    @property
    def entropy(self) -> np.ndarray:
        return self.out.entropy.numpy()

    @property
    def updated(self) -> np.ndarray:
        """Which samples fed the adapter's update."""
        return self.out.update_mask.numpy()

    @property
    def reset(self) -> bool:
        return bool(self.out.reset)

    @property
    def info(self) -> dict[str, Any]:
        return self.out.info

    @property
    def scalar_info(self) -> dict[str, Any]:
        """The ``info`` entries that are JSON scalars (numbers, strings, booleans, None)."""
        return {k: v for k, v in self.out.info.items() if isinstance(v, (int, float, str, bool, type(None)))}
