"""The frozen source model inside a :class:`~streamtta.adapters.composite.CompositeAdapter`, and
what the adapter fits from clean source data (the cb-stats class prior, the guards' reference).

The "frozen source copy" is the adapted model evaluated with the *source* values of the adapted
parameters (``torch.func.functional_call``), so it costs one extra forward and no second copy of
the weights. With the current normalisation statistics it is what filters such as ``conf-drop``
compare with; with the source statistics too (``exact``) it is the non-adapting source model.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Sequence

import torch
from torch import nn

from streamtta.adapters.class_mix import class_conditional_stats
from streamtta.adapters.common import FeatureHook, iter_norm_modules
from streamtta.adapters.guards.source_fallback import source_distance
from streamtta.adapters.norms import frozen_stats, source_stats
from streamtta.adapters.norms.aligned import AlignedNorm
from streamtta.adapters.norms.base import instance_stats
from streamtta.adapters.scripted import ScriptedModel, assigned_params


def first_source_norm(model: nn.Module) -> nn.Module | None:
    """The first normalisation layer of ``model`` with source statistics (BatchNorm or a streamtta norm)."""
    for _, m in iter_norm_modules(model):
        if getattr(m, "source_mean", None) is not None or getattr(m, "running_mean", None) is not None:
            return m
    return None


def register_source_distance_hook(norm: nn.Module, out: list[torch.Tensor]) -> Any:
    """Append each sample's :func:`source_distance` at ``norm`` (to its source statistics) to ``out``
    on every forward pass until the returned handle is removed."""

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
        mean = getattr(mod, "source_mean", None)
        mean, var = (mod.running_mean, mod.running_var) if mean is None else (mean, mod.source_var)
        out.append(source_distance(inp[0].detach(), mean, var, mod.eps))

    return norm.register_forward_pre_hook(hook)


class SourceFitMixin:
    """Source forwards and source-data fitting of :class:`~streamtta.adapters.composite.CompositeAdapter`.

    The host class sets the attributes annotated below and provides ``state_dict()`` (what
    "becomes part of the initial state" snapshots into ``_initial_state``).
    """

    model: nn.Module
    num_classes: int
    _hook: FeatureHook | None
    #: name -> source value of each adapted parameter
    _source_params: dict[str, torch.Tensor]
    _first_norm: nn.Module | None
    #: the pseudo-label norm layers (cb-stats), module order
    _label_layers: list[nn.Module]
    #: guards that compare samples with the source and take a reference from source data
    _reference_guards: list[Any]
    _initial_state: dict[str, Any]

    # -- source forwards ------------------------------------------------------------------------
    def _source_forward(self, x: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """The model with the source values of the adapted parameters and the current statistics (the
        "frozen source copy" of the filters); ``exact``: with the source statistics too, i.e. the
        non-adapting source model."""
        if isinstance(self.model, ScriptedModel):  # the stateless API does not take TorchScript modules
            with torch.no_grad(), assigned_params(self.model, self._source_params):
                self.model.use_source_stats = exact
                try:
                    out = self.model(x)
                finally:
                    self.model.use_source_stats = False
        else:
            with torch.no_grad(), frozen_stats(self.model), (source_stats(self.model) if exact else nullcontext()):
                out = torch.func.functional_call(self.model, self._source_params, (x,), strict=False)
        if self._hook is not None:
            self._hook.pop()
        return out

    def _exact_source_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The non-adapting source model: source statistics and source affine parameters."""
        return self._source_forward(x, exact=True)

    def _source_forward_with_distance(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`_exact_source_forward` plus each sample's :func:`source_distance` at the first norm layer."""
        if self._first_norm is None:
            return self._exact_source_forward(x), None
        seen: list[torch.Tensor] = []
        handle = register_source_distance_hook(self._first_norm, seen)
        try:
            out = self._exact_source_forward(x)
        finally:
            handle.remove()
        return out, seen[0]

    # -- fitting from clean source data ---------------------------------------------------------
    def calibrate_guards(self, x: torch.Tensor, batch_size: int = 256) -> float | None:
        """Give guards that compare samples with the source (source-fallback's per-sample rules)
        their reference from clean source inputs ``x``; it becomes part of the initial state.
        Returns the reference (None when no guard takes one). :meth:`fit_source` does this and the
        class prior in one pass.

        >>> import torch
        >>> from torch import nn
        >>> from streamtta.adapters import build_adapter
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        ...                     nn.Flatten(), nn.Linear(4, 2)).eval()
        >>> ad = build_adapter("bn+source-fallback", net, num_classes=2)
        >>> ad.calibrate_guards(torch.rand(50, 1, 6, 6)) > 0
        True
        """
        return self.fit_source(x, None, batch_size=batch_size)[1]

    def set_guard_reference(self, reference: float | None) -> None:
        """Set the reference of :meth:`calibrate_guards` without the data pass (same model)."""
        if not self._reference_guards:
            return
        for g in self._reference_guards:
            g.reference = None if reference is None else float(reference)
        self._initial_state = self.state_dict()

    @torch.no_grad()
    def fit_class_prior(self, x: torch.Tensor, y: torch.Tensor,
                        batch_size: int = 256) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Start the class slots of the pseudo-label norms (cb-stats) from labelled source data.

        ``x`` goes through the *source* model (source statistics and parameters) and every cb-stats
        layer gets the class-conditional mean and variance of its input (``y`` = class indices,
        ``-1`` = ignored); classes without a sample keep the layer's source statistics. The result
        becomes part of the initial state, so :meth:`reset` returns to it. Returns the per-layer
        ``(class_means, class_vars)`` (empty for adapters without cb-stats layers), which
        :meth:`set_class_prior` gives to another adapter of the same model without the data pass.

        >>> import torch
        >>> from torch import nn
        >>> from streamtta.adapters import build_adapter
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        ...                     nn.Flatten(), nn.Linear(4, 2)).eval()
        >>> ad = build_adapter("cb-stats", net, num_classes=2)
        >>> prior = ad.fit_class_prior(torch.rand(20, 1, 6, 6), torch.arange(20) % 2)
        >>> len(prior), tuple(prior[0][0].shape), ad.model[1].slot_weight.tolist()
        (1, (2, 4), [0.5, 0.5])
        """
        return self.fit_source(x, y, batch_size=batch_size, guards=False)[0]

    def _fit_targets(self, labelled: bool, guards: bool) -> tuple[list[nn.Module], list[Any], list[nn.Module]]:
        """What :meth:`fit_source` fits: the cb-stats layers (given labels), the guards taking a source reference
        (when ``guards``) and the ``align`` layers."""
        layers = [m for m in self._label_layers if not isinstance(m, AlignedNorm)] if labelled else []
        ref_guards = self._reference_guards if guards and self._first_norm is not None else []
        return layers, ref_guards, [m for m in self.model.modules() if isinstance(m, AlignedNorm)]

    @torch.no_grad()
    def fit_source(self, x: torch.Tensor, y: torch.Tensor | str | None = None, *, batch_size: int = 256,
                   guards: bool = True) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], float | None]:
        """One pass of clean source inputs ``x`` through the source model for everything the adapter
        takes from source data: the class prior of :meth:`fit_class_prior` (when labels ``y`` are
        given), the guards' reference of :meth:`calibrate_guards` (when ``guards``) and the source
        statistics of ``align`` layers. Both become
        part of the initial state. Returns ``(prior, reference)`` for :meth:`set_class_prior` and
        :meth:`set_guard_reference` on other adapters of the same model.

        ``y="predicted"``: clean source data without labels; the source model's own predictions in the same pass
        stand in for the labels of the class prior (on its clean data a source model is near its training
        accuracy, so the prior is nearly the labelled one; README, "A class prior without labels"). The model must
        then return ``(B, num_classes)`` logits (else ``ValueError``).

        >>> import torch
        >>> from torch import nn
        >>> from streamtta.adapters import build_adapter
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
        >>> prior, _ = build_adapter("cb-stats", net, num_classes=3).fit_source(torch.randn(60, 4), "predicted")
        >>> len(prior), tuple(prior[0][0].shape)
        (1, (3, 8))
        """
        predicted = isinstance(y, str)
        if predicted and y != "predicted":
            raise ValueError(f"y must be labels, None or 'predicted', got {y!r}")
        layers, ref_guards, aligned = self._fit_targets(y is not None, guards)
        if layers and not predicted:
            y = torch.as_tensor(y).long().reshape(-1)
            if len(y) != len(x):
                raise ValueError(f"x has {len(x)} samples but y has {len(y)} labels")
        if not layers and not ref_guards and not aligned:
            return [], None
        # slices go to the model's device one at a time (source data may stay on the CPU)
        dev = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {id(m): [] for m in layers}

        def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
            seen[id(mod)].append(instance_stats(inp[0].detach()))

        dists: list[torch.Tensor] = []
        handles = [m.register_forward_pre_hook(hook) for m in layers]
        if ref_guards:
            handles.append(register_source_distance_hook(self._first_norm, dists))
        for m in aligned:  # "align": the source statistics of the LayerNorm / GroupNorm outputs
            m.start_recording()
        votes: list[torch.Tensor] = []
        try:
            for i in range(0, len(x), batch_size):
                logits = self._exact_source_forward(torch.as_tensor(x[i:i + batch_size], dtype=torch.float32).to(dev))
                if layers and predicted:
                    ok = isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.shape[1] == self.num_classes
                    if not ok:
                        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                        raise ValueError(f"y='predicted' needs the model's (B, {self.num_classes}) logits, got {got}")
                    votes.append(logits.argmax(dim=1))
        finally:
            for h in handles:
                h.remove()
            for m in aligned:
                m.finish_recording()
        if layers and predicted:
            y = torch.cat(votes)
        prior = []
        for m in layers:
            cm, cv = class_conditional_stats(m, seen[id(m)], y.to(dev), self.num_classes)
            prior.append((cm, cv))
            m.set_class_prior(cm, cv)
        reference = None
        if ref_guards:
            d = torch.cat(dists)
            for g in ref_guards:
                g.calibrate(d)
            reference = ref_guards[0].reference
        self._initial_state = self.state_dict()
        return prior, reference

    def fit_source_free(self, example: torch.Tensor, *, per_class: int = 16, steps: int = 200, seed: int = 0,
                        progress: bool = False) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], float | None]:
        """:meth:`fit_source` without source data: on inputs synthesised from the source model
        (:func:`~streamtta.adapters.synthetic_prior.synthesize_inputs`; ``example``: an unlabelled batch, e.g.
        the stream's first, giving shape and scale). Opt-in (see that module for what it costs and gains). Like
        ``fit_source`` it also calibrates the guards' reference (on the synthetic inputs); a spec with nothing to
        fit (e.g. ``bn``) returns ``([], None)`` without synthesising.

        >>> import torch
        >>> from torch import nn
        >>> from streamtta.adapters import build_adapter
        >>> torch.manual_seed(0) and None
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
        >>> ad = build_adapter("cb-stats", net, num_classes=3)
        >>> prior, _ = ad.fit_source_free(torch.randn(16, 4), per_class=4, steps=20)
        >>> tuple(prior[0][0].shape), ad.model[1].slot_weight.tolist()
        ((3, 8), [0.5, 0.5, 0.5])
        """
        from streamtta.adapters.synthetic_prior import synthesize_inputs

        if isinstance(self.model, ScriptedModel):
            raise TypeError("fit_source_free needs an eager model (TorchScript modules take no forward hooks)")
        if not any(self._fit_targets(True, True)):
            return [], None  # nothing fit_source would fit: skip the synthesis

        def source_forward(x: torch.Tensor) -> torch.Tensor:
            with frozen_stats(self.model), source_stats(self.model):
                out = torch.func.functional_call(self.model, self._source_params, (x,), strict=False)
            if self._hook is not None:
                self._hook.pop()
            return out

        x, y = synthesize_inputs(self.model, self.num_classes, example, per_class=per_class, steps=steps, seed=seed,
                                 forward=source_forward, progress=progress)
        return self.fit_source(x, y)

    def set_class_prior(self, prior: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Give the cb-stats layers (module order) class priors from :meth:`fit_class_prior`; they
        become part of the initial state."""
        layers = [m for m in self._label_layers if not isinstance(m, AlignedNorm)]
        if len(prior) != len(layers):
            raise ValueError(f"prior has {len(prior)} layers, the adapter {len(layers)} cb-stats layers")
        for m, (cm, cv) in zip(layers, prior):
            m.set_class_prior(cm, cv)
        self._initial_state = self.state_dict()
