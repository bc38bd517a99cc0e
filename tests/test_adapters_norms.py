"""Correctness of the test-time normalisation layers (BN-adapt, RBN, UnMix-TNS, cb-stats)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from streamtta.adapters.norms import (
    BatchStatsNorm,
    ClassBalancedNorm,
    RobustBatchNorm,
    UnMixTNS,
    em_class_mix,
    frozen_stats,
    replace_batchnorms,
    set_stats_mode,
)
from streamtta.adapters.norms.base import instance_stats, pooled_stats


def trained_bn(c: int = 5, dim: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(c) if dim == 2 else nn.BatchNorm1d(c)
    shape = (32, c, 6, 6) if dim == 2 else (32, c)
    bn.train()
    for _ in range(20):
        bn(torch.randn(shape) * 2.0 + 0.7)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn.eval()


def ref_unmix(layer: UnMixTNS, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The published algorithm written out with (B, K, C) tensors: (y, p, mu_bar, var_bar)."""
    var_i, mean_i = torch.var_mean(x, dim=(2, 3), unbiased=False)
    M, V = layer.component_means.clone(), layer.component_vars.clone()
    p = torch.softmax(F.normalize(mean_i, dim=1) @ F.normalize(M, dim=1).t() / layer.tau, dim=1)
    mu_hat = (1 - p)[:, :, None] * M[None] + p[:, :, None] * mean_i[:, None]
    var_hat = (1 - p)[:, :, None] * V[None] + p[:, :, None] * var_i[:, None]
    mu_bar = mu_hat.mean(1)
    var_bar = var_hat.mean(1) + (mu_hat**2).mean(1) - mu_bar**2
    y = (x - mu_bar[:, :, None, None]) / torch.sqrt(var_bar[:, :, None, None] + layer.eps)
    y = y * layer.weight[None, :, None, None] + layer.bias[None, :, None, None]
    return y, p, mu_bar, var_bar


# ---------------------------------------------------------------------------------------------
# UnMix-TNS
# ---------------------------------------------------------------------------------------------
def test_unmix_init_matches_published_rule():
    bn = trained_bn(c=6)
    layer = UnMixTNS.from_bn(bn, K=4, seed=3)
    expected_noise = torch.randn((4, 6), generator=torch.Generator().manual_seed(3))
    scale = math.sqrt(0.5 * 4 / 3) * bn.running_var.sqrt()
    assert torch.allclose(layer.component_means, bn.running_mean + scale * expected_noise, atol=1e-6)
    assert torch.allclose(layer.component_vars, 0.5 * bn.running_var.expand(4, -1), atol=1e-7)
    assert torch.equal(layer.weight.data, bn.weight.data) and torch.equal(layer.bias.data, bn.bias.data)
    assert isinstance(layer.weight, nn.Parameter)


def test_unmix_forward_equals_published_formula():
    layer = UnMixTNS.from_bn(trained_bn(c=5), K=7, seed=0)
    x = torch.randn(9, 5, 4, 4) * 1.7 + 0.3
    y_ref, *_ = ref_unmix(layer, x)
    y = layer(x)
    assert torch.allclose(y, y_ref, atol=1e-4)


def test_unmix_closed_form_instance_mean():
    """mean_b = mean_k mu_k + (mu~_b - sum_k p_bk mu_k) / K."""
    layer = UnMixTNS.from_bn(trained_bn(c=5), K=6, seed=1)
    x = torch.randn(4, 5, 3, 3) * 2
    mean_i, var_i = instance_stats(x)
    p = layer.assignments(mean_i)
    mean, var = layer.mixture_stats(mean_i, var_i, p)
    M = layer.component_means
    closed = M.mean(0) + (mean_i - p @ M) / layer.K
    assert torch.allclose(mean, closed, atol=1e-5)
    _, _, mu_bar, var_bar = ref_unmix(layer, x)
    assert torch.allclose(mean, mu_bar, atol=1e-5)
    assert torch.allclose(var, var_bar, atol=1e-4)


