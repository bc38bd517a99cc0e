"""A scripted nn.Sequential of standard layers runs as its eager twin: every adapter, the same results."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

import streamtta
from streamtta.adapters import DEFAULT_SPEC
from streamtta.adapters.defaults import NO_BATCHNORM_SPEC
from streamtta.models.unscript import REBUILDERS, eager_sequential


def _saved_and_loaded(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    buf.seek(0)
    return torch.jit.load(buf)


def _every_layer_kind() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.GroupNorm(2, 4), nn.LeakyReLU(0.2),
        nn.MaxPool2d(2), nn.AvgPool2d(1), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.LayerNorm(8), nn.GELU(approximate="tanh"), nn.Dropout(0.2),
                      nn.SiLU(), nn.Tanh(), nn.Identity(), nn.ReLU6(), nn.Sigmoid()),
        nn.Linear(8, 3))
    with torch.no_grad():  # running statistics that differ from the initial ones
        net.train()(torch.randn(32, 1, 8, 8) * 2 + 1)
    net[-1].weight.requires_grad_(False)
    return net.eval()


def test_scripted_sequential_is_rebuilt_exactly():
    net = _every_layer_kind()
    compiled = _saved_and_loaded(torch.jit.script(net))
    eager = eager_sequential(compiled)
    assert eager is not None and not isinstance(eager, torch.jit.ScriptModule)
    assert [type(m) for m in eager.modules()] == [type(m) for m in net.modules()]
    assert eager[1].momentum == net[1].momentum and eager[9][3].approximate == "tanh" and eager[0].bias is None
    x = torch.randn(6, 1, 8, 8)
    assert torch.allclose(eager(x), compiled(x), atol=1e-6)
    assert eager.state_dict().keys() == compiled.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(eager.state_dict().values(), compiled.state_dict().values()))
    assert [p.requires_grad for p in eager.parameters()] == [p.requires_grad for p in net.parameters()]
    kinds = {getattr(m, "original_name", None) for m in compiled.modules()} - {"Sequential"}
    assert kinds <= set(REBUILDERS)


class Linear(nn.Module):
    """Named like torch's Linear, but computes something else."""

    def __init__(self) -> None:
        super().__init__()
        self.in_features, self.out_features = 4, 3
        self.weight = nn.Parameter(torch.randn(3, 4))
        self.bias = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * x @ self.weight.t() + self.bias


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.lin(x)


class Sequential(nn.Module):
    """A user class named Sequential whose forward is not the chain of its children (a residual)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.ReLU()
        self.c = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x)) + x)


@pytest.mark.parametrize("make", [
    lambda: torch.jit.script(Sequential()),
    lambda: torch.jit.trace(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3)), torch.randn(2, 4)),
    lambda: torch.jit.script(nn.Sequential(Block(), nn.LayerNorm(4), nn.Linear(4, 3))),
    lambda: torch.jit.script(nn.Sequential(nn.LayerNorm(4), Linear())),
    lambda: torch.jit.script(Block()),
], ids=["impostor-named-Sequential", "traced", "custom-layer", "impostor-named-Linear", "not-a-Sequential"])
def test_anything_else_stays_compiled(make):
    assert eager_sequential(make()) is None


def _stream(n: int = 512, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(0).normal(0, 2, (3, 8))
    y = rng.integers(0, 3, n)
    return (centers[y] + rng.normal(0, 1, (n, 8))).astype(np.float32), y


@pytest.mark.parametrize("norm, default", [(nn.BatchNorm1d, DEFAULT_SPEC), (nn.LayerNorm, NO_BATCHNORM_SPEC)])
def test_pipeline_runs_the_eager_default_on_a_scripted_sequential(norm, default):
    """The compiled model gets the same default adapter as the eager one and gives the same results."""
    x, y = _stream()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), norm(32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(100):
        loss = nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    compiled = _saved_and_loaded(torch.jit.script(net))
    xt, _ = _stream(192, 2)
    xt = xt + 2.5  # drifted
    out = {}
    for name, model in (("eager", net), ("compiled", compiled)):
        pipe = streamtta.Pipeline(model, scorer="energy")
        pipe.calibrate(x, y)
        assert pipe.blueprint.spec == default, name
        res = [pipe.process(torch.from_numpy(xt[i:i + 64])) for i in range(0, len(xt), 64)]
        out[name] = (np.concatenate([r.predictions for r in res]), np.concatenate([r.ood_scores for r in res]))
    np.testing.assert_array_equal(out["eager"][0], out["compiled"][0])
    np.testing.assert_allclose(out["eager"][1], out["compiled"][1], rtol=1e-4, atol=1e-5)
