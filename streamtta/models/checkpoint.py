"""Model checkpoints: weights plus a :class:`ModelMeta` that says what the model is.

A checkpoint is one ``torch.save`` file holding only plain types (loadable with
``weights_only=True``): ``{"format": "streamtta.checkpoint", "version": 1, "meta_json": str,
"state_dict": {name: tensor}}``. :func:`save_checkpoint` also writes a human-readable JSON sidecar
next to it (``digits-resnet.pt`` -> ``digits-resnet.json``) with the same metadata.

>>> import tempfile, pathlib, torch
>>> from streamtta.models.mlp import MLP
>>> meta = ModelMeta(name="toy", arch="mlp", arch_kwargs={"in_features": 2, "num_classes": 2, "hidden": [4]},
...     dataset="toy", classes=[0, 1], class_names=["a", "b"], input_shape=[2],
...     normalisation={"mean": [0.0, 0.0], "std": [1.0, 1.0]}, feature_dim=4, seed=0,
...     clean_accuracy=0.5, epochs=0, created_by="doctest", data_split={"test_fraction": 0.3, "seed": 0})
>>> path = pathlib.Path(tempfile.mkdtemp()) / "toy.pt"
>>> save_checkpoint(path, build_from_meta(meta), meta)
>>> model, meta2 = load_checkpoint(path)
>>> meta2 == meta, sidecar_path(path).name
(True, 'toy.json')
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from streamtta.models.arch import build_model

CHECKPOINT_FORMAT = "streamtta.checkpoint"
CHECKPOINT_VERSION = 1
#: Name of the metadata entry embedded in TorchScript exports (``_extra_files``).
TORCHSCRIPT_META_FILE = "streamtta_meta.json"


class Normalisation(BaseModel):
    """Per-channel / per-feature input standardisation applied by the model's first layer."""

    model_config = ConfigDict(extra="forbid")
    mean: list[float]
    std: list[float]


class DataSplit(BaseModel):
    """How the clean data were split: ``test_fraction``/``seed`` give the train/test split;
    ``holdout_fraction`` of the known-class train split (same seed, stratified) was kept out of
    training for OOD-threshold calibration; ``holdout_digest`` fingerprints those indices."""

    model_config = ConfigDict(extra="forbid")
    test_fraction: float
    seed: int
    holdout_fraction: float = 0.0
    holdout_digest: str | None = None


class ModelMeta(BaseModel):
    """Everything needed to rebuild, interpret and reproduce a source model."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = CHECKPOINT_VERSION
    name: str
    arch: str
    arch_kwargs: dict[str, Any]
    dataset: str
    #: Known class ids of the dataset, in model output order (output ``i`` = class ``classes[i]``).
    classes: list[int]
    class_names: list[str]
    #: Class ids of the dataset the model never saw (open-set "unknowns").
    unknown_classes: list[int] = Field(default_factory=list)
    unknown_class_names: list[str] = Field(default_factory=list)
    #: Shape of one raw input sample, e.g. ``[1, 32, 32]`` or ``[18]``.
    input_shape: list[int]
    normalisation: Normalisation
    feature_dim: int
    seed: int
    #: Accuracy on the known classes of the clean test split, in [0, 1].
    clean_accuracy: float
    #: Accuracy on the clean holdout slice (see :class:`DataSplit`), in [0, 1].
    holdout_accuracy: float | None = None
    epochs: int
    torch_version: str = Field(default_factory=lambda: torch.__version__)
    created_by: str
    data_split: DataSplit
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    train_seconds: float | None = None
    #: Optimizer steps the training took (``epochs x max(1, n_train // batch_size)``).
    train_steps: int | None = None

    @model_validator(mode="after")
    def _check(self) -> "ModelMeta":
        if len(self.class_names) != len(self.classes):
            raise ValueError(f"class_names has {len(self.class_names)} entries but classes has {len(self.classes)}")
        if self.unknown_class_names and len(self.unknown_class_names) != len(self.unknown_classes):
            raise ValueError("unknown_class_names must match unknown_classes in length")
        if set(self.classes) & set(self.unknown_classes):
            raise ValueError(f"classes and unknown_classes overlap: {sorted(set(self.classes) & set(self.unknown_classes))}")
        if len(self.normalisation.mean) != len(self.normalisation.std):
            raise ValueError("normalisation mean and std differ in length")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_index(self) -> dict[int, int]:
        """Dataset class id -> model output index (known classes only)."""
        return {c: i for i, c in enumerate(self.classes)}


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON sidecar of a checkpoint: same name, ``.json`` suffix."""
    return Path(path).with_suffix(".json")


