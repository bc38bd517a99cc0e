"""``streamtta`` command line.

Commands: run, calibrate, simulate, produce, bench, broker, top, train-source, meta-train, config show.
Run ``streamtta COMMAND --help`` for the flags of each (a command lists only the flags it uses);
``streamtta --version`` prints the version.

Exit codes: 0 done (also ``run`` stopped by SIGINT/SIGTERM while consuming: batch finished, committed,
broker stopped, results written; ``broker`` stopped by either); 1 Kafka unreachable (``kafka.connect_timeout_s``),
input topic missing, a commit or delivery failed for good, or an internal error (its traceback is shown); 2
bad config, model spec, calibration data, a missing file or a path that cannot be used; 128 + signal (130, 143) when a signal stops a command before its engine runs (no results) or a
second one aborts a stop.

Modules: :mod:`.common` (flags, config, logging), :mod:`.run` (run, produce), :mod:`.calibrate`,
:mod:`.offline` (simulate, bench, train-source, meta-train), :mod:`.tools` (config show, broker),
:mod:`.summary` (the run summary table), :mod:`.top` (live view of a worker's metrics).

>>> build_parser().parse_args(["calibrate", "--model", "sensor:factory", "--data", "source.npz"]).labels is None
True
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from streamtta.cli.calibrate import cmd_calibrate
from streamtta.cli.common import (
    ALL_FLAGS,
    BENCH_FLAGS,
    CALIBRATE_FLAGS,
    FLAG_FIELDS,
    PRODUCE_FLAGS,
    SIMULATE_FLAGS,
    add_config_flags,
    resolve_config,
)
from streamtta.cli.common import setup_logging as _setup_logging
from streamtta.cli.offline import cmd_bench, cmd_meta_train, cmd_simulate, cmd_train_source
from streamtta.cli.run import cmd_produce, cmd_run
from streamtta.cli.tools import cmd_broker, cmd_config_show
from streamtta.cli.top import add_parser as add_top_parser
from streamtta.config import ConfigError

__all__ = ["FLAG_FIELDS", "add_config_flags", "build_parser", "main", "resolve_config"]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are a JSON fatal line too when JSON logs are asked for."""

    argv: list[str] = []

    def error(self, message: str):  # type: ignore[override]
        a = _Parser.argv
        if any(t == "--log-format=json" or (t == "--log-format" and a[i + 1:i + 2] == ["json"])
               for i, t in enumerate(a)) or _env_wants_json():
            from streamtta.ops.logs import use_json_logs

            use_json_logs()
            sub = self.prog.removeprefix("streamtta").strip()  # _fatal says "streamtta: " itself
            _fatal(f"{sub}: {message}" if sub else message, 2, "UsageError")
            raise SystemExit(2)
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    from streamtta.version import __version__

    p = _Parser(prog="streamtta", description="Streaming test-time adaptation engine.")
    p.add_argument("--version", action="version", version=f"streamtta {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="main job: broker + replay + engine end to end (or consume an existing Kafka)")
    add_config_flags(r, ALL_FLAGS)
    r.add_argument("--scenario", help="scenario name or TOML path to replay (default quickstart; none when --model "
                                      "names another model)")
    r.add_argument("--no-replay", action="store_const", const=True, default=None,
                   help="consume the topic without replaying a scenario into it first")
    r.add_argument("--max-records", type=int, help="stop after this many records")
    r.add_argument("--calibrate-from", type=Path, metavar="FILE",
                   help="calibrate on these clean source data first: .npz (x, optional y), .npy, .csv, .parquet, "
                        "or a calibration file (default: the model's calibration file, if any)")
    r.add_argument("--labels", metavar="COL_OR_KEY", help="label column (CSV/parquet) or key (.npz) of --calibrate-from")
    r.set_defaults(func=cmd_run)

    ca = sub.add_parser("calibrate", help="fit a model on your clean data and write its calibration file")
    ca.add_argument("--data", type=Path, required=True,
                    help="clean source data: .npz (x, optional y), .npy (x), .csv or .parquet (numeric columns)")
    ca.add_argument("--labels", metavar="COL_OR_KEY",
                    help="label column (CSV/parquet, by name or 0-based index) or key (.npz; default y); "
                         "without labels the calibration is unsupervised")
    ca.add_argument("--out", type=Path, help="calibration file (default: next to the model, <model>.calib.npz)")
    add_config_flags(ca, CALIBRATE_FLAGS)
    ca.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("simulate", help="run a scenario offline through the engine (no Kafka)")
    s.add_argument("scenario", help="scenario name or TOML path")
    add_config_flags(s, SIMULATE_FLAGS)
    s.set_defaults(func=cmd_simulate)

    pr = sub.add_parser("produce", help="replay a scenario into a Kafka topic")
    pr.add_argument("scenario")
    add_config_flags(pr, PRODUCE_FLAGS)
    pr.set_defaults(func=cmd_produce)

    b = sub.add_parser("bench", help="run methods side by side on identical streams")
    b.add_argument("scenarios", nargs="*", help="scenario names or files (none with --soak)")
    b.add_argument("--methods", default="source,bn", help="comma-separated adapter specs")
    b.add_argument("--seeds", default="1", help="comma-separated seeds")
    b.add_argument("--json", type=Path, help="write results JSON here")
    b.add_argument("--plot", type=Path, help="write a PNG comparison plot here")
    b.add_argument("--plot-shifts", type=Path, help="write a PNG of the mean accuracy around the change points here")
    b.add_argument("--markdown", type=Path, help="write the results table as Markdown here")
    b.add_argument("--limit", type=int, help="use only the first N samples of each stream (smoke runs)")
    b.add_argument("--scorers", help="comma-separated OOD scorers: every method runs once per scorer")
    b.add_argument("--variant", dest="variants", action="append", default=[], metavar="LABEL:KEY=V[;KEY=V]",
                   help="run every method again with these config overrides, e.g. "
                        "'no-readapt:monitor.readapt=false' (repeatable; the label is added to the method name)")
    b.add_argument("--cost", action="store_true",
                   help="measure compute cost instead: plain forward vs adapter step vs scoring, per batch (ms)")
    b.add_argument("--cost-samples", type=int, default=2048, help="samples per scenario for --cost")
    b.add_argument("--throughput", action="store_true",
                   help="measure samples/s instead: bare forward, bare adapter step, pipeline in memory and the "
                        "engine over an embedded broker per batch size, and 1 vs 2 engine processes (one group)")
    b.add_argument("--batch-sizes", default="1,16,64,256", help="comma-separated batch sizes for --throughput")
    b.add_argument("--throughput-samples", type=int, default=2048,
                   help="samples per batch size for --throughput (batch b uses at most 64*b)")
    b.add_argument("--workers", default="1,2", help="engine processes to compare for --throughput ('' = none)")
    b.add_argument("--stream-counts", default="1,1000",
                   help="stream ids for the --throughput many-streams table: the engine per id vs grouped vs one "
                        "stream, batch 64 ('' = no table)")
    b.add_argument("--soak", type=int, metavar="N",
                   help="memory soak instead: N generated sensor records through the engine (checkpoints, "
                        "spooled run log), resident memory sampled; prints JSON (also to --json)")
    b.add_argument("--stream-ids", type=int, default=1, help="stream ids of the --soak records (state per id)")
    b.add_argument("--grouped", action="store_true", help="--soak with grouped.enabled (one forward per batch "
                   "for all stream ids)")
    b.add_argument("--streams", type=int, metavar="N", help="run each scenario as a fleet of N interleaved stream "
                   "ids, each id in one domain (streamtta.simulations.fleet); with --set engine.state_key=stream_id "
                   "each id adapts on its own")
    b.add_argument("--metrics", type=lambda s: tuple(m.strip() for m in s.split(",") if m.strip()),
                   help="table columns (metric names of metrics.summarize), e.g. acc,auroc,fpr95")
    add_config_flags(b, BENCH_FLAGS)
    b.set_defaults(func=cmd_bench)

    br = sub.add_parser("broker", help="start the embedded Kafka-protocol broker (Tansu) until Ctrl-C")
    br.add_argument("--port", type=int, default=None, help="port (default: a free loopback port)")
    br.set_defaults(func=cmd_broker)

    add_top_parser(sub)

    t = sub.add_parser("train-source", help="train a built-in source model and save its checkpoint")
    t.add_argument("--dataset", default="digits", help="digits or segment")
    t.add_argument("--out", type=Path, required=True, help="checkpoint path (.pt)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--epochs", type=int)
    t.add_argument("--known-classes", help="comma-separated known class ids (default: dataset's)")
    t.add_argument("--recipe", help="a named recipe instead of the dataset's default, e.g. digits-cnn-ln "
                                    "(streamtta.models.recipes.RECIPES: the held-out and GroupNorm/LayerNorm backbones)")
    t.set_defaults(func=cmd_train_source)

    m = sub.add_parser("meta-train", help="learn the meta-initialisation used for re-adaptation")
    m.add_argument("--model", default="digits-resnet")
    m.add_argument("--steps", type=int, default=200)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", type=Path, help="default: next to the source checkpoint")
    m.set_defaults(func=cmd_meta_train)

    c = sub.add_parser("config", help="configuration tools")
    csub = c.add_subparsers(dest="config_command", required=True)
    cs = csub.add_parser("show", help="print the resolved configuration")
    add_config_flags(cs, ALL_FLAGS)
    cs.add_argument("--format", choices=["toml", "json"], default="toml")
    cs.set_defaults(func=cmd_config_show)
    return p


def main(argv: list[str] | None = None) -> int:
    from streamtta.calibration import CalibrationError
    from streamtta.models.registry import ModelSpecError
    from streamtta.signals import Interrupted, on_signals
    from streamtta.stream.broker import BrokerStartError
    from streamtta.stream.kafka.errors import BrokerUnavailable, CommitError, DeliveryError, MissingTopicError

    parser = build_parser()
    _Parser.argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "verbose", 0), getattr(args, "log_format", None) or "text")
    from streamtta.adapters.grammar import SpecError

    usage = (ConfigError, FileNotFoundError, ModelSpecError, CalibrationError, SpecError)
    try:
        with on_signals():  # a signal before an engine runs stops the command (see the module doc)
            return int(args.func(args) or 0)
    except (*usage, BrokerUnavailable, BrokerStartError, MissingTopicError, CommitError, DeliveryError) as e:
        code = 2 if isinstance(e, usage) else 1
        _fatal(str(e), code, type(e).__name__)
        return code
    except Interrupted as e:
        _fatal(f"stopped by {e.args[0].name}", 128 + int(e.args[0]), "Interrupted")
        return 128 + int(e.args[0])
    except OSError as e:  # a path that cannot be written or read (checkpoint or output folder, ...)
        _fatal(str(e), 2, type(e).__name__)
        return 2
    except Exception as e:  # a bug: the traceback goes with the fatal line (and into the JSON line's "exc")
        _fatal(f"internal error: {type(e).__name__}: {e}", 1, type(e).__name__, exc=True)
        return 1


def _fatal(message: str, code: int, error: str, exc: bool = False) -> None:
    """The line a failed command ends with: plain text on stderr, or (``--log-format json``) one JSON log
    line, ``event`` "fatal" with the exit code and error type, so that log shippers see it too."""
    import logging
    import traceback

    from streamtta.cli.common import json_logging
    from streamtta.ops.logs import use_json_logs

    # JSON logs by flag, config file or environment (resolve_config switched the root handler then; the
    # environment is read here too, for a config that failed before it could be resolved)
    if not json_logging() and _env_wants_json():
        use_json_logs()
    if not json_logging():
        if exc:
            traceback.print_exc(file=sys.stderr)
        print(f"streamtta: {message}", file=sys.stderr)
        return
    logging.getLogger("streamtta").critical("streamtta: %s", message, exc_info=exc,
                                            extra={"event": "fatal", "exit_code": code, "error": error})


def _env_wants_json() -> bool:
    """``STREAMTTA_RUN__LOG_FORMAT=json`` in the environment (read before any config could be resolved)."""
    import os

    return os.environ.get("STREAMTTA_RUN__LOG_FORMAT", "").strip().lower() == "json"
