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


#: guards that pull the adapted parameters back to the source ones: with them the restart is not on by default
SOURCE_ANCHORS = frozenset({"ema-source"})
#: norms under which the restart won on the long tuning stream (plain test-batch statistics); under ``cb-stats``
#: it lost (its class statistics then learn from the restarted model's pseudo-labels), others are unmeasured
RESTART_NORMS = frozenset({"bn"})


def default_restart_init(spec: str, source: str | Path | None, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The meta-initialisation the meta restart gets when ``readapt_options`` leaves ``restart`` unset, or None
    (restart off). On for a spec that takes gradient steps (an objective such as ``tent`` or ``eata``) on plain
    BN-adapt statistics (norm ``bn``, :data:`RESTART_NORMS`) without a guard that anchors the parameters to the
    source ones (``ema-source``), when the model is named
    (``model.source``: a built-in name or a checkpoint file, not a ``module:factory``) and a meta-initialisation
    for it exists next to its checkpoint (:func:`meta_init_path`) that names some of ``model``'s adaptable
    parameters. Measured on the long tuning stream (README, "Meta restart by default"): the restart helped
    ``bn+tent``, ``eata`` and ``rdumb``, cost ``cb-stats+tent+conf-drop+ema-source`` a little and
    ``cb-stats+tent+conf-drop`` 2.2 points; a gradient-free spec has no parameters that carry the previous domain.

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    >>> default_restart_init("default", "digits-resnet", net) is None     # gradient-free: off
    True
    >>> default_restart_init("bn+tent", None, net) is None                 # no named model: no meta-init to trust
    True
    """
    from streamtta.adapters.grammar import SpecError, parse_spec
    from streamtta.readapt.params import adaptable_parameter_names

    try:
        parsed = parse_spec(spec)
    except SpecError:
        return None
    if (parsed.objective is None or parsed.norm.name not in RESTART_NORMS or source is None
            or any(g.name in SOURCE_ANCHORS for g in parsed.guards)):
        return None
    try:  # only the file next to the checkpoint: the checkpoint itself is never read again here
        checkpoint = resolve_checkpoint(source)
        if not checkpoint.is_file():  # a 'module:factory' has no checkpoint file to look next to
            return None
        init = load_meta_init(meta_init_path(checkpoint))
    except (OSError, ValueError):
        return None
    shapes = dict(model.named_parameters())
    usable = [n for n in adaptable_parameter_names(model)
              if n in init and n in shapes and tuple(init[n].shape) == tuple(shapes[n].shape)]
    return init if usable else None
