"""Robust BatchNorm (RBN) of RoTTA (Yuan et al., CVPR 2023): EMA-smoothed test statistics.

Buffers ``mean``/``var`` start at the source statistics. For each batch (``stats_mode`` not frozen)::

    mean <- (1 - alpha) * mean + alpha * batch_mean
    var  <- (1 - alpha) * var  + alpha * batch_var        (biased, over batch x spatial)

and the batch is normalised with the *updated* EMA (as RoTTA does in train mode); frozen mode
normalises with the stored EMA. ``alpha = 0.05`` is RoTTA's default.

Batch size 1 (documented choice): the batch variance of one sample lacks the between-instance
term, so the variance update uses ``var_inst + (mean_inst - mean_ema)**2`` instead; for ``(1, C)``
rows this is the squared deviation from the running mean. Larger batches follow RoTTA exactly.

>>> import torch
>>> layer = RobustBatchNorm(2)
>>> _ = layer(torch.full((4, 2, 3, 3), 3.0))
>>> [round(v, 2) for v in layer.mean.tolist()]  # 0.95 * 0 + 0.05 * 3
[0.15, 0.15]
"""
from __future__ import annotations

import torch

from streamtta.adapters.norms.base import AdaptiveNorm, affine_normalize, instance_stats, pooled_stats


class RobustBatchNorm(AdaptiveNorm):
    """RoTTA's RBN: normalise with an EMA (momentum ``alpha``) of the test batch statistics."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        source_mean: torch.Tensor | None = None,
        source_var: torch.Tensor | None = None,
        alpha: float = 0.05,
        warmup: float = 0.0,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, source_mean, source_var)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"RBN alpha must be in (0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.warmup = float(warmup)
        self.register_buffer("mean", self.source_mean.clone())
        self.register_buffer("var", self.source_var.clone())
        self.register_buffer("n_updates", torch.zeros((), dtype=torch.long))

    def _alpha(self) -> float:
        if self.warmup <= 0:
            return self.alpha
        return max(self.alpha, self.warmup / (float(self.n_updates) + self.warmup))

    def _batch_stats(
        self, mean_i: torch.Tensor, var_i: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = mean_i.shape[0] if mask is None else int(mask.sum())
        if n >= 2:
            return pooled_stats(mean_i, var_i, mask)
        if mask is not None:
            mean_i, var_i = mean_i[mask], var_i[mask]
        m = mean_i[0]
        return m, var_i[0] + (m - self.mean).pow(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.use_source_stats:
            return self.source_forward(x)
        if self.stats_mode == "frozen":
            return affine_normalize(x, self.mean, self.var, self.weight, self.bias, self.eps)
        mean_i, var_i = instance_stats(x)
        bm, bv = self._batch_stats(mean_i, var_i)  # gradients flow through the batch part, as in RoTTA
        a = self._alpha()
        mean = (1 - a) * self.mean + a * bm
        var = (1 - a) * self.var + a * bv
        self._record((mean_i.detach(), var_i.detach()))
        return affine_normalize(x, mean, var, self.weight, self.bias, self.eps)

    def _apply_update(self, pending: tuple, mask: torch.Tensor | None) -> None:
        mean_i, var_i = pending
        bm, bv = self._batch_stats(mean_i, var_i, mask)
        a = self._alpha()
        self.mean.mul_(1 - a).add_(bm, alpha=a)
        self.var.mul_(1 - a).add_(bv, alpha=a)
        self.n_updates += 1

    def extra_repr(self) -> str:
        return super().extra_repr() + f", alpha={self.alpha}"
