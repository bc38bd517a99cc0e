"""Every librdkafka client a run creates -- admin clients (broker wait, topic checks and creation), the
replay producer, the engine's producer and its consumer -- gets the same ``kafka.security`` settings."""
from __future__ import annotations

import pytest

from streamtta import cli
from streamtta.stream.kafka import admin as admin_mod
from streamtta.stream.kafka import sinks as sinks_mod
from streamtta.stream.kafka import source as source_mod
from streamtta.stream.kafka.admin import wait_for_broker
from streamtta.stream.kafka.errors import BrokerUnavailable

SECURITY = {"security.protocol": "plaintext", "ssl.endpoint.identification.algorithm": "none"}
CONFIG = """
[kafka]
producer = { "linger.ms" = 7 }
consumer = { "fetch.wait.max.ms" = 50 }

[kafka.security]
"security.protocol" = "plaintext"
"ssl.endpoint.identification.algorithm" = "none"
"""


@pytest.fixture
def clients(monkeypatch):
    """``{"admin"|"producer"|"consumer": [config, ...]}`` of every client created from now on."""
    seen: dict[str, list[dict]] = {"admin": [], "producer": [], "consumer": []}
    real_admin, real_consumer, real_pconf = admin_mod.AdminClient, source_mod.Consumer, sinks_mod.producer_config

    def admin(conf):
        seen["admin"].append(dict(conf))
        return real_admin(conf)

    def consumer(conf):
        seen["consumer"].append(dict(conf))
        return real_consumer(conf)

    def producer_config(*a, **kw):  # every producer's settings pass through here (make_producer)
        conf = real_pconf(*a, **kw)
        seen["producer"].append(dict(conf))
        return conf

    monkeypatch.setattr(admin_mod, "AdminClient", admin)
    monkeypatch.setattr(source_mod, "Consumer", consumer)
    monkeypatch.setattr(sinks_mod, "producer_config", producer_config)
    return seen


def _scenario(tmp_path):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "simulations" / "sensor-drift.toml").read_text()
    path = tmp_path / "sensor-tiny.toml"
    path.write_text(text.replace("samples_per_domain = 1000", "samples_per_domain = 20"))  # 120 records
    return path


def _has_security(conf: dict) -> bool:
    return all(conf.get(k) == v for k, v in SECURITY.items())


def test_every_client_of_a_run_and_of_produce_gets_the_security_settings(embedded_broker, tmp_path, unique_name,
                                                                          clients):
    bs = embedded_broker.bootstrap_servers
    cfg_file = tmp_path / "secure.toml"
    cfg_file.write_text(CONFIG)
    common = ["--config", str(cfg_file), "--bootstrap-servers", bs, "--topic", unique_name, "--no-progress",
              "--create-topics"]
    assert cli.main(["produce", str(_scenario(tmp_path)), *common]) == 0
    assert len(clients["admin"]) >= 1 and len(clients["producer"]) == 1 and not clients["consumer"]
    rc = cli.main(["run", "--scenario", str(_scenario(tmp_path)), "--group-id", unique_name, "--output-dir",
                   str(tmp_path / "runs"), "--checkpoint-dir", str(tmp_path / "ckpt"), *common])
    assert rc == 0
    # run: broker wait + replay (admin, producer) + topic checks (admin) + engine (producer, consumer)
    assert len(clients["admin"]) >= 3 and len(clients["producer"]) == 3 and len(clients["consumer"]) == 1
    for role, confs in clients.items():
        for conf in confs:
            assert _has_security(conf), (role, conf)
    assert all(c["linger.ms"] == 7 for c in clients["producer"])  # each role keeps its own settings too
    assert clients["consumer"][0]["fetch.wait.max.ms"] == 50
    assert all("linger.ms" not in c and "fetch.wait.max.ms" not in c for c in clients["admin"])


def test_security_settings_reach_librdkafka(embedded_broker):
    bs = embedded_broker.bootstrap_servers
    assert wait_for_broker(bs, timeout=10, config=SECURITY).brokers
    # the same broker through TLS: it speaks plaintext, so the admin client cannot get an answer
    with pytest.raises(BrokerUnavailable, match=bs):
        wait_for_broker(bs, timeout=2, config={"security.protocol": "ssl"})
