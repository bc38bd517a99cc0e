"""Composite adapters: spec parsing, filters, guards, gate, state round trips, model hygiene."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from streamtta.adapters import DEFAULT_SPEC, CompositeAdapter, SpecError, build_adapter, parse_spec
from streamtta.adapters.context import StepContext
from streamtta.adapters.filters import ConfidenceDropFilter, EntropyMarginFilter, RedundancyFilter
from streamtta.adapters.guards import LossEMAReset
from streamtta.adapters.norms import ClassBalancedNorm, UnMixTNS
from streamtta.adapters.objectives import EntropyObjective, WeightedEntropyObjective

NUM_CLASSES = 4


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(8, 12)
        self.bn1d = nn.BatchNorm1d(12)
        self.fc = nn.Linear(12, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        h = torch.relu(self.bn1d(self.fc1(self.pool(h).flatten(1))))
        return self.fc(h)


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    m = Net()
    m.train()
    with torch.no_grad():
        for _ in range(10):
            m(torch.rand(32, 1, 8, 8))
    return m.eval()


def batches(n: int, bs: int = 16, seed: int = 1, shift: float = 0.5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand((bs, 1, 8, 8), generator=g) * 0.5 + shift for _ in range(n)]


SPECS = [
    "source",
    "bn",
    "rbn",
    "unmix-tns",
    "cb-stats",
    "tent",
    "eata",
    "unmix-tns+tent+conf-drop+ema-source",
    "cb-stats+tent+conf-drop",
    "rbn+eata+sar-reset+periodic(every=3)",
]
if str(parse_spec(DEFAULT_SPEC)) not in {str(parse_spec(s)) for s in SPECS}:
    SPECS.append(DEFAULT_SPEC)


# ---------------------------------------------------------------------------------------------
# spec grammar
# ---------------------------------------------------------------------------------------------
def test_spec_canonical_forms():
    assert str(parse_spec("tent")) == "bn+tent"
    assert str(parse_spec("unmix")) == "unmix-tns"
    assert str(parse_spec("rotta-stats")) == "rbn"
    assert str(parse_spec("eata")) == "bn+eata-loss+ent-margin+redundancy"
    assert str(parse_spec("Unmix_TNS(K=8) + tent(lr=1e-4) + conf-drop")) == "unmix-tns(K=8)+tent(lr=0.0001)+conf-drop"
    assert str(parse_spec("eata(e_margin=1.5,d_margin=0.2)")) == (
        "bn+eata-loss(e_margin=1.5)+ent-margin(e_margin=1.5)+redundancy(d_margin=0.2)"
    )
    assert str(parse_spec("rdumb")) == "bn+eata-loss+ent-margin+redundancy+periodic(every=1000)"
    assert str(parse_spec("default")) == str(parse_spec(DEFAULT_SPEC))


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("bn+tnet", "did you mean 'tent'"),
        ("bn+rbn", "two norms"),
        ("tent+eata-loss", "two objectives"),
        ("bn+conf-drop", "needs an objective"),
        ("unmix-tns+ema-source", "needs an objective"),
        ("tent+tent", "appears twice"),
        ("unmix-tns(K=3", "unbalanced"),
        ("unmix-tns(Q=3)", "unknown argument 'Q'"),
        ("unmix-tns(K=2.5)", "should be a int"),
        ("unmix-tns(K)", "key=value"),
        ("bn++tent", "empty term"),
        ("", "non-empty"),
        ("conf-drop", "needs an objective"),
    ],
)
def test_spec_errors_are_clear(spec: str, fragment: str):
    with pytest.raises(SpecError, match=fragment.replace("(", r"\(").replace("'", "'")):
        parse_spec(spec)


def test_build_adapter_overrides(net):
    ad = build_adapter("unmix-tns(K=8)+tent(lr=1e-4)", net, NUM_CLASSES, K=3, lr=5e-4, e_margin=1.0)
    assert isinstance(ad, CompositeAdapter)
    assert all(m.K == 3 for m in ad.model.modules() if isinstance(m, UnMixTNS))  # override beats inline
    assert ad.optimizer.param_groups[0]["lr"] == 5e-4
    assert ad.ignored_overrides == ["e_margin"]
    with pytest.raises(SpecError, match="did you mean 'lr'"):
        build_adapter("tent", net, NUM_CLASSES, lR=1e-3)
    with pytest.raises(SpecError, match="should be a int"):
        build_adapter("unmix-tns", net, NUM_CLASSES, K="many")
    with pytest.raises(ValueError, match="num_classes"):
        build_adapter("bn", net, 1)


# ---------------------------------------------------------------------------------------------
# model hygiene, features, params
# ---------------------------------------------------------------------------------------------
def test_adapter_never_mutates_the_callers_model(net):
    before = copy.deepcopy(net.state_dict())
    types_before = [type(m) for m in net.modules()]
    for spec in SPECS:
        ad = build_adapter(spec, net, NUM_CLASSES)
        for x in batches(3):
            ad.step(x)
    assert [type(m) for m in net.modules()] == types_before
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not net.training


def test_features_are_the_input_of_the_last_linear_and_configurable(net):
    ad = build_adapter("bn", net, NUM_CLASSES)
    out = ad.step(batches(1)[0])
    assert out.features.shape == (16, 12) and ad.feature_layer == "fc"
    ad2 = build_adapter("bn", net, NUM_CLASSES, feature_layer="pool", feature_hook="output")
    assert ad2.step(batches(1)[0]).features.shape == (16, 8)
    with pytest.raises(ValueError, match="feature_layer='nope'"):
        build_adapter("bn", net, NUM_CLASSES, feature_layer="nope")


def test_parameters_to_adapt_are_norm_affine_params(net):
    ad = build_adapter("unmix-tns+tent", net, NUM_CLASSES)
    params = ad.parameters_to_adapt()
    assert len(params) == 6  # 3 norm layers x (weight, bias)
    assert all(p.requires_grad for p in params)
    frozen = [p for p in ad.model.parameters() if all(p is not q for q in params)]
    assert frozen and not any(p.requires_grad for p in frozen)


def test_source_spec_reproduces_the_model(net):
    ad = build_adapter("source", net, NUM_CLASSES)
    x = batches(1)[0]
    out = ad.step(x)
    with torch.no_grad():
        assert torch.allclose(out.logits, net(x), atol=1e-6)
    assert not out.update_mask.any()


# ---------------------------------------------------------------------------------------------
# filters (hand-made batches)
# ---------------------------------------------------------------------------------------------
def ctx_of(logits, source=None) -> StepContext:
    logits = torch.tensor(logits)
    src = None if source is None else (lambda: torch.tensor(source))
    return StepContext(x=torch.zeros(len(logits), 1), logits=logits, features=torch.zeros(len(logits), 1),
                       num_classes=logits.shape[1], source_fn=src)


def test_conf_drop_keeps_exactly_the_samples_whose_confidence_did_not_drop():
    source = [[2.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]
    adapted = [[3.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [3.0, 0.0, 0.0]]
    # sample 0: conf on class 0 rose -> keep; 1: fell -> drop; 2: equal -> keep; 3: class 2 collapsed -> drop
    mask = ConfidenceDropFilter()(ctx_of(adapted, source), torch.ones(4, dtype=torch.bool))
    assert mask.tolist() == [True, False, True, False]
    # AND-wise with the incoming mask
    mask = ConfidenceDropFilter()(ctx_of(adapted, source), torch.tensor([False, True, True, True]))
    assert mask.tolist() == [False, False, True, False]
    # margin
    mask = ConfidenceDropFilter(margin=0.05)(ctx_of(adapted, source), torch.ones(4, dtype=torch.bool))
    assert mask.tolist() == [True, False, False, False]


def test_entropy_margin_keeps_samples_below_e0():
    e0 = 0.4 * math.log(3)
    logits = [[10.0, 0.0, 0.0], [0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.5, 0.4, 0.0]]
    f = EntropyMarginFilter(num_classes=3)
    assert f.e_margin == pytest.approx(e0)
    ent = ctx_of(logits).entropy
    mask = f(ctx_of(logits), torch.ones(4, dtype=torch.bool))
    assert mask.tolist() == (ent < e0).tolist() == [True, False, False, False]


def test_redundancy_filter_state_and_selection():
    f = RedundancyFilter(d_margin=0.5, momentum=0.9)
    ones = torch.ones(2, dtype=torch.bool)
    assert f(ctx_of([[9.0, 0.0, 0.0], [9.0, 0.0, 0.0]]), ones).tolist() == [True, True]
    m1 = f.state_dict()["m"]
    assert torch.allclose(m1, torch.softmax(torch.tensor([9.0, 0.0, 0.0]), 0), atol=1e-6)
    mask = f(ctx_of([[9.0, 0.0, 0.0], [0.0, 9.0, 0.0]]), ones)
    assert mask.tolist() == [False, True]
    p_kept = torch.softmax(torch.tensor([0.0, 9.0, 0.0]), 0)
    assert torch.allclose(f.state_dict()["m"], 0.9 * m1 + 0.1 * p_kept, atol=1e-6)
    f.reset()
    assert f.state_dict()["m"] is None


def test_eata_objective_weights():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.3, 0.0, 0.0]])
    obj = WeightedEntropyObjective(num_classes=3)
    ctx = ctx_of(logits.tolist())
    h = ctx.entropy
    w = torch.exp(obj.e_margin - h)
    assert float(obj.loss(ctx, torch.tensor([True, True]))) == pytest.approx(float((w * h).mean()), rel=1e-6)
    assert float(EntropyObjective().loss(ctx, torch.tensor([False, True]))) == pytest.approx(float(h[1]), rel=1e-6)


def test_gate_and_filters_combine_and_gated_samples_never_update(net):
    ad = build_adapter("unmix-tns+tent+conf-drop", net, NUM_CLASSES)
    x = batches(1)[0]
    gate_mask = torch.tensor([i % 2 == 0 for i in range(16)])
    out = ad.step(x, gate=lambda logits, feats: gate_mask)
    assert not (out.update_mask & ~gate_mask).any()
    assert out.info["n_gated_out"] == 8
    # a gate that rejects everything: no update, no statistics change
    before = ad.state_dict()
    out = ad.step(batches(1, seed=7)[0], gate=lambda logits, feats: torch.zeros(16, dtype=torch.bool))
    assert not out.update_mask.any() and out.loss is None
    after = ad.state_dict()
    for k, v in before["model"].items():
        assert torch.equal(v, after["model"][k]), k
    with pytest.raises(ValueError, match="gate must return"):
        ad.step(x, gate=lambda logits, feats: torch.ones(3, dtype=torch.bool))


def test_gradient_free_specs_report_empty_update_mask(net):
    for spec in ("bn", "unmix-tns", "cb-stats", "rbn"):
        out = build_adapter(spec, net, NUM_CLASSES).step(batches(1)[0])
        assert out.update_mask.dtype == torch.bool and not out.update_mask.any() and out.loss is None


# ---------------------------------------------------------------------------------------------
# guards
# ---------------------------------------------------------------------------------------------
def test_periodic_reset_fires_and_restores_the_initial_state(net):
    ad = build_adapter("unmix-tns+tent(lr=1e-2)+periodic(every=3)", net, NUM_CLASSES)
    initial = ad.state_dict()
    outs = [ad.step(x) for x in batches(3)]
    assert [o.reset for o in outs] == [False, False, True]
    assert outs[-1].info["guard"] == "periodic"
    assert_state_equal(ad.state_dict(), initial)


def test_sar_reset_fires_when_entropy_ema_is_low(net):
    g = LossEMAReset(threshold=0.5, momentum=0.9)
    ctx = ctx_of([[9.0, 0.0, 0.0], [9.0, 0.0, 0.0]])
    assert g.after_step(None, ctx, torch.ones(2, dtype=torch.bool), updated=True) is True
    g2 = LossEMAReset(threshold=0.01)
    assert g2.after_step(None, ctx_of([[0.0, 0.0, 0.0]]), torch.ones(1, dtype=torch.bool), updated=True) is False
    assert g2.ema == pytest.approx(math.log(3), rel=1e-5)
    assert g2.after_step(None, ctx, torch.ones(2, dtype=torch.bool), updated=False) is False  # no update, no change
    ad = build_adapter("bn+tent+sar-reset(threshold=100)", net, NUM_CLASSES)
    out = ad.step(batches(1)[0])
    assert out.reset and out.info["guard"] == "sar-reset"


def test_ema_to_source_pulls_parameters_back(net):
    ad = build_adapter("bn+tent(lr=0.1)+ema-source(momentum=0.5)", net, NUM_CLASSES)
    plain = build_adapter("bn+tent(lr=0.1)", net, NUM_CLASSES)
    src = [p.detach().clone() for p in ad.parameters_to_adapt()]
    x = batches(1)[0]
    ad.step(x)
    plain.step(x)
    for p, q, s in zip(ad.parameters_to_adapt(), plain.parameters_to_adapt(), src):
        assert torch.allclose(p, 0.5 * q + 0.5 * s, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# state: reset, round trip, batch size 1, NaN safety
# ---------------------------------------------------------------------------------------------
def assert_state_equal(a, b, path="state"):
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_state_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            assert_state_equal(u, v, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.parametrize("spec", SPECS)
def test_reset_restores_a_bit_identical_state(net, spec):
    ad = build_adapter(spec, net, NUM_CLASSES)
    initial = ad.state_dict()
    for x in batches(4, shift=0.8):
        ad.step(x)
    ad.reset()
    assert_state_equal(ad.state_dict(), initial)


@pytest.mark.parametrize("spec", SPECS)
def test_state_dict_round_trip_continues_identically(net, spec):
    xs = batches(6, seed=3)
    a = build_adapter(spec, net, NUM_CLASSES)
    for x in xs[:3]:
        a.step(x)
    snap = a.state_dict()
    outs_a = [a.step(x) for x in xs[3:]]
    b = build_adapter(spec, net, NUM_CLASSES)
    b.load_state_dict(snap)
    outs_b = [b.step(x) for x in xs[3:]]
    for oa, ob in zip(outs_a, outs_b):
        assert torch.equal(oa.logits, ob.logits)
        assert torch.equal(oa.update_mask, ob.update_mask)
    assert_state_equal(a.state_dict(), b.state_dict())


def test_building_twice_gives_identical_adapters(net):
    a = build_adapter("unmix-tns", net, NUM_CLASSES, seed=5)
    b = build_adapter("unmix-tns", net, NUM_CLASSES, seed=5)
    c = build_adapter("unmix-tns", net, NUM_CLASSES, seed=6)
    assert_state_equal(a.state_dict(), b.state_dict())
    ma = next(m for m in a.model.modules() if isinstance(m, UnMixTNS)).component_means
    mc = next(m for m in c.model.modules() if isinstance(m, UnMixTNS)).component_means
    assert not torch.equal(ma, mc)


@pytest.mark.parametrize("spec", SPECS)
def test_batch_size_one_and_constant_inputs_stay_finite(net, spec):
    ad = build_adapter(spec, net, NUM_CLASSES)
    for x in [torch.rand(1, 1, 8, 8), torch.full((1, 1, 8, 8), 0.5), torch.zeros(5, 1, 8, 8),
              torch.full((5, 1, 8, 8), 7.0), torch.rand(1, 1, 8, 8)]:
        out = ad.step(x)
        assert torch.isfinite(out.logits).all(), spec
        assert out.logits.shape == (x.shape[0], NUM_CLASSES)
    for k, v in ad.state_dict()["model"].items():
        assert torch.isfinite(v).all(), f"{spec}: {k}"


def test_nan_input_never_poisons_the_state(net):
    ad = build_adapter(DEFAULT_SPEC, net, NUM_CLASSES)
    x = batches(1)[0].clone()
    x[3] = float("nan")
    ad.step(x)
    for k, v in ad.state_dict()["model"].items():
        assert torch.isfinite(v).all(), k
    assert torch.isfinite(ad.step(batches(1, seed=9)[0]).logits).all()


def test_features_call_does_not_adapt(net):
    ad = build_adapter(DEFAULT_SPEC, net, NUM_CLASSES)
    ad.step(batches(1)[0])
    before = ad.state_dict()
    logits, feats = ad.features(batches(1, seed=4)[0])
    assert logits.shape == (16, NUM_CLASSES) and feats.shape == (16, 12)
    assert_state_equal(ad.state_dict(), before)


def test_cb_stats_adapter_learns_class_slots_from_confident_labels_only(net):
    ad = build_adapter("cb-stats", net, NUM_CLASSES, label_confidence=0.0)
    for x in batches(5):
        ad.step(x)
    layer = next(m for m in ad.model.modules() if isinstance(m, ClassBalancedNorm))
    assert float(layer.slot_weight.sum()) > 0
    strict = build_adapter("cb-stats(label_confidence=0.999)", net, NUM_CLASSES)
    for x in batches(5):
        strict.step(x)
    layer = next(m for m in strict.model.modules() if isinstance(m, ClassBalancedNorm))
    assert float(layer.slot_weight.sum()) == 0.0  # this untrained net is never that confident


def test_default_spec_builds_and_adapts(net):
    ad = build_adapter(DEFAULT_SPEC, net, NUM_CLASSES)
    assert ad.spec == str(parse_spec(DEFAULT_SPEC)) == str(parse_spec("default"))
    outs = [ad.step(x) for x in batches(10, shift=0.9)]
    assert all(torch.isfinite(o.logits).all() for o in outs)
    # a shifted input distribution: the default must not stay the source model. (This shift moves the mean
    # about as far as it shrinks the variance, like a class subset would; without a class prior cb-stats'
    # imbalance veto then keeps the first layer from taking it for a new domain, and it follows it through
    # its EMA over a few batches instead of at once. Until the adapted predictions move away from the
    # source model's, source-fallback's agreement rule returns the source logits: 4 batches are too few.)
    with torch.no_grad():
        assert not torch.allclose(outs[-1].logits, net(batches(10, shift=0.9)[-1]), atol=1e-3)


@pytest.mark.parametrize("spec", ["bn", "rbn", "unmix-tns+tent(lr=0.05)", "cb-stats", "source"])
def test_exact_source_forward_is_the_callers_model_after_adaptation(net, spec):
    ad = build_adapter(spec, net, NUM_CLASSES)
    for x in batches(3, shift=0.9):
        ad.step(x)
    x = batches(1, seed=11)[0]
    with torch.no_grad():
        assert torch.allclose(ad._exact_source_forward(x), net(x), atol=1e-5)


def test_source_fallback_returns_source_logits_only_when_models_agree(net):
    x = batches(1, shift=0.9)[0]
    with torch.no_grad():
        src = net(x)
    always = build_adapter("bn+source-fallback(agreement=1e-6)", net, NUM_CLASSES)
    out = always.step(x)
    assert out.info["source-fallback"] is True and torch.allclose(out.logits, src, atol=1e-5)
    plain = build_adapter("bn", net, NUM_CLASSES).step(x)
    strict = build_adapter("bn+source-fallback(agreement=1.0)", net, NUM_CLASSES).step(x)
    agree = float((plain.logits.argmax(1) == src.argmax(1)).float().mean())
    assert strict.info["source-fallback"] is (agree >= 1.0)
    if agree < 1.0:
        assert torch.equal(strict.logits, plain.logits)
    assert torch.equal(strict.features, plain.features)  # features always come from the adapted model


def test_source_fallback_mixed_batch_gives_source_like_samples_the_source_prediction(net):
    from streamtta.adapters.guards import SourceFallback

    torch.manual_seed(0)
    ad = build_adapter("bn+source-fallback(agreement=1.0)", net, NUM_CLASSES)
    guard = next(g for g in ad.guards if isinstance(g, SourceFallback))
    assert not guard.needs_distance  # no reference yet: the mixed-batch rule is off
    ref = ad.calibrate_guards(torch.rand(300, 1, 8, 8))  # the source domain of `net`
    assert ref is not None and ref > 0 and guard.reference == ref
    x = torch.cat([torch.rand(8, 1, 8, 8), torch.rand(8, 1, 8, 8) * 0.05 + 8.0])  # half source-like, half far
    _, dist = ad._source_forward_with_distance(x)
    near = dist <= ref
    assert int(near[:8].sum()) >= 6 and not bool(near[8:].any()) and bool((dist[8:] > 5 * ref).all())
    with torch.no_grad():
        src = net(x)
    plain = build_adapter("bn", net, NUM_CLASSES).step(x)
    out = ad.step(x)
    assert out.info["source-fallback"] is False  # the batch rule did not fire: the models disagree
    assert out.info["source-fallback_near"] == int(near.sum())
    assert torch.allclose(out.logits[near], src[near], atol=1e-5)
    assert torch.equal(out.logits[~near], plain.logits[~near])
    # a batch without far samples is left alone; the reference survives reset() and state round trips
    clean = ad.step(torch.rand(16, 1, 8, 8))
    assert clean.info["source-fallback_near"] == 0
    ad.reset()
    assert guard.reference == ref
    other = build_adapter("bn+source-fallback(agreement=1.0)", net, NUM_CLASSES)
    other.load_state_dict(ad.state_dict())
    assert next(g for g in other.guards if isinstance(g, SourceFallback)).reference == ref
    off = build_adapter("bn+source-fallback(agreement=1.0,mixed=false)", net, NUM_CLASSES)
    assert off.calibrate_guards(torch.rand(50, 1, 8, 8)) is None


def test_source_fallback_stale_statistics_give_source_like_samples_the_source_prediction(net):
    """RBN's slow statistics still describe a far domain when source-like batches come back: the
    samples they do not fit get the source model's prediction; once they fit again, they do not."""
    torch.manual_seed(0)
    ad = build_adapter("rbn+source-fallback(agreement=1.0)", net, NUM_CLASSES)
    ref = ad.calibrate_guards(torch.rand(300, 1, 8, 8))
    for _ in range(30):
        ad.step(torch.rand(16, 1, 8, 8) * 0.05 + 8.0)  # a long far domain
    x = torch.rand(16, 1, 8, 8)  # back to the source domain, no far sample in the batch
    _, dist = ad._source_forward_with_distance(x)
    out = ad.step(x)
    with torch.no_grad():
        src = net(x)
    near = dist <= ref
    assert out.info["source-fallback"] is False and out.info["source-fallback_near"] == int(near.sum()) > 0
    assert torch.allclose(out.logits[near], src[near], atol=1e-5)
    fresh = build_adapter("rbn+source-fallback(agreement=1.0)", net, NUM_CLASSES)
    fresh.calibrate_guards(torch.rand(300, 1, 8, 8))
    assert fresh.step(torch.rand(16, 1, 8, 8)).info["source-fallback_near"] == 0  # statistics fit: adapted


