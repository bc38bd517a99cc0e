"""Configuration: precedence TOML < env < CLI, fail-fast errors that name the field and its source."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading

import pytest

from streamtta.config import Config, ConfigError, load_config, parse_set_option


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_are_valid():
    cfg = load_config(env=False)
    assert cfg.engine.batch_size == 64
    assert cfg.kafka.resolved_dlq_topic() == "streamtta.input.dlq"


def test_precedence_toml_env_cli(tmp_path, monkeypatch):
    p = write(tmp_path, "[engine]\nbatch_size = 8\nseed = 3\n[kafka]\ntopic = 'images'\n")
    assert load_config(p, env=False).engine.batch_size == 8
    monkeypatch.setenv("STREAMTTA_ENGINE__BATCH_SIZE", "12")
    cfg = load_config(p)
    assert cfg.engine.batch_size == 12 and cfg.engine.seed == 3 and cfg.kafka.topic == "images"
    cfg = load_config(p, overrides={"engine": {"batch_size": 5}})
    assert cfg.engine.batch_size == 5 and cfg.engine.seed == 3  # nested partial override keeps siblings


@pytest.mark.parametrize("overrides, field", [
    ({"engine": {"batch_size": 0}}, "engine.batch_size"),
    ({"engine": {"batch_sise": 3}}, "engine.batch_sise"),
    ({"monitor": {"detector": "nope"}}, "monitor.detector"),
    ({"kafka": {"poll_timeout_s": -1}}, "kafka.poll_timeout_s"),
])
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(overrides=overrides, env=False)


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "[engine\n"), env=False)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml", env=False)
    with pytest.raises(ConfigError, match="engine.batch_size"):
        load_config(write(tmp_path, "[engine]\nbatch_size = 'big'\n"), env=False)


def test_bad_env_value_names_field(monkeypatch):
    monkeypatch.setenv("STREAMTTA_ENGINE__BATCH_SIZE", "abc")
    with pytest.raises(ConfigError, match="engine.batch_size"):
        load_config()


def test_parse_set_option():
    assert parse_set_option(["adapter.options.lr=1e-4", "kafka.stop_at_end=true", "monitor.signals=['a','b']"]) == {
        "adapter": {"options": {"lr": 1e-4}}, "kafka": {"stop_at_end": True}, "monitor": {"signals": ["a", "b"]}}
    with pytest.raises(ConfigError):
        parse_set_option(["batch_size=3"])


def test_cli_config_show(tmp_path):
    p = write(tmp_path, "[engine]\nbatch_size = 8\n")
    out = subprocess.run([sys.executable, "-m", "streamtta.cli", "config", "show", "--config", str(p),
                          "--batch-size", "16", "--set", "kafka.topic=t1", "--format", "json"],
                         capture_output=True, text=True, check=True).stdout
    d = json.loads(out)
    assert d["engine"]["batch_size"] == 16 and d["kafka"]["topic"] == "t1"
    bad = subprocess.run([sys.executable, "-m", "streamtta.cli", "config", "show", "--set", "engine.batch_size=0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "engine.batch_size" in bad.stderr


def test_readme_configuration_reference_is_in_sync():
    from pathlib import Path

    from streamtta.config import reference_markdown
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- config-reference:start -->")[1].split("<!-- config-reference:end -->")[0]
    assert block.strip() == reference_markdown().strip(), "regenerate the README table from reference_markdown()"


# ---------------------------------------------------------------------------------------------
# sources per call: precedence of every layer, no os.environ writes, concurrent loads, error origins
# ---------------------------------------------------------------------------------------------
def test_precedence_of_every_layer(tmp_path, monkeypatch):
    p = write(tmp_path, "[engine]\nbatch_size = 8\nseed = 3\n[kafka]\ntopic = 'file'\npoll_timeout_s = 2.0\n")
    monkeypatch.setenv("STREAMTTA_ENGINE__BATCH_SIZE", "12")
    monkeypatch.setenv("STREAMTTA_KAFKA__TOPIC", "env")
    cfg = load_config(p, overrides={"kafka": {"topic": "cli"}})
    assert cfg.kafka.topic == "cli"  # overrides > environment
    assert cfg.engine.batch_size == 12  # environment > file
    assert cfg.engine.seed == 3 and cfg.kafka.poll_timeout_s == 2.0  # file > defaults
    assert cfg.kafka.group_id == "streamtta" and cfg.monitor.detector == "page-hinkley"  # defaults
    cfg = load_config(p, overrides={"kafka": {"topic": "cli"}}, env=False)
    assert cfg.kafka.topic == "cli" and cfg.engine.batch_size == 8
    assert load_config(p).kafka.topic == "env" and load_config(env=False).kafka.topic == "streamtta.input"
    # a plain Config() reads keyword arguments and the environment, never a file of an earlier load
    assert Config().engine.batch_size == 12 and Config().engine.seed == 0
    assert Config(engine={"batch_size": 4}).engine.batch_size == 4


class _ReadOnlyEnviron(dict):
    """Stands in for os.environ during a test: any write raises."""

    def _refuse(self, *a, **k):
        raise AssertionError("load_config must not write to os.environ")

    __setitem__ = __delitem__ = pop = popitem = clear = update = setdefault = _refuse  # type: ignore[assignment]


def test_load_config_never_writes_os_environ(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMTTA_ENGINE__SEED", "7")
    before = dict(os.environ)
    p = write(tmp_path, "[engine]\nseed = 3\n")
    with monkeypatch.context() as m:  # restored before pytest itself writes PYTEST_CURRENT_TEST again
        m.setattr(os, "environ", _ReadOnlyEnviron(before))
        assert load_config(p, env=False).engine.seed == 3  # env=False ignores the variable, never removes it
        assert load_config(p).engine.seed == 7
        with pytest.raises(ConfigError):
            load_config(p, overrides={"engine": {"seed": "x"}}, env=False)
        assert dict(os.environ) == before
    assert dict(os.environ) == before


def test_concurrent_loads_do_not_interfere(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMTTA_ENGINE__CHECKPOINT_EVERY", "5")
    files = []
    for i in range(4):
        p = tmp_path / f"c{i}.toml"
        p.write_text(f"[engine]\nseed = {i}\n[kafka]\ntopic = 't{i}'\n")
        files.append(p)
    barrier = threading.Barrier(len(files))
    errors: list[str] = []

    def worker(i):
        barrier.wait()
        for _ in range(40):
            env = i % 2 == 0  # half the threads ignore the environment, half read it
            cfg = load_config(files[i], env=env)
            got = (cfg.engine.seed, cfg.kafka.topic, cfg.engine.checkpoint_every)
            want = (i, f"t{i}", 5 if env else 1)
            if got != want:
                errors.append(f"thread {i}: got {got}, want {want}")
            if Config().kafka.topic != "streamtta.input":
                errors.append(f"thread {i}: a plain Config() saw another load's file")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(files))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    assert os.environ["STREAMTTA_ENGINE__CHECKPOINT_EVERY"] == "5"


def test_bad_key_names_the_file_and_the_key(tmp_path, monkeypatch):
    p = write(tmp_path, "[engine]\nbatch_sise = 3\n[monitor]\ndetector = 'nope'\n")
    monkeypatch.setenv("STREAMTTA_KAFKA__POLL_TIMEOUT_S", "-1")
    with pytest.raises(ConfigError) as info:
        load_config(p, overrides={"engine": {"seed": "x"}})
    lines = str(info.value).splitlines()
    assert str(p) in lines[0] and "environment" in lines[0] and "command line" in lines[0]
    by_field = {ln.strip().split(":")[0]: ln for ln in lines[1:]}
    assert by_field["engine.batch_sise"].endswith(f"[from file {p}]")
    assert by_field["monitor.detector"].endswith(f"[from file {p}]")
    assert by_field["kafka.poll_timeout_s"].endswith("[from environment STREAMTTA_*]")
    assert by_field["engine.seed"].endswith("[from command line]")
    with pytest.raises(ConfigError, match=rf"engine\.batch_sise: Extra inputs are not permitted \[from file {re.escape(str(p))}\]"):
        load_config(p, env=False)


def test_unreadable_toml_is_a_config_error(tmp_path):
    p = tmp_path / "c.toml"
    p.write_bytes(b"[engine]\nseed = '\xff'\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(p, env=False)


def test_monitor_defaults_agree_with_the_shift_monitor():
    import inspect

    from streamtta.config import MonitorConfig, reference_markdown
    from streamtta.detectors.shift.monitor import ShiftMonitor

    params = inspect.signature(ShiftMonitor.__init__).parameters
    cfg = MonitorConfig()
    # the config spells it 'page-hinkley', ShiftMonitor 'page_hinkley': the same detector once resolved
    assert ShiftMonitor(detector=cfg.detector).detector_name == ShiftMonitor().detector_name
    assert tuple(cfg.signals) == tuple(params["signals"].default)
    # the engine passes monitor.cooldown_batches explicitly; where it differs from ShiftMonitor's own
    # default, the field's doc says so (and the reference table shows it)
    default_cd = params["cooldown_batches"].default
    if cfg.cooldown_batches != default_cd:
        doc = MonitorConfig.model_fields["cooldown_batches"].description
        assert f"ShiftMonitor's own default, {default_cd}," in doc
    row = next(r for r in reference_markdown().splitlines() if r.startswith("| `monitor.cooldown_batches`"))
    assert f"| `{cfg.cooldown_batches}` |" in row


def test_reference_shows_the_current_defaults():
    from streamtta.config import reference_markdown

    rows = {r.split("`")[1]: r.split("`")[3] for r in reference_markdown().splitlines()[2:]}
    cfg = Config.model_validate({}).to_dict()
    assert len(rows) == sum(len(v) for v in cfg.values())
    for dotted, shown in rows.items():
        section, name = dotted.split(".")
        value = cfg[section][name]
        assert shown == ("unset" if value is None else json.dumps(value)), dotted
