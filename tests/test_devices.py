"""``engine.device`` (:mod:`streamtta.devices`): resolving it, moving batches and results, FAISS on a GPU or
not, and ``python -m streamtta.gpucheck``. The CUDA code paths that can run without a GPU run here with
torch / faiss calls replaced; the last tests need a real GPU and are skipped without one."""
from __future__ import annotations

import copy
import json
import logging
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from streamtta import Pipeline, devices
from streamtta.config import ConfigError, load_config
from streamtta.detectors.ood import index as index_mod
from streamtta.detectors.ood.contrast import ContrastScorer
from streamtta.detectors.ood.index import FlatIPIndex
from streamtta.devices import move_tensors, output_to_cpu, resolve_device, to_cpu, to_device
from streamtta.types import StepOutput

CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
no_gpu = pytest.mark.skipif(CUDA, reason="checks the error raised where CUDA is missing")


def _net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4)).eval()


def _data(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, 3, 8, 8), dtype=np.float32) + shift).astype(np.float32)


# -- resolving engine.device ------------------------------------------------------------------------
def test_resolve_cpu_and_auto() -> None:
    assert resolve_device(None) == resolve_device("cpu") == resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")


def test_auto_and_cuda_index_with_cuda_simulated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"sees 2 CUDA device\(s\)"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "tpu", "cuda:-1"])
def test_unknown_device_names_are_config_errors(name: str) -> None:
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device(name)
    with pytest.raises(ConfigError, match="engine.device"):
        load_config(overrides={"engine": {"device": name}}, env=False)


def test_config_field() -> None:
    assert load_config(env=False).engine.device == "cpu"
    assert load_config(overrides={"engine": {"device": "cuda:1"}}, env=False).engine.device == "cuda:1"


@no_gpu
def test_cuda_without_cuda_is_a_clear_config_error() -> None:
    with pytest.raises(ConfigError, match="CUDA is not available.*engine.device = 'cpu' or 'auto'"):
        resolve_device("cuda")
    cfg = load_config(overrides={"engine": {"device": "cuda"}}, env=False)  # loads: checked when built
    with pytest.raises(ConfigError, match="engine.device = 'cuda' but CUDA is not available"):
        Pipeline(_net(), adapter="bn", config=cfg)
    desc = devices.describe_device("cuda:0")
    assert desc["type"] == "unavailable" and "CUDA is not available" in desc["error"]


# -- moving tensors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("x", [torch.rand(4, 3, 2, 2), torch.arange(6).reshape(2, 3), torch.rand(5, 4).T,
                               torch.rand(3, dtype=torch.float64)])
def test_to_device_on_cpu_is_a_no_op(x: torch.Tensor) -> None:
    y = to_device(x, torch.device("cpu"))
    assert y is x and y.dtype == x.dtype and y.shape == x.shape and not y.is_pinned()