def test_fit_distance_recovers_the_statistics_a_layer_used():
    from streamtta.adapters.guards.source_fallback import fit_distance, source_distance

    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([0.25, 4.0, 1.0]))
        bn.weight.copy_(torch.tensor([2.0, -0.5, 1.5]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    x = torch.randn(8, 3, 6, 6) * 3.0
    with torch.no_grad():
        y = bn(x)
    assert torch.allclose(fit_distance(y, bn.weight, bn.bias), source_distance(x, bn.running_mean, bn.running_var),
                          rtol=1e-4, atol=1e-5)


def test_source_distance_is_small_for_matching_statistics():
    from streamtta.adapters.guards.source_fallback import source_distance

    g = torch.Generator().manual_seed(0)
    x = torch.randn((32, 3, 16, 16), generator=g) * 2.0 + 1.0
    mean, var = torch.full((3,), 1.0), torch.full((3,), 4.0)
    d_same = source_distance(x, mean, var)
    d_low_contrast = source_distance(x * 0.2, mean, var)
    assert d_same.shape == (32,) and float(d_same.max()) < 0.05 < float(d_low_contrast.min())
    flat = source_distance(torch.zeros(4, 3), mean, var)  # (B, C): half the mean squared z-score
    assert torch.allclose(flat, torch.full((4,), 0.125))


def test_model_without_linear_reports_logits_as_features():
    torch.manual_seed(0)
    conv_net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    ad = build_adapter("bn", conv_net, 4)
    out = ad.step(torch.rand(6, 1, 8, 8))
    assert ad.feature_layer is None and torch.equal(out.features, out.logits)


def _import_graph(*packages: str) -> dict[str, set[str]]:
    """Module -> modules it imports (every import statement, also inside functions) within ``packages``."""
    import ast
    from pathlib import Path

    import streamtta

    root = Path(streamtta.__file__).parent.parent
    files = {}
    for pkg in packages:
        for f in (root / pkg.replace(".", "/")).rglob("*.py"):
            parts = f.relative_to(root).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, f in files.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                         for a in node.names]
            else:
                continue
            for name in names:
                while name not in files and "." in name:
                    name = name.rsplit(".", 1)[0]
                if name in files and name != mod:
                    graph[mod].add(name)
    return graph


def test_adapters_and_models_have_no_import_cycle():
    graph = _import_graph("streamtta.adapters", "streamtta.models")
    assert "streamtta.adapters.guards.base" in graph and len(graph) > 30
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for dep in sorted(graph[mod]):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join(path[path.index(dep):] + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
