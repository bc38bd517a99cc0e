"""Meta-initialisation files: plain tensors + JSON-able info, loadable with ``weights_only=True``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

META_INIT_SUFFIX = ".meta-init.pt"
META_INIT_FORMAT = "streamtta.meta-init"


def meta_init_path(checkpoint: str | Path) -> Path:
    """``<ckpt>.meta-init.pt`` next to a checkpoint file (``digits-resnet.pt`` -> ``digits-resnet.meta-init.pt``)."""
    p = Path(checkpoint)
    return p.with_name(p.name[: -len(p.suffix)] + META_INIT_SUFFIX if p.suffix else p.name + META_INIT_SUFFIX)


def resolve_checkpoint(source: str | Path) -> Path:
    """The checkpoint file of a built-in model name (without training it), else ``source`` as a path."""
    text = str(source)
    try:
        from streamtta.models.registry import BUILTIN_MODELS, builtin_path

        if text in BUILTIN_MODELS:
            return Path(builtin_path(text, train_if_missing=False))
    except ImportError:  # pragma: no cover
        pass
    return Path(text).expanduser()


def save_meta_init(init: Mapping[str, torch.Tensor], path: str | Path, info: Mapping[str, Any] | None = None) -> Path:
    """Write a meta-initialisation (plain tensors + JSON-able info; loadable with weights_only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": META_INIT_FORMAT, "version": 1,
               "params": {k: v.detach().cpu().clone() for k, v in init.items()}, "info": dict(info or {})}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def _read_meta_init(path: Path, map_location: str | torch.device) -> dict[str, torch.Tensor] | None:
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception:
        return None
    if isinstance(payload, Mapping) and payload.get("format") == META_INIT_FORMAT:
        return dict(payload["params"])
    return None


def load_meta_init(source: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a meta-initialisation: a meta-init file itself, or the one next to a model's checkpoint
    (built-in model name or checkpoint path)."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file():
        params = _read_meta_init(path, map_location)
        if params is not None:
            return params
        if text.endswith(META_INIT_SUFFIX):
            raise ValueError(f"{path} is not a streamtta meta-initialisation file")
    if not text.endswith(META_INIT_SUFFIX):
        try:
            path = meta_init_path(resolve_checkpoint(source))
        except Exception as e:  # pragma: no cover - registry errors
            raise FileNotFoundError(f"cannot locate the checkpoint of model {text!r}: {e}") from e
    if not path.is_file():
        raise FileNotFoundError(f"no meta-initialisation at {path}; create it with "
                                f"`streamtta meta-train --model {text}`")
    params = _read_meta_init(path, map_location)
    if params is None:
        raise ValueError(f"{path} is not a streamtta meta-initialisation file")
    return params
