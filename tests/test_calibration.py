"""Calibration on the user's data: data files, the calibration file, Pipeline.calibrate, run-time discovery."""
from __future__ import annotations

import builtins

import numpy as np
import pytest
import torch
from torch import nn

import streamtta
from streamtta.calibration import (
    NO_CALIBRATION,
    CalibrationError,
    describe,
    is_calibration_file,
    load_any,
    load_calibration,
    model_fingerprint,
    read_data,
    save_calibration,
)
from streamtta.calibration.data import as_data
from streamtta.config import load_config
from streamtta.runner import build_pipeline


def _blobs(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    centers = np.array([[3, 0, 0, 0], [0, 3, 0, 0], [0, 0, 3, 0]], np.float32)
    return (centers[y] + rng.normal(0, 0.5, (n, 4))).astype(np.float32), y


def _net(seed: int = 0) -> nn.Module:
    """A BatchNorm MLP trained (100 full-batch steps) to tell the three blobs apart."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    x, y = (torch.from_numpy(a) for a in _blobs(300, seed=100 + seed))
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


# -- data files ---------------------------------------------------------------------------------
def test_npz_with_and_without_labels(tmp_path):
    x, y = _blobs(50)
    np.savez(tmp_path / "a.npz", x=x, y=y)
    d = read_data(tmp_path / "a.npz")
    assert d.x.shape == (50, 4) and d.x.dtype == np.float32 and d.y.tolist() == y.tolist() and d.labelled
    np.savez(tmp_path / "b.npz", x=x, target=y)
    assert read_data(tmp_path / "b.npz").y is None  # no 'y' key: unlabelled
    assert read_data(tmp_path / "b.npz", labels="target").y.tolist() == y.tolist()
    with pytest.raises(CalibrationError, match=r"no labels key 'y'"):
        read_data(tmp_path / "b.npz", labels="y")
    np.savez(tmp_path / "c.npz", features=x)
    with pytest.raises(CalibrationError, match=r"needs the key 'x'.*\['features'\]"):
        read_data(tmp_path / "c.npz")


def test_npz_with_object_arrays_is_refused(tmp_path):
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CalibrationError, match="plain data"):
        read_data(tmp_path / "obj.npz")


def test_npy_holds_x_only(tmp_path):
    np.save(tmp_path / "x.npy", _blobs(30)[0])
    d = read_data(tmp_path / "x.npy")
    assert d.x.shape == (30, 4) and d.y is None and "unsupervised" in d.describe()
    with pytest.raises(CalibrationError, match="holds x only"):
        read_data(tmp_path / "x.npy", labels="y")


def test_csv_with_header_and_label_column(tmp_path):
    p = tmp_path / "rows.csv"
    p.write_text("temp,label,rpm\n21.5,0,900\n22,1,950\n\n23.5,2,1000\n")
    d = read_data(p, labels="label")
    assert d.feature_names == ("temp", "rpm") and d.y.tolist() == [0, 1, 2]
    assert d.x.tolist() == [[21.5, 900.0], [22.0, 950.0], [23.5, 1000.0]]
    assert read_data(p).x.shape == (3, 3)  # without --labels every column is a feature
    with pytest.raises(CalibrationError, match=r"no label column 'class'.*temp"):
        read_data(p, labels="class")


def test_csv_without_header_takes_a_label_index(tmp_path):
    p = tmp_path / "rows.csv"
    p.write_text("1,2,0\n3,4,1\n")
    d = read_data(p, labels="2")
    assert d.feature_names is None and d.x.tolist() == [[1, 2], [3, 4]] and d.y.tolist() == [0, 1]


@pytest.mark.parametrize(("text", "labels", "match"), [
    ("a,b\n1,x\n", None, r"row 2, column 'b': 'x' is not a finite number"),
    ("a,b\n1,nan\n", None, "not a finite number"),
    ("a,b\n1,2\n3\n", None, "row 3 has 1 columns, expected 2"),
    ("a,y\n1,0.5\n", "y", "integer class indices"),
    ("", None, "empty CSV"),
])
def test_bad_csv_says_where(tmp_path, text, labels, match):
    p = tmp_path / "bad.csv"
    p.write_text(text)
    with pytest.raises(CalibrationError, match=match):
        read_data(p, labels=labels)


def test_parquet_without_a_reader_says_what_to_install(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_parquet(name, *args, **kwargs):
        if name.split(".")[0] in ("pyarrow", "pandas"):
            raise ImportError(f"no module named {name}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_parquet)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(CalibrationError, match="needs pyarrow.*or pandas.*npz"):
        read_data(tmp_path / "d.parquet")


def test_other_inputs_are_refused_with_a_reason(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_data(tmp_path / "missing.npz")
    (tmp_path / "d.json").write_text("{}")
    with pytest.raises(CalibrationError, match="unknown data format '.json'"):
        read_data(tmp_path / "d.json")
    with pytest.raises(CalibrationError, match="non-finite"):
        as_data(np.array([[1.0, np.inf]]))
    with pytest.raises(CalibrationError, match="3 samples but 2 labels"):
        as_data(np.zeros((3, 2)), [0, 1])


# -- calibration files --------------------------------------------------------------------------
def test_calibration_file_round_trip_is_plain_data(tmp_path):
    net, (x, y) = _net(), _blobs(40)
    path = save_calibration(tmp_path / "m.calib.npz", as_data(x, y, feature_names=list("abcd"), source="src.csv"),
                            net, model_spec="m")
    with np.load(path, allow_pickle=False) as z:  # nothing needs pickle: no array is an object array
        assert all(z[k].dtype != object for k in z.files)
        assert {"format", "version", "x", "y", "feature_names", "model_fingerprint"} <= set(z.files)
    assert is_calibration_file(path) and not is_calibration_file(tmp_path / "nothing.npz")
    d = load_calibration(path, net)
    assert np.array_equal(d.x, x) and d.y.tolist() == y.tolist() and d.feature_names == tuple("abcd")
    assert "src.csv" in d.source


def test_calibration_file_for_other_weights_is_refused(tmp_path):
    net = _net(0)
    path = save_calibration(tmp_path / "m.calib.npz", as_data(_blobs(30)[0]), net, model_spec="sensor:factory")
    with pytest.raises(CalibrationError, match=r"made for other model weights.*'sensor:factory'.*calibrate again"):
        load_calibration(path, _net(1))
    # the same weights as TorchScript: same fingerprint, accepted
    assert model_fingerprint(torch.jit.script(net)) == model_fingerprint(net)
    assert load_any(path, torch.jit.script(net)).x.shape == (30, 4)
    with pytest.raises(CalibrationError, match="labels are fixed"):
        load_any(path, net, labels="y")


def test_a_data_npz_is_not_a_calibration_file(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 2)))
    assert not is_calibration_file(tmp_path / "d.npz")
    with pytest.raises(CalibrationError, match="not a streamtta calibration file"):
        load_calibration(tmp_path / "d.npz")


# -- the pipeline -------------------------------------------------------------------------------
def test_pipeline_calibrates_from_arrays_files_and_the_constructor(tmp_path):
    net, (x, y) = _net(), _blobs(300)
    np.savez(tmp_path / "src.npz", x=x, y=y)
    cfg = {"engine": {"batch_size": 32}}
    a = streamtta.Pipeline(net, adapter="bn", scorer="energy", config=cfg)
    assert not a.calibrated and describe(a) == NO_CALIBRATION
    a.calibrate(x, y)
    assert a.calibrated and a.calibration.labelled and describe(a).startswith("arrays: 300 samples")
    b = streamtta.Pipeline(net, adapter="bn", scorer="energy", config=cfg, calibration=tmp_path / "src.npz")
    assert b.calibration.source == "src.npz"
    c = streamtta.Pipeline(net, adapter="bn", scorer="energy", config=cfg, calibration=x)
    assert c.calibrated and not c.calibration.labelled and "unsupervised" in describe(c)
    # fitting on the same data again is deterministic: identical scores and flags
    probe = np.concatenate([_blobs(32, seed=5)[0][:24], np.full((8, 4), 9.0, np.float32)])
    ra, rb = a.process(probe), b.process(probe)
    assert np.array_equal(ra.ood_scores, rb.ood_scores) and np.array_equal(ra.ood_flags, rb.ood_flags)
    assert ra.ood_scores[24:].min() > ra.ood_scores[:24].max()  # far-away samples score as OOD
    assert ra.ood_flags[24:].mean() > ra.ood_flags[:24].mean()


def test_labels_that_are_not_classes_of_the_model_are_refused():
    x, y = _blobs(60)
    with pytest.raises(CalibrationError, match=r"labels \[7\] are not classes of the model"):
        streamtta.Pipeline(_net()).calibrate(x, np.where(y == 2, 7, y))


def test_build_pipeline_finds_the_calibration_file_next_to_the_weights(tmp_path):
    net = _net()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    cfg = load_config(overrides={"model": {"source": "streamtta.models.arch:build_model", "state_dict": str(tmp_path / "w.pt")},
                                 "adapter": {"spec": "bn"}, "scorer": {"name": "energy"}}, env=False)
    uncalibrated = build_pipeline(cfg, model=net)
    assert not uncalibrated.calibrated and describe(uncalibrated) == NO_CALIBRATION
    save_calibration(tmp_path / "w.calib.npz", as_data(*_blobs(100)), net)
    found = build_pipeline(cfg, model=net)
    assert found.calibrated and found.calibration.source.startswith("w.calib.npz")
    with pytest.raises(CalibrationError, match="other model weights"):
        build_pipeline(cfg, model=_net(3))
    inline = build_pipeline(cfg, model=_net(3), calibration=_blobs(100)[0])  # explicit data win over the file
    assert inline.calibrated and not inline.calibration.labelled


def test_config_fields_name_the_calibration_and_the_json_feature_order(tmp_path):
    """``model.calibration`` calibrates like ``--calibrate-from``; ``engine.feature_names`` orders object rows."""
    import json

    import numpy as np
    import torch

    from streamtta.config import load_config
    from streamtta.engine import Engine, Outputs
    from streamtta.runner import build_pipeline
    from streamtta.stream.memory import MemoryDeadLetter, MemorySink, MemorySource

    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (300, 3)).astype(np.float32)
    np.savez(tmp_path / "src.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    cfg = load_config(overrides={"model": {"calibration": str(tmp_path / "src.npz")},
                                 "engine": {"feature_names": ["c", "a", "b"], "batch_size": 4},
                                 "kafka": {"stop_at_end": True, "poll_timeout_s": 0.001}}, env=False)
    pipe = build_pipeline(cfg, net.eval())
    assert pipe.calibrated
    rows = [json.dumps({"stream_id": "s", "features": {"a": 1.0, "b": 2.0, "c": 3.0}}).encode()] * 4
    out = Outputs(predictions=MemorySink(), alerts=[], dlq=MemoryDeadLetter())
    eng = Engine(cfg, MemorySource(rows), out, pipe)
    assert eng.limits.feature_names == ("c", "a", "b")
    eng.run()
    assert len(out.predictions.values) == 4 and not out.dlq.records


def test_a_label_column_left_among_the_features_is_a_clear_error(tmp_path):
    x, y = _blobs(60)
    path = tmp_path / "clean.csv"
    rows = ["f0,f1,f2,f3,state"] + [",".join(map(str, [*xi.tolist(), int(yi)])) for xi, yi in zip(x, y)]
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(CalibrationError, match=r"cannot take input of shape \(5,\).*--labels"):
        streamtta.Pipeline(_net(), num_classes=3).calibrate(path)
    streamtta.Pipeline(_net()).calibrate(path, labels="state")  # named: fine


def test_cli_user_errors_exit_2_without_a_traceback(tmp_path, monkeypatch, capsys):
    from streamtta import cli

    monkeypatch.chdir(tmp_path)
    x, y = _blobs(60)
    np.savez("clean.npz", x=x, y=y)
    torch.jit.trace(_net(), torch.from_numpy(x[:4])).save("m.trace.pt")
    # a spec that cannot run on a traced model (its BatchNorm is frozen in eval mode by the trace)
    assert cli.main(["calibrate", "--model", "m.trace.pt", "--data", "clean.npz", "--adapter", "unmix-tns"]) == 2
    err = capsys.readouterr().err
    assert "cannot run on this TorchScript model" in err and "Traceback" not in err
