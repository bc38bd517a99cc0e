"""Flags shared by the commands, the configuration they resolve to, logging and the console.

Each command takes the flags that mean something to it (``produce`` has no ``--adapter``): see the
``*_FLAGS`` tuples. Every flag maps to one config field (:data:`FLAG_FIELDS`); ``--set section.key=value``
reaches any field.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from streamtta.config import Config, deep_merge, install_redaction, load_config, parse_set_option, set_nested

log = logging.getLogger("streamtta")

#: dedicated flags -> dotted config field
FLAG_FIELDS = {
    "bootstrap_servers": "kafka.bootstrap_servers",
    "topic": "kafka.topic",
    "group_id": "kafka.group_id",
    "partitions": "kafka.partitions",
    "create_topics": "kafka.create_topics",
    "model": "model.source",
    "state_dict": "model.state_dict",
    "adapter": "adapter.spec",
    "scorer": "scorer.name",
    "batch_size": "engine.batch_size",
    "seed": "engine.seed",
    "checkpoint_dir": "engine.checkpoint_dir",
    "output_dir": "run.output_dir",
    "rate": "run.rate",
    "log_format": "run.log_format",
    "metrics_port": "metrics.port",
    "state_store": "engine.state_store",
}

#: flag -> (option strings, add_argument keywords)
_FLAGS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "bootstrap_servers": (("--bootstrap-servers",), {"help": "Kafka bootstrap servers (default: embedded broker)"}),
    "topic": (("--topic",), {"help": "input topic"}),
    "group_id": (("--group-id",), {"help": "consumer group id (checkpoints are kept per group)"}),
    "partitions": (("--partitions",), {"type": int, "help": "partitions of the input topic when created"}),
    "create_topics": (("--create-topics",), {"action": "store_const", "const": True, "default": None,
                                             "help": "create a missing input topic (default: error; the embedded "
                                                     "broker always creates)"}),
    "model": (("--model",), {"help": "built-in model name, checkpoint, TorchScript file or module:factory "
                                     "(a module in the current directory is found)"}),
    "state_dict": (("--state-dict",), {"type": Path, "help": "weights for a module:factory model (torch.save of "
                                                             "its state_dict; loaded weights_only)"}),
    "adapter": (("--adapter",), {"help": "adapter spec, e.g. unmix-tns+tent+conf-drop, bn, source"}),
    "scorer": (("--scorer",), {"help": "OOD scorer name"}),
    "batch_size": (("--batch-size",), {"type": int}),
    "seed": (("--seed",), {"type": int}),
    "checkpoint_dir": (("--checkpoint-dir",), {"type": Path}),
    "output_dir": (("--output-dir",), {"type": Path, "help": "parent folder of run folders (default runs/)"}),
    "rate": (("--rate",), {"type": float, "help": "replay rate, records/s (default: as fast as possible)"}),
    "log_format": (("--log-format",), {"choices": ["text", "json"], "help": "log lines as text (default) or one "
                                                                        "JSON object per line (INFO and up)"}),
    "state_store": (("--state-store",), {"choices": ["local", "kafka"],
                                         "help": "checkpoint per-stream states to the local --checkpoint-dir (default) "
                                                 "or to a compacted Kafka changelog topic any worker restores from"}),
    "metrics_port": (("--metrics-port",), {"type": int, "metavar": "PORT",
                                           "help": "serve Prometheus /metrics, /healthz and /readyz on this port "
                                                   "(0: a free one; default: no exporter)"}),
}

ALL_FLAGS = tuple(_FLAGS)
RUN_FLAGS = ALL_FLAGS
PRODUCE_FLAGS = ("bootstrap_servers", "topic", "partitions", "create_topics", "seed", "rate")
SIMULATE_FLAGS = ("model", "state_dict", "adapter", "scorer", "batch_size", "seed", "output_dir")
BENCH_FLAGS = ("model", "state_dict", "scorer", "batch_size", "output_dir")
CALIBRATE_FLAGS = ("model", "state_dict", "adapter", "scorer", "batch_size", "seed")


def add_config_flags(p: argparse.ArgumentParser, flags: tuple[str, ...] = ALL_FLAGS) -> None:
    """``--config``, ``--set``, ``--no-progress``, ``-v`` and the given shortcut flags."""
    g = p.add_argument_group("configuration (precedence: flags > STREAMTTA_* env > --config file > defaults)")
    g.add_argument("--config", "-c", type=Path, help="TOML config file")
    g.add_argument("--set", dest="set_items", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config field, e.g. --set engine.batch_size=32 (repeatable)")
    for name in flags:
        opts, kw = _FLAGS[name]
        g.add_argument(*opts, dest=name, **kw)
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("-v", "--verbose", action="count", default=0)


def resolve_config(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Config:
    overrides = parse_set_option(args.set_items)
    for flag, dotted in FLAG_FIELDS.items():
        v = getattr(args, flag, None)
        if v is not None:
            set_nested(overrides, dotted.split("."), str(v) if isinstance(v, Path) else v)
    if getattr(args, "no_progress", False):
        set_nested(overrides, ["run", "progress"], False)
    cfg = load_config(args.config, deep_merge(extra, overrides) if extra else overrides)
    install_redaction(cfg)  # from now on no log line shows this config's secrets
    if cfg.run.log_format == "json":  # also when set in a config file or the environment
        setup_logging(getattr(args, "verbose", 0), "json")
    return cfg


def setup_logging(verbose: int, fmt: str = "text") -> None:
    """Root logging: text through rich (WARNING, ``-v`` INFO, ``-vv`` DEBUG), or JSON lines on stderr
    (:func:`streamtta.ops.logs.use_json_logs`; INFO, ``-vv`` DEBUG). Either way secrets are masked."""
    from streamtta.config.secrets import install_redaction
    from streamtta.ops.logs import HANDLER_MARK, use_json_logs

    if fmt == "json":
        use_json_logs(logging.DEBUG if verbose >= 2 else logging.INFO)
        return
    from rich.logging import RichHandler

    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = RichHandler(show_path=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    setattr(handler, HANDLER_MARK, True)
    root = logging.getLogger()
    marked = [h for h in root.handlers if getattr(h, HANDLER_MARK, False)]
    if marked or not root.handlers:  # replace our own handlers (JSON ones too), leave an embedder's alone
        for h in marked:
            root.removeHandler(h)
        root.addHandler(handler)
        root.setLevel(level)
    install_redaction()  # every root handler masks the secrets of the configs in use


def console() -> Any:
    from rich.console import Console

    return Console()


def json_logging() -> bool:
    """Whether the root logger writes JSON lines (``--log-format json``, by flag, config or environment)."""
    from streamtta.ops.logs import JsonFormatter

    return any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)


def say(message: str, event: str, **fields: Any) -> None:
    """A line for people: rich text on stdout, or under JSON logs one INFO line (``event`` and ``fields``)
    on the log stream, so that stdout never mixes text into a JSON log collector."""
    if json_logging():
        from rich.text import Text

        logging.getLogger("streamtta").info(Text.from_markup(message).plain, extra={"event": event, **fields})
    else:
        console().print(message)
