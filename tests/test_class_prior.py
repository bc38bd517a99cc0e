"""cb-stats class prior: slots start from the source data's class statistics (fit_class_prior)."""
import numpy as np
import pytest
import torch
from torch import nn

from streamtta.adapters import build_adapter
from streamtta.adapters.norms import ClassBalancedNorm
from streamtta.adapters.norms.base import instance_stats


def toy():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 3)).eval()
    x = torch.rand(30, 1, 6, 6)
    y = torch.arange(30) % 3
    y[:2] = -1  # unlabelled samples are ignored
    return net, x, y


def test_prior_equals_class_conditional_stats_of_the_source_model_input():
    net, x, y = toy()
    ad = build_adapter("cb-stats(prior_weight=0.25)", net, num_classes=3)
    prior = ad.fit_class_prior(x, y)
    with torch.no_grad():
        mean_i, var_i = instance_stats(net[0](x))  # the BN input of the untouched source model
    layer = next(m for m in ad.model.modules() if isinstance(m, ClassBalancedNorm))
    for c in range(3):
        sel = y == c
        torch.testing.assert_close(layer.slot_means[c], mean_i[sel].mean(0))
        torch.testing.assert_close(layer.slot_vars[c], var_i[sel].mean(0) + mean_i[sel].var(0, unbiased=False))
    assert layer.slot_weight.tolist() == [0.25] * 3
    # part of the initial state: a reset returns to the prior, not to the empty slots
    ad.step(torch.rand(8, 1, 6, 6) * 3)
    assert not torch.equal(layer.slot_means, prior[0][0])
    ad.reset()
    assert torch.equal(layer.slot_means, prior[0][0]) and layer.slot_weight.tolist() == [0.25] * 3
    # another adapter of the same model takes the prior without a data pass
    other = build_adapter("cb-stats", net, num_classes=3)
    other.set_class_prior(prior)
    assert torch.equal(next(m for m in other.model.modules() if isinstance(m, ClassBalancedNorm)).slot_vars,
                       prior[0][1])


def test_prior_errors_and_adapters_without_cb_stats():
    net, x, y = toy()
    assert build_adapter("bn", net, num_classes=3).fit_class_prior(x, y) == []
    ad = build_adapter("cb-stats", net, num_classes=3)
    with pytest.raises(ValueError, match="labels"):
        ad.fit_class_prior(x, y[:5])
    with pytest.raises(ValueError, match="prior has 0 layers"):
        ad.set_class_prior([])
    with pytest.raises(ValueError, match="prior_weight"):
        build_adapter("cb-stats(prior_weight=2)", net, num_classes=3)


def test_prior_fixes_one_class_batches_on_real_digits():
    """Class-sorted batches of clean held-out digits: with the source class prior cb-stats keeps the
    source model's accuracy; without it one-class batches are partly mis-normalised (with BN-adapt and
    without the EMA fallback, mostly)."""
    from streamtta.models.data import load_source_train, source_holdout
    from streamtta.models.registry import load_model

    torch.manual_seed(0)
    model, meta = load_model("digits-resnet")
    index = {c: i for i, c in enumerate(meta.classes)}
    x, y = load_source_train(meta)
    xh, yh = source_holdout(meta)
    xh, yh = torch.as_tensor(np.asarray(xh), dtype=torch.float32), np.asarray(yh)

    def sorted_accuracy(spec, prior):
        ad = build_adapter(spec, model, len(index))
        if prior:
            ad.fit_class_prior(torch.as_tensor(np.asarray(x), dtype=torch.float32),
                               torch.as_tensor([index.get(int(v), -1) for v in np.asarray(y)]))
        hits = []
        for c in meta.classes:
            out = ad.step(xh[yh == c][:32])
            hits.append(float((out.logits.argmax(1) == index[c]).float().mean()))
        return float(np.mean(hits))

    with_prior = sorted_accuracy("cb-stats", True)
    assert with_prior > 0.95
    # without the prior the EMA fallback (ema, default 0.05) recovers part of it; without either, little
    no_prior, neither = sorted_accuracy("cb-stats", False), sorted_accuracy("cb-stats(ema=0)", False)
    print(f"sorted clean digits: prior {with_prior:.3f}, EMA only {no_prior:.3f}, neither {neither:.3f}")
    assert with_prior > no_prior + 0.05 and no_prior > neither + 0.05
    assert with_prior > neither + 0.2
    assert with_prior > sorted_accuracy("bn", False) + 0.5


