"""Do-no-harm output guard: fall back to the non-adapting source model on batches it handles alike.

Adapting normalisation statistics costs a little accuracy on domains that are (almost) the
source domain: there the source statistics are simply the best ones. When the adapted model and
the frozen source model (source statistics and source affine parameters) predict the same class
for at least ``agreement`` of the batch, the domain is taken as benign and the step returns the
source model's logits; otherwise the adapted logits. Adaptation itself (statistics, parameters)
is unaffected, as are the features. Costs one extra forward pass without gradients.

>>> import torch
>>> g = SourceFallback(agreement=0.75)
>>> src = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
>>> ada = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])   # 3 of 4 agree
>>> out, used = g.choose(ada, src); used, torch.equal(out, src)
(True, True)
"""
from __future__ import annotations

import torch

from streamtta.adapters.context import StepContext
from streamtta.adapters.guards.base import Guard


class SourceFallback(Guard):
    """Return the source model's logits when it agrees with the adapted model on >= ``agreement``."""

    name = "source-fallback"
    #: the adapter computes the exact source model's logits for :meth:`choose`.
    needs_source_model = True

    def __init__(self, agreement: float = 0.95) -> None:
        if not 0.0 < agreement <= 1.0:
            raise ValueError(f"source-fallback agreement must be in (0, 1], got {agreement}")
        self.agreement = float(agreement)

    def choose(self, adapted: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """``(logits to return, whether they are the source model's)``."""
        agree = (adapted.argmax(dim=1) == source.argmax(dim=1)).float().mean()
        if float(agree) >= self.agreement:
            return source, True
        return adapted, False

    def after_step(self, adapter, ctx: StepContext, mask: torch.Tensor, updated: bool) -> bool:
        return False
