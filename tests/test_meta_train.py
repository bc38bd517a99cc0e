"""Meta-training (readapt.meta_train): tasks, inner loop, outer update, and the meta-init files."""
import pytest
import torch

from meta_helpers import noise, tiny_net, toy_data

from streamtta.readapt import (
    adaptable_parameter_names,
    load_meta_init,
    meta_init_path,
    meta_train,
    save_meta_init,
    shuffled_outliers,
)
from streamtta.readapt.meta_train import TaskSampler, inner_adapt
from streamtta.readapt.params import _logits, batch_stat_norms, entropy


def test_meta_train_changes_adaptable_params_only():
    net = tiny_net()
    x, y = toy_data()
    src = {k: v.clone() for k, v in net.state_dict().items()}
    init = meta_train(net, {"num_classes": 3}, x, y, steps=4, support_size=16, query_size=16, families=["noise"],
                      corrupt_fn=noise, progress=False, outer_lr=1e-2)
    assert sorted(init) == sorted(adaptable_parameter_names(net)) == ["1.bias", "1.weight"]
    assert all(torch.isfinite(v).all() for v in init.values())
    assert any(not torch.allclose(init[k], src[k]) for k in init)
    for k, v in net.state_dict().items():  # the source model itself is untouched
        assert torch.equal(v, src[k])
    rep = meta_train(net, None, x, y, steps=2, support_size=16, query_size=16, families=["noise"], corrupt_fn=noise,
                     algorithm="reptile", progress=False)
    assert any(not torch.allclose(rep[k], src[k]) for k in rep)


def test_meta_train_with_the_corruption_library_and_errors():
    net = tiny_net()
    x, y = toy_data(32)
    init = meta_train(net, None, x, y, steps=1, support_size=8, query_size=8, families=["gaussian_noise"],
                      progress=False)
    assert set(init) == {"1.weight", "1.bias"}
    with pytest.raises(ValueError, match="output indices"):
        meta_train(net, {"num_classes": 2}, x, y, steps=1, families=["noise"], corrupt_fn=noise, progress=False)
    with pytest.raises(ValueError, match="algorithm"):
        meta_train(net, None, x, y, steps=1, algorithm="maml2", corrupt_fn=noise, families=["noise"])
    with pytest.raises(ValueError, match="families"):
        meta_train(net, None, x, y, steps=1, corrupt_fn=noise, families=[], progress=False)
    with pytest.raises(ValueError, match="inner_steps"):
        meta_train(net, None, x, y, steps=1, inner_steps=0, corrupt_fn=noise, families=["noise"], progress=False)


def test_meta_train_is_deterministic_and_zero_steps_return_the_source_parameters():
    x, y = toy_data()
    kw = dict(steps=3, support_size=16, query_size=16, families=["noise"], corrupt_fn=noise, progress=False,
              outer_lr=1e-2, inner_steps=2, seed=5)
    a, b = meta_train(tiny_net(), None, x, y, **kw), meta_train(tiny_net(), None, x, y, **kw)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = meta_train(tiny_net(), None, x, y, **{**kw, "seed": 6})
    assert any(not torch.equal(a[k], other[k]) for k in a)
    net = tiny_net()
    zero = meta_train(net, None, x, y, **{**kw, "steps": 0})
    params = dict(net.named_parameters())
    assert all(torch.equal(zero[k], params[k]) for k in zero)


def test_task_sampler_draws_disjoint_seeded_tasks():
    x, y = toy_data(40)

    def sampler(seed, outliers=None):
        return TaskSampler(x, y, noise, ["noise", "other"], (1, 3), support_size=16, query_size=12,
                           outlier_x=outliers, seed=seed)

    t1, t2 = sampler(0).sample(), sampler(0).sample()
    assert t1.family == t2.family and t1.severity == t2.severity and torch.equal(t1.query, t2.query)
    assert t1.support.shape == (16, 1, 8, 8) and t1.query.shape == (12, 1, 8, 8) and t1.labels.shape == (12,)
    assert t1.outliers.shape == t1.query.shape and t1.family in ("noise", "other") and t1.severity in (1, 3)
    with_outliers = sampler(0, outliers=x[:5]).sample()
    assert with_outliers.outliers.shape == (12, 1, 8, 8)
    # support and query are disjoint parts of the source: small data splits in half
    small = TaskSampler(x[:10], y[:10], noise, ["noise"], (1,), support_size=64, query_size=64, outlier_x=None,
                        seed=0).sample()
    assert len(small.support) == 5 and len(small.query) == 5


def test_inner_adapt_lowers_the_support_entropy():
    net = tiny_net()
    x, _ = toy_data(32)
    theta = [p for n, p in net.named_parameters() if n.startswith("1.")]
    with batch_stat_norms(net):
        losses = inner_adapt(net, theta, x, steps=5, lr=0.5)
        with torch.no_grad():
            after = float(entropy(_logits(net(x))).mean())
    assert len(losses) == 5 and after < losses[0]


def test_shuffled_outliers_keep_pixels_but_not_shape():
    x, _ = toy_data(6)
    o = shuffled_outliers(x, torch.Generator().manual_seed(0), patch=4)
    assert o.shape == x.shape
    torch.testing.assert_close(o.flatten(1).sort(1).values, x.flatten(1).sort(1).values)
    assert not torch.equal(o, x)


def test_meta_init_files(tmp_path):
    ckpt = tmp_path / "toy.pt"
    path = meta_init_path(ckpt)
    assert path.name == "toy.meta-init.pt"
    init = {"1.weight": torch.ones(6), "1.bias": torch.zeros(6)}
    save_meta_init(init, path, info={"steps": 3})
    for src in (path, ckpt):
        back = load_meta_init(src)
        assert set(back) == set(init) and torch.equal(back["1.weight"], init["1.weight"])
    with pytest.raises(FileNotFoundError, match="meta-train"):
        load_meta_init(tmp_path / "other.pt")
    (tmp_path / "junk.meta-init.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a streamtta meta-initialisation"):
        load_meta_init(tmp_path / "junk.meta-init.pt")
