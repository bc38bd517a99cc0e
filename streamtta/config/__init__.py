"""Engine configuration: pydantic models loaded from TOML, environment and CLI flags.

Precedence, lowest to highest: built-in defaults < TOML file (``--config``) < environment
(``STREAMTTA_`` prefix, nested fields joined by ``__``, e.g. ``STREAMTTA_ENGINE__BATCH_SIZE=32``)
< CLI flags (``--set engine.batch_size=32`` or the dedicated flags such as ``--batch-size``).

* :mod:`~streamtta.config.models` -- the section models and :class:`Config`;
* :mod:`~streamtta.config.loader` -- :func:`load_config` (pydantic-settings sources built per call);
* :mod:`~streamtta.config.overrides` -- ``--set`` parsing and nested-dict helpers;
* :mod:`~streamtta.config.reference` -- the README's configuration reference table;
* :mod:`~streamtta.config.errors` -- :class:`ConfigError` and validation-error formatting;
* :mod:`~streamtta.config.secrets` -- :func:`redact` secrets in what is written or logged (the
  :class:`Config` keeps the real values).

Every model forbids unknown keys, so a typo fails fast with the field's dotted name and its source:

>>> from streamtta.config import load_config
>>> load_config(overrides={"engine": {"batch_size": 16}}).engine.batch_size
16
>>> try:
...     load_config(overrides={"engine": {"batch_sise": 16}})
... except ConfigError as e:
...     print(str(e).splitlines()[1].strip())
engine.batch_sise: Extra inputs are not permitted [from command line]
"""
from __future__ import annotations

from streamtta.config.errors import ConfigError
from streamtta.config.errors import format_errors as _format_errors
from streamtta.config.loader import load_config, read_toml
from streamtta.config.models import (
                                     AdapterConfig,
                                     AlertsConfig,
                                     Config,
                                     EngineConfig,
                                     KafkaConfig,
                                     ModelConfig,
                                     MonitorConfig,
                                     RunConfig,
                                     Scalar,
                                     ScorerConfig,
                                     Section,
)
from streamtta.config.overrides import deep_merge, parse_set_option, set_nested
from streamtta.config.reference import reference_markdown
from streamtta.config.secrets import install_redaction, redact, redacted_config, secret_values

__all__ = [
    "AdapterConfig",
    "AlertsConfig",
    "Config",
    "ConfigError",
    "EngineConfig",
    "KafkaConfig",
    "ModelConfig",
    "MonitorConfig",
    "RunConfig",
    "Scalar",
    "ScorerConfig",
    "Section",
    "_format_errors",
    "deep_merge",
    "install_redaction",
    "load_config",
    "parse_set_option",
    "read_toml",
    "redact",
    "redacted_config",
    "reference_markdown",
    "secret_values",
    "set_nested",
]