def test_to_device_cuda_pins_and_copies_without_blocking(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    pinned: set[int] = set()

    def pin_memory(self: torch.Tensor) -> torch.Tensor:
        calls.append("pin")
        out = self.clone()
        pinned.add(id(out))
        return out

    def to(self: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        calls.append(("to", args, kw, id(self) in pinned))
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: id(self) in pinned)
    monkeypatch.setattr(torch.Tensor, "to", to)
    dev = torch.device("cuda", 0)
    to_device(torch.rand(2, 3), dev)
    assert calls == ["pin", ("to", (dev,), {"non_blocking": True}, True)]


def test_to_cpu_and_move_tensors_keep_cpu_objects() -> None:
    x = torch.rand(2)
    state = {"a": [x, 1, "s"], "b": (x, None), "c": {"d": x}}
    assert to_cpu(state) is state
    assert move_tensors(state, torch.device("cpu")) is state
    out = StepOutput(logits=torch.rand(3, 4), features=torch.rand(3, 8), update_mask=torch.zeros(3, dtype=torch.bool))
    assert output_to_cpu(out) is out


def test_output_to_cpu_reuses_the_gates_copies() -> None:
    # tensors off the CPU ("meta": no data, so only a reused copy can come back) that the gate scored
    logits, feats = torch.empty(3, 4, device="meta"), torch.empty(3, 8, device="meta")
    out = StepOutput(logits=logits.detach(), features=feats.detach(), update_mask=torch.zeros(3, dtype=torch.bool),
                     info={"t": torch.ones(1), "n": 2})
    lc, fc = torch.rand(3, 4), torch.rand(3, 8)
    back = output_to_cpu(out, (logits, feats, lc, fc))
    assert back is not out and back.logits is lc and back.features is fc and back.info == {"t": out.info["t"], "n": 2}
    with pytest.raises(NotImplementedError):  # nothing to reuse: copied (a meta tensor cannot be)
        output_to_cpu(out, (torch.empty(3, 4, device="meta"), torch.empty(2, 8, device="meta"), lc, fc))


def test_same_memory_check() -> None:
    x = torch.rand(4, 3)
    assert devices._same(x.detach(), x.detach()) and not devices._same(x, x.clone())
    assert not devices._same(x, x[:2]) and not devices._same(x, x.T)


# -- the pipeline on the CPU ---------------------------------------------------------------------------
def _run(spec: str, device: str | None) -> tuple[list[Any], dict[str, Any]]:
    overrides: dict[str, Any] = {"engine": {"batch_size": 16}}
    if device is not None:
        overrides["engine"]["device"] = device
    pipe = Pipeline(_net(), adapter=spec, config=overrides)
    pipe.fit_source(_data(120, 0), np.arange(120) % 4)
    res = [pipe.process(_data(16, 10 + i, shift=0.3 * i)) for i in range(4)]
    return res, pipe.state_dict()


def _flat(st: Any) -> list[Any]:
    if isinstance(st, dict):
        return [v for k in sorted(st, key=str) for v in [k, *_flat(st[k])]]
    if isinstance(st, (list, tuple)):
        return [v for item in st for v in _flat(item)]
    return [st]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b, equal_nan=True)
    if isinstance(a, float) and np.isnan(a):
        return isinstance(b, float) and np.isnan(b)
    return a == b


@pytest.mark.parametrize("spec", ["default", "bn+tent"])
def test_explicit_cpu_is_bitwise_the_default(spec: str) -> None:
    (ra, sa), (rb, sb) = _run(spec, None), _run(spec, "cpu")
    for a, b in zip(ra, rb):
        assert torch.equal(a.logits, b.logits) and torch.equal(a.features, b.features)
        assert np.array_equal(a.ood_scores, b.ood_scores) and np.array_equal(a.ood_flags, b.ood_flags)
        assert a.logits.device.type == "cpu" and isinstance(a.ood_scores, np.ndarray)
    fa, fb = _flat(sa), _flat(sb)
    assert len(fa) == len(fb) and all(_same(x, y) for x, y in zip(fa, fb))


def test_state_dict_round_trip_through_move_tensors() -> None:
    res, st = _run("bn", "cpu")
    pipe = Pipeline(_net(), adapter="bn", config={"engine": {"batch_size": 16}})
    pipe.fit_source(_data(120, 0), np.arange(120) % 4)
    pipe.load_state_dict(st)
    assert all(_same(x, y) for x, y in zip(_flat(pipe.state_dict()), _flat(st)))


def test_scorer_options_get_the_device_only_where_they_take_one() -> None:
    from streamtta.blueprint import _scorer_options

    gpu = torch.device("cuda", 0)
    assert _scorer_options("contrast", {"k": 5}, gpu) == {"k": 5, "device": gpu}
    assert _scorer_options("contrast", {"device": "cpu"}, gpu) == {"device": "cpu"}
    assert _scorer_options("fusion", {}, gpu) == {} and _scorer_options("energy", {}, gpu) == {}
    assert _scorer_options("contrast", {}, torch.device("cpu")) == {}


def test_manifest_names_the_device(tmp_path: Any) -> None:
    from streamtta.runner import write_manifest

    write_manifest(tmp_path, load_config(env=False), seed=0, stream=None, command=["x"])
    dev = json.loads((tmp_path / "manifest.json").read_text())["device"]
    assert dev["requested"] == "cpu" and dev["resolved"] == "cpu" and "faiss_gpus" in dev


