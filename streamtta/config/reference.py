"""The configuration reference table (README), generated from the models' defaults and field docs."""
from __future__ import annotations

import json

from streamtta.config.models import Config


def reference_markdown() -> str:
    """The configuration reference table of the README, generated from the models.

    >>> print(reference_markdown().splitlines()[2])
    | `kafka.bootstrap_servers` | `unset` | Kafka bootstrap servers; unset = start the embedded Tansu broker (run/produce only). |
    """
    lines = ["| field | default | description |", "|---|---|---|"]
    for section, finfo in Config.model_fields.items():
        model = finfo.annotation
        for name, f in model.model_fields.items():  # type: ignore[union-attr]
            default = f.default_factory() if f.default_factory is not None else f.default  # type: ignore[call-arg]
            shown = "unset" if default is None else json.dumps(default, default=str)
            lines.append(f"| `{section}.{name}` | `{shown}` | {f.description or ''} |")
    return "\n".join(lines)
