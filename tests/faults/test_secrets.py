"""Secrets set through --set, the environment or a TOML file never reach the run's files, `config show`
or the log, while the resolved Config keeps the real values for the Kafka clients."""
from __future__ import annotations

import copy
import io
import json
import logging
import os
import sys

import pytest
import tomllib

from streamtta import cli
from streamtta.config import redact, redacted_config, secret_values
from streamtta.config.secrets import (
    FILTER,
    MARKER,
    SECRET_KEYS,
    install_redaction,
    is_secret_key,
    redact_argv,
    redact_text,
)
from streamtta.runner import write_manifest
from streamtta.stream.kafka.settings import client_settings

PW = "pw-Zq8!xK2#secret-sauce"
KEY_PW = "keypass-7781-abc"
CLIENT_SECRET = "oidc-client-secret-991"


@pytest.fixture(autouse=True)
def clean_filter():
    """The log filter is process-wide: restore its values and take it off the root handlers afterwards."""
    saved = set(FILTER.values)
    yield
    FILTER.values.clear()
    FILTER.values.update(saved)
    for h in logging.getLogger().handlers:
        h.removeFilter(FILTER)


@pytest.fixture(autouse=True)
def no_streamtta_env(monkeypatch):
    for k in list(os.environ):
        if k.upper().startswith("STREAMTTA_"):
            monkeypatch.delenv(k)


def config_args(source, tmp_path, monkeypatch):
    """CLI arguments (after the command) that set the SASL password through ``source``; the TOML file
    always carries the other secrets and the non-secret security settings."""
    toml = tmp_path / "cfg.toml"
    lines = ['[kafka.security]', '"security.protocol" = "SASL_SSL"', '"sasl.mechanism" = "PLAIN"',
             f'"ssl.key.password" = "{KEY_PW}"',
             '[kafka.consumer]', f'"sasl.oauthbearer.client.secret" = "{CLIENT_SECRET}"', '"fetch.wait.max.ms" = 7']
    args = ["--config", str(toml)]
    if source == "toml":
        lines.insert(3, f'"sasl.password" = "{PW}"')
    elif source == "env":
        monkeypatch.setenv("STREAMTTA_KAFKA__SECURITY__SASL.PASSWORD", PW)
    elif source == "set-table":
        args += ["--set", f'kafka.security={{"sasl.password"="{PW}"}}']
    else:  # under kafka.security the rest of the key is one librdkafka setting
        args += ["--set", f"kafka.security.sasl.password={PW}"]
    toml.write_text("\n".join(lines) + "\n")
    return args


def resolve(args):
    ns = cli.build_parser().parse_args(["config", "show", *args])
    return cli.resolve_config(ns)


SOURCES = ["set", "set-table", "env", "toml"]


@pytest.mark.parametrize("source", SOURCES)
def test_config_keeps_the_real_values(source, tmp_path, monkeypatch):
    cfg = resolve(config_args(source, tmp_path, monkeypatch))
    assert cfg.kafka.security["sasl.password"] == PW
    assert client_settings(cfg.kafka, "consumer")["sasl.password"] == PW
    assert client_settings(cfg.kafka, "consumer")["sasl.oauthbearer.client.secret"] == CLIENT_SECRET
    before = cfg.to_dict()
    shown = redacted_config(cfg)
    write_manifest(tmp_path, cfg, seed=0, stream=None, command=["streamtta"])
    assert cfg.to_dict() == before and shown["kafka"]["security"]["sasl.password"] == MARKER


