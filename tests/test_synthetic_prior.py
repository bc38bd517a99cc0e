"""A class prior without source data: inputs synthesised by model inversion (streamtta/adapters/synthetic_prior.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from streamtta.adapters import build_adapter
from streamtta.adapters.norms import ClassBalancedNorm
from streamtta.adapters.synthetic_prior import source_norm_stats, synthesize_inputs


def trained_net(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small BN MLP trained on three Gaussian classes (a few hundred Adam steps)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 6, generator=g) * 3
    y = torch.arange(600) % 3
    x = centres[y] + torch.randn(600, 6, generator=g)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval(), x, y


def layer_stats(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    seen = []
    h = net[1].register_forward_pre_hook(lambda m, i: seen.append(i[0]))
    with torch.no_grad():
        net(x)
    h.remove()
    return seen[0].mean(0), seen[0].var(0, unbiased=False)


def test_synthetic_inputs_are_classified_as_their_class_and_match_the_source_statistics():
    net, x, _ = trained_net()
    xs, ys = synthesize_inputs(net, 3, x[:32], per_class=16, steps=200)
    assert xs.shape == (48, 6) and ys.tolist() == [0] * 16 + [1] * 16 + [2] * 16
    with torch.no_grad():
        assert float((net(xs).argmax(1) == ys).float().mean()) == 1.0
    mean, var = source_norm_stats(net[1])
    m_syn, v_syn = layer_stats(net, xs)
    m_noise, v_noise = layer_stats(net, x[:32].mean(0) + x[:32].std(0) * torch.randn(48, 6))

    def gap(m, v):
        return float(((m - mean).pow(2) / var).mean() + (v.log() - var.log()).pow(2).mean())

    assert gap(m_syn, v_syn) < 0.1 * gap(m_noise, v_noise)
    # the same seed gives the same inputs
    again, _ = synthesize_inputs(net, 3, x[:32], per_class=16, steps=200)
    assert torch.equal(again, xs)
    other, _ = synthesize_inputs(net, 3, x[:32], per_class=16, steps=200, seed=1)
    assert not torch.equal(other, xs)


def test_the_synthetic_prior_separates_the_classes_like_the_real_one():
    net, x, y = trained_net()
    real = build_adapter("cb-stats", net, num_classes=3)
    real_prior, _ = real.fit_source(x, y)
    ad = build_adapter("cb-stats", net, num_classes=3)
    prior, _ = ad.fit_source_free(x[:32], per_class=16, steps=200)
    (cm, _), (rm, _) = prior[0], real_prior[0]
    # each synthetic class mean lies nearest the real mean of the same class
    assert torch.cdist(cm, rm).argmin(dim=1).tolist() == [0, 1, 2]
    layer = next(m for m in ad.model.modules() if isinstance(m, ClassBalancedNorm))
    assert layer.slot_weight.tolist() == [0.5] * 3
    # part of the initial state; the adapted parameters are untouched and hold no gradient
    ad.step(x[:16] + 2.0)
    ad.reset()
    assert torch.equal(layer.slot_means, cm)
    assert all(p.grad is None for p in ad.model.parameters())
    torch.testing.assert_close(layer.weight, net[1].weight)


def test_the_adapter_synthesises_through_the_source_model(monkeypatch):
    net, x, _ = trained_net()
    ad = build_adapter("cb-stats+tent", net, num_classes=3)
    ad.step(x[:64] * 3 + 5)  # adapted away from the source: parameters and statistics
    got = []
    monkeypatch.setattr(ad, "fit_source", lambda xs, ys: got.append((xs, ys)) or ([], None))
    ad.fit_source_free(x[:32], per_class=4, steps=50)
    (xs, ys), = got
    # the same inputs as a synthesis from the original (eval) model: source parameters and statistics
    want, want_y = synthesize_inputs(net, 3, x[:32], per_class=4, steps=50)
    torch.testing.assert_close(xs, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(ys, want_y)


def test_errors():
    net, x, _ = trained_net()
    with pytest.raises(ValueError, match="per_class"):
        synthesize_inputs(net, 3, x[:8], per_class=0)
    with pytest.raises(ValueError, match="example"):
        synthesize_inputs(net, 3, x[:1])
    with pytest.raises(ValueError, match="example"):
        synthesize_inputs(net, 3, torch.full((4, 6), float("nan")))
    with pytest.raises(ValueError, match="no norm layer"):
        synthesize_inputs(nn.Sequential(nn.Linear(6, 3)), 3, x[:8])
    with pytest.raises(TypeError, match="eager"):
        synthesize_inputs(torch.jit.script(net), 3, x[:8])
    scripted = build_adapter("source", torch.jit.script(net), num_classes=3)
    with pytest.raises(TypeError, match="eager"):
        scripted.fit_source_free(x[:8])
    with pytest.raises(ValueError, match="per_class"):
        synthesize_inputs(net, 3, x[:8], per_class=2.5)
    with pytest.raises(ValueError, match=r"logits of shape \(5, 3\), not \(B, 5\)"):
        build_adapter("cb-stats", net, num_classes=5).fit_source_free(x[:8], per_class=1, steps=1)
    # a training-mode BatchNorm would overwrite its running statistics with the synthetic batch's
    net.train()
    running = net[1].running_mean.clone()
    with pytest.raises(ValueError, match="eval"):
        synthesize_inputs(net, 3, x[:8], per_class=1, steps=1)
    assert torch.equal(net[1].running_mean, running)


def test_a_spec_with_nothing_to_fit_skips_the_synthesis(monkeypatch):
    import streamtta.adapters.synthetic_prior as sp

    net, x, _ = trained_net()
    monkeypatch.setattr(sp, "synthesize_inputs", lambda *a, **k: pytest.fail("synthesised for nothing"))
    assert build_adapter("bn", net, num_classes=3).fit_source_free(x[:8]) == ([], None)


def test_on_real_digits_a_class_sorted_stream_gains_from_the_synthetic_prior():
    """digits-resnet (BatchNorm CNN) on a class-sorted gaussian-noise stream of real handwritten digits: the
    synthetic prior (small settings to keep the test short) against no prior at all."""
    from streamtta.adaptbench import render
    from streamtta.models.registry import load_model
    from streamtta.simulations.scenario import Scenario

    torch.set_num_threads(1)
    sc = Scenario(name="t", dataset="digits-c", model="digits-resnet", domains=["gaussian_noise"],
                  samples_per_domain=512, known_classes=list(range(8)), batch_size=64, ordering={"kind": "sorted"})
    model, meta = load_model(sc.model)
    x, y, _ = render(sc)
    x = torch.from_numpy(x)

    def accuracy(synthetic: bool) -> float:
        torch.manual_seed(0)
        ad = build_adapter("default", model, len(meta.classes))
        if synthetic:
            ad.fit_source_free(x[:64], per_class=8, steps=60)
        hits = [(ad.step(x[i:i + 64]).logits.argmax(1).numpy() == y[i:i + 64]).mean() for i in range(0, len(x), 64)]
        return float(sum(hits) / len(hits))

    without, synthetic = accuracy(False), accuracy(True)
    assert synthetic > without + 0.1, (synthetic, without)


def test_models_without_batchnorm_statistics_are_refused():
    torch.manual_seed(0)
    ln = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3)).eval()
    ad = build_adapter("default", ln, num_classes=3)  # align: its statistics are the LayerNorm's output's
    ad.fit_source(torch.randn(64, 6))
    with pytest.raises(ValueError, match="no norm layer"):
        ad.fit_source_free(torch.randn(16, 6))
