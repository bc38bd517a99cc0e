"""Spec strings: name an adapter as ``norm + objective + filters + guards``.

Grammar (names are case-insensitive; ``_`` and ``-`` are interchangeable)::

    spec  := term ("+" term)*
    term  := NAME [ "(" [ KEY "=" VALUE ("," KEY "=" VALUE)* ] ")" ]
    VALUE := int | float | true | false | none | bare-word

Terms, by kind (aliases in brackets):

* **norm** (at most one): ``source`` (no adaptation: BatchNorm with source statistics),
  ``bn`` [bn-adapt, tbn] (test-batch statistics), ``rbn`` [rotta-stats, robust-bn] (RoTTA's
  robust EMA statistics), ``unmix-tns`` [unmix, unmixtns] (UnMix-TNS as published),
  ``cb-stats`` [cbn, class-balanced] (test-batch statistics corrected for the batch's class mix,
  see :mod:`streamtta.adapters.norms.class_balanced`);
* **objective** (at most one): ``tent`` [entropy], ``eata-loss`` (exp(E0-H)-weighted entropy);
* **filter** (any, applied in the order written): ``conf-drop`` (open-set confidence-drop),
  ``ent-margin`` (EATA reliability, H < E0), ``redundancy`` (EATA non-redundancy);
* **guard** (any): ``sar-reset`` (entropy-EMA reset), ``periodic`` (RDumb), ``ema-source``
  [ema-to-source] (weight ensembling towards the source), ``source-fallback`` (return the source
  model's prediction on batches where it agrees with the adapted one, i.e. benign domains);
* **macros** expand in place: ``eata`` [eta] = ``eata-loss+ent-margin+redundancy``;
  ``ostta`` = ``tent+conf-drop``; ``rdumb`` = ``eata+periodic(every=1000)``; ``default`` =
  :data:`DEFAULT_SPEC`.

Rules: a spec with an objective but no norm uses ``bn`` (so ``"tent"`` is ``"bn+tent"``); a
norm alone is a gradient-free adapter (``"unmix-tns"`` is UnMix-TNS with no gradient step,
``"source"`` does nothing); filters and the ``sar-reset``/``ema-source`` guards need an
objective; no term twice. Optimizer arguments (``lr``, ``optimizer``, ``sgd_momentum``,
``weight_decay``) go on the objective term, e.g.
``"unmix-tns(K=8)+tent(lr=1e-4)+conf-drop+ema-source(momentum=0.99)"``; the pseudo-label
arguments of the adapter (``prepass``, ``relabel``) go on the ``cb-stats`` term.

``build_adapter(spec, model, num_classes, **overrides)`` also takes flat keyword overrides that
beat the spec's own arguments: see :data:`OVERRIDE_KEYS` (``lr``, ``optimizer``, ``K``,
``bs_max``, ``tau``, ``e_margin``, ``d_margin``, ``conf_margin``, ``reset_threshold``,
``reset_every``, ``ema_momentum``, ``rbn_alpha``, ``shift_rate``, ``feature_layer``, ``seed``
...). A key that no component knows is an error; a known key the spec does not use is ignored
(listed in ``adapter.ignored_overrides``).

>>> str(parse_spec("tent"))
'bn+tent'
>>> str(parse_spec("UnMix(K=8) + eata"))
'unmix-tns(K=8)+eata-loss+ent-margin+redundancy'
>>> try:
...     parse_spec("bn+tnet")
... except SpecError as e:
...     print(str(e)[:60])
unknown term 'tnet' in spec 'bn+tnet' (did you mean 'tent'?)
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

#: The shipped default method (see the adapters package docstring for the rationale and numbers).
DEFAULT_SPEC = "cb-stats+source-fallback"


class SpecError(ValueError):
    """A spec string or an override that cannot be understood."""


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------
ADAPTER_ARGS: dict[str, type] = {
    "lr": float,
    "optimizer": str,
    "sgd_momentum": float,
    "weight_decay": float,
}
#: Adapter-level arguments that the pseudo-label norm (cb-stats) accepts inline.
LABEL_ARGS: dict[str, type] = {"prepass": str, "relabel": str, "label_confidence": float, "balanced_tv": float,
                               "imbalanced_tv": float}
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
             "reanchor": float, "offset_floor": float, "update_on_shift": bool, "prior_weight": float, **LABEL_ARGS},
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
             "quantile": float},
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

_TERM_RE = re.compile(r"^\s*([A-Za-z0-9_\-]+)\s*(?:\((.*)\))?\s*$", re.S)


def _canon(name: str) -> str:
    n = name.strip().lower().replace("_", "-")
    return ALIASES.get(n, n)


def _parse_value(raw: str) -> Any:
    v = raw.strip()
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", v):
        raise SpecError(f"cannot read value {raw!r}")
    return v


def _coerce(term: str, key: str, value: Any, typ: type) -> Any:
    if value is None:
        return None
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if value in (0, 1):
                return bool(value)
            raise TypeError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise SpecError(f"{term}: argument {key}={value!r} should be a {typ.__name__}") from None


# ---------------------------------------------------------------------------------------------
# parsed spec
# ---------------------------------------------------------------------------------------------
@dataclass
class SpecTerm:
    name: str
    kind: str
    args: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.args:
            return self.name
        return f"{self.name}({','.join(f'{k}={v}' for k, v in self.args.items())})"


@dataclass
class AdapterSpec:
    """A parsed spec: one norm, an optional objective, filters and guards (in order)."""

    norm: SpecTerm
    objective: SpecTerm | None = None
    filters: list[SpecTerm] = field(default_factory=list)
    guards: list[SpecTerm] = field(default_factory=list)

    def terms(self) -> list[SpecTerm]:
        return [self.norm] + ([self.objective] if self.objective else []) + self.filters + self.guards

    def __str__(self) -> str:
        return "+".join(str(t) for t in self.terms())


def _split_terms(spec: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in spec:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise SpecError(f"unbalanced ')' in spec {spec!r}")
        if ch == "+" and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise SpecError(f"unbalanced '(' in spec {spec!r}")
    parts.append("".join(cur))
    return parts


def _parse_args(term: str, body: str | None, spec: str) -> dict[str, Any]:
    args: dict[str, Any] = {}
    if body is None or not body.strip():
        return args
    for item in body.split(","):
        if "=" not in item:
            raise SpecError(f"argument {item.strip()!r} of {term!r} in spec {spec!r} must be written key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key.isidentifier():
            raise SpecError(f"bad argument name {key!r} of {term!r} in spec {spec!r}")
        if key in args:
            raise SpecError(f"argument {key!r} given twice to {term!r} in spec {spec!r}")
        try:
            args[key] = _parse_value(raw)
        except SpecError as e:
            raise SpecError(f"{term}: {e} in spec {spec!r}") from None
    return args


def _suggest(name: str, options) -> list[str]:
    """Closest option to ``name`` (case-insensitive), as a 0- or 1-element list."""
    lower = {o.lower(): o for o in options}
    exact = lower.get(name.lower())
    if exact is not None:
        return [exact]
    return [lower[m] for m in difflib.get_close_matches(name.lower(), sorted(lower), n=1)]


def _known_names() -> list[str]:
    return sorted(set(TERMS) | set(MACROS))


def _expand(spec: str, depth: int = 0) -> list[SpecTerm]:
    if depth > 5:
        raise SpecError(f"macro expansion too deep in {spec!r}")
    out: list[SpecTerm] = []
    for raw in _split_terms(spec):
        m = _TERM_RE.match(raw)
        if not raw.strip():
            raise SpecError(f"empty term in spec {spec!r} (check for a stray '+')")
        if m is None:
            raise SpecError(f"cannot parse term {raw.strip()!r} in spec {spec!r}; expected name or name(key=value, ...)")
        name = _canon(m.group(1))
        args = _parse_args(m.group(1), m.group(2), spec)
        if name in MACROS:
            parts = _expand(MACROS[name](), depth + 1)
            for key, value in args.items():
                takers = [p for p in parts if key in TERMS[p.name].params]
                if not takers:
                    raise SpecError(
                        f"{name}: unknown argument {key!r}; its parts ({'+'.join(p.name for p in parts)}) "
                        f"accept {sorted({k for p in parts for k in TERMS[p.name].params})}"
                    )
                for p in takers:
                    p.args[key] = _coerce(p.name, key, value, TERMS[p.name].params[key])
            out.extend(parts)
            continue
        if name not in TERMS:
            close = difflib.get_close_matches(name, _known_names(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpecError(f"unknown term {m.group(1)!r} in spec {spec!r}{hint}; known terms: {', '.join(_known_names())}")
        info = TERMS[name]
        for key, value in args.items():
            if key not in info.params:
                raise SpecError(
                    f"{name}: unknown argument {key!r} in spec {spec!r}; accepted: {sorted(info.params) or 'none'}"
                )
            args[key] = _coerce(name, key, value, info.params[key])
        out.append(SpecTerm(name, info.kind, args))
    return out


def parse_spec(spec: str | AdapterSpec) -> AdapterSpec:
    """Parse and validate a spec string (see the module docstring for the grammar)."""
    if isinstance(spec, AdapterSpec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"spec must be a non-empty string such as 'unmix-tns+tent', got {spec!r}")
    terms = _expand(spec)
    seen: set[str] = set()
    norm = objective = None
    filters, guards = [], []
    for t in terms:
        if t.name in seen:
            raise SpecError(f"term {t.name!r} appears twice in spec {spec!r}")
        seen.add(t.name)
        if t.kind == "norm":
            if norm is not None:
                raise SpecError(f"spec {spec!r} has two norms ({norm.name!r} and {t.name!r}); choose one")
            norm = t
        elif t.kind == "objective":
            if objective is not None:
                raise SpecError(f"spec {spec!r} has two objectives ({objective.name!r} and {t.name!r}); choose one")
            objective = t
        elif t.kind == "filter":
            filters.append(t)
        else:
            guards.append(t)
    for t in filters + guards:
        if TERMS[t.name].needs_objective and objective is None:
            raise SpecError(
                f"{t.name!r} in spec {spec!r} needs an objective (e.g. '+tent'): a gradient-free spec has no update to "
                f"{'filter' if t.kind == 'filter' else 'guard'}"
            )
    if norm is None:
        if objective is None:
            raise SpecError(f"spec {spec!r} names neither a norm nor an objective; e.g. 'bn', 'unmix-tns' or 'tent'")
        norm = SpecTerm("bn", "norm")
    return AdapterSpec(norm, objective, filters, guards)


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------
def _term_kwargs(term: SpecTerm, overrides: dict[str, Any], used: set[str]) -> dict[str, Any]:
    info = TERMS[term.name]
    kw = {k: v for k, v in term.args.items() if k not in ADAPTER_ARGS and k not in LABEL_ARGS}
    for okey, param in info.overrides.items():
        if okey in overrides:
            kw[param] = _coerce(term.name, okey, overrides[okey], info.params[param])
            used.add(okey)
    return kw


def _build_component(term: SpecTerm, kw: dict[str, Any], num_classes: int) -> Any:
    from streamtta.adapters import filters as F
    from streamtta.adapters import guards as G
    from streamtta.adapters import objectives as O

    builders: dict[str, Callable[..., Any]] = {
        "tent": lambda **k: O.EntropyObjective(**k),
        "eata-loss": lambda **k: O.WeightedEntropyObjective(num_classes, **k),
        "conf-drop": lambda **k: F.ConfidenceDropFilter(**k),
        "ent-margin": lambda **k: F.EntropyMarginFilter(num_classes, **k),
        "redundancy": lambda **k: F.RedundancyFilter(**k),
        "sar-reset": lambda **k: G.LossEMAReset(**k),
        "periodic": lambda **k: G.PeriodicReset(**k),
        "ema-source": lambda **k: G.EMAToSource(**k),
        "source-fallback": lambda **k: G.SourceFallback(**k),
    }
    return builders[term.name](**kw)


def build_adapter(spec: str | AdapterSpec, model: nn.Module, num_classes: int, **overrides: Any):
    """Build a :class:`~streamtta.adapters.composite.CompositeAdapter` from a spec and overrides.

    ``overrides`` are flat keys (:data:`OVERRIDE_KEYS`) that win over the spec's own arguments.
    """
    from streamtta.adapters.composite import CompositeAdapter

    unknown = sorted(set(overrides) - OVERRIDE_KEYS)
    if unknown:
        close = {k: _suggest(k, OVERRIDE_KEYS) for k in unknown}
        hints = "; ".join(f"{k!r}" + (f" (did you mean {c[0]!r}?)" if c else "") for k, c in close.items())
        raise SpecError(f"unknown override(s) {hints}; accepted: {', '.join(sorted(OVERRIDE_KEYS))}")
    parsed = parse_spec(spec)
    used: set[str] = set()
    norm_kwargs = _term_kwargs(parsed.norm, overrides, used)
    objective = None
    adapter_kw: dict[str, Any] = {k: v for k, v in parsed.norm.args.items() if k in LABEL_ARGS}
    if parsed.objective is not None:
        adapter_kw.update({k: _coerce(parsed.objective.name, k, v, ADAPTER_ARGS[k])
                           for k, v in parsed.objective.args.items() if k in ADAPTER_ARGS})
        objective = _build_component(parsed.objective, _term_kwargs(parsed.objective, overrides, used), num_classes)
    filters = [_build_component(t, _term_kwargs(t, overrides, used), num_classes) for t in parsed.filters]
    guards = [_build_component(t, _term_kwargs(t, overrides, used), num_classes) for t in parsed.guards]
    for key in GLOBAL_OVERRIDES:
        if key in overrides:
            if key in ADAPTER_ARGS and objective is None:
                continue
            if key in LABEL_ARGS and parsed.norm.name != "cb-stats":
                continue
            adapter_kw[key] = _coerce("adapter", key, overrides[key], GLOBAL_OVERRIDES[key]) if overrides[key] is not None else None
            used.add(key)
    try:
        adapter = CompositeAdapter(
            model, num_classes, norm=parsed.norm.name, norm_kwargs=norm_kwargs, objective=objective,
            filters=filters, guards=guards, spec=str(parsed), **adapter_kw,
        )
    except TypeError as e:  # a bad constructor argument that slipped through
        raise SpecError(f"cannot build {str(parsed)!r}: {e}") from None
    adapter.ignored_overrides = sorted(set(overrides) - used)
    return adapter
