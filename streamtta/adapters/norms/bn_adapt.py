"""BN-adapt (test-batch statistics; Schneider et al. 2020, Nado et al. 2020; the normaliser of TENT).

Each batch is normalised with its own statistics over (batch x spatial) dims. The layer is
stateless. Batch statistics need at least two samples; for smaller batches (batch size 1) the
layer uses the frozen **source** statistics instead (a documented choice: a single image's own
statistics are instance normalisation, which the source model never saw; a single ``(1, C)`` row
has zero variance). ``source_weight`` > 0 blends the source statistics in (the "BN-alpha" prior).

>>> import torch
>>> layer = BatchStatsNorm(3)
>>> y = layer(torch.randn(8, 3, 4, 4) * 5 + 2).detach()
>>> abs(float(y.mean())) < 1e-4, round(float(y.var(unbiased=False)), 2)
(True, 1.0)
>>> bool(torch.isfinite(layer(torch.randn(1, 3))).all())  # batch size 1 -> source statistics
True
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from streamtta.adapters.norms.base import AdaptiveNorm, affine_normalize


class BatchStatsNorm(AdaptiveNorm):
    """Normalise with the statistics of the current test batch (BN-adapt / "TBN")."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        source_mean: torch.Tensor | None = None,
        source_var: torch.Tensor | None = None,
        min_batch_size: int = 2,
        source_weight: float = 0.0,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, source_mean, source_var)
        if min_batch_size < 2:
            raise ValueError(f"min_batch_size must be >= 2 (batch statistics of one sample), got {min_batch_size}")
        if not 0.0 <= source_weight < 1.0:
            raise ValueError(f"source_weight must be in [0, 1), got {source_weight}")
        self.min_batch_size = int(min_batch_size)
        self.source_weight = float(source_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.use_source_stats:
            return self.source_forward(x)
        if x.shape[0] < self.min_batch_size:
            return F.batch_norm(x, self.source_mean, self.source_var, self.weight, self.bias, False, 0.0, self.eps)
        if self.source_weight == 0.0:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        dims = [0] + list(range(2, x.dim()))
        var, mean = torch.var_mean(x, dim=dims, unbiased=False)
        a = self.source_weight
        mean = a * self.source_mean + (1 - a) * mean
        var = a * self.source_var + (1 - a) * var
        return affine_normalize(x, mean, var, self.weight, self.bias, self.eps)