# -- FAISS on a GPU, or why not ------------------------------------------------------------------------
@pytest.fixture
def fresh_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_mod, "_LOGGED", set())


def test_faiss_without_gpu_support_logs_once_and_stays_on_cpu(monkeypatch: pytest.MonkeyPatch, fresh_log: None,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delattr(index_mod.faiss, "StandardGpuResources", raising=False)
    caplog.set_level(logging.INFO, logger="streamtta.detectors")
    a, b = FlatIPIndex(4, device="cuda:0"), FlatIPIndex(4, device="cuda")
    assert a.backend == b.backend == "faiss" and a.gpu is None and b.gpu is None
    lines = [r.getMessage() for r in caplog.records if "stay on the CPU" in r.getMessage()]
    assert len(lines) == 1 and "no GPU support" in lines[0]
    a.upsert([5, 6], np.eye(4, dtype=np.float32)[:2])
    assert a.search(np.eye(4, dtype=np.float32)[1:2], k=1)[1].tolist() == [[6]]
    assert FlatIPIndex(4).gpu is None  # a CPU index: nothing to say
    assert len([r for r in caplog.records if "stay on the CPU" in r.getMessage()]) == 1


@pytest.fixture
def fake_faiss_gpu(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """faiss with "GPU support": the GPU copy is a CPU clone; returns the list of clone calls."""
    faiss = index_mod.faiss
    made: list[int] = []

    def to_gpu(res: Any, gpu: int, index: Any) -> Any:
        made.append(gpu)
        assert isinstance(res, FakeResources) and index.ntotal >= 0
        return faiss.clone_index(index)

    class FakeResources:
        pass

    monkeypatch.setattr(faiss, "StandardGpuResources", FakeResources, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    monkeypatch.setattr(index_mod, "_GPU_RESOURCES", {})
    return made


def test_faiss_gpu_copy_matches_the_cpu_index(fake_faiss_gpu: list[int]) -> None:
    rng = np.random.default_rng(0)
    gpu, cpu = FlatIPIndex(8, device="cuda:1"), FlatIPIndex(8)
    assert gpu.gpu == 1 and cpu.gpu is None
    for step in range(6):
        ids = rng.choice(40, size=10, replace=False)
        vecs = rng.standard_normal((10, 8)).astype(np.float32)
        for idx in (gpu, cpu):
            idx.upsert(ids, vecs)
            idx.remove(ids[:3] + step)
        q = rng.standard_normal((5, 8)).astype(np.float32)
        for k in (1, 4, 50):
            sg, ig = gpu.search(q, k)
            sc, ic = cpu.search(q, k)
            assert np.array_equal(ig, ic) and np.array_equal(sg, sc)
        assert gpu.search(q, 2)[1].tolist() == cpu.search(q, 2)[1].tolist()
    assert fake_faiss_gpu == [1] * 6  # one copy per change, none for searches of an unchanged index
    dup = copy.deepcopy(gpu)
    assert dup._gpu_index is None and gpu._gpu_index is not None
    assert np.array_equal(dup.search(q, 3)[1], cpu.search(q, 3)[1])
    assert FlatIPIndex(8, device="cuda:3").gpu is None  # faiss sees 2 GPUs


def test_contrast_scorer_on_a_gpu_index_scores_as_on_cpu(fake_faiss_gpu: list[int]) -> None:
    rng = np.random.default_rng(1)
    feats, logits = rng.standard_normal((200, 16)).astype(np.float32), rng.standard_normal((200, 4))
    on_gpu = ContrastScorer(device=torch.device("cuda", 0)).fit(feats, logits)
    on_cpu = ContrastScorer().fit(feats, logits)
    assert on_gpu.source.gpu == 0 and on_cpu.source.gpu is None
    for i in range(3):
        f = torch.from_numpy(rng.standard_normal((32, 16)).astype(np.float32) + i)
        lg = torch.from_numpy(rng.standard_normal((32, 4)).astype(np.float32))
        sg, sc = on_gpu.score(f, lg), on_cpu.score(f, lg)
        assert np.array_equal(sg, sc)
        on_gpu.partial_fit(f, lg)
        on_cpu.partial_fit(f, lg)
    stream = on_gpu.for_stream()  # per-stream copies deep-copy the online memories
    assert all(_same(a, b) for a, b in zip(_flat(stream.state_dict()), _flat(on_gpu.for_stream().state_dict())))
    assert fake_faiss_gpu  # the GPU copies were searched


# -- python -m streamtta.gpucheck ----------------------------------------------------------------------
def test_gpucheck_allow_cpu_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    from streamtta.gpucheck import main

    threads = torch.get_num_threads()
    try:
        assert main(["--allow-cpu", "--device", "cuda", "--batch-sizes", "4", "--samples", "8",
                     "--calibration", "48", "--adapters", "bn", "--depth", "10", "--widen", "1",
                     "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    doc = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in doc["rows"]] == ["forward", "step", "pipeline"]
    assert all(r["samples_per_s"] > 0 and r["batch_size"] == 4 and r["samples"] == 8 for r in doc["rows"])
    assert doc["model"]["name"] == "wrn-10-1" and doc["requested_device"] == "cuda"
    assert doc["device"]["type"] == ("cuda" if CUDA else "cpu") and doc["versions"]["faiss"]


@no_gpu
def test_gpucheck_without_cuda_says_so_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    from streamtta.gpucheck import main

    assert main(["--batch-sizes", "4"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["cuda_available"] is False and "CUDA is not available" in doc["skipped"]


# -- a real GPU ---------------------------------------------------------------------------------------------
@needs_gpu
@pytest.mark.parametrize("spec", ["default", "bn+tent"])
def test_pipeline_on_cuda_matches_cpu_and_returns_cpu_data(spec: str) -> None:
    (rc, sc), (rg, sg) = _run(spec, "cpu"), _run(spec, "cuda")
    for a, b in zip(rc, rg):
        assert b.logits.device.type == "cpu" and b.features.device.type == "cpu" and np.isfinite(b.ood_scores).all()
    # the first batch's outputs come before any update: equal up to float error (later ones may part ways
    # where a sample sits on a gate or memory-admission boundary)
    assert torch.allclose(rc[0].logits, rg[0].logits, atol=1e-4)
    assert np.allclose(rc[0].ood_scores, rg[0].ood_scores, atol=1e-4)
    assert all(t.device.type == "cpu" for t in _flat(sg) if isinstance(t, torch.Tensor))
    pipe = Pipeline(_net(), adapter=spec, config={"engine": {"batch_size": 16, "device": "cuda"}})
    pipe.fit_source(_data(120, 0), np.arange(120) % 4)
    assert next(pipe.blueprint.model.parameters()).device.type == "cuda"
    pipe.load_state_dict(sc)  # a CPU checkpoint into a CUDA pipeline
    assert pipe.process(_data(16, 99)).logits.device.type == "cpu"
    n_faiss, _ = devices.faiss_gpu_status()
    assert (pipe.parts.scorer.source.gpu is not None) == (n_faiss > 0)
    x_gpu = torch.from_numpy(_data(16, 98)).cuda()  # a CUDA input: results still hold CPU data
    assert pipe.process(x_gpu).x.device.type == "cpu"


@needs_gpu
def test_faiss_index_on_a_real_gpu() -> None:
    if devices.faiss_gpu_status()[0] < 1:
        pytest.skip(f"faiss without GPU support: {devices.faiss_gpu_status()[1]}")
    rng = np.random.default_rng(2)
    gpu, cpu = FlatIPIndex(16, device="cuda"), FlatIPIndex(16)
    assert gpu.gpu is not None
    for idx in (gpu, cpu):
        idx.upsert(np.arange(100), rng.standard_normal((100, 16)).astype(np.float32))
        idx.remove([3, 50])
    q = rng.standard_normal((7, 16)).astype(np.float32)
    (sg, ig), (sc, ic) = gpu.search(q, 5), cpu.search(q, 5)
    assert np.array_equal(ig, ic) and np.allclose(sg, sc, atol=1e-4)
    assert copy.deepcopy(gpu).search(q, 5)[1].tolist() == ic.tolist()
