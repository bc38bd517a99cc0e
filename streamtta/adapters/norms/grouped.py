"""BatchNorm with one set of statistics per row (a stream): many streams normalised in one forward.

:class:`GroupedBatchNorm` replaces a trained ``nn.BatchNorm1d/2d/3d``. It keeps tables ``mean`` and
``var`` of shape ``(rows, C)``, every row starting at the source statistics. Before a forward its owner
(:class:`streamtta.adapters.grouped.GroupedStats`) sets :attr:`GroupedBatchNorm.route`: for every sample the
index of its row among the batch's distinct rows (``inverse``), those rows, their sample counts in the batch
and the weight ``a`` each row gives this batch. Per row ``r`` with batch statistics ``(m_b, v_b)`` pooled
over its samples (and their spatial positions), the exponentially weighted update is::

    d = m_b - mean[r]
    mean[r] <- mean[r] + a * d
    var[r]  <- (1 - a) * (var[r] + a * d**2) + a * v_b

and each sample is normalised with its row's *updated* statistics (as RBN does for one stream). For one
sample of a ``(B, C)`` input ``v_b = 0`` and the variance update is the usual exponentially weighted one.
The forward only records what it saw; :meth:`GroupedBatchNorm.commit` writes the update, for the samples
its mask keeps (OOD-flagged or non-finite samples never move a stream's statistics).

>>> import torch
>>> from torch import nn
>>> layer = GroupedBatchNorm.from_bn(nn.BatchNorm1d(2).eval())
>>> layer.ensure(3)                      # three streams, all at the source statistics (0, 1)
>>> x = torch.tensor([[4.0, 4.0], [2.0, 2.0]])
>>> layer.route = route(torch.tensor([2, 0]), torch.tensor([0.5, 0.5], dtype=torch.float64))
>>> y = layer(x)
>>> layer.commit(torch.tensor([True, True]))
>>> layer.mean[:, 0].tolist()            # row 0 saw 2.0, row 1 nothing, row 2 saw 4.0
[1.0, 0.0, 2.0]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from streamtta.adapters.norms.base import affine_normalize, instance_stats


@dataclass
class Route:
    """Where the samples of one batch go: ``inverse[i]`` indexes ``rows`` (the batch's distinct rows),
    ``counts`` their samples in the batch, ``weight`` the weight ``a`` of each row's update."""

    inverse: torch.Tensor
    rows: torch.Tensor
    counts: torch.Tensor
    weight: torch.Tensor


def route(rows: torch.Tensor, weight: torch.Tensor | None = None) -> Route:
    """The :class:`Route` of per-sample ``rows`` (weights per distinct row, ascending; default 1)."""
    uniq, inverse = torch.unique(rows, return_inverse=True)
    counts = torch.bincount(inverse, minlength=len(uniq))
    w = torch.ones(len(uniq), dtype=torch.float64) if weight is None else weight
    return Route(inverse, uniq, counts, w)


def row_update(mean: torch.Tensor, var: torch.Tensor, inverse: torch.Tensor, counts: torch.Tensor,
               weight: torch.Tensor, mean_i: torch.Tensor, var_i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Updated ``(mean, var)`` of the batch's rows (``mean``/``var``: their current ``(U, C)`` values) from
    per-sample instance statistics; rows without a sample (count 0) keep their values."""
    U, C = mean.shape
    n = counts.to(mean.dtype).clamp_min(1).unsqueeze(1)
    s1 = torch.zeros(U, C, dtype=mean.dtype, device=mean.device).index_add_(0, inverse, mean_i.to(mean.dtype))
    s2 = torch.zeros(U, C, dtype=mean.dtype, device=mean.device).index_add_(
        0, inverse, (var_i + mean_i * mean_i).to(mean.dtype))
    mb = s1 / n
    vb = (s2 / n - mb * mb).clamp_min(0.0)
    a = (weight.to(mean.dtype) * (counts > 0).to(mean.dtype)).unsqueeze(1)
    d = mb - mean
    return mean + a * d, (1 - a) * (var + a * d * d) + a * vb


class GroupedBatchNorm(nn.Module):
    """A trained BatchNorm with per-row (per-stream) statistics; see the module docstring."""

    def __init__(self, num_features: int, eps: float = 1e-5, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, source_mean: torch.Tensor | None = None,
                 source_var: torch.Tensor | None = None) -> None:
        super().__init__()
        self.num_features, self.eps = int(num_features), float(eps)
        c = self.num_features
        self.register_buffer("weight", None if weight is None else weight.detach().clone().float())
        self.register_buffer("bias", None if bias is None else bias.detach().clone().float())
        self.register_buffer("source_mean", torch.zeros(c) if source_mean is None else source_mean.detach().clone().float())
        self.register_buffer("source_var", torch.ones(c) if source_var is None else source_var.detach().clone().float())
        self.register_buffer("mean", torch.zeros(0, c))
        self.register_buffer("var", torch.zeros(0, c))
        #: per row, the moving average of its samples' ``log`` spread (``log var_i``, spatial inputs of a layer
        #: that tracks surprise); NaN until the row's first kept sample
        self.register_buffer("log_spread", torch.zeros(0, c))
        #: set by the owner before each forward (None: normalise with the source statistics)
        self.route: Route | None = None
        #: share of the source statistics mixed into every row's when normalising (alpha-BN style)
        self.source_weight = 0.0
        #: when True, a routed forward sets :attr:`surprise`
        self.track_surprise = False
        #: per sample, how far it lies from its stream's statistics before this batch (a stream's shift
        #: signal): ``log1p`` of the channel mean of ``(mean_i - mean[r])**2 / var[r]``, plus, for inputs with
        #: spatial dimensions, the channel mean of ``|log var_i - log_spread[r]|`` (noise raises a sample's
        #: spread, blur lowers it, often with the same means)
        self.surprise: torch.Tensor | None = None
        self._pending: tuple[Route, torch.Tensor, torch.Tensor] | None = None
        self._spatial = False  # whether the last routed forward's input had spatial dimensions

    @classmethod
    def from_bn(cls, bn: nn.modules.batchnorm._NormBase) -> "GroupedBatchNorm":
        """From a trained BatchNorm: its affine parameters (fixed) and running statistics (the source)."""
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"{type(bn).__name__} keeps no running statistics (track_running_stats=False): "
                             f"there are no source statistics to start each stream from")
        layer = cls(bn.num_features, bn.eps, bn.weight if bn.affine else None, bn.bias if bn.affine else None,
                    bn.running_mean, bn.running_var)
        return layer.to(bn.running_mean.device)

    def ensure(self, rows: int) -> None:
        """Grow the tables to ``rows`` rows; new rows hold the source statistics."""
        have = self.mean.shape[0]
        if rows > have:
            extra = rows - have
            self.mean = torch.cat([self.mean, self.source_mean.expand(extra, -1)])
            self.var = torch.cat([self.var, self.source_var.expand(extra, -1)])
            self.log_spread = torch.cat([self.log_spread, self.mean.new_full((extra, self.num_features), float("nan"))])

    @torch.no_grad()
    def reset_rows(self, rows: torch.Tensor) -> None:
        """Rows back to the source statistics (a row handed to a new stream)."""
        self.mean[rows] = self.source_mean
        self.var[rows] = self.source_var
        self.log_spread[rows] = float("nan")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"GroupedBatchNorm expects input (B, {self.num_features}, *), got {tuple(x.shape)}")
        r = self.route
        if r is None:
            return affine_normalize(x, self.source_mean, self.source_var, self.weight, self.bias, self.eps)
        mean_i, var_i = instance_stats(x)
        self._spatial = x.dim() > 2
        old_m, old_v = self.mean[r.rows], self.var[r.rows]
        if self.track_surprise:
            ov = old_v[r.inverse] + self.eps
            z = (mean_i - old_m[r.inverse]).pow(2) / ov
            self.surprise = torch.log1p(z.mean(dim=1))
            if x.dim() > 2:  # the spread inside the sample too: noise raises it, blur lowers it
                d = (torch.log(var_i + self.eps) - self.log_spread[r.rows][r.inverse]).abs()
                self.surprise = self.surprise + torch.nan_to_num(d, nan=0.0).mean(dim=1)
        m, v = row_update(old_m, old_v, r.inverse, r.counts, r.weight, mean_i, var_i)
        self._pending = (r, mean_i, var_i)
        if self.source_weight > 0:
            b = self.source_weight
            m, v = (1 - b) * m + b * self.source_mean, (1 - b) * v + b * self.source_var
        return affine_normalize(x, m[r.inverse], v[r.inverse], self.weight, self.bias, self.eps)

    @torch.no_grad()
    def commit(self, keep: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Write the last forward's update from the samples ``keep`` marks; ``weight`` (per distinct row,
        default: the forward's) is the weight of each row's update from its kept samples."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        r, mean_i, var_i = pending
        keep = keep.to(device=mean_i.device, dtype=torch.bool)
        if not bool(keep.any()):
            return
        counts = torch.bincount(r.inverse[keep], minlength=len(r.rows))
        m, v = row_update(self.mean[r.rows], self.var[r.rows], r.inverse[keep], counts,
                          r.weight if weight is None else weight, mean_i[keep], var_i[keep])
        self.mean[r.rows] = m
        self.var[r.rows] = v
        if self.track_surprise and self._spatial:  # a (B, C) input has no spread; a flat image's is log(eps)
            self._update_spread(r, keep, counts, var_i, r.weight if weight is None else weight)

    def _update_spread(self, r: Route, keep: torch.Tensor, counts: torch.Tensor, var_i: torch.Tensor,
                       weight: torch.Tensor) -> None:
        """Move the kept rows' ``log_spread`` towards their samples' mean ``log var_i`` (a new row: set to it)."""
        lv = torch.log(var_i[keep] + self.eps)
        s = torch.zeros(len(r.rows), self.num_features, dtype=lv.dtype, device=lv.device).index_add_(
            0, r.inverse[keep], lv)
        got = counts > 0
        mb = s[got] / counts[got].unsqueeze(1).to(lv.dtype)
        old = self.log_spread[r.rows[got]]
        a = weight[got].to(lv.dtype).unsqueeze(1)
        self.log_spread[r.rows[got]] = torch.where(torch.isnan(old), mb, old + a * (mb - old))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, rows={self.mean.shape[0]}"