@pytest.mark.parametrize("source", SOURCES)
def test_manifest_and_config_toml_hold_the_marker_never_the_secret(source, tmp_path, monkeypatch):
    args = config_args(source, tmp_path, monkeypatch)
    cfg = resolve(args)
    monkeypatch.setattr(sys, "argv", ["streamtta", "run", *args])  # the recorded command line
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_manifest(run_dir, cfg, seed=3, stream={"n": 1})
    for name in ("config.toml", "manifest.json"):
        text = (run_dir / name).read_text()
        for secret in (PW, KEY_PW, CLIENT_SECRET):
            assert secret not in text, (name, secret)
        assert MARKER in text
    toml = tomllib.loads((run_dir / "config.toml").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    for conf in (toml, manifest["config"]):
        sec = conf["kafka"]["security"]
        assert sec["sasl.password"] == sec["ssl.key.password"] == MARKER
        assert sec["security.protocol"] == "SASL_SSL" and sec["sasl.mechanism"] == "PLAIN"  # settings kept
        assert conf["kafka"]["consumer"] == {"sasl.oauthbearer.client.secret": MARKER, "fetch.wait.max.ms": 7}
    assert manifest["seed"] == 3 and manifest["command"][:2] == ["streamtta", "run"]
    if source == "set-table":
        assert 'kafka.security={"sasl.password"="***"}' in manifest["command"]
    if source == "set":
        assert "kafka.security.sasl.password=***" in manifest["command"]


@pytest.mark.parametrize("fmt", ["toml", "json"])
@pytest.mark.parametrize("source", SOURCES)
def test_config_show_redacts(source, fmt, tmp_path, monkeypatch, capsys):
    args = config_args(source, tmp_path, monkeypatch)
    assert cli.main(["config", "show", "--format", fmt, *args]) == 0
    out = capsys.readouterr().out
    for secret in (PW, KEY_PW, CLIENT_SECRET):
        assert secret not in out
    conf = json.loads(out) if fmt == "json" else tomllib.loads(out)
    assert conf["kafka"]["security"]["sasl.password"] == MARKER
    assert conf["kafka"]["security"]["security.protocol"] == "SASL_SSL"
    assert conf["kafka"]["consumer"]["sasl.oauthbearer.client.secret"] == MARKER


@pytest.mark.parametrize("source", SOURCES)
def test_log_records_are_masked(source, tmp_path, monkeypatch, caplog):
    cfg = resolve(config_args(source, tmp_path, monkeypatch))
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        cli._setup_logging(0)  # puts the filter on every root handler (ours, pytest's)
        write_manifest(tmp_path, cfg, seed=0, stream=None, command=[])  # registers the config's secrets
        log = logging.getLogger("streamtta.engine")
        log.warning("consumer settings %s", client_settings(cfg.kafka, "consumer"))
        log.warning("trying password %s then %r", cfg.kafka.security["sasl.password"], KEY_PW)
        try:
            raise RuntimeError(f"SASL authentication failed with {PW}")
        except RuntimeError:
            log.exception("connect failed")
    finally:
        root.removeHandler(handler)
    text = stream.getvalue()
    assert text.count("WARNING") == 2 and "ERROR connect failed" in text and "RuntimeError" in text
    for out in (text, caplog.text):
        for secret in (PW, KEY_PW, CLIENT_SECRET):
            assert secret not in out
        assert MARKER in out
    assert cfg.kafka.security["sasl.password"] == PW


def test_log_pairs_are_masked_without_a_registered_config():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    install_redaction(handlers=[handler])
    log = logging.getLogger("streamtta.test-secrets")
    log.addHandler(handler)
    try:
        log.warning("conf %s", {"sasl.password": "unregistered-1", "acks": "all"})
        log.warning("set ssl.keystore.password=unregistered-2 and my_api_token: unregistered-3")
    finally:
        log.removeHandler(handler)
    text = stream.getvalue()
    assert "unregistered" not in text and "'acks': 'all'" in text and text.count(MARKER) == 3


def test_every_listed_key_and_word_is_secret_and_ordinary_keys_are_not():
    for key in SECRET_KEYS:
        assert is_secret_key(key) and is_secret_key(key.upper()) and is_secret_key(f"kafka.security.{key}")
    for key in ("db_Password", "CLIENT_SECRET", "auth.token", "aws_credentials", "private_key_file", "passphrase"):
        assert is_secret_key(key), key
    for key in ("sasl.mechanism", "security.protocol", "ssl.ca.location", "bootstrap_servers", "batch_size",
                "ssl.certificate.location", "state_key", "topic", "sasl.kerberos.service.name"):
        assert not is_secret_key(key), key


def test_redact_nested_values_lists_and_known_strings_without_touching_the_input():
    obj = {"a": [{"sasl.password": "x1", "n": 1}, {"inner": {"SSL_KEY": {"pem": "x2"}}}],
           "ssl.key.password": None, "note": "uses x3 somewhere", "argv": ("--set", "k.secret=x4")}
    orig = copy.deepcopy(obj)
    out = redact(obj, {"x3"})
    assert obj == orig
    assert out == {"a": [{"sasl.password": MARKER, "n": 1}, {"inner": {"SSL_KEY": MARKER}}],
                   "ssl.key.password": None, "note": f"uses {MARKER} somewhere", "argv": ("--set", f"k.secret={MARKER}")}
    assert secret_values(obj) == set()  # under secret keys but too short to search for in free text
    assert secret_values({"sasl.password": "x1-long", "k": "k.secret=x4-long"}) == {"x1-long"}


def test_redact_argv_and_text_forms():
    argv = ["streamtta", "run", "--set", "kafka.security.sasl.password=a b c", "--set=kafka.producer.ssl.key.pem=K",
            "STREAMTTA_KAFKA__SECURITY__SASL.PASSWORD=e", "--topic", "t", "--set", "engine.batch_size=8",
            "--bootstrap-servers", "host:9092"]
    out = redact_argv(argv, values={"host-secret"})
    assert out == ["streamtta", "run", "--set", f"kafka.security.sasl.password={MARKER}",
                   f"--set=kafka.producer.ssl.key.pem={MARKER}", f"STREAMTTA_KAFKA__SECURITY__SASL.PASSWORD={MARKER}",
                   "--topic", "t", "--set", "engine.batch_size=8", "--bootstrap-servers", "host:9092"]
    assert redact_text('{"sasl.password": "q w", "acks": "all"}') == f'{{"sasl.password": "{MARKER}", "acks": "all"}}'
    assert redact_text("nothing to hide: batch_size=3 topic=t") == "nothing to hide: batch_size=3 topic=t"


def test_nested_security_settings_flatten_and_errors_never_echo_a_secret(monkeypatch, capsys):
    from streamtta.config import ConfigError, load_config

    monkeypatch.setenv("STREAMTTA_KAFKA__SECURITY__SASL__PASSWORD", PW)  # the env form of a dotted name
    assert load_config(overrides={}).kafka.security == {"sasl.password": PW}
    monkeypatch.delenv("STREAMTTA_KAFKA__SECURITY__SASL__PASSWORD")
    with pytest.raises(ConfigError) as e:
        load_config(overrides={"kafka": {"security": {"sasl.password": [PW]}}}, env=False)
    assert PW not in str(e.value) and "***" in str(e.value)


def test_short_secret_values_are_not_masked_inside_words(caplog):
    from streamtta.config.secrets import MIN_MASKED_CHARS, secret_values

    values = secret_values({"kafka": {"security": {"sasl.username": "u", "sasl.password": PW}}})
    assert values == {PW} and len(PW) >= MIN_MASKED_CHARS
