"""TorchScript models (scripted and traced, saved and loaded) with every adapter spec term.

For a BatchNorm MLP and a LayerNorm MLP (8 features, 3 classes) as the eager module, ``torch.jit.script``
and ``torch.jit.trace`` (with and without an exported ``forward_features``), each saved and loaded: every spec either runs through ``Pipeline.process`` (finite outputs; gradient
specs move the norm affine parameters, ``bn`` normalises with the batch's statistics) and gives what the
same spec gives on the eager module where the route is the same, or is refused at build time with a
message naming the terms that cannot run. Plus: a checkpoint round trip, independent per-stream copies,
the default spec's fallback and the features of ``export_torchscript`` output.
"""
from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import streamtta
from streamtta.adapters.defaults import NO_BATCHNORM_SCRIPT_SPEC
from streamtta.adapters import SpecError, build_adapter, parse_spec
from streamtta.adapters.state import share_fixed, stream_copy
from streamtta.adapters.terms import MACROS, TERMS

NUM_CLASSES = 3
#: trace: ``forward`` traced, the exported ``forward_features`` scripted (as torch does); trace-plain: a
#: traced ``nn.Sequential`` of the same layers (no ``forward_features``)
FORMS = ("eager", "script", "trace", "trace-plain")
#: the norm terms each TorchScript form of the BatchNorm MLP refuses (the LayerNorm MLP refuses none)
REFUSED = {"script": {"align", "rbn", "unmix-tns", "cb-stats"}, "trace": {"align", "rbn", "unmix-tns", "cb-stats"},
           "trace-plain": {"align", "rbn", "unmix-tns", "cb-stats", "bn"}}


def _smallest_spec(name: str) -> str:
    if name in MACROS or TERMS[name].kind in ("norm", "objective"):
        return name
    return f"{'tent' if TERMS[name].needs_objective else 'bn'}+{name}"


SPECS = sorted({_smallest_spec(n) for n in TERMS} | set(MACROS) | {"source+tent", "bn+tent+conf-drop+ema-source"})


