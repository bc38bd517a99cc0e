"""Base class of the test-time normalisation layers and the layer-swapping helper.

Every layer here is a drop-in replacement of a trained ``nn.BatchNorm1d/2d/3d``: it copies the
affine ``weight``/``bias`` (still ``nn.Parameter`` s, so entropy objectives can adapt them) and keeps
the source ``running_mean``/``running_var`` as ``source_mean``/``source_var`` buffers. Inputs are
``(B, C)`` or ``(B, C, *spatial)``; "instance statistics" are taken over the spatial dimensions.

Stateful layers (RBN, UnMix-TNS) update their statistics according to :attr:`AdaptiveNorm.stats_mode`:

* ``"immediate"`` (default, the published behaviour): every forward call updates the statistics;
* ``"deferred"``: a forward call only records what it saw; :meth:`AdaptiveNorm.commit` applies the
  update later, optionally for a subset of the batch (the adapters use this so that samples the
  OOD gate rejects never move the statistics);
* ``"frozen"``: statistics are read, never written (calibration / ``Adapter.features``).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

STATS_MODES = ("immediate", "deferred", "frozen")


def instance_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-instance, per-channel ``(mean, biased var)`` over the spatial dims; both ``(B, C)``.

    For ``(B, C)`` inputs (no spatial dims) the mean is ``x`` itself and the variance is zero.
    """
    if x.dim() == 2:
        return x, torch.zeros_like(x)
    # E[x^2] - E[x]^2 with a dot product: an order of magnitude faster on CPU than torch.var_mean
    # (and its backward); exact enough for activations whose mean is not >> their spread.
    f = x.flatten(2)
    n = f.shape[2]
    mean = f.mean(dim=2)
    sq = torch.linalg.vecdot(f, f, dim=2) / n
    return mean, (sq - mean * mean).clamp_min(0.0)


