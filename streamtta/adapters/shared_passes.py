"""The extra passes of a :class:`~streamtta.adapters.composite.CompositeAdapter` step (the cb-stats
class-mix pre-pass and the source-fallback source pass), and the options that make them cheaper.

Besides its adapted forward, the default step runs the model twice more: a *pre-pass* with the
stored statistics whose predictions give the batch's class mix, and the *source pass* (source
statistics and parameters) whose logits ``source-fallback`` may return. Three ways to spend less:

* **batch size 1** (always on, exact; ``cb-stats`` layers only): cb-stats normalises a single
  sample with its stored marginal whatever the class mix, and tests no domain shift, so the adapted
  pass *is* the pre-pass; the pre-pass is skipped (unless the pre-pass uses the source parameters
  while an objective adapts them).
* ``prepass_samples=k`` (adapter option): the pre-pass runs on ``k`` evenly spaced samples of the
  batch only; the class mix is their EM estimate and the layers' shift test uses their statistics.
  The pre-pass normalises each sample with stored statistics (but for layers whose shift test fires:
  they take the probe samples' own), so a sample's pre-pass logits hardly depend on the rest of the
  batch: mainly the estimate gets noisier. Needs ``relabel="final"``.
* ``source-fallback(probe=k)`` (guard option, default 16; 0 = off): the source model, which has no batch dependence,
  runs on ``k`` evenly spaced probe samples; only when their agreement with the adapted predictions
  says the batch rule may fire (:meth:`~streamtta.adapters.guards.source_fallback.SourceFallback.may_fire`)
  does it run on the rest; otherwise only on the samples the per-sample rules pick, whose distances
  come from the first cb-stats layer's instance statistics of the adapted pass
  (:func:`~streamtta.adapters.guards.source_fallback.stats_distances`; no pass over the activations).
  A batch whose probe misses an agreement at the threshold keeps the adapted logits.

>>> import torch
>>> probe_indices(10, 4).tolist(), probe_indices(3, 4).tolist()
([0, 2, 5, 7], [0, 1, 2])
"""
from __future__ import annotations

from typing import Any

import torch

from streamtta.adapters.class_mix import batch_class_mix
from streamtta.adapters.guards.source_fallback import stats_distances
from streamtta.adapters.norms import frozen_stats, set_class_mix
from streamtta.adapters.norms.class_balanced import ClassBalancedNorm


def probe_indices(batch: int, k: int) -> torch.Tensor:
    """``min(k, batch)`` evenly spaced sample indices of a batch of ``batch`` (all of them when ``k >= batch``)."""
    if k >= batch:
        return torch.arange(batch)
    return (torch.arange(k, dtype=torch.float64) * (batch / k)).long()


class SharedPassesMixin:
    """Pre-pass and source pass of :class:`~streamtta.adapters.composite.CompositeAdapter` (see the module
    docstring). The host sets the attributes annotated below and provides the source forwards."""

    num_classes: int
    prepass: str
    prepass_samples: int
    objective: Any
    guards: list
    _label_layers: list
    _first_norm: Any
    balanced_tv: float | None
    imbalanced_tv: float | None

    def _class_mix_prepass(self, x: torch.Tensor) -> torch.Tensor | None:
        """cb-stats: a pre-pass with the stored statistics (layers that detect a new domain use the
        batch's own) gives pseudo-labels; their EM class mix is set on the layers for the main pass.
        Returns the pre-pass logits (of the probe samples only with ``prepass_samples``), or None when
        the adapted pass stands in for the pre-pass (batch size 1)."""
        B = int(x.shape[0])
        plain_cb = all(isinstance(layer, ClassBalancedNorm) for layer in self._label_layers)  # not "align"
        if B < 2 and plain_cb and (self.prepass != "source" or self.objective is None):
            for layer in self._label_layers:
                layer.shift_detected = False
            set_class_mix(self._label_layers, torch.full((self.num_classes,), 1.0 / self.num_classes,
                                                         device=x.device))
            return None
        if 0 < self.prepass_samples < B:
            x = x[probe_indices(B, self.prepass_samples).to(x.device)]
        for layer in self._label_layers:
            layer.detect_shift = True
            layer.shift_detected = None
        try:
            if self.prepass == "source":
                pre_logits = self._source_forward(x)
            else:
                with torch.no_grad(), frozen_stats(self.model):
                    pre_logits = self.model(x)
                self._pop_features(pre_logits)
        finally:
            for layer in self._label_layers:
                layer.detect_shift = False
        mix = batch_class_mix(pre_logits, self.num_classes, self.balanced_tv, self.imbalanced_tv, x.device)
        set_class_mix(self._label_layers, mix)
        return pre_logits

    def _output_logits(self, x: torch.Tensor, logits: torch.Tensor, fit: list[torch.Tensor],
                       info: dict[str, Any]) -> torch.Tensor:
        """The logits to return: the adapted model's, or the source model's where an output guard
        (source-fallback) chooses them."""
        for g in self.guards:
            if not getattr(g, "needs_source_model", False):
                continue
            stats = self._first_stats() if getattr(g, "probe", 0) > 0 else None
            if stats is not None:
                logits, used = self._probed_choice(g, x, logits, stats)
            elif getattr(g, "needs_distance", False):
                src_logits, dist = self._source_forward_with_distance(x)
                logits, used = g.choose(logits, src_logits, distance=dist, fit=fit[0] if fit else None)
            else:
                logits, used = g.choose(logits, self._exact_source_forward(x))
            if getattr(g, "needs_distance", False):
                info[f"{g.name}_near"] = g.last_n_near
            info[g.name] = used
        return logits

    def _first_stats(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(source distance, fit distance)`` of each sample at the first norm layer, from the
        statistics the adapted pass recorded there; None when that layer records none (not cb-stats)."""
        layer = self._first_norm
        stats = getattr(layer, "last_stats", None)
        if stats is None:
            return None
        mean_i, var_i, m, v, spatial = stats
        return stats_distances(mean_i, var_i, (layer.source_mean, layer.source_var), (m, v),
                               getattr(layer, "weight", None), layer.eps, spatial)

    def _probed_choice(self, g: Any, x: torch.Tensor, logits: torch.Tensor,
                       dists: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """:meth:`SourceFallback.choose` with the source model run on a probe, then on the rest of the
        batch or on the samples the per-sample rules pick."""
        B = int(x.shape[0])
        dist, fit = dists
        idx = probe_indices(B, g.probe).to(x.device)
        src_probe = self._exact_source_forward(x[idx])
        agree = float((src_probe.argmax(dim=1) == logits[idx].argmax(dim=1)).float().mean())
        if idx.numel() == B or g.may_fire(agree, int(idx.numel())):
            src = logits.new_empty(logits.shape)
            src[idx] = src_probe
            rest = torch.ones(B, dtype=torch.bool, device=x.device)
            rest[idx] = False
            if bool(rest.any()):
                src[rest] = self._exact_source_forward(x[rest])
            return g.choose(logits, src, distance=dist if g.needs_distance else None, fit=fit)
        g.last_n_near = 0
        use = g.sample_rule(dist, fit)
        if use is None or not bool(use.any()):
            return logits, False
        use = use.to(x.device)
        g.last_n_near = int(use.sum())
        out = logits.clone()
        out[use] = self._exact_source_forward(x[use])
        return out, False
