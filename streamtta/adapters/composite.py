"""The composable adapter: ``norm x objective x filters x guards`` around a copy of any model.

:class:`CompositeAdapter` deep-copies the user's module, swaps its BatchNorm layers for the chosen
test-time normalisation (TorchScript: :mod:`~streamtta.adapters.scripted`); on every :meth:`~CompositeAdapter.step`:

0. for pseudo-label-driven norms (``cb-stats``) only: a pre-pass with the stored statistics
   (no update) whose predictions become the pseudo-labels of the layers (at batch size 1 the
   adapted pass stands in for it; cheaper options: :mod:`streamtta.adapters.shared_passes`);
1. runs one forward pass of the adapted model (these are the returned, pre-update logits;
   features are the input of the last ``nn.Linear`` unless ``feature_layer`` says otherwise);
2. builds the keep-mask: samples with finite logits AND the caller's gate (OOD samples out) AND
   every filter in order;
3. if an objective is configured and some sample is kept: one optimizer step on the norm affine
   parameters;
4. commits the normalisation-statistics update for the gated (in-distribution) samples;
5. runs the guards; one that fires resets everything to the initial state.

Samples the gate rejects (OOD) still take part in their own batch's forward pass (the gate
needs its features), but never in any state update: neither gradients nor statistics.

The "frozen source copy" that filters such as ``conf-drop`` need, and the source-data fitting
(:meth:`~CompositeAdapter.fit_source`), live in :mod:`streamtta.adapters.source_fit`; the
class-mix helpers of ``cb-stats`` in :mod:`streamtta.adapters.class_mix`.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Sequence

import torch
from torch import nn

from streamtta.adapters.base import Adapter, Gate
from streamtta.adapters.class_mix import RELABEL, balance_shrunk_mix, commit_labels
from streamtta.adapters.common import FeatureHook, last_linear_name, norm_affine_parameters
from streamtta.adapters.context import StepContext
from streamtta.adapters.filters.base import Filter
from streamtta.adapters.guards.base import Guard
from streamtta.adapters.guards.source_fallback import fit_distance
from streamtta.adapters.masks import admission_mask, sanitize_batch
from streamtta.adapters.norms import (
    NORM_CLASSES,
    commit_stats,
    frozen_stats,
    label_norms,
    make_norm_factory,
    replace_norms,
    set_class_mix,
    set_stats_mode,
)
from streamtta.adapters.objectives.base import Objective
from streamtta.adapters.scripted import is_script, script_feature_layer, wrap_script
from streamtta.adapters.shared_passes import SharedPassesMixin
from streamtta.adapters.source_fit import SourceFitMixin, first_source_norm
from streamtta.adapters.state import adapter_state, load_adapter_state
from streamtta.types import StepOutput

__all__ = ["CompositeAdapter", "OPTIMIZERS", "PREPASS", "RELABEL", "balance_shrunk_mix"]

OPTIMIZERS = ("adam", "adamw", "sgd")
PREPASS = ("auto", "adapted", "source")


class CompositeAdapter(SharedPassesMixin, SourceFitMixin, Adapter):
    """Online adapter assembled from a normalisation, an optional objective, filters and guards.

    Parameters
    ----------
    model: any ``nn.Module`` classifier returning ``(B, num_classes)`` logits; it is deep-copied.
    num_classes: number of output classes.
    norm: ``"source"`` (keep BatchNorm with source statistics), ``"bn"``, ``"rbn"`` or ``"unmix-tns"``.
    norm_kwargs: constructor arguments of the norm layer (e.g. ``{"K": 16}``).
    objective: label-free loss; None = gradient-free adapter (statistics only).
    filters: applied in order, AND-wise, after the gate.
    guards: collapse guards run after each step.
    lr, optimizer, sgd_momentum, weight_decay: optimizer of the norm affine parameters
        (``"adam"``: betas (0.9, 0.999); ``"sgd"``: momentum with Nesterov, as the TTA benchmark).
    feature_layer: name of the sub-module whose input (``feature_hook="input"``) or output is
        reported as features; default: the last ``nn.Linear``; if the model has none, the logits.
    seed: seeds the UnMix-TNS component noise (building twice gives identical adapters).
    prepass: pseudo-label source of ``cb-stats``: ``"adapted"`` (current model), ``"source"``
        (the frozen source copy, i.e. source affine parameters), ``"auto"`` (``"source"`` when a
        filter needs the source forward anyway, so the pre-pass is free; else ``"adapted"``).
    prepass_samples: ``cb-stats``: run the pre-pass on at most this many evenly spaced samples of
        the batch (0 = all; needs ``relabel="final"``; see :mod:`streamtta.adapters.shared_passes`).
    relabel: labels ``cb-stats`` commits its statistics with: ``"final"`` (the main forward's
        predictions), ``"prepass"`` (the pre-pass labels the forward used), ``"agree"`` (the
        final predictions where they agree with the pre-pass, other samples ignored).
    label_confidence: ``cb-stats`` slots learn only from samples whose final confidence is at
        least this (``relabel`` ``"final"``/``"agree"``).
    balanced_tv, imbalanced_tv: the estimated class mix of a batch whose total-variation
        distance from uniform is at most ``balanced_tv`` is taken as uniform (the batch is
        balanced up to estimation noise: plain batch statistics); at or above ``imbalanced_tv``
        (default ``balanced_tv + 0.3``) it is used as estimated; linear in between (see
        :func:`~streamtta.adapters.class_mix.balance_shrunk_mix`); ``balanced_tv=None`` turns this off.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        norm: str = "bn",
        norm_kwargs: dict[str, Any] | None = None,
        objective: Objective | None = None,
        filters: Sequence[Filter] = (),
        guards: Sequence[Guard] = (),
        lr: float = 1e-3,
        optimizer: str = "adam",
        sgd_momentum: float = 0.9,
        weight_decay: float = 0.0,
        feature_layer: str | None = None,
        feature_hook: str = "input",
        seed: int | None = 0,
        prepass: str = "auto",
        prepass_samples: int = 0,
        relabel: str = "final",
        label_confidence: float = 0.6,
        balanced_tv: float | None = 0.3,
        imbalanced_tv: float | None = None,
        spec: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if int(num_classes) != num_classes or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if prepass not in PREPASS:
            raise ValueError(f"prepass must be one of {PREPASS}, got {prepass!r}")
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        self.num_classes = int(num_classes)
        self.norm = norm
        self.norm_kwargs = dict(norm_kwargs or {})
        self.objective = objective
        self.filters = list(filters)
        self.guards = list(guards)
        self.lr = float(lr)
        self.optimizer_name = optimizer
        self.sgd_momentum = float(sgd_momentum)
        self.weight_decay = float(weight_decay)
        self.seed = seed
        self.spec = spec
        if relabel not in RELABEL:
            raise ValueError(f"relabel must be one of {RELABEL}, got {relabel!r}")
        self.relabel = relabel
        if int(prepass_samples) != prepass_samples or prepass_samples < 0 or (prepass_samples and relabel != "final"):
            raise ValueError("prepass_samples must be an integer >= 0 (> 0 only with relabel='final'), "
                             f"got {prepass_samples!r}")
        self.prepass_samples = int(prepass_samples)
        if not 0.0 <= label_confidence < 1.0:
            raise ValueError(f"label_confidence must be in [0, 1), got {label_confidence}")
        self.label_confidence = float(label_confidence)
        if balanced_tv is None and imbalanced_tv is not None:
            raise ValueError("imbalanced_tv needs balanced_tv")
        if balanced_tv is not None:
            imbalanced_tv = min(balanced_tv + 0.3, 1.0) if imbalanced_tv is None else imbalanced_tv
            if not 0.0 <= balanced_tv < imbalanced_tv <= 1.0:
                raise ValueError(f"need 0 <= balanced_tv < imbalanced_tv <= 1, got {balanced_tv}, {imbalanced_tv}")
        self.balanced_tv, self.imbalanced_tv = balanced_tv, imbalanced_tv

        self.scripted = is_script(model)  # TorchScript: wrapped, no layer replaced (streamtta.adapters.scripted)
        self.model = wrap_script(model, norm, self.norm_kwargs, spec) if self.scripted else copy.deepcopy(model)
        self.replaced: list[str] = [] if self.scripted else self._swap_norms(norm, seed)
        self.model.eval()
        self.model.requires_grad_(False)

        names = {id(p): n for n, p in self.model.named_parameters()}
        self._params = norm_affine_parameters(self.model)
        self._param_names = [names[id(p)] for p in self._params]
        if objective is not None:
            if not self._params:
                raise ValueError("the objective needs norm affine parameters, but the model has none")
            for p in self._params:
                p.requires_grad_(True)
        self.optimizer = self._make_optimizer() if objective is not None else None

        if self.scripted:  # features: the input of the wrapper's tap (see ScriptedModel)
            feature_layer, feature_hook = script_feature_layer(feature_layer), "input"
        layer = feature_layer if feature_layer is not None else last_linear_name(self.model)
        self.feature_layer = layer
        self._hook = FeatureHook(self.model, layer, feature_hook) if layer is not None else None

        self._needs_source = any(f.needs_source for f in self.filters)
        self._label_layers = label_norms(self.model)
        self._first_norm = None if self.scripted else first_source_norm(self.model)  # no hook runs in TorchScript
        self._reference_guards = [g for g in self.guards if hasattr(g, "calibrate") and getattr(g, "mixed", False)]
        if prepass == "auto":
            prepass = "source" if (self._needs_source and objective is not None) else "adapted"
        self.prepass = prepass
        self._source_params = {n: p.detach().clone() for n, p in zip(self._param_names, self._params)}
        for g in self.guards:
            g.bind(self)
        self.n_steps = 0
        self._initial_state = self.state_dict()

    # -- construction helpers -------------------------------------------------------------------
    def _swap_norms(self, norm: str, seed: int | None) -> list[str]:
        """Replace the BatchNorm layers of ``self.model`` by the ``norm`` layers (deferred statistics
        updates); returns the names of the replaced layers."""
        layer_kwargs = dict(self.norm_kwargs)
        if getattr(NORM_CLASSES.get(norm), "needs_pseudo_labels", False):
            layer_kwargs.setdefault("num_classes", self.num_classes)
        factory = make_norm_factory(norm, seed=seed, **layer_kwargs)
        if factory is None:
            return []
        replaced = replace_norms(self.model, norm, factory)
        if not replaced:
            kind = "LayerNorm/GroupNorm" if norm == "align" else "BatchNorm"
            warnings.warn(f"norm {norm!r}: the model has no {kind} layer, so normalisation does not adapt", stacklevel=3)
        set_stats_mode(self.model, "deferred")
        return replaced

    def _make_optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(
                self._params, lr=self.lr, momentum=self.sgd_momentum, nesterov=self.sgd_momentum > 0,
                weight_decay=self.weight_decay,
            )
        cls = torch.optim.AdamW if self.optimizer_name == "adamw" else torch.optim.Adam
        return cls(self._params, lr=self.lr, betas=(0.9, 0.999), weight_decay=self.weight_decay)

    def parameters_to_adapt(self) -> list[nn.Parameter]:
        """The norm affine parameters the objective updates (module order)."""
        return list(self._params)

    def reset_optimizer(self) -> None:
        """Fresh optimizer state (e.g. after the parameters were restarted from a meta-initialisation)."""
        if self.objective is not None:
            self.optimizer = self._make_optimizer()

    # -- forward passes -------------------------------------------------------------------------
    def _pop_features(self, logits: torch.Tensor) -> torch.Tensor:
        feats = self._hook.pop() if self._hook is not None else None
        return logits if feats is None else feats

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, features)`` of the current model; statistics are read, not updated."""
        with frozen_stats(self.model):
            logits = self.model(x)
        return logits, self._pop_features(logits)

    # -- one step -------------------------------------------------------------------------------
    def step(self, x: torch.Tensor, gate: Gate | None = None) -> StepOutput:
        x, finite_in = sanitize_batch(x)
        B = int(x.shape[0])
        pre_logits = self._class_mix_prepass(x) if self._label_layers else None
        logits, feats, fit = self._adapted_forward(x)
        if self._label_layers and pre_logits is None:  # batch size 1: the adapted pass was the pre-pass
            pre_logits = logits.detach()
        gate_mask = admission_mask(logits, feats, finite_in, gate)
        ctx = StepContext(
            x=x, logits=logits, features=feats.detach(), num_classes=self.num_classes,
            source_fn=(lambda: self._source_forward(x)) if self._needs_source else None,
        )
        if pre_logits is not None and self.prepass == "source" and pre_logits.shape[0] == B:
            ctx._cache["source_logits"] = pre_logits
        mask = self._apply_filters(ctx, gate_mask.clone())

        info: dict[str, Any] = {"n_gated_out": int(B - int(gate_mask.sum())), "n_kept": int(mask.sum())}
        if finite_in is not None:
            info["n_nonfinite_inputs"] = int((~finite_in).sum())
        loss_value, updated = self._optimizer_step(ctx, mask, info)
        # statistics move after the backward pass (the graph still references the old buffers)
        self._commit_statistics(logits, pre_logits, gate_mask, info)
        self.n_steps += 1

        fired = self._run_guards(ctx, mask, updated)
        update_mask = mask if updated else torch.zeros_like(mask)
        out_logits = self._output_logits(x, logits.detach(), fit, info)
        if fired is not None:
            self.reset()
            info["guard"] = fired
        return StepOutput(
            logits=out_logits, features=feats.detach(), update_mask=update_mask,
            loss=loss_value, reset=fired is not None, info=info,
        )

    def _adapted_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """The main forward pass of the adapted model (with gradients when an objective is set):
        ``(logits, features, fit)``, ``fit`` holding each sample's :func:`fit_distance` at the first
        norm layer when a guard needs it (else empty). Clears the class mix the pre-pass set."""
        fit: list[torch.Tensor] = []
        fit_hook = None
        if self._first_norm is not None and any(getattr(g, "needs_distance", False) and not (
                getattr(g, "probe", 0) and hasattr(self._first_norm, "last_stats")) for g in self.guards):
            # how well the statistics this pass normalises with fit each sample
            fit_hook = self._first_norm.register_forward_hook(
                lambda mod, inp, out: fit.append(fit_distance(out.detach(), getattr(mod, "weight", None),
                                                              getattr(mod, "bias", None))))
        try:
            with torch.set_grad_enabled(self.objective is not None):
                logits = self.model(x)
        finally:
            if fit_hook is not None:
                fit_hook.remove()
            if self._label_layers:
                set_class_mix(self._label_layers, None)
        feats = self._pop_features(logits)
        if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"model must return (B, num_classes) logits, got shape {tuple(logits.shape)}")
        return logits, feats, fit

    def _apply_filters(self, ctx: StepContext, mask: torch.Tensor) -> torch.Tensor:
        """The samples that feed the objective: the filters in order (only when there is an objective)."""
        if self.objective is not None:
            for f in self.filters:
                mask = f(ctx, mask)
        return mask

    def _optimizer_step(self, ctx: StepContext, mask: torch.Tensor, info: dict[str, Any]) -> tuple[float | None, bool]:
        """One optimizer step of the objective on the kept samples, skipped (reason in ``info``) on a
        non-finite loss or gradient. Returns ``(loss, whether the parameters were updated)``."""
        if self.objective is None or not bool(mask.any()):
            return None, False
        loss = self.objective.loss(ctx, mask)
        if not torch.isfinite(loss):
            info["skipped"] = "non-finite loss"
            return None, False
        loss_value, updated = None, False
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in self._params):
            self.optimizer.step()
            loss_value, updated = float(loss.detach()), True
        else:  # e.g. a NaN sample outside the mask still reaches shared gradients
            info["skipped"] = "non-finite gradient"
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, updated

    def _commit_statistics(self, logits: torch.Tensor, pre_logits: torch.Tensor | None, gate_mask: torch.Tensor,
                           info: dict[str, Any]) -> None:
        """Apply the deferred normalisation-statistics updates for the gated samples (pseudo-label
        norms with their commit labels; they learn whether their pre-pass saw a new domain)."""
        for layer in self._label_layers:
            layer.new_domain = bool(layer.shift_detected)
        labels = commit_labels(self.relabel, self.label_confidence, logits, pre_logits)
        commit_stats(self.model, gate_mask, labels=labels)
        if self._label_layers:
            info["shifted_layers"] = sum(bool(layer.new_domain) for layer in self._label_layers)
        for layer in self._label_layers:
            layer.new_domain = False

    def _run_guards(self, ctx: StepContext, mask: torch.Tensor, updated: bool) -> str | None:
        """Run the guards in order; the name of the first that asks for a reset (the rest do not run)."""
        for g in self.guards:
            if g.after_step(self, ctx, mask, updated):
                return g.name
        return None

    # -- state ----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the state right after construction (model, statistics, optimizer, filters, guards)."""
        self.load_state_dict(self._initial_state)

    def state_dict(self) -> dict[str, Any]:
        return adapter_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_adapter_state(self, state)

    def __repr__(self) -> str:
        parts = [f"norm={self.norm!r}"]
        if self.norm_kwargs:
            parts.append(f"norm_kwargs={self.norm_kwargs}")
        if self.objective is not None:
            parts += [f"objective={self.objective!r}", f"optimizer={self.optimizer_name!r}", f"lr={self.lr:g}"]
        if self.filters:
            parts.append(f"filters={self.filters}")
        if self.guards:
            parts.append(f"guards={self.guards}")
        return f"CompositeAdapter({', '.join(parts)})"