def pooled_stats(
    mean_i: torch.Tensor, var_i: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``(mean, biased var)`` over (batch x spatial) from per-instance stats (law of total variance).

    Equal to ``var_mean(x, dim=(0, 2, 3), unbiased=False)`` when every instance has the same size.
    """
    if mask is not None:
        mean_i, var_i = mean_i[mask], var_i[mask]
    mean = mean_i.mean(dim=0)
    var = var_i.mean(dim=0) + (mean_i - mean).pow(2).mean(dim=0)
    return mean, var


def finite_copy_(*pairs: tuple[torch.Tensor, torch.Tensor]) -> None:
    """``dst.copy_(src)`` for each ``(dst, src)`` pair (same shapes) where every ``src`` is finite; elsewhere
    all ``dst`` keep their values, so a statistics update that overflowed (e.g. the variance of a 1e20 batch in
    float32) neither poisons the state nor leaves a mean without its variance.

    >>> m, v = torch.zeros(3), torch.ones(3)
    >>> finite_copy_((m, torch.tensor([1.0, 2.0, 3.0])), (v, torch.tensor([4.0, float("inf"), 5.0])))
    >>> m.tolist(), v.tolist()
    ([1.0, 0.0, 3.0], [4.0, 1.0, 5.0])
    """
    ok = torch.stack([torch.isfinite(src) for _, src in pairs]).all(dim=0)
    for dst, src in pairs:
        dst.copy_(torch.where(ok, src, dst))


def affine_normalize(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """``weight * (x - mean) / sqrt(var + eps) + bias`` with ``(C,)`` or per-instance ``(B, C)`` stats."""
    stats_grad = mean.requires_grad or var.requires_grad
    if mean.dim() == 1 and not stats_grad:
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
    if not stats_grad and x.dim() > 2:
        # per-instance statistics as one fused eval-mode batch norm over (1, B*C, *spatial)
        B, C = x.shape[:2]
        w = None if weight is None else weight.repeat(B)
        b = None if bias is None else bias.repeat(B)
        y = F.batch_norm(x.reshape((1, B * C) + x.shape[2:]), mean.reshape(-1), var.reshape(-1), w, b, False, 0.0, eps)
        return y.view_as(x)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    if mean.dim() == 1:
        view: tuple[int, ...] = (1, -1) + (1,) * (x.dim() - 2)
    else:
        view = tuple(scale.shape) + (1,) * (x.dim() - 2)
    return x * scale.view(view) + shift.view(view)


class AdaptiveNorm(nn.Module):
    """Common state of the streamtta normalisation layers (see the module docstring)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        source_mean: torch.Tensor | None = None,
        source_var: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if num_features <= 0:
            raise ValueError(f"num_features must be positive, got {num_features}")
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = 0.1 if momentum is None else float(momentum)
        if affine:
            self.weight: nn.Parameter | None = nn.Parameter(torch.ones(num_features))
            self.bias: nn.Parameter | None = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        mean = torch.zeros(num_features) if source_mean is None else source_mean.detach().clone().float()
        var = torch.ones(num_features) if source_var is None else source_var.detach().clone().float()
        self.register_buffer("source_mean", mean)
        self.register_buffer("source_var", var)
        self.stats_mode = "immediate"
        #: when True (see :func:`source_stats`) the layer is the plain source BatchNorm.
        self.use_source_stats = False
        self._pending: tuple | None = None

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_bn(cls, bn: nn.modules.batchnorm._NormBase, **kwargs) -> "AdaptiveNorm":
        """Build the layer from a trained BatchNorm (copies affine params and running stats)."""
        layer = cls(
            bn.num_features,
            eps=bn.eps,
            momentum=bn.momentum,
            affine=bn.affine,
            source_mean=bn.running_mean,
            source_var=bn.running_var,
            **kwargs,
        )
        if bn.affine:
            with torch.no_grad():
                layer.weight.copy_(bn.weight)
                layer.bias.copy_(bn.bias)
        return layer.to(device=bn.weight.device if bn.affine else layer.source_mean.device)

    def source_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The original BatchNorm: frozen source statistics, current affine parameters."""
        return affine_normalize(x, self.source_mean, self.source_var, self.weight, self.bias, self.eps)

    # -- statistics bookkeeping -----------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__} expects input (B, {self.num_features}, *), got shape {tuple(x.shape)}"
            )

    def _record(self, pending: tuple) -> None:
        """Called by forward with what the update needs; applies it now or later per ``stats_mode``."""
        if self.stats_mode == "frozen":
            return
        if self.stats_mode == "deferred":
            self._pending = pending
        else:
            self._pending = None
            self._apply_update(pending, None)

    @torch.no_grad()
    def commit(self, mask: torch.Tensor | None = None) -> None:
        """Apply the update recorded by the last deferred forward (only samples where ``mask`` is True)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if mask is not None:
            mask = mask.to(device=self.source_mean.device, dtype=torch.bool).reshape(-1)
            if not bool(mask.any()):
                return
            if bool(mask.all()):
                mask = None
        self._apply_update(pending, mask)

    def discard(self) -> None:
        """Drop a recorded-but-uncommitted update."""
        self._pending = None

    def _apply_update(self, pending: tuple, mask: torch.Tensor | None) -> None:  # pragma: no cover
        """Stateless layers have nothing to update."""

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, stats_mode={self.stats_mode!r}"


NormFactory = Callable[[nn.modules.batchnorm._NormBase], nn.Module]


def replace_batchnorms(model: nn.Module, factory: NormFactory) -> list[str]:
    """Swap every ``nn.BatchNorm1d/2d/3d`` of ``model`` in place for ``factory(bn)``; returns the names.

    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    >>> from streamtta.adapters.norms.bn_adapt import BatchStatsNorm
    >>> replace_batchnorms(net, BatchStatsNorm.from_bn)
    ['1']
    """
    names: list[str] = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(parent, child_name, factory(child))
                names.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return names


def adaptive_norms(model: nn.Module) -> Iterator[AdaptiveNorm]:
    for m in model.modules():
        if isinstance(m, AdaptiveNorm):
            yield m


def set_stats_mode(model: nn.Module, mode: str) -> None:
    """Set ``stats_mode`` of every :class:`AdaptiveNorm` in ``model``."""
    if mode not in STATS_MODES:
        raise ValueError(f"stats_mode must be one of {STATS_MODES}, got {mode!r}")
    for m in adaptive_norms(model):
        m.stats_mode = mode
        m._pending = None


@contextlib.contextmanager
def frozen_stats(model: nn.Module) -> Iterator[None]:
    """Context manager: forwards inside read the normalisation statistics but never update them."""
    saved = [(m, m.stats_mode) for m in adaptive_norms(model)]
    for m, _ in saved:
        m.stats_mode = "frozen"
    try:
        yield
    finally:
        for m, mode in saved:
            m.stats_mode = mode


@contextlib.contextmanager
def source_stats(model: nn.Module) -> Iterator[None]:
    """Context manager: every :class:`AdaptiveNorm` normalises with the frozen source statistics
    (with the source affine parameters too, this is the non-adapting source model)."""
    layers = list(adaptive_norms(model))
    for m in layers:
        m.use_source_stats = True
    try:
        yield
    finally:
        for m in layers:
            m.use_source_stats = False


def commit_stats(model: nn.Module, mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> None:
    """:meth:`AdaptiveNorm.commit` on every layer of ``model``; ``labels`` go to pseudo-label-driven layers."""
    for m in adaptive_norms(model):
        if labels is not None and getattr(m, "needs_pseudo_labels", False):
            m.commit(mask, labels=labels)
        else:
            m.commit(mask)
