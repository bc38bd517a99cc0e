"""Bring your own model: a module:factory found in the current directory, `streamtta calibrate`, and
`streamtta run --calibrate-from` on a shifted sensor stream with an unknown class (embedded broker)."""
from __future__ import annotations

import json
import sys
import uuid

import numpy as np
import pytest
import torch

from streamtta import cli
from streamtta.calibration import load_calibration
from streamtta.models.registry import ModelSpecError, load_model

FACTORY = """from torch import nn


def factory():
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))
"""


def readings(rng: np.random.Generator, n: int, states: list[int], drift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    centers = np.random.default_rng(0).normal(0, 2, (4, 8))  # 4 machine states; the model knows 0-2
    y = rng.choice(states, n)
    return (centers[y] + rng.normal(0, 1, (n, 8)) + drift).astype(np.float32), y


def train_factory(source: str, name: str, folder) -> tuple[torch.nn.Module, np.random.Generator]:
    """Write ``source`` as ``<folder>/<name>.py``, train its factory's model on clean readings of states 0-2
    and save ``weights.pt`` and ``source.npz`` (the first 1,000 readings) next to it: ``(model, rng)``."""
    (folder / f"{name}.py").write_text(source)
    ns: dict = {}
    exec(compile(source, name, "exec"), ns)
    rng = np.random.default_rng(1)
    x, y = readings(rng, 3000, [0, 1, 2])
    torch.manual_seed(0)
    net = ns["factory"]()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(300):
        i = rng.integers(0, len(x), 128)
        loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x[i])), torch.from_numpy(y[i]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    torch.save(net.state_dict(), folder / "weights.pt")
    np.savez(folder / "source.npz", x=x[:1000], y=y[:1000])
    return net, rng


@pytest.fixture(scope="module")
def sensor(tmp_path_factory: pytest.TempPathFactory):
    """A folder with ``<module>.py`` (the factory), its trained weights and clean source data."""
    folder = tmp_path_factory.mktemp("byom")
    name = f"sensor_{uuid.uuid4().hex[:8]}"
    net, rng = train_factory(FACTORY, name, folder)
    yield {"dir": folder, "module": name, "net": net, "rng": rng}
    sys.modules.pop(name, None)


@pytest.fixture
def in_folder(sensor, monkeypatch):
    """Work in the sensor folder, with neither it nor '' on sys.path (as the installed console script)."""
    monkeypatch.chdir(sensor["dir"])
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(sensor["dir"]))])
    sys.modules.pop(sensor["module"], None)
    return sensor


def test_factory_resolves_from_the_current_directory(in_folder):
    model, meta = load_model(f"{in_folder['module']}:factory", state_dict="weights.pt")
    assert meta is None and model[0].in_features == 8
    assert torch.equal(model[0].weight, in_folder["net"][0].weight)
    assert sys.path[-1] == str(in_folder["dir"])  # appended: installed packages still come first


def test_a_module_found_nowhere_says_where_it_looked(in_folder):
    with pytest.raises(ModelSpecError, match=r"cannot import module 'no_such_sensor_mod'.*current directory"):
        load_model("no_such_sensor_mod:factory")


def test_commands_list_only_their_flags_and_the_version(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    from streamtta.version import __version__

    assert capsys.readouterr().out.strip() == f"streamtta {__version__}"
    helps = {}
    for cmd in ("produce", "run", "calibrate", "simulate", "bench"):
        with pytest.raises(SystemExit):
            cli.main([cmd, "--help"])
        helps[cmd] = capsys.readouterr().out
    assert "--topic" in helps["produce"] and "--rate" in helps["produce"]
    for engine_only in ("--adapter", "--scorer", "--model", "--batch-size", "--checkpoint-dir", "--group-id"):
        assert engine_only not in helps["produce"], engine_only
    assert "--calibrate-from" in helps["run"] and "--adapter" in helps["run"] and "--state-dict" in helps["run"]
    assert "--data" in helps["calibrate"] and "--bootstrap-servers" not in helps["calibrate"]
    assert "--bootstrap-servers" not in helps["simulate"] and "--adapter" not in helps["bench"]


def test_calibrate_command_writes_the_file_next_to_the_weights(in_folder, capsys):
    spec = f"{in_folder['module']}:factory"
    assert cli.main(["calibrate", "--model", spec, "--state-dict", "weights.pt", "--data", "source.npz",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "labelled" in out and "accuracy on these data" in out and "weights.calib.npz" in out
    model, _ = load_model(spec, state_dict="weights.pt")
    d = load_calibration("weights.calib.npz", model)
    assert d.x.shape == (1000, 8) and d.labelled

    x = np.load("source.npz")["x"]
    header = ",".join(f"s{i}" for i in range(8))
    np.savetxt("clean.csv", x[:200], delimiter=",", header=header, comments="")
    assert cli.main(["calibrate", "--model", spec, "--state-dict", "weights.pt", "--data", "clean.csv",
                     "--out", "unlabelled.calib.npz"]) == 0
    out = capsys.readouterr().out
    assert "unsupervised" in out and "s0, s1" in out and "--calibrate-from unlabelled.calib.npz" in out
    assert load_calibration("unlabelled.calib.npz", model).feature_names == tuple(header.split(","))

    torch.manual_seed(5)  # other weights: the calibration file is refused, exit code 2, no traceback
    torch.save(torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                                   torch.nn.Linear(32, 3)).state_dict(), "other.pt")
    assert cli.main(["calibrate", "--model", spec, "--state-dict", "other.pt", "--data", "weights.calib.npz"]) == 2
    assert "made for other model weights" in capsys.readouterr().err


def _produce_stream(bootstrap: str, topic: str, x: np.ndarray, y: np.ndarray, bad_at: int) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap})
    for i, (xi, yi) in enumerate(zip(x, y)):
        if i == bad_at:  # 7 features: the wrong dimension
            producer.produce(topic, key="m-1", value=json.dumps({"stream_id": "m-1", "features": [1.0] * 7}))
        row = {"stream_id": "m-1", "features": xi.tolist(), "is_unknown": bool(yi == 3)}
        if yi < 3:
            row["label"] = int(yi)
        producer.produce(topic, key="m-1", value=json.dumps(row))
    producer.flush()


