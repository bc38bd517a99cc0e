"""Source models: backbones, features, checkpoints, training reproducibility, loading by spec."""
from __future__ import annotations

import json
import logging
import textwrap

import pytest
import torch
from torch import nn

from streamtta.models import (
    MLP,
    FeatureHook,
    ModelMeta,
    Normalize,
    ResNet,
    export_torchscript,
    feature_dim,
    forward_with_features,
    last_linear,
    load_checkpoint,
    load_model,
    load_source_test,
    load_source_train,
    resnet8,
    save_checkpoint,
    sidecar_path,
    source_holdout,
)
from streamtta.models import registry
from streamtta.models.checkpoint import read_checkpoint
from streamtta.models.train import accuracy, main, train_source

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits():
    return load_model("digits-resnet")


@pytest.fixture(scope="module")
def segment():
    return load_model("segment-mlp")


def _same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=1e-5)


# ----------------------------------------------------------------------------- shipped checkpoints
@pytest.mark.parametrize("name", ["digits-resnet", "segment-mlp"])
def test_shipped_checkpoint_is_small_documented_and_its_accuracy_is_true(name):
    path = registry.builtin_path(name, train_if_missing=False)
    assert path.parent == registry.CHECKPOINT_DIR
    assert path.stat().st_size < 2_000_000
    state, meta = read_checkpoint(path)
    side = json.loads(sidecar_path(path).read_text())
    assert ModelMeta.model_validate(side) == meta
    assert meta.name == name and meta.created_by.startswith("streamtta train-source ")
    assert f"--seed {meta.seed}" in meta.created_by and f"--epochs {meta.epochs}" in meta.created_by
    model, _ = load_checkpoint(path)
    x, y = load_source_test(meta, as_index=True)
    assert accuracy(model, x, y) == pytest.approx(meta.clean_accuracy, abs=1e-6)
    assert meta.clean_accuracy > 0.9
    assert list(x.shape[1:]) == meta.input_shape and int(y.max()) == meta.num_classes - 1


def test_retraining_digits_with_the_shipped_settings_reproduces_its_accuracy(digits):
    _, shipped = digits
    model, meta = train_source(
        shipped.dataset, known_classes=shipped.classes, epochs=shipped.epochs, seed=shipped.seed, progress=False
    )
    assert meta.clean_accuracy == pytest.approx(shipped.clean_accuracy, abs=0.03)
    assert meta.data_split == shipped.data_split
    assert meta.normalisation == shipped.normalisation
    assert meta.classes == shipped.classes and meta.unknown_classes == [8, 9]
    # the work the retraining did, not its wall-clock time (which depends on the machine's load):
    # exactly the shipped epochs of full batches over the fit split, and no more than 12 passes over it
    x_fit, _ = load_source_train(meta)
    batch = meta.hyperparameters["batch_size"]
    assert meta.train_steps == shipped.epochs * (len(x_fit) // batch)
    assert meta.train_steps * batch <= 12 * len(x_fit)


def test_segment_training_is_deterministic_by_seed_and_matches_shipped(segment):
    _, shipped = segment
    m1, meta1 = train_source("segment", seed=shipped.seed, progress=False)
    m2, _ = train_source("segment", seed=shipped.seed, progress=False)
    m3, _ = train_source("segment", seed=shipped.seed + 1, epochs=3, progress=False)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)
    assert meta1.clean_accuracy == pytest.approx(shipped.clean_accuracy, abs=0.03)
    assert meta1.unknown_class_names == ["window"] and meta1.unknown_classes == [6]


def test_training_restores_global_torch_state():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    train_source("segment", epochs=1, progress=False)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()


