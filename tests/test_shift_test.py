"""cb-stats' new-domain test and its imbalance veto (streamtta/adapters/norms/shift_test.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from streamtta.adapters.norms import ClassBalancedNorm
from streamtta.adapters.norms.base import instance_stats, pooled_stats
from streamtta.adapters.norms.shift_test import imbalance_signature, shift_detected

C, F = 4, 8


def separated_classes(n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of ``C`` classes whose means lie 2 within-class std apart (as in an MLP's hidden layer)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(C, F, generator=g) * 2.0
    y = torch.arange(n) % C
    return centres[y] + torch.randn(n, F, generator=g), y


def no_structure(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots without a class structure: every slot at the marginal statistics of ``x``."""
    return x.mean(0).expand(C, F).clone(), x.var(0, unbiased=False).expand(C, F).clone()


def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(0), x.var(0, unbiased=False)


def test_the_signature_of_a_class_subset_balances_mean_shift_and_variance_deficit():
    x, y = separated_classes()
    mS, vS = stats(x)
    s_d = [imbalance_signature(*stats(x[y == c]), mS, vS)[:2] for c in range(C)]
    s_avg, d_avg = np.mean([s for s, _ in s_d]), np.mean([d for _, d in s_d])
    assert s_avg == pytest.approx(d_avg, rel=0.15)  # both are the between-class share of the variance
    assert d_avg > 0.5  # well separated classes: most of the variance is between classes
    # a shift of the whole domain moves the mean only
    s, d, g = imbalance_signature(*stats(x + 1.5 * vS.sqrt()), mS, vS)
    assert s > 2 and d == 0 and g < 0.01


def test_one_class_batches_are_new_domains_only_without_the_veto():
    x, y = separated_classes()
    slots = no_structure(x)
    for c in range(C):
        batch = stats(x[y == c][:64])
        assert shift_detected(*batch, *slots)  # the distance test alone: "new domain"
        assert not shift_detected(*batch, *slots, imbalance_ratio=3.0)


@pytest.mark.parametrize("shift", ["offset", "contrast", "noise"])
def test_domain_shifts_of_a_balanced_batch_still_fire_with_the_veto(shift):
    x, _ = separated_classes()
    slots = no_structure(x)
    mS, vS = stats(x)
    g = torch.Generator().manual_seed(1)
    moved = {
        "offset": x + 1.0 * vS.sqrt(),                                  # mean moves, variance kept
        "contrast": mS + 0.3 * (x - mS),                               # variance shrinks, mean kept
        "noise": x + 1.5 * vS.sqrt() * torch.randn(x.shape, generator=g),  # variance grows
    }[shift][:64]
    assert shift_detected(*stats(moved), *slots, imbalance_ratio=3.0)


def layer(**kw) -> ClassBalancedNorm:
    x, _ = separated_classes()
    m, v = stats(x)
    out = ClassBalancedNorm(F, num_classes=C, source_mean=m, source_var=v, **kw)
    out.stats_mode = "deferred"
    return out


def test_the_layer_vetoes_only_while_its_class_structure_is_unknown():
    x, y = separated_classes()
    one_class = x[y == 2][:64]
    lay = layer()
    assert lay.structure_unknown()
    assert not lay._test_shift(*instance_stats(one_class))
    assert layer(imbalance_ratio=0.0)._test_shift(*instance_stats(one_class))  # 0: the distance test alone
    lay.slot_weight.fill_(0.5)  # e.g. a class prior (prior_weight 0.5): the distance test decides, informed
    assert not lay.structure_unknown()
    assert lay._test_shift(*instance_stats(one_class)) == shift_detected(
        *pooled_stats(*instance_stats(one_class)), lay.slot_means, lay.slot_vars)
    for bad in (-1.0, float("nan")):  # NaN would switch the veto off silently
        with pytest.raises(ValueError, match="imbalance_ratio"):
            layer(imbalance_ratio=bad)


@pytest.mark.parametrize("ratio, part", [(3.0, 0.5), (0.0, 1.0)])
def test_a_new_domain_restarts_the_ema_half_as_far_without_a_class_structure(ratio, part):
    x, _ = separated_classes()
    batch = x[:64] + 3.0
    lay = layer(imbalance_ratio=ratio, ema=0.05)
    before = lay.ema_mean.clone()
    lay.class_mix = torch.full((C,), 1.0 / C)
    lay(batch)
    trust = lay._batch_weight
    lay.new_domain = True
    lay.commit(labels=torch.zeros(64, dtype=torch.long))
    a = 0.05 + 0.95 * trust * part
    torch.testing.assert_close(lay.ema_mean, before + a * (pooled_stats(*instance_stats(batch))[0] - before))


def test_unfitted_default_keeps_the_source_accuracy_on_a_class_sorted_sensor_stream():
    """Real data (river's ImageSegments through segment-mlp, tuning scenario sensor-sev3-sorted): without the
    veto the unfitted default took every one-class batch for a new domain and fell far below the source."""
    from streamtta.adaptbench import render, run_spec
    from streamtta.models.registry import load_model
    from streamtta.simulations.scenario import find_scenario

    torch.set_num_threads(1)
    sc = find_scenario("sensor-sev3-sorted")
    model, meta = load_model(sc.model)
    x, y, cuts = render(sc)
    kw = dict(fit=False, batch_size=sc.batch_size, reset_each_domain=True)
    source = run_spec("source", model, meta, x, y, cuts, **kw)
    veto = run_spec("cb-stats+source-fallback", model, meta, x, y, cuts, **kw)
    off = run_spec("cb-stats(imbalance_ratio=0)+source-fallback", model, meta, x, y, cuts, **kw)
    assert veto >= source - 3.0, (veto, source)
    assert off < source - 20.0, (off, source)  # what the veto fixes


def test_a_first_batch_of_a_few_classes_does_not_make_the_class_structure_known():
    """Establishment counts by coverage: two of four slots learned (mean W 0.45) keep the structure unknown, so a
    one-class batch of a third class is still vetoed; the same W on every slot (a class prior) makes it known."""
    x, y = separated_classes()
    lay = layer()
    for c in (0, 1):
        lay.slot_means[c], lay.slot_vars[c] = stats(x[y == c])
    lay.slot_weight.copy_(torch.tensor([0.9, 0.9, 0.0, 0.0]))
    assert float(lay.slot_weight.mean()) >= 0.25  # the plain mean would call it known
    assert lay.structure_unknown()
    assert not lay._test_shift(*instance_stats(x[y == 2][:64]))
    lay.slot_weight.fill_(0.45)
    assert not lay.structure_unknown()


def test_unfitted_default_stays_above_the_source_on_a_dirichlet_sensor_stream():
    """Real data (tuning scenario sensor-sev3-noniid, stream seed 1): with establishment counted by its plain mean,
    a domain's first batches of a few classes made the structure "known", the veto went off, and one-class
    batches were taken for new domains and normalised with their own statistics: the unfitted default fell 8
    points below the source model."""
    from streamtta.adaptbench import render, run_spec
    from streamtta.models.registry import load_model
    from streamtta.simulations.scenario import find_scenario

    torch.set_num_threads(1)
    sc = find_scenario("sensor-sev3-noniid")
    model, meta = load_model(sc.model)
    x, y, cuts = render(sc, seed=1)
    kw = dict(fit=False, batch_size=sc.batch_size, reset_each_domain=True)
    source = run_spec("source", model, meta, x, y, cuts, **kw)
    default = run_spec("default", model, meta, x, y, cuts, **kw)
    assert default > source, (default, source)
