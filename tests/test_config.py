"""Configuration: precedence TOML < env < CLI, fail-fast errors that name the field."""
from __future__ import annotations

import subprocess
import sys

import pytest

from streamtta.config import ConfigError, load_config, parse_set_option


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
    import json
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
