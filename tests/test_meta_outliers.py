"""Meta-training's query loss with ``outlier_fraction``: the cross-entropy is computed on the query's
own test-batch statistics, and the outliers are a minority share of the out-energy batch."""
import pytest
import torch

from meta_helpers import tiny_net, toy_data

from streamtta.readapt import meta_train, shuffled_outliers
from streamtta.readapt.meta_train import ShiftTask, query_loss
from streamtta.readapt.params import batch_stat_norms


def _task(outliers):
    x, y = toy_data(16)
    return ShiftTask("noise", 1, x, x, y, outliers)


def _two_outlier_sets():
    x, _ = toy_data(16)
    a = shuffled_outliers(x, torch.Generator().manual_seed(0))
    b = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) * 3.0  # other intensity statistics
    return a, b


def _ce(net, outliers, fraction):
    with torch.no_grad(), batch_stat_norms(net):
        return query_loss(net, _task(outliers), 0.0, 5.0, 0.1, outlier_fraction=fraction)[1]


def test_cross_entropy_does_not_depend_on_the_outliers_with_a_fraction():
    net = tiny_net()
    a, b = _two_outlier_sets()
    assert _ce(net, a, 0.2) == pytest.approx(_ce(net, b, 0.2), abs=1e-7)
    # the joint forward (None) lets the outliers shift the query's batch statistics, hence its cross-entropy
    assert abs(_ce(net, a, None) - _ce(net, b, None)) > 1e-4


def test_outliers_are_the_requested_share_of_the_out_energy_batch():
    net = tiny_net()
    sizes = []
    hook = net[1].register_forward_pre_hook(lambda m, inp: sizes.append(len(inp[0])))
    a, _ = _two_outlier_sets()
    with torch.no_grad(), batch_stat_norms(net):
        query_loss(net, _task(a), 0.0, 5.0, 0.1, outlier_fraction=0.2)
        query_loss(net, _task(a), 0.0, 5.0, 0.1, outlier_fraction=None)
    hook.remove()
    assert sizes == [16, 16 + 4, 32]  # 4 of 20 = 0.2; the joint batch is half outliers


def test_outlier_fraction_outside_0_1_is_refused():
    x, y = toy_data(16)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="outlier_fraction"):
            meta_train(tiny_net(), None, x, y, steps=1, outlier_fraction=bad, progress=False)