class SensorMLP(nn.Module):
    """The user's model: two hidden layers with a norm each; exports its features as ours do."""

    def __init__(self, norm: str) -> None:
        super().__init__()
        make = nn.BatchNorm1d if norm == "bn" else nn.LayerNorm
        self.body = nn.Sequential(nn.Linear(8, 16), make(16), nn.ReLU(), nn.Linear(16, 16), make(16), nn.ReLU())
        self.fc = nn.Linear(16, NUM_CLASSES)

    @torch.jit.export
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _source(n: int = 240, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % NUM_CLASSES
    centers = torch.tensor([[2.0] * 4 + [0.0] * 4, [0.0] * 4 + [2.0] * 4, [-2.0] * 8])
    return centers[y] + torch.randn(n, 8, generator=g), y


def _shifted(seed: int) -> torch.Tensor:
    return _source(32, seed)[0] * 1.5 + 2.0


def _train(norm: str) -> nn.Module:
    torch.manual_seed(0)
    net = SensorMLP(norm)
    x, y = _source()
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


def _reload(module: torch.jit.ScriptModule) -> nn.Module:
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    buf.seek(0)
    return torch.jit.load(buf)


@pytest.fixture(scope="module")
def models() -> dict[tuple[str, str], nn.Module]:
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for norm in ("bn", "ln"):
            net = _train(norm)
            out[norm, "eager"] = net
            out[norm, "script"] = _reload(torch.jit.script(net))
            out[norm, "trace"] = _reload(torch.jit.trace(net, _source(4)[0]))
            out[norm, "trace-plain"] = _reload(torch.jit.trace(nn.Sequential(*net.body, net.fc), _source(4)[0]))
    return out


def _refused_terms(norm: str, form: str) -> set[str]:
    """Norm terms refused on this model: the BatchNorm replacers (and bn when traced) on compiled BatchNorm;
    align (it replaces LayerNorm / GroupNorm) on any compiled model."""
    if form == "eager":
        return set()
    return REFUSED[form] if norm == "bn" else {"align"}


def _refused(norm: str, form: str, spec: str) -> bool:
    # "default" resolves per model (adapters.defaults.default_spec), so it always runs
    return spec != "default" and parse_spec(spec).norm.name in _refused_terms(norm, form)


def _build(spec: str, model: nn.Module):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no BatchNorm layer" for statistics norms on the LayerNorm MLP
        return build_adapter(spec, model, NUM_CLASSES, lr=1e-2)


def _norm_params(adapter) -> list[torch.Tensor]:
    return [p.detach().clone() for p in adapter.parameters_to_adapt()]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("norm", ["bn", "ln"])
def test_every_spec_runs_or_is_refused(models, norm: str, form: str) -> None:
    model = models[norm, form]
    x_src, y_src = _source()
    for spec in SPECS:
        if _refused(norm, form, spec):
            for up_front in ("build_adapter", "Pipeline"):
                with pytest.raises(SpecError) as err:
                    if up_front == "build_adapter":
                        build_adapter(spec, model, NUM_CLASSES)
                    else:
                        streamtta.Pipeline(model, adapter=str(parse_spec(spec)), scorer="energy")
                msg = str(err.value)
                assert f"term {parse_spec(spec).norm.name!r}" in msg and "cannot run on this TorchScript model" in msg
                assert all(t in msg for t in _refused_terms(norm, form)) and "terms that run" in msg
            continue
        pipe = streamtta.Pipeline(model, adapter=spec, scorer="energy")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe.fit_source(x_src.numpy(), y_src.numpy())
        before, moved = _norm_params(pipe.adapter), []
        for seed in (1, 2, 3):
            res = pipe.process(_shifted(seed))
            assert np.isfinite(res.ood_scores).all() and res.predictions.shape == (32,), (spec, norm, form)
            # a guard's reset (sar-reset) puts the parameters back: look after every batch
            moved.append(res.reset or any(not torch.equal(a, b) for a, b in zip(before, _norm_params(pipe.adapter))))
        assert np.isfinite(pipe.process(_shifted(4)[:1]).ood_scores).all()  # batch size 1
        if parse_spec(spec).objective is not None:
            assert any(moved), f"{spec} on {norm}/{form} did not adapt"


def _run(adapter, seeds=(1, 2, 3)) -> list[torch.Tensor]:
    return [adapter.step(_shifted(s)).logits for s in seeds]


@pytest.mark.parametrize("form", FORMS[1:])
@pytest.mark.parametrize("norm", ["bn", "ln"])
def test_same_outputs_as_the_eager_module(models, norm: str, form: str) -> None:
    """Where the route is the same (every spec that runs; source-fallback without a source reference
    uses its batch rule on both) the TorchScript adapter gives the eager adapter's outputs."""
    for spec in SPECS:
        if _refused(norm, form, spec) or spec == "default":  # "default" resolves per model: other specs here
            continue
        eager, compiled = _build(spec, models[norm, "eager"]), _build(spec, models[norm, form])
        for a, b in zip(_run(eager), _run(compiled)):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=f"{spec} on {norm}/{form}")
        assert len(eager.parameters_to_adapt()) == len(compiled.parameters_to_adapt()) > 0
        for a, b in zip(eager.parameters_to_adapt(), compiled.parameters_to_adapt()):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=f"{spec} on {norm}/{form}")


def test_bn_uses_batch_statistics_and_leaves_the_source_ones(models) -> None:
    model = models["bn", "script"]
    running = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    bn, source = _build("bn", model), _build("source", model)
    x = _shifted(5)
    assert not torch.allclose(bn.step(x).logits, source.step(x).logits, atol=1e-3)
    assert torch.allclose(bn.step(x[:1]).logits, source.step(x[:1]).logits)  # one sample: source statistics
    state = bn.model.state_dict()
    for k, v in running.items():
        assert torch.equal(state[f"net.{k}"], v) and torch.equal(model.state_dict()[k], v)


