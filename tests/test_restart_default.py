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
    torch.save(net.state_dict(), path)
    save_meta_init({n: p.detach() + 1 for n, p in net.named_parameters() if n in adaptable_parameter_names(net)},
                   tmp_path / "mine.meta-init.pt")
    return net, path


def test_gradient_specs_get_the_restart_others_do_not(ckpt):
    net, path = ckpt
    for spec in ("bn+tent", "eata", "rdumb", "tent", "bn+tent(lr=0.005)"):
        init = default_restart_init(spec, path, net)
        assert init is not None and set(init) == {"1.weight", "1.bias"}, spec
    # gradient-free, other norms (cb-stats lost; the rest unmeasured), anchored to the source parameters,
    # unnamed model, no file, a file for another model
    assert default_restart_init("cb-stats+source-fallback", path, net) is None
    for spec in ("cb-stats+tent+conf-drop", "rbn+tent", "unmix-tns+tent"):
        assert default_restart_init(spec, path, net) is None, spec
    assert default_restart_init("bn", path, net) is None
    assert default_restart_init("cb-stats+tent+conf-drop+ema-source", path, net) is None
    assert default_restart_init("bn+tent", None, net) is None
    assert default_restart_init("bn+tent", path.with_name("other.pt"), net) is None
    wide = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16))
    assert default_restart_init("bn+tent", path, wide) is None  # the shapes do not match
    assert default_restart_init("not a spec +", path, net) is None
    (path.with_name("bad.meta-init.pt")).write_bytes(b"not torch")
    path.with_name("bad.pt").write_bytes(b"")
    assert default_restart_init("bn+tent", path.with_name("bad.pt"), net) is None


def test_only_the_file_next_to_a_checkpoint_is_read(ckpt, tmp_path, monkeypatch):
    """The checkpoint itself is not loaded a second time, and a 'module:factory' (no checkpoint file) gets no
    meta-init from a file of a similar name in the working directory."""
    net, path = ckpt
    loaded = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: (loaded.append(str(f)), real(f, *a, **k))[1])
    assert default_restart_init("bn+tent", path, net) is not None
    assert loaded == [str(tmp_path / "mine.meta-init.pt")]
    monkeypatch.chdir(tmp_path)
    assert default_restart_init("bn+tent", "mine.net:make", net) is None  # would resolve to ./mine.meta-init.pt


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


def test_other_weights_and_unnamed_models(ckpt):
    """Weights from model.state_dict are not the checkpoint's: no default restart; an explicit restart=true
    needs a named model (no silent digits-resnet meta-init for a user's module)."""
    from streamtta.blueprint import Blueprint
    from streamtta.config import Config
    from streamtta.models.registry import load_model

    net, path = ckpt
    cfg = Config()
    cfg.adapter.spec, cfg.model.source, cfg.model.num_classes = "bn+tent", str(path), 3
    cfg.model.state_dict = str(path)
    assert Blueprint(cfg, net).base_readapter.restart is False
    cfg = Config()
    cfg.adapter.spec, cfg.model.num_classes = "bn+tent", 3
    cfg.monitor.readapt_options = {"restart": True}
    with pytest.raises(ValueError, match="model.source"):
        Blueprint(cfg, net)
    cnn, meta = load_model("digits-cnn")  # a built-in passed as a module: its own meta-init, by its metadata
    ra = Blueprint(cfg, cnn, meta).base_readapter
    assert ra.restart and set(ra.meta_init) <= {n for n, _ in cnn.named_parameters()}


def test_one_state_per_stream_id_keeps_the_restart_off(ckpt):
    """Per-id states would each keep a restart buffer: the default leaves it off there (explicit true still works)."""
    from streamtta.blueprint import Blueprint
    from streamtta.config import Config

    net, path = ckpt
    cfg = Config()
    cfg.adapter.spec = "bn+tent"
    cfg.model.source = str(path)
    cfg.model.num_classes = 3
    cfg.engine.state_key = "stream_id"
    assert Blueprint(cfg, net).base_readapter.restart is False
    cfg.monitor.readapt_options = {"restart": True}
    assert Blueprint(cfg, net).base_readapter.restart is True
