"""The OOD-burst rule: a sustained high OOD-flag rate raises one :class:`~streamtta.alerts.events.OODBurstEvent`."""
from __future__ import annotations

import math
from collections import deque
from typing import Any, Mapping

import numpy as np

from streamtta.alerts.events import OODBurstEvent


class OODBurstRule:
    """Fires once when the OOD-flag rate stays at or above ``level`` for ``n_batches`` batches.

    It re-arms after the rate has fallen below ``level * rearm_fraction`` (hysteresis).

    >>> rule = OODBurstRule(level=0.5, n_batches=3)
    >>> [b for b, r in enumerate([0.1, 0.6, 0.7, 0.8, 0.9, 0.2, 0.6, 0.6, 0.6]) if rule.update(r, b)]
    [3, 8]
    """

    def __init__(self, level: float = 0.5, n_batches: int = 3, rearm_fraction: float = 0.8) -> None:
        if not 0.0 < level <= 1.0:
            raise ValueError(f"level must be in (0, 1], got {level}")
        if n_batches < 1:
            raise ValueError(f"n_batches must be >= 1, got {n_batches}")
        self.level = float(level)
        self.n_batches = int(n_batches)
        self.rearm_fraction = float(rearm_fraction)
        self.reset()

    def reset(self) -> None:
        self.run = 0
        self.armed = True
        self.rates: deque[float] = deque(maxlen=self.n_batches)

    def update(self, ood_rate: float, batch_index: int) -> OODBurstEvent | None:
        """Feed one batch's OOD-flag rate; returns an event when a burst starts (non-finite rates are ignored)."""
        r = float(ood_rate)
        if not math.isfinite(r):
            return None
        self.rates.append(r)
        self.run = self.run + 1 if r >= self.level else 0
        if not self.armed and r < self.level * self.rearm_fraction:
            self.armed = True
        if self.armed and self.run >= self.n_batches:
            self.armed = False
            return OODBurstEvent(batch_index=int(batch_index), rate=float(np.mean(self.rates)), n_batches=self.run,
                                 level=self.level, evidence={"rates": [round(v, 4) for v in self.rates]})
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"run": self.run, "armed": self.armed, "rates": list(self.rates)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.run, self.armed = int(state["run"]), bool(state["armed"])
        self.rates = deque(state["rates"], maxlen=self.n_batches)
