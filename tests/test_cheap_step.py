"""The cheaper step of cb-stats + source-fallback (streamtta.adapters.shared_passes): the batch-size-1
pre-pass skip is exact, the analytic distances equal the activation-based ones, the probed source
pass runs the source model only where it is needed, and ``prepass_samples`` runs a subsampled pre-pass."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from streamtta.adapters import CompositeAdapter
from streamtta.adapters import shared_passes
from streamtta.adapters.guards import SourceFallback
from streamtta.adapters.guards.source_fallback import fit_distance, source_distance

NUM_CLASSES = 4


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.fc(self.pool(h).flatten(1))


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    m = Net()
    m.train()
    with torch.no_grad():
        for _ in range(10):
            m(torch.rand(32, 1, 8, 8))
        m.bn.weight[0] = 0.0  # a dead channel: left out of the fit distance
    return m.eval()


def make(net: nn.Module, probe: int = 0, agreement: float = 0.95, **kw) -> CompositeAdapter:
    ad = CompositeAdapter(net, NUM_CLASSES, norm="cb-stats", guards=[SourceFallback(agreement=agreement, probe=probe)],
                          **kw)
    g = torch.Generator().manual_seed(3)
    ad.fit_source(torch.rand(200, 1, 8, 8, generator=g), torch.arange(200) % NUM_CLASSES)
    return ad


def stream(n: int, bs: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand((bs, 1, 8, 8), generator=g) * (0.5 + i % 3) + 0.3 * (i % 2) for i in range(n)]


def test_batch_size_one_skips_the_prepass_with_identical_results(net, monkeypatch):
    fast = make(net)
    calls = []
    fast.model.register_forward_pre_hook(lambda m, inp: calls.append(1))
    outs_fast = [fast.step(x) for x in stream(12, 1)]
    assert len(calls) == 24  # the adapted pass and the source pass, no pre-pass
    # the reference: the same adapter with the pre-pass forced (no layer counts as plain cb-stats)
    monkeypatch.setattr(shared_passes, "ClassBalancedNorm", type("NotCb", (), {}))
    slow = make(net)
    outs_slow = [slow.step(x) for x in stream(12, 1)]
    for a, b in zip(outs_fast, outs_slow):
        assert torch.equal(a.logits, b.logits) and a.info == b.info
    for la, lb in zip(fast._label_layers, slow._label_layers):
        assert torch.equal(la.slot_means, lb.slot_means) and torch.equal(la.slot_weight, lb.slot_weight)


def mlp() -> nn.Module:
    torch.manual_seed(1)
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, NUM_CLASSES))
    m.train()
    with torch.no_grad():
        for _ in range(10):
            m(torch.rand(32, 1, 8, 8))
    return m.eval()


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_analytic_distances_equal_the_activation_based_ones(net, kind):
    ad = make(net if kind == "conv" else mlp())
    x = stream(1, 16)[0] * 3.0
    seen = []
    h = ad._first_norm.register_forward_hook(lambda m, inp, out: seen.append((inp[0].detach(), out.detach())))
    ad._class_mix_prepass(x)
    seen.clear()
    ad._adapted_forward(x)
    h.remove()
    inp, out = seen[0]
    dist, fit = ad._first_stats()
    layer = ad._first_norm
    assert torch.allclose(dist, source_distance(inp, layer.source_mean, layer.source_var, layer.eps), rtol=1e-3, atol=1e-4)
    assert torch.allclose(fit, fit_distance(out, layer.weight, layer.bias), rtol=1e-3, atol=1e-4)
    assert float(fit.std()) > 0


def test_probe_as_large_as_the_batch_is_the_exact_step(net):
    exact, probed = make(net), make(net, probe=16)
    for x in stream(6, 16):
        a, b = exact.step(x), probed.step(x)
        assert torch.allclose(a.logits, b.logits, atol=1e-5) and a.info == b.info


def test_probe_runs_the_source_model_only_where_needed(net):
    ad = make(net, probe=4, agreement=1.0)
    g = ad.guards[0]
    x = stream(1, 16)[0]
    src = ad._exact_source_forward(x)
    sizes = []
    orig = ad._exact_source_forward
    ad._exact_source_forward = lambda xx: (sizes.append(int(xx.shape[0])), orig(xx))[1]
    # adapted logits that disagree everywhere: the batch rule cannot fire, per-sample rules pick 2
    adapted = -src
    dist = torch.full((16,), 100.0 * g.reference)
    dist[[1, 9]] = 0.0  # two source-like samples in a batch of far ones
    out, used = ad._probed_choice(g, x, adapted, (dist, torch.zeros(16)))
    assert sizes == [4, 2] and used is False and g.last_n_near == 2
    assert torch.allclose(out[[1, 9]], src[[1, 9]], atol=1e-5) and torch.equal(out[[0, 2, 3]], adapted[[0, 2, 3]])
    # agreeing probe: the rest of the batch runs too, and the batch rule returns the source logits
    sizes.clear()
    out, used = ad._probed_choice(g, x, src.clone(), (dist, torch.zeros(16)))
    assert sizes == [4, 12] and used is True and torch.allclose(out, src, atol=1e-5)


def test_prepass_samples_runs_a_subsampled_prepass(net):
    ad = make(net, prepass_samples=4)
    sizes = []
    ad.model.register_forward_pre_hook(lambda m, inp: sizes.append(int(inp[0].shape[0])))
    out = ad.step(stream(1, 16)[0])
    assert sizes == [4, 16, 16] and out.logits.shape  # pre-pass, adapted pass, source pass == (16, NUM_CLASSES)
    assert shared_passes.probe_indices(16, 4).tolist() == [0, 4, 8, 12]
    with pytest.raises(ValueError, match="prepass_samples"):
        make(net, prepass_samples=4, relabel="agree")
    with pytest.raises(ValueError, match="probe"):
        SourceFallback(probe=-1)