def test_pipeline_blueprint_gives_new_adapters_the_prior():
    from streamtta.config import Config
    from streamtta.runner import build_pipeline
    from streamtta.models.registry import load_model

    model, meta = load_model("digits-resnet")
    cfg = Config()
    cfg.model.source = "digits-resnet"
    comps = build_pipeline(cfg, model, meta).blueprint
    a, b = comps.new_adapter(), comps.new_adapter()
    la = [m for m in a.model.modules() if isinstance(m, ClassBalancedNorm)]
    lb = [m for m in b.model.modules() if isinstance(m, ClassBalancedNorm)]
    assert la and all(float(m.slot_weight.min()) == m.prior_weight for m in la)
    assert all(torch.equal(p.slot_means, q.slot_means) for p, q in zip(la, lb))
    cfg.adapter.class_prior = False
    plain = build_pipeline(cfg, model, meta).blueprint.new_adapter()
    assert all(float(m.slot_weight.max()) == 0.0 for m in plain.model.modules() if isinstance(m, ClassBalancedNorm))


def test_balance_shrink_takes_nearly_uniform_mixes_as_uniform():
    from streamtta.adapters.composite import balance_shrunk_mix

    near = torch.tensor([0.15, 0.1, 0.125, 0.125, 0.125, 0.125, 0.125, 0.125])
    assert torch.allclose(balance_shrunk_mix(near), torch.full((8,), 0.125))
    one = torch.zeros(8)
    one[3] = 1.0
    assert torch.equal(balance_shrunk_mix(one), one)
    half = torch.tensor([0.5, 0.5, 0, 0, 0, 0, 0, 0])  # tv = 0.75 >= 0.6: kept as estimated
    assert torch.equal(balance_shrunk_mix(half), half)
    mid = torch.tensor([0.45, 0.45, 0.1 / 6, 0.1 / 6, 0.1 / 6, 0.1 / 6, 0.1 / 6, 0.1 / 6])  # tv = 0.575
    out = balance_shrunk_mix(mid)
    assert float(out.sum()) == pytest.approx(1.0) and 0.125 < float(out[0]) < 0.45
    net, _, _ = toy()
    assert build_adapter("cb-stats", net, num_classes=3).balanced_tv == 0.3
    ad = build_adapter("cb-stats(balanced_tv=0.1,imbalanced_tv=0.2)", net, num_classes=3)
    assert (ad.balanced_tv, ad.imbalanced_tv) == (0.1, 0.2)
    assert build_adapter("cb-stats(balanced_tv=0.2)", net, num_classes=3).imbalanced_tv == pytest.approx(0.5)
    with pytest.raises(ValueError, match="balanced_tv"):
        build_adapter("cb-stats(balanced_tv=0.5,imbalanced_tv=0.2)", net, num_classes=3)


def test_fit_source_takes_prior_and_guard_reference_from_one_pass():
    net, x, y = toy()
    both = build_adapter("cb-stats+source-fallback", net, num_classes=3)
    calls = []
    inner = both._exact_source_forward
    both._exact_source_forward = lambda b: calls.append(len(b)) or inner(b)
    prior, reference = both.fit_source(x, y, batch_size=16)
    assert calls == [16, 14]  # one pass over the 30 samples
    apart = build_adapter("cb-stats+source-fallback", net, num_classes=3)
    apart_prior = apart.fit_class_prior(x, y, batch_size=16)
    assert reference == apart.calibrate_guards(x, batch_size=16) and reference > 0
    for (m1, v1), (m2, v2) in zip(prior, apart_prior):
        assert torch.equal(m1, m2) and torch.equal(v1, v2)
    assert both.fit_source(x, None) == ([], reference)  # no labels: the guard reference alone
    assert build_adapter("source", net, num_classes=3).fit_source(x, y) == ([], None)