def test_unmix_k1_is_instance_normalisation_without_noise():
    bn = trained_bn(c=4)
    layer = UnMixTNS.from_bn(bn, K=1, seed=0)
    assert torch.allclose(layer.component_means, bn.running_mean[None])
    assert torch.allclose(layer.component_vars, bn.running_var[None])
    x = torch.randn(3, 4, 5, 5) * 3 + 1
    expected = F.instance_norm(x, weight=bn.weight, bias=bn.bias, eps=bn.eps)
    assert torch.allclose(layer(x), expected, atol=1e-4)


def test_unmix_update_rule_on_hand_made_batch():
    layer = UnMixTNS(2, K=2, bs_max=4, tau=0.07, source_mean=torch.zeros(2), source_var=torch.ones(2), seed=0)
    with torch.no_grad():
        layer.component_means.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        layer.component_vars.copy_(torch.tensor([[1.0, 1.0], [2.0, 2.0]]))
    # two instances: constant maps, so instance mean = value, instance variance = 0
    x = torch.tensor([3.0, 0.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    x = torch.cat([x, torch.tensor([0.0, 5.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)])
    layer(x)
    mean_i = torch.tensor([[3.0, 0.0], [0.0, 5.0]])
    sim = F.normalize(mean_i, dim=1) @ F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1).t()
    p = torch.softmax(sim / 0.07, dim=1)  # ~ identity
    lam = 1 - 0.9 ** (2 / 4)
    M0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    V0 = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    exp_m = M0 + lam * (p[:, :, None] * (mean_i[:, None] - M0[None])).mean(0)
    exp_v = V0 + lam * (p[:, :, None] * (0.0 - V0[None])).mean(0)
    assert torch.allclose(layer.component_means, exp_m, atol=1e-6)
    assert torch.allclose(layer.component_vars, exp_v, atol=1e-6)
    # by hand: component 0 moves by lam * (3 - 1) / 2 on channel 0
    assert abs(float(layer.component_means[0, 0]) - (1 + lam * 1.0)) < 1e-4


def test_unmix_updates_on_every_forward_even_without_grad():
    layer = UnMixTNS.from_bn(trained_bn(), K=4, seed=0)
    before = layer.component_means.clone()
    with torch.no_grad():
        layer(torch.randn(8, 5, 4, 4) + 3)
    assert not torch.equal(before, layer.component_means)


def test_unmix_deferred_commit_with_mask_and_frozen():
    layer = UnMixTNS.from_bn(trained_bn(), K=4, seed=0)
    x = torch.randn(6, 5, 4, 4) + 2
    ref = UnMixTNS.from_bn(trained_bn(), K=4, seed=0)
    layer.stats_mode = "deferred"
    layer(x)
    assert torch.equal(layer.component_means, ref.component_means)  # nothing yet
    layer.commit(torch.tensor([True, True, True, False, False, False]))
    ref(x[:3])  # immediate update with the kept samples only (lambda uses the kept count)
    assert torch.allclose(layer.component_means, ref.component_means, atol=1e-6)
    with frozen_stats(layer):
        layer(x)
    layer.commit()
    assert torch.allclose(layer.component_means, ref.component_means, atol=1e-6)


def test_unmix_bn1d_is_source_passthrough_as_published():
    bn = trained_bn(c=5, dim=1)
    layer = UnMixTNS.from_bn(bn, K=4)
    x = torch.randn(7, 5)
    assert torch.allclose(layer(x), bn(x), atol=1e-5)
    x3 = torch.randn(7, 5, 9)
    assert torch.allclose(layer(x3), bn(x3), atol=1e-5)
    adapted = UnMixTNS.from_bn(bn, K=4, adapt_bn1d=True)
    assert not torch.allclose(adapted(x3), bn(x3), atol=1e-3)


# ---------------------------------------------------------------------------------------------
# BN-adapt, RBN
# ---------------------------------------------------------------------------------------------
def test_bn_adapt_uses_batch_stats_and_source_at_batch_size_one():
    bn = trained_bn()
    layer = BatchStatsNorm.from_bn(bn)
    x = torch.randn(10, 5, 4, 4) * 3
    assert torch.allclose(layer(x), F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps), atol=1e-5)
    x1 = torch.randn(1, 5, 4, 4)
    assert torch.allclose(layer(x1), bn(x1), atol=1e-5)


def test_rbn_ema_rule():
    bn = trained_bn()
    layer = RobustBatchNorm.from_bn(bn, alpha=0.05)
    x = torch.randn(16, 5, 3, 3) * 2 + 1
    bv, bm = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    y = layer(x)
    exp_m = 0.95 * bn.running_mean + 0.05 * bm
    exp_v = 0.95 * bn.running_var + 0.05 * bv
    assert torch.allclose(layer.mean, exp_m, atol=1e-5) and torch.allclose(layer.var, exp_v, atol=1e-5)
    ref = (x - exp_m[None, :, None, None]) / torch.sqrt(exp_v[None, :, None, None] + bn.eps)
    ref = ref * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    assert torch.allclose(y, ref, atol=1e-4)


def test_pooled_stats_equal_batch_stats():
    x = torch.randn(7, 3, 5, 5) * 4 + 2
    m, v = pooled_stats(*instance_stats(x))
    bv, bm = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(m, bm, atol=1e-5) and torch.allclose(v, bv, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# cb-stats
# ---------------------------------------------------------------------------------------------
def test_cb_stats_uniform_mix_is_bn_adapt():
    bn = trained_bn()
    layer = ClassBalancedNorm.from_bn(bn, num_classes=3, batch_kappa=0.0)
    x = torch.randn(12, 5, 4, 4) * 2
    layer.class_mix = torch.full((3,), 1 / 3)
    assert torch.allclose(layer(x), F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps), atol=1e-4)
    layer.class_mix = None  # no mix -> stored marginal = source statistics before any update
    assert torch.allclose(layer(x), bn(x), atol=1e-5)


def test_cb_stats_one_class_batch_is_debiased_to_the_balanced_statistics():
    torch.manual_seed(0)
    layer = ClassBalancedNorm(2, num_classes=2, source_mean=torch.zeros(2), source_var=torch.ones(2), batch_kappa=0.0)
    with torch.no_grad():  # learned slots: class 0 sits at +1, class 1 at -1, within variance 1
        layer.slot_means.copy_(torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))
        layer.slot_vars.fill_(1.0)
        layer.slot_weight.fill_(1.0)
    x = torch.randn(4000, 2, 1, 1) + 1.0  # a batch of class 0 only
    layer.class_mix = torch.tensor([1.0, 0.0])
    y = layer(x).detach()
    # balanced marginal is N(0, 2): the class-0 batch must come out with mean 1/sqrt(2), var 1/2
    assert abs(float(y.mean()) - 1 / math.sqrt(2)) < 0.05
    assert abs(float(y.var()) - 0.5) < 0.05
    layer.class_mix = torch.tensor([0.5, 0.5])  # pretending it is balanced = BN-adapt: mean 0
    assert abs(float(layer(x).detach().mean())) < 1e-3


