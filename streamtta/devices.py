"""Where the model runs (``engine.device``), and moving tensors there and back.

* :func:`resolve_device`: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when torch sees a GPU,
  else CPU) -> a :class:`torch.device`; CUDA asked for where torch has none is a
  :class:`~streamtta.config.ConfigError` that says so.
* :func:`to_device`: one batch decoded on the CPU -> the device. For a CUDA device the batch is put in
  pinned (page-locked) host memory and copied with ``non_blocking=True``; for the CPU it is returned as it
  is (the same tensor object, no copy).
* :func:`to_cpu` / :func:`move_tensors`: every tensor of a nested dict/list/tuple on the CPU (results,
  checkpointed states) or on the device (a restored adapter state).
* :func:`describe_device`: a small dict for the run manifest and the GPU check.

>>> import torch
>>> resolve_device("cpu"), resolve_device(None)
(device(type='cpu'), device(type='cpu'))
>>> resolve_device("auto") == (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
True
>>> x = torch.rand(2, 3)
>>> to_device(x, torch.device("cpu")) is x
True
>>> to_cpu({"a": [x, 1], "b": (x,)})["a"][0] is x
True
>>> describe_device("cpu")["type"]
'cpu'
"""
from __future__ import annotations

import dataclasses
import platform
import re
from typing import Any

import torch

DEVICE_NAMES = re.compile(r"^(cpu|auto|cuda(:[0-9]+)?)$")


def _config_error(msg: str) -> Exception:
    from streamtta.config import ConfigError

    return ConfigError(msg)


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The :class:`torch.device` of an ``engine.device`` value (None = ``"cpu"``).

    ``"cuda"`` is the current CUDA device (``torch.cuda.current_device()``, normally 0).
    :class:`~streamtta.config.ConfigError` for an unknown name, and for CUDA (or ``cuda:N`` past the
    last GPU) when torch cannot use one."""
    if isinstance(name, torch.device):
        name = str(name)
    name = "cpu" if name is None else str(name).strip().lower()
    if not DEVICE_NAMES.match(name):
        raise _config_error(f"engine.device: unknown device {name!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    if name == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if available else torch.device("cpu")
    if not available:
        why = ("this torch build has no CUDA support" if torch.version.cuda is None
               else "torch sees no CUDA GPU (driver missing, or CUDA_VISIBLE_DEVICES empty)")
        raise _config_error(f"engine.device = {name!r} but CUDA is not available: {why} (torch "
                            f"{torch.__version__}); use engine.device = 'cpu' or 'auto'")
    dev = torch.device(name)
    index = torch.cuda.current_device() if dev.index is None else dev.index
    count = torch.cuda.device_count()
    if index >= count:
        raise _config_error(f"engine.device = {name!r} but torch sees {count} CUDA device(s) "
                            f"(cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def is_cuda(device: torch.device | str | None) -> bool:
    """True for a CUDA device."""
    return device is not None and torch.device(device).type == "cuda"


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``: unchanged when it is there already; from the CPU to CUDA through pinned
    memory with a non-blocking copy (the copy is ordered on the current CUDA stream, so kernels launched
    after it see the data); any other move is a plain ``x.to(device)``."""
    if x.device == device or (x.device.type == device.type == "cpu"):
        return x
    if device.type == "cuda" and x.device.type == "cpu":
        if not x.is_pinned():
            x = x.pin_memory()
        return x.to(device, non_blocking=True)
    return x.to(device)


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor (in nested dicts, lists and tuples) on the CPU; CPU tensors and
    everything else are returned as they are (no copy)."""
    return move_tensors(obj, torch.device("cpu"))


def move_tensors(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor (in nested dicts, lists and tuples) on ``device``; tensors already there
    and non-tensors are kept as they are. Containers are rebuilt only when something moved."""
    if isinstance(obj, torch.Tensor):
        if obj.device == device or obj.device.type == device.type == "cpu":
            return obj
        return obj.to(device)
    if isinstance(obj, dict):
        moved = {k: move_tensors(v, device) for k, v in obj.items()}
        return obj if all(moved[k] is v for k, v in obj.items()) else moved
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        items = [move_tensors(v, device) for v in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        return items if isinstance(obj, list) else tuple(items)
    return obj


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` view the same memory the same way (two ``detach()`` of one tensor)."""
    return (a.device == b.device and a.data_ptr() == b.data_ptr() and a.shape == b.shape
            and a.stride() == b.stride() and a.dtype == b.dtype)


def output_to_cpu(out: Any, gated: tuple[torch.Tensor, ...] | None = None) -> Any:
    """A :class:`~streamtta.types.StepOutput` with its tensors (and those in ``info``) on the CPU: ``out``
    itself when they are there already. ``gated`` = ``(logits, features, logits_cpu, features_cpu)``, the
    tensors a gate scored and their CPU copies, reused when ``out`` holds the same tensors (one copy each)."""
    if all(t.device.type == "cpu" for t in (out.logits, out.features, out.update_mask)):
        return out

    def back(t: torch.Tensor, i: int) -> torch.Tensor:
        return gated[i + 2] if gated is not None and _same(t, gated[i]) else t.cpu()

    return dataclasses.replace(out, logits=back(out.logits, 0), features=back(out.features, 1),
                               update_mask=out.update_mask.cpu(), info=to_cpu(out.info))


def faiss_gpu_status() -> tuple[int, str | None]:
    """``(GPUs FAISS can use, why none)``: the reason is None when there is at least one."""
    try:
        import faiss  # type: ignore
    except Exception:  # pragma: no cover - faiss is a dependency
        return 0, "faiss is not installed"
    if not hasattr(faiss, "StandardGpuResources") or not hasattr(faiss, "index_cpu_to_gpu"):
        return 0, f"this faiss build ({getattr(faiss, '__version__', '?')}) has no GPU support (faiss-cpu)"
    n = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    if n < 1:
        return 0, "faiss sees no GPU"
    return n, None


def describe_device(name: str | torch.device | None) -> dict[str, Any]:
    """What ``engine.device = name`` runs on, for the run manifest: the requested name, the resolved
    device, its hardware name, torch's CUDA version and how many GPUs FAISS can use (and why none).
    Never raises: an unusable device is described with its error."""
    requested = "cpu" if name is None else str(name)
    try:
        dev = resolve_device(name)
    except ValueError as e:
        return {"requested": requested, "type": "unavailable", "error": str(e)}
    n_faiss, why = faiss_gpu_status()
    out: dict[str, Any] = {"requested": requested, "resolved": str(dev), "type": dev.type,
                           "torch_cuda": torch.version.cuda, "faiss_gpus": n_faiss}
    if dev.type == "cuda":
        out["name"] = torch.cuda.get_device_name(dev)
        out["memory_gb"] = round(torch.cuda.get_device_properties(dev).total_memory / 2**30, 1)
    else:
        out["name"] = platform.processor() or platform.machine()
    if why is not None:
        out["faiss_gpu"] = why
    return out
