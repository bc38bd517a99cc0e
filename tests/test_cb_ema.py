"""cb-stats' fallback statistics: the slots' marginal blended with an EMA of the test batches (``ema``)."""
from __future__ import annotations

import pytest
import torch

from streamtta.adapters import build_adapter
from streamtta.adapters.norms import ClassBalancedNorm
from streamtta.adapters.norms.base import instance_stats, pooled_stats


def layer(ema: float = 0.05, **kw) -> ClassBalancedNorm:
    out = ClassBalancedNorm(3, num_classes=4, source_mean=torch.zeros(3), source_var=torch.ones(3), ema=ema, **kw)
    out.stats_mode = "deferred"
    return out


def run(lay: ClassBalancedNorm, x: torch.Tensor, mix: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    lay.class_mix = mix
    y = lay(x).detach()
    lay.commit(labels=labels)
    return y


def one_class(n: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(n, 3, 4, 4) * 2 + 3, torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.zeros(n, dtype=torch.long)


def test_stored_statistics_are_the_ema_without_a_class_structure_and_the_marginal_with_one():
    lay = layer()
    with torch.no_grad():
        lay.ema_mean.fill_(2.0)
        lay.ema_var.fill_(3.0)
        lay.slot_means.copy_(torch.arange(4.0).unsqueeze(1).expand(4, 3))
    m, v = lay.stored()  # W = 0: the EMA alone
    assert torch.allclose(m, torch.full((3,), 2.0)) and torch.allclose(v, torch.full((3,), 3.0))
    lay.slot_weight.fill_(1.0)  # established: the slots' marginal
    mS, vS = lay.marginal(lay.slot_means, lay.slot_vars)
    assert torch.allclose(lay.stored()[0], mS) and torch.allclose(lay.stored()[1], vS)
    lay.slot_weight.fill_(0.5)  # halfway: the mixture of the two Gaussians
    m, v = lay.stored()
    assert torch.allclose(m, 0.5 * mS + 0.5 * 2.0)
    assert torch.allclose(v, 0.5 * vS + 0.5 * 3.0 + 0.25 * (mS - 2.0) ** 2)


def test_ema_moves_by_its_weight_per_batch_with_the_kept_samples_only():
    x, mix, labels = one_class()
    lay = layer(ema=0.1)
    lay.class_mix = mix
    lay(x)
    keep = torch.arange(32) < 20
    lay.commit(mask=keep, labels=labels)
    bm, bv = pooled_stats(*instance_stats(x[:20]))
    assert torch.allclose(lay.ema_mean, 0.1 * bm, atol=1e-5)
    assert torch.allclose(lay.ema_var, 0.9 + 0.1 * bv + 0.09 * bm ** 2, atol=1e-4)


def test_an_untrusted_one_class_batch_falls_back_on_the_ema_not_the_source_statistics():
    x, mix, labels = one_class()
    lay, old = layer(), layer(ema=0.0)
    with torch.no_grad():
        lay.ema_mean.fill_(3.0)  # the stream so far sits at the batch's mean
        lay.ema_var.fill_(4.0)
    y_new, y_old = run(lay, x, mix, labels), run(old, x, mix, labels)
    # no class structure (W = 0): the one-class imbalance is all uncorrectable, the batch weight is 0 and the
    # batch is normalised with the stored statistics alone: the EMA, where the layer without it takes the source's
    assert lay._batch_weight == 0.0 and old._batch_weight == 0.0
    for y, m_fb, v_fb in ((y_new, 3.0, 4.0), (y_old, 0.0, 1.0)):
        assert torch.allclose(y, (x - m_fb) / (v_fb + lay.eps) ** 0.5, atol=1e-5)
    lay.class_mix = old.class_mix = None  # the pre-pass: stored statistics, here the EMA vs the marginal
    assert not torch.allclose(lay(x), old(x))


def test_ema_zero_is_the_layer_without_the_ema():
    x, mix, labels = one_class()
    lay = layer(ema=0.0)
    for _ in range(3):
        run(lay, x, mix, labels)
    assert torch.equal(lay.ema_mean, torch.zeros(3)) and torch.equal(lay.ema_var, torch.ones(3))
    assert all(torch.equal(a, b) for a, b in zip(lay.stored(), lay.marginal(lay.slot_means, lay.slot_vars)))


def test_a_new_domain_restarts_the_ema_at_the_batch_when_the_slots_hold_a_class_prior():
    x, mix, labels = one_class()
    bm, _ = pooled_stats(*instance_stats(x))
    prior, bare = layer(), layer()
    prior.set_class_prior(torch.zeros(4, 3), torch.ones(4, 3))  # W = prior_weight: fully re-anchored
    for lay in (prior, bare):
        lay.new_domain = True
        run(lay, x, torch.full((4,), 0.25), labels)
    assert torch.allclose(prior.ema_mean, bm, atol=1e-5)
    # without a prior the batch's own weight decides, halved while the class structure is unknown (a
    # pre-pass on the batch's own statistics makes any batch look balanced); imbalance_ratio=0: not halved
    assert torch.allclose(bare.ema_mean, bm * (0.05 + 0.95 * 0.5 * 32 / 34), atol=1e-4)
    plain = layer(imbalance_ratio=0.0)
    plain.new_domain = True
    run(plain, x, torch.full((4,), 0.25), labels)
    assert torch.allclose(plain.ema_mean, bm * (0.05 + 0.95 * 32 / 34), atol=1e-4)


def test_a_few_established_classes_correct_little():
    x, mix, labels = one_class()
    lay = layer(batch_kappa=0.0)
    with torch.no_grad():
        lay.slot_weight.copy_(torch.tensor([0.9, 0.0, 0.0, 0.0]))  # only class 0 seen so far
    lay.class_mix = mix
    lay(x)
    # coverage: W counts as W * mean(W) / max(W) = 0.225 for class 0; u = (0.75 * 0.775 + 3 * 0.25) / 1.5
    assert lay._batch_weight == pytest.approx(1 - (0.75 * 0.775 + 0.75) / 1.5)
    lay.slot_weight.fill_(0.9)  # every class known: as before
    lay(x)
    assert lay._batch_weight == pytest.approx(0.9)


def test_old_states_without_the_ema_load_with_the_ema_at_the_slots_marginal():
    lay = layer()
    with torch.no_grad():
        lay.slot_means.normal_()
    state = {k: v for k, v in lay.state_dict().items() if not k.startswith("ema_")}
    fresh = layer()
    fresh.load_state_dict(state)
    m, v = fresh.marginal(lay.slot_means, lay.slot_vars)
    assert torch.equal(fresh.ema_mean, m) and torch.equal(fresh.ema_var, v)


def test_ema_is_validated_and_reachable_from_a_spec():
    with pytest.raises(ValueError, match="ema"):
        layer(ema=1.5)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Flatten(),
                                torch.nn.LazyLinear(4))
    model(torch.randn(2, 1, 6, 6))
    ad = build_adapter("cb-stats(ema=0.2)", model.eval(), 4)
    assert [m.ema for m in ad.model.modules() if isinstance(m, ClassBalancedNorm)] == [0.2]
    ad = build_adapter("default", model.eval(), 4)
    assert [m.ema for m in ad.model.modules() if isinstance(m, ClassBalancedNorm)] == [0.05]


def test_an_old_state_missing_its_slots_is_reported_by_the_loader_not_a_key_error():
    state = {k: v for k, v in layer().state_dict().items() if k not in ("ema_mean", "ema_var", "slot_vars")}
    missing, _ = layer().load_state_dict(state, strict=False)  # a partial load stays a partial load
    assert set(missing) == {"slot_vars", "ema_mean", "ema_var"}
    with pytest.raises(RuntimeError, match="slot_vars"):
        layer().load_state_dict(state)
    with pytest.raises(RuntimeError, match="slot_means"):  # not an AttributeError from the EMA's start
        layer().load_state_dict({**state, "slot_means": [[0.0] * 3] * 4, "slot_vars": torch.ones(4, 3)})


@pytest.mark.parametrize("shape", [(16, 4), (16, 1, 6, 6)])
def test_a_batch_whose_statistics_overflow_float32_leaves_outputs_and_state_finite(shape):
    torch.manual_seed(0)
    if len(shape) == 2:
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    else:
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                  torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    ad = build_adapter("default", net.eval(), 3)
    for scale in (1e20, 1e30, 1.0, 1.0):  # the squares of 1e20 and 1e30 overflow float32
        out = ad.step(torch.randn(*shape) * scale)
        assert torch.isfinite(out.logits).all(), scale
    for name, buf in ad.model.named_buffers():
        assert not buf.is_floating_point() or torch.isfinite(buf).all(), name