def test_train_cli_writes_checkpoint_with_exact_command(tmp_path):
    out = tmp_path / "seg.pt"
    assert main(["--dataset", "Segment", "--epochs", "2", "--seed", "3", "--known-classes", "6,0,1",
                 "--out", str(out), "--no-progress"]) == 0
    model, meta = load_model(str(out))
    assert meta.created_by == f"streamtta train-source --dataset segment --seed 3 --epochs 2 --known-classes 6,0,1 --out {out}"
    assert meta.classes == [6, 0, 1] and meta.class_names[0] == "window" and meta.unknown_classes == [2, 3, 4, 5]
    _, y = load_source_train(meta)
    _, yi = load_source_train(meta, as_index=True)
    assert set(y.tolist()) == {6, 0, 1} and set(yi.tolist()) == {0, 1, 2}
    assert [meta.classes[i] for i in yi.tolist()] == y.tolist()
    assert model.fc.out_features == 3
    assert meta.train_steps == 2 * (len(y) // 64)  # 2 epochs of full batches (checkpointed with the model)


@pytest.mark.parametrize("kwargs, match", [
    ({"known_classes": [0, 0, 1]}, "known_classes"),
    ({"known_classes": [0, 12]}, "known_classes"),
    ({"epochs": 2, "lr": -1.0}, "lr > 0"),
])
def test_train_source_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train_source("segment", progress=False, **kwargs)
    with pytest.raises(ValueError, match="built-in datasets"):
        train_source("cifar", progress=False)


# ----------------------------------------------------------------------------- data slices
def test_holdout_is_clean_in_distribution_and_disjoint_from_training_data(digits):
    _, meta = digits
    x_fit, y_fit = load_source_train(meta)
    x_ho, y_ho = source_holdout(meta)
    x_te, _ = load_source_test(meta)
    assert x_ho.shape[1:] == x_fit.shape[1:] and y_ho.dtype == torch.int64
    assert set(y_ho.tolist()) == set(range(meta.num_classes))
    frac = len(y_ho) / (len(y_ho) + len(y_fit))
    assert frac == pytest.approx(meta.data_split.holdout_fraction, abs=0.01)
    fit_rows = {r.tobytes() for r in x_fit.numpy()}
    assert not any(r.tobytes() in fit_rows for r in x_ho.numpy())
    assert torch.equal(source_holdout(meta, n=10)[0], x_ho[:10])
    # unknown classes never appear in any source slice
    _, y_all = load_source_test(meta, include_unknown=True)
    _, yi_all = load_source_test(meta, include_unknown=True, as_index=True)
    assert set(y_all.tolist()) == set(meta.classes) | set(meta.unknown_classes)
    assert torch.equal(yi_all == -1, torch.isin(y_all, torch.tensor(meta.unknown_classes)))
    assert len(y_all) > len(x_te)
    with pytest.raises(ValueError, match="n must be"):
        source_holdout(meta, n=0)


def test_recorded_split_digest_guards_against_a_different_split(segment):
    _, meta = segment
    tampered = meta.model_copy(update={"data_split": meta.data_split.model_copy(update={"holdout_digest": "0" * 16})})
    with pytest.raises(RuntimeError, match="differs from the one recorded"):
        source_holdout(tampered)


# ----------------------------------------------------------------------------- backbones + features
def test_normalize_is_the_first_layer_and_matches_meta(digits, segment):
    for model, meta in (digits, segment):
        first_name, first = next(iter(model.named_children()))
        assert first_name == "normalize" and isinstance(first, Normalize)
        assert first.mean.tolist() == pytest.approx(meta.normalisation.mean)
        assert first.std.tolist() == pytest.approx(meta.normalisation.std)
    model, meta = digits
    x = torch.rand(4, *meta.input_shape)
    with torch.no_grad():
        expected = model(x)
        feats = model.layer3(model.layer2(model.layer1(model.relu(model.bn1(model.conv1(
            (x - meta.normalisation.mean[0]) / meta.normalisation.std[0]))))))
        got = model.fc(torch.flatten(model.pool(feats), 1))
    assert torch.allclose(expected, got, atol=1e-5)
    assert not torch.allclose(expected, model.fc(model.forward_features(x * 2)), atol=1e-3)
    with pytest.raises(ValueError, match="std must be > 0"):
        Normalize([0.0], [0.0])


@pytest.mark.parametrize("model, shape, dim", [
    (resnet8(num_classes=5, in_channels=1), (3, 1, 32, 32), 64),
    (ResNet(num_classes=4, in_channels=3, widths=(8, 16, 24), blocks_per_stage=2), (2, 3, 32, 32), 24),
    (MLP(in_features=7, num_classes=3, hidden=(16, 12), dropout=0.1), (5, 7), 12),
])
def test_features_are_the_input_of_the_last_linear(model, shape, dim):
    model.eval()
    x = torch.rand(*shape)
    logits, feats = forward_with_features(model, x)
    assert feats.shape == (shape[0], dim) and feature_dim(model) == dim
    assert last_linear(model) is model.fc
    assert torch.allclose(feats, model.forward_features(x), atol=1e-6)
    assert torch.allclose(logits, model.fc(feats), atol=1e-6)
    logits.sum().backward()  # gradients flow through the captured features
    assert model.fc.weight.grad is not None and not model._forward_pre_hooks


def test_feature_hook_on_any_module_and_named_layers():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
            self.cls = nn.Linear(6, 3)
            self.unused = nn.Linear(6, 2)

        def forward(self, x):
            return self.cls(self.body(x))

    net = TwoHeads()
    x = torch.randn(5, 4)
    with pytest.raises(RuntimeError, match="was not called"):
        forward_with_features(net, x)  # the last registered Linear is never run
    logits, feats = forward_with_features(net, x, layer="cls")
    assert torch.allclose(feats, net.body(x)) and logits.shape == (5, 3)
    with FeatureHook(net, layer="body.0") as hook:
        net(x)
    assert torch.equal(hook.features, x)
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        last_linear(net, "nope")
    with pytest.raises(ValueError, match="not an nn.Linear"):
        last_linear(net, "body")
    with pytest.raises(ValueError, match="no nn.Linear"):
        last_linear(nn.Conv2d(1, 1, 1))


def test_features_survive_swapping_norm_layers(digits):
    import copy

    model = copy.deepcopy(digits[0])
    for name, m in list(model.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(m, child_name, nn.GroupNorm(1, child.num_features))
    _, feats = forward_with_features(model, torch.rand(2, 1, 32, 32))
    assert feats.shape == (2, digits[1].feature_dim)


# ----------------------------------------------------------------------------- load_model specs
def test_load_builtin_and_path_give_the_same_model(digits, tmp_path):
    model, meta = digits
    assert not model.training and meta.feature_dim == 64 and meta.num_classes == 8
    path = tmp_path / "copy.pt"
    save_checkpoint(path, model, meta)
    again, meta2 = load_model(path)
    assert meta2 == meta and sidecar_path(path).is_file()
    assert _same_outputs(model, again, torch.rand(6, 1, 32, 32))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("which", ["digits", "segment"])
def test_torchscript_round_trip_keeps_outputs_meta_and_features(which, digits, segment, tmp_path):
    model, meta = digits if which == "digits" else segment
    path = tmp_path / f"{which}.ts"
    export_torchscript(model, path, meta)
    scripted, meta2 = load_model(str(path))
    assert isinstance(scripted, torch.jit.ScriptModule) and meta2 == meta
    x = torch.rand(5, *meta.input_shape)
    assert _same_outputs(model, scripted, x)
    logits, feats = forward_with_features(scripted, x)
    _, ref_feats = forward_with_features(model, x)
    assert torch.allclose(feats, ref_feats, atol=1e-5) and logits.shape == (5, meta.num_classes)
    with pytest.raises(TypeError, match="TorchScript"):
        FeatureHook(scripted)
    # a plain TorchScript file without metadata loads with meta=None
    plain = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Linear(3, 2))), str(plain))
    m, none_meta = load_model(str(plain))
    assert none_meta is None and m(torch.rand(1, 3)).shape == (1, 2)
    with pytest.raises(TypeError, match="forward_features"):
        forward_with_features(m, torch.rand(1, 3))