def _dead_letter_offsets(bootstrap: str, topic: str) -> list[int]:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex, "enable.auto.commit": False})
    try:
        c.assign([TopicPartition(f"{topic}.dlq", 0, 0)])
        msgs = c.consume(10, timeout=5)
        return [int(dict(m.headers())["dlq.origin.offset"]) for m in msgs if not m.error()]
    finally:
        c.close()


def test_run_calibrated_from_the_users_data(in_folder, embedded_broker, unique_name, capsys):
    bs = embedded_broker.bootstrap_servers
    x, y = readings(in_folder["rng"], 1000, [0, 1, 2, 3], drift=3.0)  # every sensor reads 3 high; state 3 is new
    _produce_stream(bs, unique_name, x, y, bad_at=500)
    known = y < 3
    with torch.no_grad():
        source_acc = 100 * float((in_folder["net"](torch.from_numpy(x)).argmax(1).numpy() == y)[known].mean())
    runs = in_folder["dir"] / f"runs-{unique_name}"
    args = ["run", "--model", f"{in_folder['module']}:factory", "--state-dict", "weights.pt", "--bootstrap-servers",
            bs, "--topic", unique_name, "--no-progress", "--output-dir", str(runs), "--set", "kafka.stop_at_end=true"]
    assert cli.main([*args, "--calibrate-from", "source.npz"]) == 0
    metrics = json.loads((next(runs.iterdir()) / "metrics.json").read_text())
    s, stats = metrics["summary"], metrics["stats"]
    assert stats["samples"] == 1000 and stats["dead_letters"] == 1
    assert _dead_letter_offsets(bs, unique_name) == [500]
    assert s["acc"] >= source_acc  # adapted on the drifted stream: at least the source model
    assert s["auroc"] >= 85.0 and s["ood_rate"] > 0  # the unknown state is told apart and flagged
    assert stats["calibration"].startswith("source.npz: 1000 samples") and "labelled" in stats["calibration"]
    capsys.readouterr()

    # the same topic, another group, weights with no calibration file next to them: the summary says that
    # there are no OOD flags and why
    raw_weights = f"raw-{unique_name}.pt"
    (in_folder["dir"] / raw_weights).write_bytes((in_folder["dir"] / "weights.pt").read_bytes())
    args[args.index("weights.pt")] = raw_weights
    assert cli.main([*args, "--group-id", f"{unique_name}-raw", "--max-records", "200"]) == 0
    out = capsys.readouterr().out
    assert "no OOD flags without calibration data" in " ".join(out.split())
    raw = json.loads((sorted(runs.iterdir())[-1] / "metrics.json").read_text())
    assert raw["summary"]["ood_rate"] == 0 and raw["stats"]["calibration"].startswith("none")


@pytest.mark.parametrize("form", ["factory", "torchscript"])
def test_layernorm_model_adapts_on_the_users_stream(form, tmp_path, monkeypatch, embedded_broker, unique_name):
    """The same flow with a LayerNorm MLP, as a factory and as a scripted nn.Sequential file run with
    nothing but ``--calibrate-from`` and the broker/topic flags: the default aligns its LayerNorm outputs to
    the statistics of the calibration data (no BatchNorm to re-estimate), so the +3 drift no longer costs
    accuracy, and the unknown state is told apart."""
    name = f"sensor_ln_{uuid.uuid4().hex[:8]}"
    net, rng = train_factory(FACTORY.replace("nn.BatchNorm1d(32)", "nn.LayerNorm(32)"), name, tmp_path)
    torch.jit.script(net).save(str(tmp_path / "model.ts.pt"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    bs = embedded_broker.bootstrap_servers
    xt, yt = readings(rng, 1000, [0, 1, 2, 3], drift=3.0)
    _produce_stream(bs, unique_name, xt, yt, bad_at=500)
    known = yt < 3
    with torch.no_grad():
        source_acc = 100 * float((net(torch.from_numpy(xt)).argmax(1).numpy() == yt)[known].mean())
    runs = tmp_path / "runs"
    model = ["--model", f"{name}:factory", "--state-dict", "weights.pt"] if form == "factory" else [
        "--model", "model.ts.pt"]
    try:
        assert cli.main(["run", *model, "--bootstrap-servers", bs, "--topic", unique_name, "--calibrate-from",
                         "source.npz", "--no-progress", "--output-dir", str(runs), "--set",
                         "kafka.stop_at_end=true"]) == 0
    finally:
        sys.modules.pop(name, None)
    run_dir = next(runs.iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    s = metrics["summary"]
    assert json.loads((run_dir / "manifest.json").read_text())["adapter_spec"] == "align"  # "default", resolved
    assert s["acc"] >= source_acc + 10  # the LayerNorm outputs are aligned: most of the drift's cost is gone
    assert s["auroc"] >= 85.0 and s["ood_rate"] > 0
    assert metrics["stats"]["dead_letters"] == 1 and _dead_letter_offsets(bs, unique_name) == [500]
