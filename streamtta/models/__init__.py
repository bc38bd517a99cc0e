"""Source models: backbones, checkpoints with metadata, training, and loading by spec.

>>> from streamtta.models import load_model, forward_with_features
>>> import torch
>>> model, meta = load_model("digits-resnet")
>>> logits, feats = forward_with_features(model, torch.rand(4, *meta.input_shape))
>>> logits.shape[1] == meta.num_classes, feats.shape[1] == meta.feature_dim
(True, True)
"""
from streamtta.models.arch import ARCHITECTURES, build_model
from streamtta.models.checkpoint import (
    ModelMeta,
    build_from_meta,
    export_torchscript,
    load_checkpoint,
    load_torchscript,
    save_checkpoint,
    sidecar_path,
)
from streamtta.models.data import load_dataset_split, load_source_test, load_source_train, source_holdout
from streamtta.models.features import FeatureHook, feature_dim, forward_with_features, last_linear
from streamtta.models.mlp import MLP
from streamtta.models.normalize import Normalize
from streamtta.models.registry import BUILTIN_MODELS, builtin_path, cache_dir, load_model
from streamtta.models.resnet import ResNet, resnet8, resnet20

__all__ = [
    "ARCHITECTURES", "BUILTIN_MODELS", "FeatureHook", "MLP", "ModelMeta", "Normalize", "ResNet",
    "build_from_meta", "build_model", "builtin_path", "cache_dir", "export_torchscript", "feature_dim",
    "forward_with_features", "last_linear", "load_checkpoint", "load_dataset_split", "load_model",
    "load_source_test", "load_source_train", "load_torchscript", "resnet8", "resnet20", "save_checkpoint",
    "sidecar_path", "source_holdout", "train_source",
]


def __getattr__(name: str):
    # Imported lazily so ``python -m streamtta.models.train`` does not import itself twice.
    if name == "train_source":
        from streamtta.models.train import train_source

        return train_source
    raise AttributeError(f"module 'streamtta.models' has no attribute {name!r}")
