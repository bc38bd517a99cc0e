"""``streamtta config show`` and ``streamtta broker``."""
from __future__ import annotations

import argparse
import json

from streamtta.cli.common import resolve_config


def cmd_config_show(args: argparse.Namespace) -> int:
    import tomli_w

    from streamtta.config.secrets import redacted_config
    from streamtta.runner import _drop_none

    shown = redacted_config(resolve_config(args))  # secrets shown as ***
    if args.format == "json":
        print(json.dumps(shown, indent=2))
    else:
        print(tomli_w.dumps(_drop_none(shown)), end="")
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    from streamtta.stream.broker import serve

    return serve(args.port, say=lambda line: print(line, flush=True))  # SIGINT/SIGTERM: stop the broker, exit 0
