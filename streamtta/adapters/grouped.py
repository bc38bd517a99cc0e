"""Per-stream BatchNorm statistics for many streams in one forward: :class:`GroupedStats`.

A copy of the model whose BatchNorm layers are :class:`~streamtta.adapters.norms.grouped.GroupedBatchNorm`
layers: one row of statistics per stream, all rows starting at the source statistics. A forward takes the
batch and each sample's row; every sample is normalised with its own stream's statistics after they have
taken in this batch's samples of that stream. The weight of a stream's update from ``n`` new samples,
after ``seen`` samples so far, is::

    a = max(1 - (1 - alpha) ** n,  n / (seen + prior + n))

so a new stream starts as a running average that gives the source statistics the weight of ``prior``
samples, and settles into an exponential moving average with per-sample momentum ``alpha`` (a memory of
about ``1 / alpha`` samples) once it has seen about ``1 / alpha - prior`` samples. Only the affine
parameters of the source model are used; nothing is learned by gradient.

``layers=k`` keeps per-stream statistics in the first ``k`` BatchNorm layers only (in module order); the
later ones normalise with the source statistics. Early layers carry a stream's domain (sensor gain, blur,
noise); deep ones carry its classes, so deep per-stream statistics go wrong when a stream's labels come in
runs (a machine in one state for an hour). ``source_weight=b`` normalises with ``(1 - b)`` of the stream's
statistics plus ``b`` of the source's (alpha-BN).

>>> import torch
>>> from torch import nn
>>> torch.manual_seed(0) and None
>>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
>>> g = GroupedStats(net, alpha=0.05, prior=4)
>>> g.ensure(2)
>>> logits, feats = g.forward(torch.randn(6, 4) + 3, torch.tensor([0, 1, 0, 1, 0, 0]))
>>> logits.shape, feats.shape
(torch.Size([6, 3]), torch.Size([6, 8]))
>>> g.commit(torch.ones(6, dtype=torch.bool)); g.seen.tolist()
[4.0, 2.0]
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from streamtta.adapters.common import FeatureHook, last_linear_name
from streamtta.adapters.norms.base import replace_batchnorms
from streamtta.adapters.norms.grouped import GroupedBatchNorm, route


class GroupedStats:
    """Per-row BatchNorm statistics of ``model`` (see the module docstring).

    ``feature_layer`` names the layer whose input (``feature_hook="input"``) or output gives the features
    (default: the last ``nn.Linear``'s input)."""

    def __init__(self, model: nn.Module, *, alpha: float = 0.01, prior: float = 16.0, layers: int | None = None,
                 source_weight: float = 0.0, feature_layer: str | None = None, feature_hook: str = "input") -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if prior < 0:
            raise ValueError(f"prior must be >= 0, got {prior}")
        if isinstance(model, torch.jit.ScriptModule):
            raise ValueError("grouped statistics need an eager model (a TorchScript module hides its BatchNorm "
                             "layers): load it as 'module:factory' with its state dict, or export an nn.Sequential")
        if layers is not None and layers < 1:
            raise ValueError(f"layers must be >= 1 (or None: all), got {layers}")
        if not 0.0 <= source_weight < 1.0:
            raise ValueError(f"source_weight must be in [0, 1), got {source_weight}")
        self.alpha, self.prior, self.source_weight = float(alpha), float(prior), float(source_weight)
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        if not replace_batchnorms(self.model, GroupedBatchNorm.from_bn):
            raise ValueError(f"grouped statistics need BatchNorm layers, and {type(model).__name__} has none "
                             f"(a LayerNorm/GroupNorm model normalises each sample on its own already)")
        every = [m for m in self.model.modules() if isinstance(m, GroupedBatchNorm)]
        #: the layers with per-stream statistics (the first ``layers``); the others keep the source's
        self.layers = every[:layers] if layers is not None else every
        self.layers[0].track_surprise = True  # the first normalised layer: closest to the input
        for layer in self.layers:
            layer.source_weight = self.source_weight
        device = self.layers[0].source_mean.device
        #: samples each row has taken in since it was (re)started
        self.seen = torch.zeros(0, dtype=torch.float64, device=device)
        layer = feature_layer if feature_layer is not None else last_linear_name(self.model)
        if layer is None:
            raise ValueError(f"{type(model).__name__} has no nn.Linear layer to take features from")
        self._hook = FeatureHook(self.model, layer, feature_hook)
        self._route: Any = None

    @property
    def rows(self) -> int:
        return int(self.seen.shape[0])

    def ensure(self, rows: int) -> None:
        """Grow to ``rows`` rows (new rows: source statistics, nothing seen)."""
        if rows > self.rows:
            for layer in self.layers:
                layer.ensure(rows)
            self.seen = torch.cat([self.seen, self.seen.new_zeros(rows - self.rows)])

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Rows back to the source statistics, as if never seen (``restart=True`` keeps the statistics and
        only forgets the count, see :meth:`restart_rows`)."""
        for layer in self.layers:
            layer.reset_rows(rows)
        self.seen[rows] = 0

    def restart_rows(self, rows: torch.Tensor) -> None:
        """Keep the rows' statistics but forget how many samples they rest on: the next samples move them
        as fast as a new stream's (after a shift the stream confirmed)."""
        self.seen[rows] = 0

    def weights(self, seen: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """Update weight ``a`` of rows that saw ``seen`` samples and take in ``n`` more."""
        n = n.to(torch.float64)
        ema = 1.0 - (1.0 - self.alpha) ** n
        avg = n / (seen + self.prior + n).clamp_min(1e-12)
        return torch.maximum(ema, avg)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, features)`` of the batch ``x``, sample ``i`` normalised with row ``rows[i]``."""
        if x.shape[0] != rows.shape[0]:
            raise ValueError(f"{x.shape[0]} samples but {rows.shape[0]} rows")
        if rows.numel() and int(rows.max()) >= self.rows:
            raise ValueError(f"row {int(rows.max())} does not exist (rows: {self.rows}); call ensure() first")
        r = route(rows.to(self.seen.device))
        r.weight = self.weights(self.seen[r.rows], r.counts)
        self._route = r
        for layer in self.layers:
            layer.route = r
        try:
            logits = self.model(x)
        finally:
            for layer in self.layers:
                layer.route = None
        feats = self._hook.pop()
        return logits, (feats if feats is not None else logits).flatten(1)

    @property
    def surprise(self) -> torch.Tensor | None:
        """Per sample of the last forward: its distance, at the first BatchNorm layer, from its stream's
        statistics before the batch (a stream's covariate-shift signal; see ``GroupedBatchNorm.surprise``)."""
        return self.layers[0].surprise

    @torch.no_grad()
    def commit(self, keep: torch.Tensor) -> None:
        """Write the last forward's statistics updates from the samples ``keep`` marks (less any whose
        statistics in a per-stream layer are not finite)."""
        r, self._route = self._route, None
        if r is None:
            return
        keep = keep.to(device=self.seen.device, dtype=torch.bool)
        for layer in self.layers:  # a finite input whose statistics overflow (1e20) must not poison its row
            if layer._pending is not None:
                keep = keep & torch.isfinite(layer._pending[1]).all(1) & torch.isfinite(layer._pending[2]).all(1)
        n = torch.bincount(r.inverse[keep], minlength=len(r.rows))
        w = self.weights(self.seen[r.rows], n)
        for layer in self.layers:
            layer.commit(keep, w)
        self.seen[r.rows] += n.to(torch.float64)

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self, rows: int | None = None) -> dict[str, Any]:
        """The first ``rows`` rows (default all): per layer ``mean``/``var`` tables, ``seen`` and the first
        layer's ``log_spread`` (NaN: no sample yet)."""
        k = self.rows if rows is None else int(rows)
        return {"alpha": self.alpha, "prior": self.prior, "seen": self.seen[:k].cpu().clone(),
                "mean": [layer.mean[:k].cpu().clone() for layer in self.layers],
                "var": [layer.var[:k].cpu().clone() for layer in self.layers],
                "log_spread": self.layers[0].log_spread[:k].cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the rows of :meth:`state_dict` (the hyperparameters stay this object's)."""
        seen = torch.as_tensor(state["seen"], dtype=torch.float64)
        if seen.dim() != 1 or not (torch.isfinite(seen).all() and bool((seen >= 0).all())):
            raise ValueError("per-row sample counts ('seen') must be finite and >= 0, in one dimension")
        means, vars_ = list(state["mean"]), list(state["var"])
        if len(means) != len(self.layers) or len(vars_) != len(self.layers):
            raise ValueError(f"the state has {len(means)} normalisation layers, the model {len(self.layers)}")
        k = int(seen.shape[0])
        for layer, m, v in zip(self.layers, means, vars_):
            if tuple(m.shape) != (k, layer.num_features) or tuple(v.shape) != (k, layer.num_features):
                raise ValueError(f"statistics of shape {tuple(m.shape)} do not fit a layer of "
                                 f"{layer.num_features} channels and {k} rows")
            if not (torch.isfinite(m).all() and torch.isfinite(v).all() and bool((v >= 0).all())):
                raise ValueError("statistics hold NaN/Inf or a negative variance")
        spread = torch.as_tensor(state["log_spread"], dtype=torch.float32)
        if tuple(spread.shape) != (k, self.layers[0].num_features) or bool(torch.isinf(spread).any()):
            raise ValueError(f"log_spread of shape {tuple(spread.shape)} (or holding Inf) does not fit {k} rows")
        device = self.seen.device
        for layer, m, v in zip(self.layers, means, vars_):
            layer.log_spread = spread.to(device).clone() if layer is self.layers[0] else \
                torch.full((k, layer.num_features), float("nan"), device=device)
            layer.mean = m.to(device=device, dtype=torch.float32).clone()
            layer.var = v.to(device=device, dtype=torch.float32).clone()
        self.seen = seen.to(device).clone()
