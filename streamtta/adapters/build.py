"""Build a :class:`~streamtta.adapters.composite.CompositeAdapter` from a spec and flat overrides."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from streamtta.adapters.composite import CompositeAdapter
from streamtta.adapters.defaults import default_spec, is_default
from streamtta.adapters.filters import ConfidenceDropFilter, EntropyMarginFilter, RedundancyFilter
from streamtta.adapters.grammar import AdapterSpec, SpecError, SpecTerm, coerce_arg, parse_spec, suggest
from streamtta.adapters.guards import EMAToSource, LossEMAReset, PeriodicReset, SourceFallback
from streamtta.adapters.objectives import EntropyObjective, WeightedEntropyObjective
from streamtta.adapters.terms import ADAPTER_ARGS, GLOBAL_OVERRIDES, LABEL_ARGS, OVERRIDE_KEYS, TERMS

#: term name -> ``(num_classes, **constructor_kwargs) -> component`` for every objective, filter
#: and guard term (norm terms are layer factories, see :func:`streamtta.adapters.norms.make_norm_factory`).
COMPONENT_BUILDERS: dict[str, Callable[..., Any]] = {
    "tent": lambda num_classes, **k: EntropyObjective(**k),
    "eata-loss": lambda num_classes, **k: WeightedEntropyObjective(num_classes, **k),
    "conf-drop": lambda num_classes, **k: ConfidenceDropFilter(**k),
    "ent-margin": lambda num_classes, **k: EntropyMarginFilter(num_classes, **k),
    "redundancy": lambda num_classes, **k: RedundancyFilter(**k),
    "sar-reset": lambda num_classes, **k: LossEMAReset(**k),
    "periodic": lambda num_classes, **k: PeriodicReset(**k),
    "ema-source": lambda num_classes, **k: EMAToSource(**k),
    "source-fallback": lambda num_classes, **k: SourceFallback(**k),
}


def _term_kwargs(term: SpecTerm, overrides: dict[str, Any], used: set[str]) -> dict[str, Any]:
    """Constructor arguments of ``term``: its inline arguments (adapter-level ones left out), beaten by
    the overrides it maps (recorded in ``used``)."""
    info = TERMS[term.name]
    kw = {k: v for k, v in term.args.items() if k not in ADAPTER_ARGS and k not in LABEL_ARGS}
    for okey, param in info.overrides.items():
        if okey in overrides:
            kw[param] = coerce_arg(term.name, okey, overrides[okey], info.params[param])
            used.add(okey)
    return kw


def _build_component(term: SpecTerm, kw: dict[str, Any], num_classes: int) -> Any:
    return COMPONENT_BUILDERS[term.name](num_classes, **kw)


def _check_override_keys(overrides: dict[str, Any]) -> None:
    unknown = sorted(set(overrides) - OVERRIDE_KEYS)
    if unknown:
        close = {k: suggest(k, OVERRIDE_KEYS) for k in unknown}
        hints = "; ".join(f"{k!r}" + (f" (did you mean {c[0]!r}?)" if c else "") for k, c in close.items())
        raise SpecError(f"unknown override(s) {hints}; accepted: {', '.join(sorted(OVERRIDE_KEYS))}")


def _inline_adapter_kwargs(parsed: AdapterSpec) -> dict[str, Any]:
    """Adapter-level arguments written inline: the pseudo-label ones on the norm, the optimizer ones on
    the objective."""
    adapter_kw: dict[str, Any] = {k: v for k, v in parsed.norm.args.items() if k in LABEL_ARGS}
    if parsed.objective is not None:
        adapter_kw.update({k: coerce_arg(parsed.objective.name, k, v, ADAPTER_ARGS[k])
                           for k, v in parsed.objective.args.items() if k in ADAPTER_ARGS})
    return adapter_kw


def _global_overrides(parsed: AdapterSpec, has_objective: bool, overrides: dict[str, Any],
                      used: set[str]) -> dict[str, Any]:
    """The adapter-level overrides that apply to this spec (recorded in ``used``): optimizer keys only
    with an objective, pseudo-label keys only with ``cb-stats``."""
    adapter_kw: dict[str, Any] = {}
    for key in GLOBAL_OVERRIDES:
        if key in overrides:
            if key in ADAPTER_ARGS and not has_objective:
                continue
            if key in LABEL_ARGS and parsed.norm.name != "cb-stats":
                continue
            value = overrides[key]
            adapter_kw[key] = coerce_arg("adapter", key, value, GLOBAL_OVERRIDES[key]) if value is not None else None
            used.add(key)
    return adapter_kw


def build_adapter(spec: str | AdapterSpec, model: nn.Module, num_classes: int, **overrides: Any) -> CompositeAdapter:
    """Build a :class:`~streamtta.adapters.composite.CompositeAdapter` from a spec and overrides.

    ``"default"`` resolves per model (:func:`~streamtta.adapters.defaults.default_spec`: BatchNorm models,
    GroupNorm/LayerNorm models, TorchScript). ``overrides`` are flat keys (:data:`~streamtta.adapters.terms.OVERRIDE_KEYS`) that win over the
    spec's own arguments; the known keys this spec does not use are listed in ``ignored_overrides``.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2)).eval()
    >>> ad = build_adapter("rdumb", net, 2, reset_every=50, K=8)
    >>> ad.guards[0].every, ad.ignored_overrides       # K only applies to unmix-tns
    (50, ['K'])
    """
    _check_override_keys(overrides)
    if is_default(spec):  # what "default" means depends on the model's norm layers
        spec = default_spec(model)
    parsed = parse_spec(spec)
    used: set[str] = set()
    norm_kwargs = _term_kwargs(parsed.norm, overrides, used)
    adapter_kw = _inline_adapter_kwargs(parsed)
    objective = None
    if parsed.objective is not None:
        objective = _build_component(parsed.objective, _term_kwargs(parsed.objective, overrides, used), num_classes)
    filters = [_build_component(t, _term_kwargs(t, overrides, used), num_classes) for t in parsed.filters]
    guards = [_build_component(t, _term_kwargs(t, overrides, used), num_classes) for t in parsed.guards]
    adapter_kw.update(_global_overrides(parsed, objective is not None, overrides, used))
    try:
        adapter = CompositeAdapter(
            model, num_classes, norm=parsed.norm.name, norm_kwargs=norm_kwargs, objective=objective,
            filters=filters, guards=guards, spec=str(parsed), **adapter_kw,
        )
    except TypeError as e:  # a bad constructor argument that slipped through
        raise SpecError(f"cannot build {str(parsed)!r}: {e}") from None
    adapter.ignored_overrides = sorted(set(overrides) - used)
    return adapter