def test_cb_stats_slot_update_touches_only_labelled_classes():
    layer = ClassBalancedNorm.from_bn(trained_bn(), num_classes=4)
    layer.stats_mode = "deferred"
    layer.class_mix = torch.full((4,), 0.25)
    x = torch.randn(8, 5, 4, 4) + 3
    layer(x)
    before = layer.slot_means.clone()
    labels = torch.tensor([2, 2, 2, 2, 2, -1, -1, -1])  # -1: ignored
    layer.commit(labels=labels)
    changed = (layer.slot_means != before).any(dim=1)
    assert changed.tolist() == [False, False, True, False]
    assert layer.slot_weight[2] > 0 and float(layer.slot_weight.sum()) == float(layer.slot_weight[2])
    m2 = instance_stats(x)[0][:5].mean(0)
    a = 5 / (5 + layer.kappa)
    assert torch.allclose(layer.slot_means[2], before[2] + a * (m2 - before[2]), atol=1e-5)


def test_em_class_mix_recovers_proportions_of_calibrated_posteriors():
    torch.manual_seed(0)
    # posteriors of a 2-class problem with true mix (0.8, 0.2) and a calibrated classifier
    y = (torch.rand(4000) < 0.2).long()
    score = torch.randn(4000) + torch.where(y == 1, 1.0, -1.0)
    p1 = torch.sigmoid(2 * score)  # likelihood ratio exp(2 s) under equal priors
    probs = torch.stack([1 - p1, p1], dim=1)
    pi = em_class_mix(probs, iters=200)
    assert abs(float(pi[1]) - 0.2) < 0.03