def test_unlabelled_source_data_give_the_prior_of_the_source_models_own_predictions():
    net, x, _ = toy()
    with torch.no_grad():
        predicted = net(x).argmax(1)
    ad = build_adapter("cb-stats+source-fallback", net, num_classes=3)
    calls = []
    inner = ad._exact_source_forward
    ad._exact_source_forward = lambda b: calls.append(len(b)) or inner(b)
    prior, reference = ad.fit_source(x, "predicted", batch_size=16)
    assert calls == [16, 14]  # the labels come from the same pass
    labelled = build_adapter("cb-stats+source-fallback", net, num_classes=3)
    want, want_ref = labelled.fit_source(x, predicted, batch_size=16)
    assert reference == want_ref and len(prior) == len(want) == 1
    for (m1, v1), (m2, v2) in zip(prior, want):
        assert torch.equal(m1, m2) and torch.equal(v1, v2)
    assert build_adapter("bn", net, num_classes=3).fit_source(x, "predicted") == ([], None)
    with pytest.raises(ValueError, match="'predicted'"):
        ad.fit_source(x, "guess")


def test_pipeline_fit_source_without_labels_starts_from_the_predicted_prior():
    """A user with clean but unlabelled source data (``pipe.fit_source(x)``) still gets a class prior."""
    from streamtta import Pipeline

    net, x, _ = toy()
    x = torch.cat([x] * 2)
    pipe = Pipeline(net, num_classes=3).fit_source(x.numpy())
    layers = [m for m in pipe.blueprint.new_adapter().model.modules() if isinstance(m, ClassBalancedNorm)]
    assert layers and all(float(m.slot_weight.min()) == m.prior_weight for m in layers)
    # the prior is the one of the predictions on the source data the blueprint kept (the hold-out is set aside)
    kept = torch.as_tensor(pipe.blueprint._train[0])
    ref = build_adapter("cb-stats", net, num_classes=3)
    with torch.no_grad():
        ref.fit_source(kept, net(kept).argmax(1))
    want = next(m for m in ref.model.modules() if isinstance(m, ClassBalancedNorm))
    torch.testing.assert_close(layers[0].slot_means, want.slot_means)
    off = Pipeline(net, num_classes=3)
    off.blueprint.cfg.adapter.class_prior = False
    off.fit_source(x.numpy())
    assert all(float(m.slot_weight.max()) == 0.0
               for m in off.blueprint.new_adapter().model.modules() if isinstance(m, ClassBalancedNorm))


def test_predicted_prior_refuses_outputs_that_are_not_the_classes_logits():
    """Review: a tuple-returning model crashed with AttributeError, and with num_classes below the logits' width
    the predictions of the other classes were dropped silently; both now say what the model must return."""
    net, x, _ = toy()

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x), x

    with pytest.raises(ValueError, match=r"\(B, 3\) logits, got tuple"):
        build_adapter("cb-stats", Pair().eval(), num_classes=3).fit_source(x, "predicted")
    with pytest.raises(ValueError, match=r"\(B, 2\) logits, got \(16, 3\)"):
        build_adapter("cb-stats", net, num_classes=2).fit_source(x, "predicted", batch_size=16)
    # a model that predicts some classes only: the others (fewer than two votes) keep the source statistics
    with torch.no_grad():
        net[-1].bias.copy_(torch.tensor([0.0, -1e4, 1e4]))  # every sample votes for class 2
    ad = build_adapter("cb-stats", net, num_classes=3)
    (means, variances), = ad.fit_source(x, "predicted")[0]
    layer = next(m for m in ad.model.modules() if isinstance(m, ClassBalancedNorm))
    assert torch.isfinite(means).all() and torch.isfinite(variances).all()
    assert torch.equal(means[0], layer.source_mean) and torch.equal(means[1], layer.source_mean)
    assert not torch.equal(means[2], layer.source_mean)