@pytest.mark.parametrize("form", FORMS[1:])
def test_checkpoint_round_trip(models, form: str) -> None:
    spec = "source+tent+sar-reset" if form == "trace-plain" else "bn+tent+conf-drop+ema-source"
    adapter = _build(spec, models["bn", form])
    _run(adapter)
    snap = adapter.state_dict()
    expected = _run(adapter, (7, 8))
    adapter.load_state_dict(snap)
    fresh = _build(spec, models["bn", form])
    fresh.load_state_dict(snap)
    for a, b, c in zip(expected, _run(adapter, (7, 8)), _run(fresh, (7, 8))):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("norm", ["bn", "ln"])
def test_stream_copies_are_independent(models, norm: str) -> None:
    proto = share_fixed(_build("bn+tent", models[norm, "script"]))
    a, b = stream_copy(proto), stream_copy(proto)
    ids = {id(t) for t in a.model.parameters()}
    assert all(id(p) in ids for g in a.optimizer.param_groups for p in g["params"])
    start = _norm_params(b)
    out_b = _run(b, (1,))
    _run(a)
    assert all(torch.equal(p, q) for p, q in zip(_norm_params(proto), start))
    assert any(not torch.equal(p, q) for p, q in zip(_norm_params(a), start))
    c = stream_copy(proto)
    assert torch.equal(_run(c, (1,))[0], out_b[0])  # a's steps did not leak into the prototype
    assert "net.body.0.weight" not in a.state_dict()["model"]  # fixed weights stay out of the state


def test_default_spec_falls_back_on_compiled_batchnorm(models, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="streamtta"):
        specs = {form: streamtta.Pipeline(models[norm, form], scorer="energy").blueprint.spec
                 for norm, form in [("bn", "script"), ("bn", "trace"), ("bn", "trace-plain")]}
        ln = streamtta.Pipeline(models["ln", "script"], scorer="energy").blueprint.spec
        eager = streamtta.Pipeline(models["bn", "eager"], scorer="energy").blueprint.spec
    assert specs == {"script": "bn+source-fallback", "trace": "bn+source-fallback", "trace-plain": "source"}
    assert eager == "cb-stats+source-fallback" and ln == NO_BATCHNORM_SCRIPT_SPEC  # LayerNorm: no align
    assert sum("cannot run on this TorchScript model" in r.message for r in caplog.records) == 3


def test_features_of_exported_models(models, tmp_path) -> None:
    from streamtta.models import export_torchscript, load_torchscript

    net = models["bn", "eager"]
    path = tmp_path / "sensor.ts.pt"
    export_torchscript(net, path)
    loaded, _ = load_torchscript(path)
    adapter = _build("bn+tent", loaded)
    out = adapter.step(_shifted(1))
    assert out.features.shape == (32, 16)  # forward_features: the classifier's input
    eager = _build("bn+tent", net)
    torch.testing.assert_close(out.features, eager.step(_shifted(1)).features, rtol=1e-4, atol=1e-4)
    plain = nn.Sequential(*net.body, net.fc).eval()  # no forward_features: the Sequential's own layers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        compiled_forms = (torch.jit.script(plain), torch.jit.trace(plain, _source(4)[0]))
    want = _build("source", plain).step(_shifted(1)).features
    for compiled in compiled_forms:  # the input of its last Linear, as on the eager module
        got = _build("source", compiled).step(_shifted(1)).features
        assert got.shape == (32, 16)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    other = nn.Sequential(nn.Flatten(), nn.Linear(8, NUM_CLASSES), nn.Softmax(dim=1)).eval()  # no final Linear
    with pytest.warns(UserWarning, match="exports no forward_features"):
        feats = build_adapter("source", torch.jit.script(other), NUM_CLASSES).step(_shifted(1)).features
    assert feats.shape == (32, NUM_CLASSES)  # the outputs stand in
