"""Structured logs (issue 17): ``--log-format json`` writes one JSON object per line, the engine logs one
line per alert, checkpoint and commit at INFO and per batch at DEBUG, and secrets never show."""
from __future__ import annotations

import io
import json
import logging

import pytest
import torch

from streamtta.checkpoints import CheckpointStore
from streamtta.cli import build_parser, resolve_config
from streamtta.config import Config, install_redaction, load_config
from streamtta.engine import Engine, Outputs
from streamtta.models.registry import load_model
from streamtta.ops.eventlog import EventLog
from streamtta.ops.logs import JsonFormatter, use_json_logs
from streamtta.runner import build_pipeline
from streamtta.simulations.digits import load_digits_32
from streamtta.stream.envelope import encode_tensor
from streamtta.stream.memory import MemoryDeadLetter, MemorySink, MemorySource


@pytest.fixture
def root_logging():
    """Restore the root logger (handlers, level) after a test that reconfigures it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def json_lines(buf):
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def run_engine(tmp_path, n=160, poison=(5, 6)):
    torch.set_num_threads(1)
    d = load_digits_32()
    values = [b"junk" if i in poison else encode_tensor(d.x_test[i], "cam", label=int(d.y_test[i])) for i in range(n)]
    cfg = load_config(overrides={"adapter": {"spec": "bn"}, "engine": {"batch_size": 32, "checkpoint_interval_s": 0},
                                 "kafka": {"stop_at_end": True, "poll_timeout_s": 0.01}}, env=False)
    out = Outputs(predictions=MemorySink(), alerts=[MemorySink()], dlq=MemoryDeadLetter())
    eng = Engine(cfg, MemorySource(values, topic="t"), out, build_pipeline(cfg, *load_model("digits-resnet")),
                 store=CheckpointStore(tmp_path / "ck"), observer=EventLog())
    eng.run()
    return eng, out


def test_engine_events_as_json_lines(tmp_path, root_logging):
    buf = io.StringIO()
    use_json_logs(logging.INFO, stream=buf)
    eng, out = run_engine(tmp_path)
    lines = json_lines(buf)
    assert all({"time", "level", "event", "logger"} <= set(line) for line in lines)
    by_event = {}
    for line in lines:
        by_event.setdefault(line["event"], []).append(line)
    alerts = out.alerts[0].values
    assert [a["kind"] for a in by_event["alert"]] == [a["kind"] for a in alerts] and alerts
    dead = next(a for a in by_event["alert"] if a["kind"] == "dead_letter")
    assert dead["partition"] == 0 and dead["offsets"]["t[0]"][0] <= 5 <= dead["offsets"]["t[0]"][1]
    commits = [c["offsets"]["t[0]"] for c in by_event["commit"]]
    assert len(commits) >= eng.batches and commits == sorted(commits)  # checkpoint_every=1: each batch commits
    assert by_event["commit"][-1]["offsets"] == {"t[0]": 160} and by_event["commit"][-1]["partition"] == 0
    assert by_event["checkpoint"][-1]["stream"] == "t:0" and by_event["checkpoint"][-1]["offsets"] == {"t[0]": 160}
    assert all(line["level"] == "INFO" for line in lines if line["event"] in ("alert", "commit", "checkpoint"))
    assert "batch" not in by_event  # DEBUG


def test_batch_lines_at_debug(tmp_path, root_logging):
    buf = io.StringIO()
    use_json_logs(logging.DEBUG, stream=buf)
    eng, _ = run_engine(tmp_path, n=96, poison=())
    batches = [line for line in json_lines(buf) if line["event"] == "batch"]
    assert len(batches) == eng.batches and all(b["level"] == "DEBUG" for b in batches)
    assert batches[0]["offsets"] == {"t[0]": [0, 31]} and batches[0]["records"] == 32


def test_json_logs_mask_secrets(root_logging):
    buf = io.StringIO()
    use_json_logs(logging.INFO, stream=buf)
    install_redaction(Config(kafka={"security": {"sasl.password": "hunter2-secret"}}))
    log = logging.getLogger("streamtta.test")
    log.info("connecting with hunter2-secret and sasl.password=other-pw",
             extra={"event": "connect", "conf": {"sasl.password": "x", "note": "pw hunter2-secret"}})
    try:
        raise RuntimeError("bad hunter2-secret")
    except RuntimeError:
        log.exception("failed")
    text = buf.getvalue()
    assert "hunter2" not in text and "other-pw" not in text
    first, second = json_lines(buf)
    assert first["event"] == "connect" and first["conf"] == {"sasl.password": "***", "note": "pw ***"}
    assert "RuntimeError: bad ***" in second["exc"]


def test_log_format_flag_and_config(root_logging):
    args = build_parser().parse_args(["run", "--log-format", "json", "--metrics-port", "0"])
    cfg = resolve_config(args)
    assert cfg.run.log_format == "json" and cfg.metrics.port == 0 and cfg.metrics.host == "0.0.0.0"
    assert any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)
    assert resolve_config(build_parser().parse_args(["run"])).run.log_format == "text"
    assert resolve_config(build_parser().parse_args(["run"])).metrics.port is None


def test_json_logs_mask_secrets_in_every_field(root_logging):
    buf = io.StringIO()
    use_json_logs(stream=buf)
    install_redaction(Config(kafka={"security": {"sasl.password": "hunter3-secret"}}))
    logging.getLogger("streamtta.test").warning("auth", extra={"event": "auth with hunter3-secret",
                                                                "stream": "hunter3-secret"})
    text = buf.getvalue()
    assert "hunter3-secret" not in text and json_lines(buf)[0]["stream"] == "***"


def test_a_failed_command_ends_with_a_json_fatal_line(tmp_path, root_logging, capsys):
    """Under --log-format json the error a command stops on is a JSON line too (event "fatal", exit code)."""
    from streamtta import cli

    missing = tmp_path / "nowhere.toml"
    assert cli.main(["config", "show", "--log-format", "json", "--config", str(missing)]) == 2
    err = capsys.readouterr().err
    fatal = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert fatal and fatal[-1]["event"] == "fatal" and fatal[-1]["exit_code"] == 2
    assert fatal[-1]["level"] == "CRITICAL" and str(missing) in fatal[-1]["message"]
    assert not [line for line in err.splitlines() if line.startswith("streamtta:")]  # no plain-text line
    assert cli.main(["config", "show", "--config", str(missing)]) == 2  # text logs: the plain line
    assert capsys.readouterr().err.startswith("streamtta: ")


def test_json_debug_lines_are_streamtta_own(root_logging):
    """``-vv`` turns on streamtta's DEBUG lines (batch events), not every library's (matplotlib's font search
    alone writes hundreds per run)."""
    buf = io.StringIO()
    use_json_logs(logging.DEBUG, stream=buf)
    logging.getLogger("matplotlib.font_manager").debug("findfont: score(...)")
    logging.getLogger("streamtta.engine").debug("batch of 64 records", extra={"event": "batch"})
    logging.getLogger("matplotlib").info("a library's INFO line still shows")
    assert [(d["logger"], d["level"]) for d in json_lines(buf)] == [("streamtta.engine", "DEBUG"),
                                                                   ("matplotlib", "INFO")]


def test_an_unusable_path_is_a_fatal_json_line_from_the_environment_setting(tmp_path, root_logging, capsys,
                                                                             monkeypatch):
    """An OSError (an output folder under a file) exits 2 with one fatal line, JSON when the environment
    asks for JSON logs, never a traceback."""
    from streamtta import cli

    monkeypatch.setenv("STREAMTTA_RUN__LOG_FORMAT", "json")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(["simulate", "quickstart", "--output-dir", str(blocker / "sub"), "--no-progress",
                     "--set", "run.scenario=quickstart"]) == 2
    err = capsys.readouterr().err
    fatal = [json.loads(line) for line in err.splitlines() if line.startswith("{") and '"fatal"' in line]
    assert len(fatal) == 1 and fatal[0]["exit_code"] == 2 and fatal[0]["error"] == "NotADirectoryError"
    assert "Traceback" not in err


def test_a_usage_error_under_json_logs_is_a_json_fatal_line(root_logging, capsys):
    """An unknown flag with --log-format json: stderr is JSON lines only, ending with the fatal one (exit 2)."""
    from streamtta import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--log-format", "json", "--no-such-flag"])
    assert e.value.code == 2
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines[-1]["event"] == "fatal" and lines[-1]["exit_code"] == 2 and "--no-such-flag" in lines[-1]["message"]
    with pytest.raises(SystemExit):  # text logs: argparse's own usage message
        cli.main(["run", "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
