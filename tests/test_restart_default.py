"""The meta restart is on by default for gradient specs that have a meta-initialisation (default_restart_init)."""
import pytest
import torch
from torch import nn

from streamtta.readapt import save_meta_init
from streamtta.readapt.meta_init import default_restart_init
from streamtta.readapt.params import adaptable_parameter_names


def small():
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()


@pytest.fixture
def ckpt(tmp_path):
    """A checkpoint path whose meta-init file names the small model's BatchNorm parameters."""
    net = small()
    path = tmp_path / "mine.pt"
    save_meta_init({n: p.detach() + 1 for n, p in net.named_parameters() if n in adaptable_parameter_names(net)},
                   tmp_path / "mine.meta-init.pt")
    return net, path


def test_gradient_specs_get_the_restart_others_do_not(ckpt):
    net, path = ckpt
    for spec in ("bn+tent", "eata", "cb-stats+tent+conf-drop", "bn+tent(lr=0.005)"):
        init = default_restart_init(spec, path, net)
        assert init is not None and set(init) == {"1.weight", "1.bias"}, spec
    # gradient-free, anchored to the source parameters, unnamed model, no file, a file for another model
    assert default_restart_init("cb-stats+source-fallback", path, net) is None
    assert default_restart_init("bn", path, net) is None
    assert default_restart_init("cb-stats+tent+conf-drop+ema-source", path, net) is None
    assert default_restart_init("bn+tent", None, net) is None
    assert default_restart_init("bn+tent", path.with_name("other.pt"), net) is None
    wide = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16))
    assert default_restart_init("bn+tent", path, wide) is None  # the shapes do not match
    assert default_restart_init("not a spec +", path, net) is None
    (path.with_name("bad.meta-init.pt")).write_bytes(b"not torch")
    assert default_restart_init("bn+tent", path.with_name("bad.pt"), net) is None


def test_blueprint_turns_the_restart_on_only_when_unset(ckpt, caplog):
    from streamtta.blueprint import Blueprint
    from streamtta.config import Config

    net, path = ckpt

    def restart(spec, **opts):
        cfg = Config()
        cfg.adapter.spec = spec
        cfg.model.source = str(path)
        cfg.model.num_classes = 3
        cfg.monitor.readapt_options = opts
        return Blueprint(cfg, net).base_readapter.restart

    with caplog.at_level("INFO", logger="streamtta"):
        assert restart("bn+tent") is True
    assert "meta restart on by default" in caplog.text
    assert restart("bn+tent", restart=False) is False
    assert restart("default") is False
    assert restart("cb-stats+tent+conf-drop+ema-source") is False
    assert restart("cb-stats+tent+conf-drop+ema-source", restart=True) is True  # explicit: as asked