def test_module_factory_with_state_dict(digits, tmp_path, monkeypatch):
    model, meta = digits
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        from streamtta.models import resnet8
        def digits8():
            return resnet8(num_classes=8, in_channels=1)
        NOT_CALLABLE = 3
        def not_a_module():
            return "hello"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    loaded, none_meta = load_model("my_models:digits8", state_dict=str(weights))
    assert none_meta is None and not loaded.training
    assert _same_outputs(model, loaded, torch.rand(4, 1, 32, 32))
    # a streamtta checkpoint is accepted as the state dict too
    ckpt = tmp_path / "c.pt"
    save_checkpoint(ckpt, model, meta)
    loaded2, _ = load_model("my_models:digits8", state_dict=ckpt)
    assert _same_outputs(model, loaded2, torch.rand(2, 1, 32, 32))
    # errors
    with pytest.raises(ValueError, match="cannot import module 'no_such_mod'"):
        load_model("no_such_mod:f")
    with pytest.raises(ValueError, match="no attribute 'nope'"):
        load_model("my_models:nope")
    with pytest.raises(ValueError, match="not a callable"):
        load_model("my_models:NOT_CALLABLE")
    with pytest.raises(ValueError, match="not an nn.Module"):
        load_model("my_models:not_a_module")
    with pytest.raises(ValueError, match="does not fit the model"):
        load_model("streamtta.models.resnet:resnet8", state_dict=weights)  # 10 classes vs 8
    with pytest.raises(FileNotFoundError, match="state dict file"):
        load_model("my_models:digits8", state_dict=tmp_path / "missing.pt")


def test_bad_specs_raise_clear_errors(digits, tmp_path):
    with pytest.raises(ValueError, match="not a built-in model"):
        load_model("cifar-resnet")
    with pytest.raises(ValueError, match="empty model spec"):
        load_model("  ")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "missing.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_model(str(garbage))
    bare = tmp_path / "bare.pt"
    torch.save(digits[0].state_dict(), bare)
    with pytest.raises(ValueError, match="bare state dict"):
        load_model(str(bare))
    pickled = tmp_path / "pickled.pt"
    torch.save({"obj": Normalize([0.0], [1.0])}, pickled)  # arbitrary pickled object
    with pytest.raises(ValueError, match="weights_only=True"):
        load_model(str(pickled))
    with pytest.raises(ValueError, match="extra"):
        ModelMeta.model_validate({**digits[1].model_dump(), "surprise": 1})


def test_missing_builtin_is_trained_once_and_cached(tmp_path, monkeypatch, caplog):
    empty = tmp_path / "pkg"
    empty.mkdir()
    monkeypatch.setattr(registry, "CHECKPOINT_DIR", empty)
    monkeypatch.setenv("STREAMTTA_CACHE_DIR", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="streamtta.models"):
        model, meta = load_model("segment-mlp")
    assert "training it now" in caplog.text
    cached = tmp_path / "cache" / "models" / "segment-mlp.pt"
    assert cached.is_file() and meta.name == "segment-mlp" and meta.clean_accuracy > 0.9
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="streamtta.models"):
        again, meta2 = load_model("segment-mlp")
    assert caplog.text == "" and meta2 == meta
    with pytest.raises(FileNotFoundError, match="digits-resnet"):
        registry.builtin_path("digits-resnet", train_if_missing=False)
