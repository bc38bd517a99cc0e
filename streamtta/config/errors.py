"""Configuration errors and the formatting of pydantic validation errors into one readable message."""
from __future__ import annotations

from typing import Any, Callable

from pydantic import ValidationError

from streamtta.config.secrets import is_secret_key, redact


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field(s)."""


def format_errors(err: ValidationError, origin: str, where: Callable[[tuple[Any, ...]], str | None] | None = None
                  ) -> str:
    """One line per error: ``section.key: message (got value)``.

    ``origin`` names where the configuration came from (first line); ``where(loc)``, if given, names the
    source of one error's value (e.g. the TOML file), appended as ``[from ...]``.
    """
    lines = [f"invalid configuration ({origin}):"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        got = e.get("input")
        if any(is_secret_key(str(x)) for x in e["loc"]):  # never echo a secret
            got = "***"
        elif isinstance(got, (dict, list)):
            got = redact(got)
        line = f"  {loc}: {e['msg']} (got {got!r})" if e["type"] != "extra_forbidden" else f"  {loc}: {e['msg']}"
        src = where(tuple(e["loc"])) if where is not None else None
        lines.append(f"{line} [from {src}]" if src else line)
    return "\n".join(lines)
