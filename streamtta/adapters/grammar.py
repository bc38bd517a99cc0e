"""The spec grammar: parse and validate ``norm + objective + filters + guards`` strings into an
:class:`AdapterSpec` (the terms are registered in :mod:`streamtta.adapters.terms`; the grammar
and its rules are documented in :mod:`streamtta.adapters.spec`).

>>> str(parse_spec("rdumb(every=50)"))
'bn+eata-loss+ent-margin+redundancy+periodic(every=50)'
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any

from streamtta.adapters.terms import ALIASES, MACROS, TERMS


class SpecError(ValueError):
    """A spec string or an override that cannot be understood."""


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


def coerce_arg(term: str, key: str, value: Any, typ: type) -> Any:
    """``value`` of argument ``key`` of ``term`` as a ``typ`` (None stays None); SpecError if it is not one."""
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


def split_specs(text: str) -> list[str]:
    """A comma-separated list of specs (``--methods``), commas inside a term's ``(...)`` kept.

    >>> split_specs("source, bn,align(full_share=0.7,none_share=0.4)+tent")
    ['source', 'bn', 'align(full_share=0.7,none_share=0.4)+tent']
    """
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [m.strip() for m in [*out, cur] if m.strip()]


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


def suggest(name: str, options) -> list[str]:
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
                    p.args[key] = coerce_arg(p.name, key, value, TERMS[p.name].params[key])
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
            args[key] = coerce_arg(name, key, value, info.params[key])
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