def build_from_meta(meta: ModelMeta) -> nn.Module:
    """A freshly initialised model of the architecture described by ``meta``."""
    return build_model(meta.arch, meta.arch_kwargs, meta.normalisation.mean, meta.normalisation.std)


def _atomic_write_bytes(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def save_checkpoint(path: str | os.PathLike, model: nn.Module, meta: ModelMeta, *, sidecar: bool = True) -> None:
    """Write ``model``'s state dict and ``meta`` to ``path`` (atomically) plus the JSON sidecar."""
    path = Path(path)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "meta_json": meta.model_dump_json(),
        "state_dict": state,
    }
    _atomic_write_bytes(path, lambda f: torch.save(payload, f))
    if sidecar:
        text = json.dumps(meta.model_dump(mode="json"), indent=2) + "\n"
        _atomic_write_bytes(sidecar_path(path), lambda f: f.write(text.encode("utf-8")))


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], ModelMeta]:
    """``(state_dict, meta)`` of a streamtta checkpoint, without building the model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle errors, truncated files, non-torch files
        raise ValueError(
            f"{str(path)!r} cannot be read as a torch checkpoint with weights_only=True "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        hint = ""
        if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            hint = " It looks like a bare state dict: load it with a 'module:factory' spec and state_dict=."
        raise ValueError(f"{str(path)!r} is not a streamtta checkpoint (no format={CHECKPOINT_FORMAT!r} entry).{hint}")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{str(path)!r} has checkpoint version {payload.get('version')!r}; this streamtta reads {CHECKPOINT_VERSION}")
    meta = ModelMeta.model_validate_json(payload["meta_json"])
    return payload["state_dict"], meta


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[nn.Module, ModelMeta]:
    """Rebuild the model saved by :func:`save_checkpoint`; returned in ``eval()`` mode."""
    state, meta = read_checkpoint(path, map_location)
    model = build_from_meta(meta)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"weights in {str(path)!r} do not fit architecture {meta.arch!r} {meta.arch_kwargs}: {e}") from e
    return model.to(map_location).eval(), meta


def export_torchscript(model: nn.Module, path: str | os.PathLike, meta: ModelMeta | None = None) -> None:
    """Script ``model`` (in eval mode) to ``path``, embedding ``meta`` so loaders can read it back."""
    path = Path(path)
    was_training = model.training
    model.eval()
    extra = {TORCHSCRIPT_META_FILE: meta.model_dump_json()} if meta is not None else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # torch 2.x flags TorchScript as deprecated; it still works
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            scripted = torch.jit.script(model)
        finally:
            model.train(was_training)
        torch.jit.save(scripted, str(path), _extra_files=extra)


def load_torchscript(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[nn.Module, ModelMeta | None]:
    """``torch.jit.load`` plus the embedded :class:`ModelMeta` when the file has one."""
    extra = {TORCHSCRIPT_META_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            model = torch.jit.load(str(path), map_location=map_location, _extra_files=extra)
    except Exception as e:
        raise ValueError(f"{str(path)!r} cannot be loaded as TorchScript ({type(e).__name__}: {e})") from e
    raw = extra.get(TORCHSCRIPT_META_FILE) or ""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    meta = ModelMeta.model_validate_json(raw) if raw else None
    return model.eval(), meta
