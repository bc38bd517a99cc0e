"""Test-batch alignment for LayerNorm / GroupNorm models ("align").

LayerNorm and GroupNorm normalise each sample on its own, so a model built on them has no batch statistics
for BN-adapt to re-estimate -- yet a covariate shift still moves the *per-channel* distribution of their
normalised output ``z`` (an offset on every input of a sensor MLP survives a LayerNorm as a per-channel
offset pattern). This layer replaces a trained ``nn.LayerNorm`` (one normalised dimension: the channels,
last axis, as in transformers and channels-last ConvNeXt blocks) or ``nn.GroupNorm`` (channels on axis 1)
and re-standardises ``z`` per channel with the test batch's statistics onto the *source* statistics of
``z``, before the (adaptable) affine parameters::

    z  = per-sample normalisation of x              (exactly what the original layer computes)
    z' = (z - m_batch) / sqrt(v_batch + eps) * sqrt(v_src + eps) + m_src
    y  = weight * z' + bias

**Statistics across batches.** The test statistics ``(m, v)`` are an exponential moving average of the
batch statistics (weight ``alpha`` per batch, default 0.2, times the class-mix weight ``w`` below; with
``warmup`` the first batches are averaged equally, weight ``1/(n+1)`` while that is larger), started
from the source statistics: a few batches of a class-sorted stream then still average over several classes,
and a one-sample batch changes little. Frozen forwards read the average; the deferred update takes only the
samples the adapter's gate keeps. ``alpha=None`` uses each batch's own statistics instead (blended towards
the source ones by ``w``). On the tuning streams (digits-c with `digits-resnet-ln` / `-gn`, 500 samples per
domain) ``alpha`` 0.2 beat the per-batch statistics on i.i.d., Dirichlet and class-sorted orders, and on the
continual open-set stream (LayerNorm: 80.9% against 75.0%, source 72.8%).

**Class-correlated batches.** Batch statistics of a batch that holds one or two classes describe those
classes, not the domain (BN-adapt's failure on sorted streams). The layer takes part in the adapter's
class-mix pre-pass like ``cb-stats`` (it is the *unaligned* model there): with ``f`` the share of the
classes the batch's estimated class mix effectively holds (its perplexity ``exp(H(mix))`` over the number of
classes: 1 for a balanced batch, ``1/C`` for a one-class batch), the statistics used are
``w * batch + (1 - w) * source`` with ``w`` 1 from ``full_share`` up, 0 up to ``none_share`` and linear in
between -- full alignment on a batch that holds most classes, none (the original layer) on a batch of a few.

``(m_src, v_src)`` are measured on clean source data by
:meth:`CompositeAdapter.fit_source <streamtta.adapters.composite.CompositeAdapter.fit_source>` (the layer
records ``z`` during the exact source pass). Until then -- and for a batch with fewer than
``min_batch_size`` rows of statistics -- the layer is the original one (``z' = z``). Statistics are taken
over every axis but the channel one (batch x positions), so a batch of one image still has spatial rows.
With ``alpha=None`` the layer is stateless between batches, like BN-adapt.

>>> import torch
>>> from torch import nn
>>> ln = nn.LayerNorm(16)
>>> layer = AlignedNorm.from_norm(ln, alpha=None)          # each batch's own statistics
>>> x = torch.randn(256, 16)
>>> bool(torch.allclose(layer(x), ln(x), atol=1e-6))      # not calibrated yet: the original layer
True
>>> layer.start_recording(); _ = layer.source_forward(x); layer.finish_recording()
>>> shifted = x + torch.linspace(-2, 2, 16)               # a per-feature offset survives LayerNorm...
>>> gap = lambda y: round(float((y.mean(0) - ln(x).mean(0)).abs().max().detach()), 3)
>>> gap(ln(shifted)) > 0.5, gap(layer(shifted))          # ...the aligned layer takes it out again
(True, 0.0)
>>> ema = AlignedNorm.from_norm(ln, warmup=False)          # alpha 0.2: step by step, batch after batch
>>> _ = ema.load_state_dict(layer.state_dict())
>>> g = [gap(ema(shifted)) for _ in range(4)]
>>> g == sorted(g, reverse=True) and g[-1] < 0.7 * g[0]
True
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from streamtta.adapters.norms.base import AdaptiveNorm, instance_stats, pooled_stats


class AlignedNorm(AdaptiveNorm):
    """LayerNorm / GroupNorm whose normalised output is aligned per channel to its source statistics."""

    #: takes part in the adapter's class-mix pre-pass (as the unaligned layer) and gets the batch's class mix
    needs_pseudo_labels = True

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 source_mean: torch.Tensor | None = None, source_var: torch.Tensor | None = None, *,
                 groups: int | None = None, min_batch_size: int = 2, full_share: float = 0.5, none_share: float = 0.25,
                 alpha: float | None = 0.2, warmup: bool = True, num_classes: int | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, source_mean, source_var)
        if min_batch_size < 2:
            raise ValueError(f"min_batch_size must be >= 2, got {min_batch_size}")
        if not 0.0 <= none_share < full_share <= 1.0:
            raise ValueError(f"need 0 <= none_share < full_share <= 1, got {none_share}, {full_share}")
        self.full_share, self.none_share = float(full_share), float(none_share)
        if alpha is not None and not 0.0 < alpha <= 1.0:
            raise ValueError(f"align alpha must be in (0, 1], got {alpha}")
        #: None: each batch's own statistics; else an EMA of them (weight ``alpha`` x the class-mix weight)
        self.alpha = None if alpha is None else float(alpha)
        #: average the first batches equally (weight 1/(n+1) while above ``alpha``), then the EMA
        self.warmup = bool(warmup)
        self.register_buffer("n_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("test_mean", self.source_mean.clone())
        self.register_buffer("test_var", self.source_var.clone())
        self.num_classes = num_classes  # given to every pseudo-label norm; the class mix carries it here
        # the class-mix pre-pass protocol of the pseudo-label norms (see CompositeAdapter._class_mix_prepass)
        self.class_mix: torch.Tensor | None = None
        self.detect_shift, self.shift_detected, self.new_domain = False, None, False
        #: GroupNorm group count (channels on axis 1); None: LayerNorm over the last axis
        self.groups = None if groups is None else int(groups)
        self.min_batch_size = int(min_batch_size)
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self._sums: list[torch.Tensor] | None = None

    @classmethod
    def from_norm(cls, norm: nn.Module, **kwargs) -> "AlignedNorm":
        """Build the layer from a trained ``nn.LayerNorm`` (one normalised dimension) or ``nn.GroupNorm``."""
        if isinstance(norm, nn.GroupNorm):
            c, groups, affine = norm.num_channels, norm.num_groups, norm.affine
        elif isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1:
            c, groups, affine = norm.normalized_shape[0], None, norm.elementwise_affine
        else:
            raise TypeError(f"align replaces GroupNorm or a LayerNorm over one dimension, not {norm!r}")
        layer = cls(c, eps=norm.eps, affine=affine and norm.weight is not None, groups=groups, **kwargs)
        if layer.weight is not None:
            with torch.no_grad():
                layer.weight.copy_(norm.weight)
                if norm.bias is not None:
                    layer.bias.copy_(norm.bias)
                else:
                    layer.bias.zero_()
        return layer.to(norm.weight.device if norm.weight is not None else layer.source_mean.device)

    # -- the two halves -------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        axis = 1 if self.groups is not None else -1
        if x.dim() < 2 or x.shape[axis] != self.num_features:
            raise ValueError(f"{type(self).__name__} expects {self.num_features} channels on axis {axis}, "
                             f"got shape {tuple(x.shape)}")

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups is not None:
            return F.group_norm(x, self.groups, None, None, self.eps)
        return F.layer_norm(x, (self.num_features,), None, None, self.eps)

    def _channels_last(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` as ``(rows, C)``."""
        if self.groups is not None:
            return z.transpose(1, -1).reshape(-1, self.num_features)
        return z.reshape(-1, self.num_features)

    def _affine(self, z: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return z
        shape = (1, -1) + (1,) * (z.dim() - 2) if self.groups is not None else (-1,)
        return z * self.weight.view(shape) + self.bias.view(shape)

    # -- forward --------------------------------------------------------------------------------------
    def source_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The original layer (while recording: its ``z`` statistics are accumulated)."""
        z = self._normalise(x)
        if self._sums is not None:
            rows = self._channels_last(z.detach()).double()
            self._sums[0] += rows.shape[0]
            self._sums[1] += rows.sum(0)
            self._sums[2] += (rows * rows).sum(0)
        return self._affine(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.use_source_stats or self.detect_shift or not bool(self.calibrated):
            return self.source_forward(x)
        z = self._normalise(x)
        if self.alpha is not None:
            mean, var = self._ema_stats(z)
        else:
            rows = self._channels_last(z)
            w = self.batch_weight()
            if rows.shape[0] < self.min_batch_size or w == 0.0:
                return self._affine(z)
            var, mean = torch.var_mean(rows, dim=0, unbiased=False)
            if w < 1.0:
                mean = w * mean + (1.0 - w) * self.source_mean
                var = w * var + (1.0 - w) * self.source_var
        scale = torch.sqrt((self.source_var + self.eps) / (var + self.eps))
        shift = self.source_mean - mean * scale
        shape = (1, -1) + (1,) * (z.dim() - 2) if self.groups is not None else (-1,)
        return self._affine(z * scale.view(shape) + shift.view(shape))

    def batch_weight(self) -> float:
        """The weight of the batch statistics for the current class mix (1 without one)."""
        if self.class_mix is None:
            return 1.0
        p = self.class_mix.clamp_min(1e-12)
        share = float(torch.exp(-(p * p.log()).sum())) / p.numel()
        return min(1.0, max(0.0, (share - self.none_share) / (self.full_share - self.none_share)))

    def _sample_stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample, per-channel ``(mean, var)`` of ``z`` over its positions, both ``(B, C)``."""
        if self.groups is not None:
            return instance_stats(z)
        rows = z.reshape(z.shape[0], -1, self.num_features)
        var, mean = torch.var_mean(rows, dim=1, unbiased=False)
        return mean, var

    def _ema_stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``alpha`` set: the stored EMA (frozen mode), or the EMA updated with this batch's statistics at
        weight ``alpha`` x :meth:`batch_weight` (the update itself is recorded for :meth:`commit`)."""
        if self.stats_mode == "frozen":
            return self.test_mean, self.test_var
        mean_i, var_i = self._sample_stats(z)
        a = self.batch_weight() * max(float(self.alpha), 1.0 / (int(self.n_updates) + 1) if self.warmup else 0.0)
        if a == 0.0 or mean_i.shape[0] * z[0].numel() // self.num_features < self.min_batch_size:
            return self.test_mean, self.test_var
        bm, bv = pooled_stats(mean_i, var_i)
        self._record((mean_i.detach(), var_i.detach(), a))
        return (1 - a) * self.test_mean + a * bm, (1 - a) * self.test_var + a * bv

    def _apply_update(self, pending: tuple, mask: torch.Tensor | None) -> None:
        mean_i, var_i, a = pending
        bm, bv = pooled_stats(mean_i, var_i, mask)
        self.test_mean.mul_(1 - a).add_(bm, alpha=a)
        self.test_var.mul_(1 - a).add_(bv, alpha=a)
        self.n_updates += 1

    def commit(self, mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> None:
        """With ``alpha``: apply the recorded EMA update (samples where ``mask`` is True); else stateless."""
        if self.alpha is not None:
            super().commit(mask)

    # -- source statistics ----------------------------------------------------------------------------
    def start_recording(self) -> None:
        """Accumulate the ``z`` statistics of the following :meth:`source_forward` calls."""
        dev = self.source_mean.device
        self._sums = [torch.zeros((), dtype=torch.float64, device=dev),
                      torch.zeros(self.num_features, dtype=torch.float64, device=dev),
                      torch.zeros(self.num_features, dtype=torch.float64, device=dev)]

    @torch.no_grad()
    def finish_recording(self) -> None:
        """Make the recorded statistics the source statistics (the layer aligns from now on)."""
        sums, self._sums = self._sums, None
        if sums is None or float(sums[0]) < 2:
            return
        mean = sums[1] / sums[0]
        var = (sums[2] / sums[0] - mean * mean).clamp_min(0.0)
        self.source_mean.copy_(mean.float())
        self.source_var.copy_(var.float())
        self.test_mean.copy_(self.source_mean)
        self.test_var.copy_(self.source_var)
        self.n_updates.zero_()
        self.calibrated.fill_(True)

    def extra_repr(self) -> str:
        kind = f"GroupNorm({self.groups})" if self.groups is not None else "LayerNorm"
        return f"{self.num_features}, {kind}, calibrated={bool(self.calibrated)}"


def replace_sample_norms(model: nn.Module, **kwargs) -> list[str]:
    """Swap every ``nn.GroupNorm`` and one-dimensional ``nn.LayerNorm`` of ``model`` in place for an
    :class:`AlignedNorm`; returns the names."""
    names: list[str] = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm) or (isinstance(child, nn.LayerNorm) and len(child.normalized_shape) == 1):
                setattr(parent, child_name, AlignedNorm.from_norm(child, **kwargs))
                names.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return names
