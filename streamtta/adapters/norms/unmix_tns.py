"""UnMix-TNS (Tomar et al., ICLR 2024): un-mixing test-time normalisation statistics.

Each layer keeps ``K`` statistics components ``(mu_k, var_k)`` initialised from the source
statistics plus noise (``alpha = 0.5``)::

    mu_k  = mu_s + sqrt(alpha K / (K - 1)) * sqrt(var_s) * eps_kc,   eps ~ N(0, 1) per (k, c)
    var_k = (1 - alpha) * var_s                                      (K = 1: no noise, alpha = 0)

For an input ``x`` of shape ``(B, C, *spatial)`` with instance statistics ``m_b, v_b`` (over the
spatial dims) the layer computes, exactly as the official code::

    p_bk      = softmax_k(cos(m_b, mu_k) / tau)                          (no gradient, tau = 0.07)
    mu^_bk    = (1 - p_bk) mu_k  + p_bk m_b
    var^_bk   = (1 - p_bk) var_k + p_bk v_b
    mean_b    = mean_k mu^_bk
    var_b     = mean_k var^_bk + mean_k mu^_bk**2 - mean_b**2            (law of total variance)
    y         = weight * (x - mean_b) / sqrt(var_b + eps) + bias

and afterwards (with the *old* components used for the output) the online un-mixing update::

    lambda = 1 - (1 - momentum) ** (B / bs_max)                          (momentum 0.1 -> 1 - 0.9**(B/bs_max))
    mu_k  <- mu_k  + lambda * mean_b p_bk (m_b - mu_k)
    var_k <- var_k + lambda * mean_b p_bk (v_b - var_k)

Differences from the official code, all documented choices: ``lambda`` uses the actual batch size
of each call (the official code fixes it from the configured batch size: identical when they are
equal); the mixture is evaluated centred on the component average (equal to the formula above up
to float rounding); under ``stats_mode="deferred"`` the
update waits for :meth:`commit` and can skip gated samples (``lambda`` then uses the number of
kept samples). Layers that replace a ``BatchNorm1d`` normalise with the frozen source statistics
(as published) unless ``adapt_bn1d=True``, and ``(B, C)`` inputs always do (no instance statistics).
Batch size 1 works natively (per-instance statistics).

Extension (not in the paper, off by default): ``instance_weight`` > 0 adds the fraction
``instance_weight`` of the instance's own deviation from the mixture mean on top of the
published ``1/K`` share.

>>> import torch
>>> torch.manual_seed(0) and None
>>> layer = UnMixTNS(4, K=8)
>>> y = layer(torch.randn(2, 4, 5, 5))
>>> tuple(y.shape), layer.component_means.shape
((2, 4, 5, 5), torch.Size([8, 4]))
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from streamtta.adapters.norms.base import AdaptiveNorm, affine_normalize, instance_stats


class UnMixTNS(AdaptiveNorm):
    """UnMix-TNS normalisation layer (see the module docstring for the exact rules)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        source_mean: torch.Tensor | None = None,
        source_var: torch.Tensor | None = None,
        K: int = 16,
        bs_max: int = 64,
        tau: float = 0.07,
        init_alpha: float = 0.5,
        instance_weight: float = 0.0,
        passthrough: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, source_mean, source_var)
        if int(K) != K or K < 1:
            raise ValueError(f"UnMix-TNS needs an integer number of components K >= 1, got K={K!r}")
        if bs_max < 1:
            raise ValueError(f"bs_max must be >= 1, got {bs_max}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if not 0.0 <= init_alpha < 1.0:
            raise ValueError(f"init_alpha must be in [0, 1), got {init_alpha}")
        if not 0.0 <= instance_weight <= 1.0:
            raise ValueError(f"instance_weight must be in [0, 1], got {instance_weight}")
        self.K = int(K)
        self.bs_max = int(bs_max)
        self.tau = float(tau)
        self.instance_weight = float(instance_weight)
        self.passthrough = bool(passthrough)
        alpha = 0.0 if self.K == 1 else float(init_alpha)
        self.init_alpha = alpha
        gen = None
        if seed is not None:
            gen = torch.Generator().manual_seed(int(seed))
        std = self.source_var.clamp_min(0).sqrt()
        noise = torch.randn((self.K, num_features), generator=gen).to(self.source_mean.device)
        scale = math.sqrt(alpha * self.K / (self.K - 1)) if self.K > 1 else 0.0
        self.register_buffer("component_means", self.source_mean.expand(self.K, -1) + scale * std * noise)
        self.register_buffer("component_vars", ((1.0 - alpha) * self.source_var).expand(self.K, -1).clone())

    @classmethod
    def from_bn(cls, bn: nn.modules.batchnorm._NormBase, adapt_bn1d: bool = False, **kwargs) -> "UnMixTNS":
        kwargs.setdefault("passthrough", isinstance(bn, nn.BatchNorm1d) and not adapt_bn1d)
        return super().from_bn(bn, **kwargs)  # type: ignore[return-value]

    # -- maths ----------------------------------------------------------------------------------
    def assignments(self, mean_i: torch.Tensor) -> torch.Tensor:
        """``p_bk = softmax_k(cos(m_b, mu_k) / tau)``, shape ``(B, K)`` (no gradient)."""
        with torch.no_grad():
            sim = F.normalize(mean_i, dim=1) @ F.normalize(self.component_means, dim=1).t()
            return torch.softmax(sim.div_(self.tau), dim=1)

    def mixture_stats(
        self, mean_i: torch.Tensor, var_i: torch.Tensor, p: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-instance normalisation ``(mean_b, var_b)``, each ``(B, C)``.

        The mixed component means are formed as one ``(B, K, C)`` tensor centred on the component
        average (about ten tensor operations per layer; the per-layer cost on small models is the
        number of operations, not their size).
        """
        M, V = self.component_means, self.component_vars
        mbar = M.mean(dim=0)
        Mc = M - mbar
        # mu^_bk - mbar = Mc_k + p_bk (m_b - mbar - Mc_k)
        d = torch.addcmul(Mc, p.unsqueeze(2), (mean_i - mbar).unsqueeze(1) - Mc)
        mean_d = d.mean(dim=1)
        var_mix = ((d * d).mean(dim=1) - mean_d * mean_d).clamp_min(0.0)
        # mean_k var^_bk = mean_k V_k + (v_b - sum_k p_bk V_k) / K   (the p_bk sum to one)
        var = (var_i - p @ V) / self.K + V.mean(dim=0) + var_mix
        mean = mbar + mean_d
        if self.instance_weight > 0.0:
            w = self.instance_weight
            # move the mean a further fraction w of the way to the instance mean; keep the
            # variance consistent with the shifted centre (total variance around the new mean)
            shift = w * (mean_i - mean)
            var = (1 - w) * var + w * var_i + w * (1 - w) * (mean_i - mean).pow(2)
            mean = mean + shift
        return mean, var.clamp_min(0.0)

    # -- module API -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.use_source_stats:
            return self.source_forward(x)
        if self.passthrough or x.dim() == 2:
            return affine_normalize(x, self.source_mean, self.source_var, self.weight, self.bias, self.eps)
        mean_i, var_i = instance_stats(x)
        p = self.assignments(mean_i.detach())
        mean, var = self.mixture_stats(mean_i, var_i, p)
        self._record((mean_i.detach(), var_i.detach(), p))
        return affine_normalize(x, mean, var, self.weight, self.bias, self.eps)

    def _apply_update(self, pending: tuple, mask: torch.Tensor | None) -> None:
        mean_i, var_i, p = pending
        if mask is not None:
            mean_i, var_i, p = mean_i[mask], var_i[mask], p[mask]
        n = mean_i.shape[0]
        lam = 1.0 - (1.0 - self.momentum) ** (n / self.bs_max)
        a = lam / n
        # mu_k <- mu_k + a sum_b p_bk (m_b - mu_k) = (1 - a sum_b p_bk) mu_k + a sum_b p_bk m_b
        keep = p.sum(dim=0).unsqueeze(1).mul_(-a).add_(1.0)  # (K, 1)
        pt = p.t()
        self.component_means.mul_(keep).addmm_(pt, mean_i, alpha=a)
        self.component_vars.mul_(keep).addmm_(pt, var_i, alpha=a)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", K={self.K}, bs_max={self.bs_max}, tau={self.tau}"
        if self.instance_weight:
            s += f", instance_weight={self.instance_weight}"
        return s + (", passthrough" if self.passthrough else "")
