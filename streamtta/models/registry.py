"""Resolve a model spec to ``(nn.Module, ModelMeta | None)``.

A spec is one of:

* a built-in name -- ``"digits-resnet"``, ``"segment-mlp"`` -- resolved to the checkpoint shipped
  in ``streamtta/models/checkpoints/`` (or, if missing, to the user cache; if it is in neither
  place it is trained on the spot and saved to the cache);
* a path to a streamtta checkpoint (``.pt`` written by :func:`save_checkpoint`);
* a path to a TorchScript file (``torch.jit.save``; metadata is read back when it was written by
  :func:`export_torchscript`);
* ``"package.module:factory"`` -- a zero-argument callable returning an ``nn.Module`` -- usually
  with ``state_dict="weights.pt"`` (loaded with ``weights_only=True``). A module that is not importable
  from ``sys.path`` is looked up in the current directory (``sensor:factory`` finds ``./sensor.py``
  without ``PYTHONPATH``; the directory is appended to ``sys.path``, so installed packages come first).

``state_dict=`` may be given with any spec: those weights are loaded on top (strictly).
The model comes back in ``eval()`` mode.

>>> model, meta = load_model("segment-mlp")
>>> meta.name, meta.num_classes, type(model).__name__
('segment-mlp', 6, 'MLP')
>>> model, meta = load_model("streamtta.models.resnet:resnet8")
>>> meta is None, model.fc.out_features
(True, 10)
"""
from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from streamtta.models.checkpoint import ModelMeta, load_checkpoint, load_torchscript

log = logging.getLogger("streamtta.models")

#: Built-in model name -> training dataset (see :data:`streamtta.models.recipes.RECIPES`).
BUILTIN_MODELS: dict[str, str] = {"digits-resnet": "digits", "segment-mlp": "segment", "digits-cnn": "digits",
                                  "digits-cnn-gn": "digits", "digits-cnn-ln": "digits", "segment-mlp-ln": "segment",
                                  "digits-resnet-gn": "digits", "digits-resnet-ln": "digits"}

class ModelSpecError(ValueError):
    """A model spec cannot be resolved or loaded; the message names the spec and the reason."""


CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def cache_dir() -> Path:
    """User cache for models trained on demand: ``$STREAMTTA_CACHE_DIR`` or
    ``$XDG_CACHE_HOME/streamtta`` (default ``~/.cache/streamtta``), subfolder ``models``."""
    env = os.environ.get("STREAMTTA_CACHE_DIR")
    if env:
        return Path(env).expanduser() / "models"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "streamtta" / "models"


def builtin_path(name: str, *, train_if_missing: bool = True) -> Path:
    """Checkpoint path of a built-in model, training and caching it if no copy exists."""
    if name not in BUILTIN_MODELS:
        raise ModelSpecError(f"unknown built-in model {name!r}; built-in models: {sorted(BUILTIN_MODELS)}")
    for folder in (CHECKPOINT_DIR, cache_dir()):
        if (folder / f"{name}.pt").is_file():
            return folder / f"{name}.pt"
    if not train_if_missing:
        raise FileNotFoundError(f"no checkpoint for built-in model {name!r} in {CHECKPOINT_DIR} or {cache_dir()}")
    from streamtta.models.recipes import RECIPES
    from streamtta.models.train import train_source

    target = None
    for folder in (cache_dir(), CHECKPOINT_DIR):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                target = folder / f"{name}.pt"
                break
        except OSError:
            continue
    if target is None:
        raise PermissionError(f"cannot train built-in model {name!r}: neither {cache_dir()} nor {CHECKPOINT_DIR} is writable")
    log.warning("built-in model %r has no checkpoint; training it now (seconds) and saving it to %s", name, target)
    train_source(BUILTIN_MODELS[name], recipe=name if name in RECIPES else None, out=target, name=name,
                 progress=False)
    return target


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _import_module(spec: str, module_name: str) -> object:
    """Import ``module_name``; if its top-level package is nowhere on ``sys.path``, try the current directory."""
    top = module_name.split(".", 1)[0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        if e.name != top or cwd in sys.path or not _in_dir(cwd, top):
            raise ModelSpecError(f"model spec {spec!r}: cannot import module {module_name!r} ({e}; looked in sys.path "
                             f"and the current directory {cwd})") from e
    except ImportError as e:
        raise ModelSpecError(f"model spec {spec!r}: cannot import module {module_name!r} ({e})") from e
    sys.path.append(cwd)
    importlib.invalidate_caches()
    log.info("model spec %r: importing %r from the current directory %s", spec, module_name, cwd)
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise ModelSpecError(f"model spec {spec!r}: cannot import module {module_name!r} from {cwd} ({e})") from e


def _in_dir(folder: str, top: str) -> bool:
    return (Path(folder) / f"{top}.py").is_file() or (Path(folder) / top).is_dir()


def _from_factory(spec: str) -> nn.Module:
    module_name, attr = spec.split(":", 1)
    module = _import_module(spec, module_name)
    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelSpecError(f"model spec {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelSpecError(f"model spec {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable factory")
    try:
        model = obj()
    except TypeError as e:
        raise ModelSpecError(f"model spec {spec!r}: the factory must be callable with no arguments ({e})") from e
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"model spec {spec!r}: the factory returned a {type(model).__name__}, not an nn.Module")
    return model


def _load_state(model: nn.Module, state_dict: str | os.PathLike, map_location: str | torch.device) -> None:
    path = Path(state_dict)
    if not path.is_file():
        raise FileNotFoundError(f"state dict file {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ModelSpecError(
            f"state dict file {str(path)!r} cannot be loaded with weights_only=True ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    if isinstance(state, dict) and state.get("format") == "streamtta.checkpoint":
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelSpecError(f"{str(path)!r} does not hold a state dict (a mapping of names to tensors)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelSpecError(f"state dict {str(path)!r} does not fit the model: {e}") from e


def load_model(
    spec: str | os.PathLike,
    *,
    state_dict: str | os.PathLike | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[nn.Module, ModelMeta | None]:
    """Load a model from a built-in name, checkpoint path, TorchScript path or ``module:factory``."""
    text = str(spec).strip()
    if not text:
        raise ModelSpecError("empty model spec")
    meta: ModelMeta | None
    path = Path(text).expanduser()
    if text in BUILTIN_MODELS:
        model, meta = load_checkpoint(builtin_path(text), map_location)
    elif path.is_file():
        if _is_torchscript(path):
            model, meta = load_torchscript(path, map_location)
        else:
            model, meta = load_checkpoint(path, map_location)
    elif _FACTORY_RE.match(text):
        model, meta = _from_factory(text).to(map_location), None
        if state_dict is None:
            warnings.warn(f"model {text!r}: a factory without state_dict= / --state-dict runs the weights the "
                          f"factory makes (random unless it loads trained ones itself)", stacklevel=2)
    elif path.suffix or os.sep in text or "/" in text:
        raise FileNotFoundError(f"model file {text!r} does not exist")
    else:
        raise ModelSpecError(
            f"model spec {text!r} is not a built-in model ({', '.join(sorted(BUILTIN_MODELS))}), an existing "
            "checkpoint / TorchScript file, or 'package.module:factory'"
        )
    if state_dict is not None:
        _load_state(model, state_dict, map_location)
    return model.eval(), meta
