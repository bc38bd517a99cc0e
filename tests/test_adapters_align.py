"""LayerNorm / GroupNorm models: the "align" norm and what "default" means per model."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from streamtta.adapters import SpecError, build_adapter
from streamtta.adapters.defaults import DEFAULT_SPEC, NO_BATCHNORM_SPEC, NO_BATCHNORM_SCRIPT_SPEC, default_spec
from streamtta.adapters.norms import AlignedNorm
from streamtta.models.cnn import CNN

torch.set_num_threads(1)


def blobs(n: int, shift: float = 0.0, classes: list[int] | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 16, generator=torch.Generator().manual_seed(99)) * 2
    y = torch.tensor(classes * (n // len(classes))) if classes else torch.randint(0, 4, (n,), generator=g)
    x = centers[y] + torch.randn(len(y), 16, generator=g)
    return x + shift * torch.linspace(-1, 1, 16), y


@pytest.fixture(scope="module")
def ln_mlp():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 4))
    x, y = blobs(2000)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(200):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def accuracy(adapter, x, y, bs=64) -> float:
    hits = [(adapter.step(x[i:i + bs]).logits.argmax(1) == y[i:i + bs]).float() for i in range(0, len(x), bs)]
    return float(torch.cat(hits).mean())


@pytest.mark.parametrize("kind", ["ln", "gn"])
def test_aligned_layer_is_the_original_until_calibrated(kind):
    torch.manual_seed(0)
    orig = nn.LayerNorm(8) if kind == "ln" else nn.GroupNorm(2, 8)
    with torch.no_grad():
        orig.weight.uniform_(0.5, 1.5)
        orig.bias.uniform_(-1, 1)
    x = torch.randn(6, 8) if kind == "ln" else torch.randn(6, 8, 3, 3)
    layer = AlignedNorm.from_norm(orig, alpha=None)  # each batch's own statistics (the EMA: below)
    assert torch.allclose(layer(x), orig(x), atol=1e-6)
    offset = torch.linspace(-2, 2, 8).view((8,) if kind == "ln" else (8, 1, 1))
    layer.start_recording()
    layer.source_forward(x + offset)  # source statistics of another per-channel pattern
    layer.finish_recording()
    assert bool(layer.calibrated) and not torch.allclose(layer(x), orig(x), atol=1e-3)
    layer.class_mix = torch.tensor([1.0, 0.0, 0.0, 0.0])  # a one-class batch: batch statistics are not trusted
    assert layer.batch_weight() == 0.0 and torch.allclose(layer(x), orig(x), atol=1e-6)
    layer.class_mix = torch.full((4,), 0.25)
    assert layer.batch_weight() == 1.0


def test_align_recovers_a_feature_offset_and_keeps_one_class_batches(ln_mlp):
    x, y = blobs(1024, shift=5.0, seed=1)
    src = build_adapter("source", ln_mlp, 4)
    ad = build_adapter("align", ln_mlp, 4)
    clean, clean_y = blobs(1000, seed=2)
    ad.fit_source(clean, clean_y)
    assert accuracy(ad, x, y) > accuracy(src, x, y) + 0.05
    # class-sorted batches: never below the source model
    xs, ys = blobs(1024, shift=5.0, classes=[0], seed=3)
    ad.reset()
    assert accuracy(ad, xs, ys) >= accuracy(build_adapter("source", ln_mlp, 4), xs, ys) - 1e-9
    # state round trip keeps the source statistics
    state = ad.state_dict()
    ad2 = build_adapter("align", ln_mlp, 4)
    ad2.load_state_dict(state)
    ad2.step(x[:64])
    layer = next(m for m in ad2.model.modules() if isinstance(m, AlignedNorm))
    assert bool(layer.calibrated)


def test_default_resolves_per_model(ln_mlp):
    bn = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)).eval()
    assert default_spec(bn) == DEFAULT_SPEC
    assert default_spec(ln_mlp) == NO_BATCHNORM_SPEC and default_spec(CNN(4, norm="gn")) == NO_BATCHNORM_SPEC
    assert default_spec(torch.jit.script(ln_mlp)) == NO_BATCHNORM_SCRIPT_SPEC
    assert default_spec(nn.Sequential(nn.Linear(16, 4))) == "source"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "has no BatchNorm layer" warning for the LayerNorm default
        ad = build_adapter("default", ln_mlp, 4)
    assert ad.spec == build_adapter(NO_BATCHNORM_SPEC, ln_mlp, 4).spec
    assert any(isinstance(m, AlignedNorm) for m in ad.model.modules())
    assert ad.parameters_to_adapt()  # LayerNorm affine parameters


def test_align_is_refused_on_torchscript_by_name(ln_mlp):
    with pytest.raises(SpecError, match="align.*LayerNorm / GroupNorm"):
        build_adapter("align", torch.jit.script(ln_mlp), 4)
    ad = build_adapter("default", torch.jit.script(ln_mlp), 4)  # the script default runs
    assert ad.step(torch.randn(8, 16)).logits.shape == (8, 4)


def test_align_with_alpha_keeps_an_ema_of_the_kept_samples_statistics():
    """alpha: the layer normalises with an EMA of the batch statistics (stateful, saved in state_dict); the
    deferred update takes only the samples the mask keeps; frozen forwards read the EMA without moving it."""
    torch.manual_seed(0)
    ln = nn.LayerNorm(8)
    layer = AlignedNorm.from_norm(ln, alpha=0.5, warmup=False)
    src = torch.randn(512, 8)
    layer.start_recording(); layer.source_forward(src); layer.finish_recording()
    assert torch.equal(layer.test_mean, layer.source_mean)
    shifted = torch.randn(64, 8) + torch.linspace(-2, 2, 8)
    z_mean = ln(shifted).mean(0).detach()  # per-channel mean of the shifted z (weight 1, bias 0)
    layer.stats_mode = "deferred"
    gaps = []
    for _ in range(6):
        layer(shifted)
        layer.commit()
        gaps.append(float((layer.test_mean - z_mean).abs().max()))
    assert all(b < a for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 0.05 * gaps[0]  # halves every batch
    before = layer.test_mean.clone()
    layer.class_mix = torch.tensor([1.0, 0.0, 0.0, 0.0])  # a one-class batch: it does not move the average
    layer(shifted + 5.0)
    layer.commit()
    assert torch.equal(layer.test_mean, before)
    layer.class_mix = None
    layer.stats_mode = "frozen"
    layer(shifted + 5.0)
    assert torch.equal(layer.test_mean, before)
    # the mask: an update from half the batch equals an update from that half alone
    a, b = (AlignedNorm.from_norm(ln, alpha=0.5, warmup=False) for _ in range(2))
    for m in (a, b):
        m.load_state_dict(layer.state_dict())
        m.stats_mode = "deferred"
    keep = torch.arange(64) < 32
    a(shifted * 3.0); a.commit(keep)
    b(shifted[keep] * 3.0); b.commit()
    assert torch.allclose(a.test_mean, b.test_mean, atol=1e-6) and torch.allclose(a.test_var, b.test_var, atol=1e-6)
    assert "test_mean" in layer.state_dict() and not torch.equal(a.test_mean, layer.test_mean)


def test_align_warmup_averages_the_first_batches_equally():
    """warmup (default): batch n (from 0) enters with weight max(alpha, 1/(n+1)): the first sets the
    statistics, the first two are averaged equally."""
    torch.manual_seed(0)
    ln = nn.LayerNorm(8)
    layer = AlignedNorm.from_norm(ln)
    layer.start_recording(); layer.source_forward(torch.randn(256, 8)); layer.finish_recording()
    b1, b2 = torch.randn(64, 8) + 1.0, torch.randn(64, 8) - torch.linspace(-1, 1, 8)
    m1, m2 = ln(b1).mean(0).detach(), ln(b2).mean(0).detach()
    layer(b1)
    assert torch.allclose(layer.test_mean, m1, atol=1e-5)
    layer(b2)
    assert torch.allclose(layer.test_mean, (m1 + m2) / 2, atol=1e-5) and int(layer.n_updates) == 2
