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

    ``nonfinite`` marks the samples whose input held NaN or Inf (found in ``x``). The adapter steps on
    them replaced by finite values (:func:`~streamtta.adapters.masks.sanitize_batch`) and never learns
    from them; their predictions are meaningless, so such a sample is always in ``ood_flags`` and never in
    ``keep`` -- also when a re-processing assigns new flags.

    >>> from streamtta.types import StepOutput
    >>> x = torch.tensor([[1.0, 2.0], [float("nan"), 0.0]])
    >>> out = StepOutput(logits=torch.zeros(2, 3), features=torch.zeros(2, 4),
    ...                  update_mask=torch.zeros(2, dtype=torch.bool))
    >>> r = BatchResult(0, x, out, ood_scores=np.zeros(2), ood_flags=np.zeros(2, bool), keep=np.ones(2, bool),
    ...                 classes=np.arange(3))
    >>> r.nonfinite.tolist(), r.ood_flags.tolist(), r.keep.tolist()
    ([False, True], [False, True], [True, False])
    >>> r.ood_flags = np.zeros(2, bool); r.ood_flags.tolist()
    [False, True]
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
    #: per sample: the input held NaN/Inf (derived from ``x``)
    nonfinite: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n, x = len(self.ood_scores), self.x
        bad = np.zeros(n, bool)
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 1 and x.shape[0] == n and n:
            bad = ~torch.isfinite(x.detach().reshape(n, -1)).all(dim=1).cpu().numpy()
        object.__setattr__(self, "nonfinite", bad)
        if bad.any():
            self.ood_flags, self.keep = self.ood_flags, self.keep  # applies the rule in __setattr__

    def __setattr__(self, name: str, value: Any) -> None:
        bad = self.__dict__.get("nonfinite")
        if name in ("ood_flags", "keep") and bad is not None and bad.any():
            v = np.asarray(value, dtype=bool)
            value = v | bad if name == "ood_flags" else v & ~bad
        object.__setattr__(self, name, value)

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
