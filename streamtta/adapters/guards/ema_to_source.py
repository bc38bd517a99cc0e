"""Weight ensembling towards the source (ROID): ``theta <- m * theta + (1 - m) * theta_src`` after each update.

Applied to the adapted parameters only (the norm affine parameters); ``momentum = 0.99`` is
ROID's ``MOMENTUM_SRC``. This bounds how far the parameters can drift, so long streams cannot
run away. It never requests a reset. ``anchor`` (the source values) is captured when the
adapter is built and can be moved with :meth:`set_anchor` (e.g. to a meta-initialisation).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from streamtta.adapters.context import StepContext
from streamtta.adapters.guards.base import Guard


class EMAToSource(Guard):
    """Pull the adapted parameters towards their source values after every optimizer step."""

    name = "ema-source"

    def __init__(self, momentum: float = 0.99) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"ema-source momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self._anchor: list[torch.Tensor] = []

    def bind(self, adapter) -> None:
        self.set_anchor(adapter.parameters_to_adapt())

    def set_anchor(self, params: Iterable[torch.Tensor]) -> None:
        self._anchor = [p.detach().clone() for p in params]

    @torch.no_grad()
    def after_step(self, adapter, ctx: StepContext, mask: torch.Tensor, updated: bool) -> bool:
        if not updated:
            return False
        params = adapter.parameters_to_adapt()
        if len(params) != len(self._anchor):
            raise RuntimeError(
                f"ema-source anchor has {len(self._anchor)} tensors but the adapter adapts {len(params)}"
            )
        for p, a in zip(params, self._anchor):
            p.mul_(self.momentum).add_(a, alpha=1.0 - self.momentum)
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": [a.clone() for a in self._anchor]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "anchor" in state:
            self._anchor = [a.detach().clone() for a in state["anchor"]]
