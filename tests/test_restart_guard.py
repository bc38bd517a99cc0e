"""The meta restart's keep rule rejects a confidently wrong restart: lower entropy and predictions still
spread over the classes (the entropy proxies approve it), but other classes than the source copy's."""
import copy

import pytest
import torch
from torch import nn

from meta_helpers import toy_data

from streamtta.readapt import ReAdapter
from streamtta.readapt.restart import got_worse, source_predictions, with_agreement


class LogitNormAdapter:
    """A linear classifier whose logits pass through a BatchNorm1d: its affine parameters scale (and can
    flip) each class logit. ``_source_forward`` is the frozen source copy, as on CompositeAdapter."""

    def __init__(self, model, with_source=True):
        self.model = model
        if with_source:
            source = copy.deepcopy(model)
            self._source_forward = lambda x: source(x)

    def parameters_to_adapt(self):
        return [self.model[2].weight, self.model[2].bias]

    @torch.no_grad()
    def features(self, x):
        f = self.model[:2](x)
        return self.model[2](f), f


def source_net():
    torch.manual_seed(0)
    x, y = toy_data(96, seed=1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 3), nn.BatchNorm1d(3, affine=True))
    net[2].eval()  # running statistics stay mean 0, variance 1: the norm is its affine map
    opt = torch.optim.Adam(net[1].parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


def restart_once(adapter, x, **kwargs):
    # the meta-initialisation flips every class logit, scaled up, and shifts them so that the predictions
    # stay spread over the three classes: confidently wrong on every input
    init = {"2.weight": torch.full((3,), -6.0), "2.bias": torch.tensor([0.0, -4.0, 16.0])}
    ra = ReAdapter(init, steps=0, restart=True, **kwargs)
    for b in range(4):
        ra.observe(x[16 * b:16 * (b + 1)], batch_index=b)
    return ra.on_shift(adapter)


def test_a_confidently_wrong_restart_is_rolled_back():
    net = source_net()
    x, y = toy_data(64)
    assert float((net(x).argmax(1) == y).float().mean()) > 0.9
    with torch.no_grad():  # the adapted model before the shift: right, but less sure
        net[2].weight.fill_(0.1)
    before = [p.detach().clone() for p in net[2].parameters()]
    res = restart_once(LogitNormAdapter(net), x)
    pb, pa = res["proxies_before"], res["proxies_after"]
    # what the entropy proxies see: more confident, histogram not collapsed ...
    assert pa["mean_entropy"] < pb["mean_entropy"] and pa["hist_entropy"] > pb["hist_entropy"] - 0.05
    # ... what they miss: the restart no longer agrees with the source copy
    assert pb["source_agreement"] > 0.9 and pa["source_agreement"] < 0.1
    assert res["action"] == "rolled_back"
    for p, q in zip(net[2].parameters(), before):
        assert torch.equal(p, q)


def test_the_agreement_check_can_be_turned_off_and_needs_a_source_copy():
    x, _ = toy_data(64)
    for kwargs, with_source in (({"agreement_tolerance": None}, True), ({}, False)):
        net = source_net()
        with torch.no_grad():
            net[2].weight.fill_(0.1)
        res = restart_once(LogitNormAdapter(net, with_source=with_source), x, **kwargs)
        assert res["action"] == "readapted"  # the entropy proxies alone keep the wrong restart
        assert torch.all(net[2].weight < 0)
    assert "source_agreement" not in res["proxies_before"]


def test_got_worse_compares_source_agreement():
    before = {"mean_entropy": 0.40, "hist_entropy": 0.98, "source_agreement": 0.95}
    wrong = {"mean_entropy": 0.30, "hist_entropy": 0.97, "source_agreement": 0.90}
    better = {"mean_entropy": 0.30, "hist_entropy": 0.97, "source_agreement": 0.96}
    rule = dict(entropy_tolerance=0.0, hist_tolerance=0.05)
    assert got_worse(before, wrong, **rule)
    assert not got_worse(before, wrong, **rule, agreement_tolerance=0.1)
    assert not got_worse(before, better, **rule)
    no_ref = {k: v for k, v in wrong.items() if k != "source_agreement"}
    assert not got_worse(before, no_ref, **rule)  # only compared when both sides have it


def test_source_predictions_and_agreement():
    net = source_net()
    x, _ = toy_data(20)
    ref = source_predictions(LogitNormAdapter(net), x, batch_size=8)
    assert ref.shape == (20,) and torch.equal(ref, net(x).argmax(1))
    assert source_predictions(LogitNormAdapter(net, with_source=False), x, 8) is None
    logits = net(x).detach()
    assert with_agreement({}, logits, ref) == {"source_agreement": 1.0}
    assert with_agreement({}, -logits, ref)["source_agreement"] < 0.5
    assert with_agreement({"a": 1.0}, logits, None) == {"a": 1.0}


def test_an_agreement_tolerance_outside_0_1_is_refused():
    """A negative tolerance would roll back every restart, NaN would silently turn the check off."""
    for bad in (-0.1, float("nan"), 1.5):
        with pytest.raises(ValueError, match="agreement_tolerance"):
            ReAdapter({}, agreement_tolerance=bad)
    for ok in (None, 0.0, 1.0):
        ReAdapter({}, agreement_tolerance=ok)
