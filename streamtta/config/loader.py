"""Resolving a :class:`~streamtta.config.models.Config` from its sources, one set of sources per call.

Precedence, lowest to highest: defaults < TOML file < environment (``STREAMTTA_*``) < overrides. Each
:func:`load_config` call builds its own pydantic-settings sources (``TomlConfigSettingsSource`` for the
file, ``EnvSettingsSource`` for the environment, ``InitSettingsSource`` for the overrides) and hands them
to :class:`Config` (``_build_sources``), so no module state is shared between calls and ``os.environ`` is
only read, never written: concurrent loads with different files or ``env`` flags do not interfere.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import tomllib
from pydantic import ValidationError
from pydantic_settings import (
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    TomlConfigSettingsSource,
)
from pydantic_settings.sources import DefaultSettingsSource

from streamtta.config.errors import ConfigError, format_errors
from streamtta.config.models import Config

#: How the environment source is named in error messages.
ENV_ORIGIN = "environment STREAMTTA_*"
#: How the overrides source is named in error messages.
OVERRIDES_ORIGIN = "command line"


def read_toml(path: str | Path) -> dict[str, Any]:
    """The parsed TOML file ``path``; :class:`ConfigError` if it is missing or not valid TOML."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from e


def toml_source(path: str | Path) -> TomlConfigSettingsSource:
    """pydantic-settings' TOML source for ``path``, which must exist (the source itself skips missing files)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        return TomlConfigSettingsSource(Config, toml_file=p)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from e
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the config file: {e}") from e


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
                env: bool = True) -> Config:
    """Resolve the configuration: defaults < TOML ``path`` < environment (if ``env``) < ``overrides``.

    A bad key or value raises :class:`ConfigError` naming the dotted field and the source it came from.
    """
    init_kwargs = dict(overrides or {})
    named: list[tuple[str, PydanticBaseSettingsSource]] = []  # highest priority first
    if init_kwargs:
        named.append((OVERRIDES_ORIGIN, InitSettingsSource(Config, init_kwargs=init_kwargs)))
    if env:
        named.append((ENV_ORIGIN, EnvSettingsSource(Config)))
    if path is not None:
        named.append((f"file {path}", toml_source(path)))
    sources = tuple(s for _, s in named) + (DefaultSettingsSource(Config),)
    try:
        return Config(_build_sources=(sources, init_kwargs))
    except ValidationError as e:
        origin = ", ".join(name for name, _ in reversed(named)) or "defaults"
        raise ConfigError(format_errors(e, origin, _locator(named))) from None


def _locator(named: list[tuple[str, PydanticBaseSettingsSource]]) -> Callable[[tuple[Any, ...]], str | None]:
    """``where(loc)``: the name of the highest-priority source whose data holds the value at ``loc``."""
    datas = [(name, source()) for name, source in named]

    def where(loc: tuple[Any, ...]) -> str | None:
        for name, data in datas:
            if _holds(data, loc):
                return name
        return None

    return where


def _holds(data: Any, loc: tuple[Any, ...]) -> bool:
    for key in loc:
        if isinstance(data, dict):
            if key not in data:
                return False
            data = data[key]
        else:
            return True  # a scalar or list value set by this source contains the failing part
    return True
