"""ReAdapter: the onset split, the meta restart and its rollback, its state."""
import pytest
import torch
from torch import nn

from meta_helpers import tiny_net, toy_data

from streamtta.readapt import ReAdapter






class FakeAdapter:
    """The parts of the Adapter interface ReAdapter uses."""

    def __init__(self, model):
        self.model = model

    def parameters_to_adapt(self):
        return [p for n, p in self.model.named_parameters() if n.startswith("1.")]

    @torch.no_grad()
    def features(self, x):
        f = self.model[:5](x)
        return self.model[5](f), f


class Recorder:
    def __init__(self):
        self.calls = []
        self.threshold = 0.0

    def recalibrate(self, features, logits):
        self.calls.append((features.shape, logits.shape))

    def reset_reference(self):
        self.calls.append("reset")


def trained_net():
    net = tiny_net()
    x, y = toy_data(96, seed=1)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    net.train()
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


def test_readapter_rolls_back_when_proxies_get_worse():
    net = trained_net()
    x, _ = toy_data(64)
    adapter = FakeAdapter(net)
    before = [p.detach().clone() for p in adapter.parameters_to_adapt()]
    bad_init = {"1.weight": torch.zeros(6), "1.bias": torch.zeros(6)}  # every input -> same prediction
    ra = ReAdapter(bad_init, steps=0, restart=True)
    for b in range(4):
        ra.observe(x[16 * b : 16 * (b + 1)], batch_index=b)
    scorer, mon = Recorder(), Recorder()
    res = ra.on_shift(adapter, scorer, monitor=mon)
    assert res["proxies_before"]["hist_entropy"] > 0.5  # diverse predictions before
    assert res["action"] == "rolled_back"
    assert res["proxies_after"]["hist_entropy"] < res["proxies_before"]["hist_entropy"]
    for p, q in zip(adapter.parameters_to_adapt(), before):
        assert torch.equal(p, q)
    assert scorer.calls == [] and mon.calls == []


def test_readapter_readapts_and_recalibrates():
    net = tiny_net()
    x, _ = toy_data(96)
    adapter = FakeAdapter(net)
    init = {n: p.detach().clone() for n, p in net.named_parameters() if n.startswith("1.")}
    with torch.no_grad():  # the adapter drifted away from the meta-init
        net[1].weight.mul_(0.2)
    ra = ReAdapter(init, restart=True, steps=5, lr=1e-2, entropy_tolerance=10.0, hist_tolerance=1.0, recent_batches=2)
    for b in range(6):
        ra.observe(x[16 * b : 16 * (b + 1)], batch_index=b)
    scorer, mon = Recorder(), Recorder()
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    res = ra.on_shift(adapter, scorer, monitor=mon)
    assert res["action"] == "readapted" and res["n_samples"] == 32 and res["n_params_from_meta_init"] == 2
    assert not torch.allclose(net[1].weight, init["1.weight"] * 0.2)
    assert len(scorer.calls) == 1 and mon.calls == ["reset"]
    # recalibrate_scorer=False: parameters re-adapted, the scorer left alone
    quiet = Recorder()
    ra2 = ReAdapter(init, restart=True, steps=5, lr=1e-2, entropy_tolerance=10.0, hist_tolerance=1.0, recent_batches=2,
                    recalibrate_scorer=False)
    for b in range(6):
        ra2.observe(x[16 * b : 16 * (b + 1)], batch_index=b)
    assert ra2.on_shift(adapter, quiet)["action"] == "readapted" and quiet.calls == []
    for k, v in net.named_buffers():  # running statistics untouched
        assert torch.equal(v, buffers[k])


def test_readapter_decay_returns_to_the_pre_shift_parameters():
    net = tiny_net()
    x, _ = toy_data(96)
    adapter = FakeAdapter(net)
    init = {n: p.detach().clone() for n, p in net.named_parameters() if n.startswith("1.")}
    with torch.no_grad():
        net[1].weight.mul_(0.2)
    before = net[1].weight.detach().clone()
    ra = ReAdapter(init, restart=True, steps=5, lr=1e-2, entropy_tolerance=10.0, hist_tolerance=1.0, recent_batches=2,
                   decay_batches=4)
    for b in range(6):
        ra.observe(x[16 * b : 16 * (b + 1)], batch_index=b)
    res = ra.on_shift(adapter)
    assert res["action"] == "readapted" and res["decay_batches"] == 4
    readapted = net[1].weight.detach().clone()
    gap = (readapted - before).abs().max()
    assert gap > 0
    ra.observe(x[:16], batch_index=6)  # one of four batches done: 3/4 of the change is left
    assert torch.allclose(net[1].weight, before + 0.75 * (readapted - before), atol=1e-6)
    for b in range(7, 10):
        ra.observe(x[:16], batch_index=b)
    assert torch.allclose(net[1].weight, before, atol=1e-6) and ra._decay is None
    with pytest.raises(ValueError, match="decay_batches"):
        ReAdapter(init, decay_batches=-1)


def test_readapter_buffer_is_bounded_and_stateful():
    init = {"1.weight": torch.ones(6)}
    ra = ReAdapter(init, restart=True, buffer_size=40)
    for b in range(10):
        ra.observe(torch.full((16, 1, 4, 4), float(b)))
    assert len(ra) == 40
    assert float(ra.buffer[-1][1][0, 0, 0, 0]) == 9.0
    other = ReAdapter(init, restart=True)
    other.load_state_dict(ra.state_dict())
    assert len(other) == 40 and other.n_observed_batches == 10
    split_only = ReAdapter()  # without the restart nothing reads the buffer: it stays empty
    split_only.observe(torch.ones(16, 1, 4, 4))
    assert len(split_only) == 0 and split_only.n_observed_batches == 1
    assert ReAdapter({}).on_shift(FakeAdapter(tiny_net()))["action"] == "none"  # no restart by default
    assert ReAdapter({"1.weight": torch.ones(6)}, restart=True).on_shift(FakeAdapter(tiny_net()))["action"] == "skipped"
    with pytest.raises(ValueError, match="meta-initialisation"):
        ReAdapter(None, restart=True)


def test_restored_state_keeps_the_configured_meta_init_and_drops_a_stale_buffer():
    init = {"1.weight": torch.ones(6), "1.bias": torch.zeros(6)}
    split_only = ReAdapter()
    split_only.observe(torch.ones(16, 1, 4, 4))
    restarter = ReAdapter(init, restart=True)
    restarter.load_state_dict(split_only.state_dict())  # a checkpoint written before restart was turned on
    assert set(restarter.meta_init) == set(init) and restarter.n_observed_batches == 1
    with_buffer = ReAdapter(init, restart=True)
    for b in range(3):
        with_buffer.observe(torch.ones(16, 1, 4, 4))
    again = ReAdapter()
    again.load_state_dict(with_buffer.state_dict())  # restart turned off: the old buffer is not kept
    assert len(with_buffer) == 48 and len(again) == 0