# ---------------------------------------------------------------------------------------------
# every norm: batch size 1, constant inputs, shape handling
# ---------------------------------------------------------------------------------------------
def _all_layers(bn: nn.Module) -> list[nn.Module]:
    return [
        BatchStatsNorm.from_bn(bn),
        RobustBatchNorm.from_bn(bn),
        UnMixTNS.from_bn(bn, K=4, seed=0),
        UnMixTNS.from_bn(bn, K=1),
        ClassBalancedNorm.from_bn(bn, num_classes=3),
    ]


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("dim", [1, 2])
def test_every_norm_handles_batch_size_one_and_constant_inputs(batch: int, dim: int):
    bn = trained_bn(c=4, dim=dim)
    shape = (batch, 4, 6, 6) if dim == 2 else (batch, 4)
    for layer in _all_layers(bn):
        for x in (torch.randn(shape), torch.full(shape, 3.0), torch.zeros(shape)):
            if isinstance(layer, ClassBalancedNorm):
                layer.class_mix = torch.full((3,), 1 / 3)
            y = layer(x)
            if isinstance(layer, ClassBalancedNorm):
                layer.commit(labels=torch.zeros(batch, dtype=torch.long))
            assert y.shape == x.shape
            assert torch.isfinite(y).all(), f"{type(layer).__name__} produced NaN/inf on {tuple(shape)}"
            for name, buf in layer.named_buffers():
                assert torch.isfinite(buf).all(), f"{type(layer).__name__}.{name} became non-finite"


def test_norms_reject_wrong_channel_count_and_bad_hyperparameters():
    layer = UnMixTNS(4, K=2)
    with pytest.raises(ValueError, match="expects input"):
        layer(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="K"):
        UnMixTNS(4, K=0)
    with pytest.raises(ValueError, match="alpha"):
        RobustBatchNorm(4, alpha=0.0)
    with pytest.raises(ValueError, match="min_batch_size"):
        BatchStatsNorm(4, min_batch_size=1)
    with pytest.raises(ValueError, match="num_classes"):
        ClassBalancedNorm.from_bn(trained_bn())


def test_replace_batchnorms_and_stats_mode():
    net = nn.Sequential(nn.Conv2d(1, 5, 3), trained_bn(), nn.Flatten(), nn.Linear(5 * 16, 3), nn.BatchNorm1d(3))
    names = replace_batchnorms(net, lambda bn: UnMixTNS.from_bn(bn, K=2, seed=0))
    assert names == ["1", "4"]
    assert isinstance(net[1], UnMixTNS) and net[4].passthrough
    set_stats_mode(net, "frozen")
    before = net[1].component_means.clone()
    net(torch.randn(3, 1, 6, 6))
    assert torch.equal(before, net[1].component_means)
    with pytest.raises(ValueError, match="stats_mode"):
        set_stats_mode(net, "sometimes")


def test_unmix_instance_weight_one_is_instance_norm_and_bn_source_weight_blends():
    bn = trained_bn()
    x = torch.randn(4, 5, 6, 6) * 2 + 1
    full = UnMixTNS.from_bn(bn, K=8, seed=0, instance_weight=1.0)
    assert torch.allclose(full(x), F.instance_norm(x, weight=bn.weight, bias=bn.bias, eps=bn.eps), atol=1e-4)
    blend = BatchStatsNorm.from_bn(bn, source_weight=0.25)
    bv, bm = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    m = 0.25 * bn.running_mean + 0.75 * bm
    v = 0.25 * bn.running_var + 0.75 * bv
    ref = (x - m[None, :, None, None]) / torch.sqrt(v[None, :, None, None] + bn.eps)
    ref = ref * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    assert torch.allclose(blend(x), ref, atol=1e-4)
