"""The registry of adapter spec terms: every name the spec grammar accepts, its kind, arguments,
override keys, aliases and macros (the grammar itself is in :mod:`streamtta.adapters.spec`).

>>> TERMS["tent"].kind, sorted(TERMS["periodic"].params), TERMS["periodic"].overrides
('objective', ['every'], {'reset_every': 'every'})
>>> ALIASES["rotta-stats"], MACROS["ostta"]()
('rbn', 'tent+conf-drop')
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

#: The shipped default method (see the :mod:`streamtta.adapters` package docstring for the rationale).
DEFAULT_SPEC = "cb-stats+source-fallback"

#: Optimizer arguments of the adapter, accepted inline by the objective term.
ADAPTER_ARGS: dict[str, type] = {
    "lr": float,
    "optimizer": str,
    "sgd_momentum": float,
    "weight_decay": float,
}
#: Adapter-level arguments that the pseudo-label norm (cb-stats) accepts inline.
LABEL_ARGS: dict[str, type] = {"prepass": str, "relabel": str, "label_confidence": float, "balanced_tv": float,
                               "imbalanced_tv": float, "prepass_samples": int}
#: Adapter-level override keys (not tied to a term).
GLOBAL_OVERRIDES: dict[str, type] = {
    **ADAPTER_ARGS, **LABEL_ARGS, "feature_layer": str, "feature_hook": str, "seed": int,
}


@dataclass(frozen=True)
class TermInfo:
    name: str
    kind: str  # norm | objective | filter | guard
    params: dict[str, type]  # constructor argument -> type
    overrides: dict[str, str] = field(default_factory=dict)  # override key -> constructor argument
    needs_objective: bool = False


def _same(*names: str) -> dict[str, str]:
    return {n: n for n in names}


TERMS: dict[str, TermInfo] = {
    t.name: t
    for t in [
        TermInfo("source", "norm", {}),
        TermInfo("bn", "norm", {"min_batch_size": int, "source_weight": float}, _same("min_batch_size", "source_weight")),
        TermInfo("align", "norm", {"min_batch_size": int, "full_share": float, "none_share": float,
                                    "alpha": float, "warmup": bool}),
        TermInfo("rbn", "norm", {"alpha": float, "warmup": float}, {"rbn_alpha": "alpha"}),
        TermInfo(
            "unmix-tns",
            "norm",
            {"K": int, "bs_max": int, "tau": float, "init_alpha": float, "instance_weight": float, "adapt_bn1d": bool},
            _same("K", "bs_max", "tau", "init_alpha", "instance_weight", "adapt_bn1d"),
        ),
        TermInfo(
            "cb-stats",
            "norm",
            {"alpha": float, "kappa": float, "shift_rate": float, "batch_kappa": float, "shift_factor": float,
             "reanchor": float, "offset_floor": float, "update_on_shift": bool, "prior_weight": float, "ema": float,
             "imbalance_ratio": float,
             **LABEL_ARGS},
            {"cb_alpha": "alpha", "kappa": "kappa", "shift_rate": "shift_rate", "batch_kappa": "batch_kappa",
             "shift_factor": "shift_factor"},
        ),
        TermInfo("tent", "objective", {"diversity_weight": float, **ADAPTER_ARGS}, _same("diversity_weight")),
        TermInfo("eata-loss", "objective", {"e_margin": float, **ADAPTER_ARGS}, _same("e_margin")),
        TermInfo("conf-drop", "filter", {"margin": float}, {"conf_margin": "margin"}, needs_objective=True),
        TermInfo("ent-margin", "filter", {"e_margin": float}, _same("e_margin"), needs_objective=True),
        TermInfo(
            "redundancy", "filter", {"d_margin": float, "momentum": float},
            {"d_margin": "d_margin", "redundancy_momentum": "momentum"}, needs_objective=True,
        ),
        TermInfo(
            "sar-reset", "guard", {"threshold": float, "momentum": float},
            {"reset_threshold": "threshold", "reset_momentum": "momentum"}, needs_objective=True,
        ),
        TermInfo("periodic", "guard", {"every": int}, {"reset_every": "every"}),
        TermInfo("ema-source", "guard", {"momentum": float}, {"ema_momentum": "momentum"}, needs_objective=True),
        TermInfo(
            "source-fallback", "guard",
            {"agreement": float, "mixed": bool, "near": float, "far": float, "far_fraction": float, "stale": float,
             "quantile": float, "probe": int},
            {"fallback_agreement": "agreement", "fallback_mixed": "mixed"},
        ),
    ]
}

ALIASES: dict[str, str] = {
    "bn-adapt": "bn", "tbn": "bn", "rotta-stats": "rbn", "robust-bn": "rbn", "unmix": "unmix-tns",
    "unmixtns": "unmix-tns", "fallback": "source-fallback", "cbn": "cb-stats", "class-balanced": "cb-stats", "entropy": "tent", "ema-to-source": "ema-source", "eta": "eata",
}

#: name -> expansion (a spec string, arguments given to the macro go to the parts that accept them)
MACROS: dict[str, Callable[[], str]] = {
    "eata": lambda: "eata-loss+ent-margin+redundancy",
    "ostta": lambda: "tent+conf-drop",
    "rdumb": lambda: "eata+periodic(every=1000)",
    "default": lambda: DEFAULT_SPEC,
}

#: Every flat override key ``build_adapter`` understands.
OVERRIDE_KEYS: frozenset[str] = frozenset(GLOBAL_OVERRIDES) | frozenset(
    k for t in TERMS.values() for k in t.overrides
)
