"""A scripted ``nn.Sequential`` of standard layers, rebuilt as the eager module it was compiled from.

Inside a compiled graph no layer can be replaced, so the statistics adapters that swap norm layers
(``cb-stats``, ``align``, ...) cannot run on a TorchScript model (see :mod:`streamtta.adapters.scripted`).
Many exported models are plain ``nn.Sequential`` stacks, though, whose forward is the chain of their
layers. :func:`eager_sequential` rebuilds such a model from its compiled layers: every layer of a
type listed in :data:`REBUILDERS` becomes a fresh eager layer with the compiled one's hyperparameters,
parameters and buffers, and is checked against it on a random input of a shape it accepts; nested
``Sequential`` s are rebuilt the same way. When any layer is of another type, the model was traced (a
traced layer keeps no hyperparameters), or a check fails, the answer is None and the model stays compiled.
The rebuilt model has the same ``state_dict`` keys and values, so fingerprints and calibration files
made for the compiled model stay valid.

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3)).eval()
>>> eager = eager_sequential(torch.jit.script(net))
>>> type(eager[1]).__name__, isinstance(eager, torch.jit.ScriptModule)
('LayerNorm', False)
>>> x = torch.randn(5, 8)
>>> torch.allclose(eager(x), net(x))
True
>>> eager_sequential(torch.jit.trace(net, x)) is None       # traced: hyperparameters are gone
True
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["REBUILDERS", "eager_sequential"]


def _bias(m: Any) -> bool:
    return getattr(m, "bias", None) is not None


def _conv(cls: type) -> Callable[[Any], nn.Module]:
    return lambda m: cls(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                         dilation=m.dilation, groups=m.groups, bias=_bias(m), padding_mode=m.padding_mode)


def _bn(cls: type) -> Callable[[Any], nn.Module]:
    return lambda m: cls(m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                         track_running_stats=m.track_running_stats)


def _layer_norm(m: Any) -> nn.Module:
    affine = bool(m.elementwise_affine)
    return nn.LayerNorm(tuple(m.normalized_shape), eps=m.eps, elementwise_affine=affine, bias=affine and _bias(m))


#: ``original_name`` of a compiled layer -> a function building the eager layer from its hyperparameters
REBUILDERS: dict[str, Callable[[Any], nn.Module]] = {
    "Linear": lambda m: nn.Linear(m.in_features, m.out_features, bias=_bias(m)),
    "Conv1d": _conv(nn.Conv1d),
    "Conv2d": _conv(nn.Conv2d),
    "BatchNorm1d": _bn(nn.BatchNorm1d),
    "BatchNorm2d": _bn(nn.BatchNorm2d),
    "LayerNorm": _layer_norm,
    "GroupNorm": lambda m: nn.GroupNorm(m.num_groups, m.num_channels, eps=m.eps, affine=m.affine),
    "ReLU": lambda m: nn.ReLU(),
    "ReLU6": lambda m: nn.ReLU6(),
    "LeakyReLU": lambda m: nn.LeakyReLU(m.negative_slope),
    "GELU": lambda m: nn.GELU(approximate=m.approximate),
    "SiLU": lambda m: nn.SiLU(),
    "Tanh": lambda m: nn.Tanh(),
    "Sigmoid": lambda m: nn.Sigmoid(),
    "Identity": lambda m: nn.Identity(),
    "Dropout": lambda m: nn.Dropout(m.p),
    "Flatten": lambda m: nn.Flatten(m.start_dim, m.end_dim),
    "AdaptiveAvgPool1d": lambda m: nn.AdaptiveAvgPool1d(m.output_size),
    "AdaptiveAvgPool2d": lambda m: nn.AdaptiveAvgPool2d(m.output_size),
    "MaxPool2d": lambda m: nn.MaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode),
    "AvgPool2d": lambda m: nn.AvgPool2d(m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode,
                                        count_include_pad=m.count_include_pad),
}


def _probe(layer: nn.Module, kind: str, gen: torch.Generator) -> torch.Tensor:
    """A random input ``layer`` (an eager layer of type ``kind``) accepts."""
    w = getattr(layer, "weight", None)
    dtype = w.dtype if isinstance(w, torch.Tensor) else torch.float32
    if kind == "Linear":
        shape: tuple[int, ...] = (3, layer.in_features)
    elif kind in ("Conv1d", "Conv2d"):
        shape = (2, layer.in_channels) + (13,) * (1 if kind == "Conv1d" else 2)
    elif kind == "BatchNorm1d":
        shape = (3, layer.num_features)
    elif kind == "BatchNorm2d":
        shape = (2, layer.num_features, 4, 4)
    elif kind == "LayerNorm":
        shape = (3, *layer.normalized_shape)
    elif kind == "GroupNorm":
        shape = (2, layer.num_channels, 4, 4)
    elif kind.endswith("Pool1d"):
        shape = (2, 3, 12)
    else:  # activations, dropout, flatten, 2-d pooling
        shape = (2, 3, 12, 12)
    return torch.randn(shape, generator=gen).to(dtype)


def _torch_layer(module: Any) -> bool:
    """Whether a compiled module was scripted from one of torch's own ``nn`` classes (not a user class
    that only shares its name, such as a ``class Sequential`` of one's own with another forward)."""
    try:
        name = module._c._type().qualified_name()
    except (AttributeError, RuntimeError):
        return False
    return str(name).startswith("__torch__.torch.nn.modules.")


def _chains_children(module: Any) -> bool:
    """Whether a compiled container's forward is the plain chain: each child's forward once, in order,
    on the previous output, returning the last one (nothing else in its graph)."""
    try:
        graph = module.graph
    except (AttributeError, RuntimeError):
        return False
    args = [v.debugName() for v in graph.inputs()]
    if len(args) != 2:
        return False
    attrs: dict[str, str] = {}
    called, current = [], args[1]
    for node in graph.nodes():
        ins = [v.debugName() for v in node.inputs()]
        if node.kind() == "prim::GetAttr" and ins == args[:1]:
            attrs[node.output().debugName()] = node.s("name")
        elif (node.kind() == "prim::CallMethod" and node.s("name") == "forward" and len(ins) == 2
              and ins[0] in attrs and ins[1] == current):
            called.append(attrs[ins[0]])
            current = node.output().debugName()
        else:
            return False
    outs = [v.debugName() for v in graph.outputs()]
    return outs == [current] and called == [name for name, _ in module.named_children()]


def _rebuild(module: Any, gen: torch.Generator) -> nn.Module | None:
    kind = getattr(module, "original_name", None)
    if not _torch_layer(module):
        return None
    if kind == "Sequential":
        if not _chains_children(module):
            return None
        children = []
        for name, child in module.named_children():
            eager = _rebuild(child, gen)
            if eager is None:
                return None
            children.append((name, eager))
        return nn.Sequential(OrderedDict(children))
    build = REBUILDERS.get(str(kind))
    if build is None:
        return None
    try:
        layer = build(module)
        layer.load_state_dict(module.state_dict(), strict=True)
    except (AttributeError, RuntimeError, TypeError, ValueError):  # a traced layer, or not the layer its name says
        return None
    for name, p in module.named_parameters(recurse=False):
        getattr(layer, name).requires_grad_(p.requires_grad)
    layer.train(False)
    was_training = module.training
    module.train(False)
    try:
        x = _probe(layer, str(kind), gen)
        with torch.no_grad():
            same = bool(torch.allclose(layer(x), module(x), rtol=1e-4, atol=1e-5))
    except RuntimeError:
        same = False
    finally:
        module.train(was_training)
    layer.train(was_training)
    return layer if same else None


def eager_sequential(model: nn.Module) -> nn.Module | None:
    """The eager twin of a scripted ``nn.Sequential`` of :data:`REBUILDERS` layers (nested Sequentials
    too), each checked against its compiled layer; None for anything else (a user class named like a
    torch layer included) (see the module docstring)."""
    if not isinstance(model, torch.jit.ScriptModule) or getattr(model, "original_name", None) != "Sequential":
        return None
    gen = torch.Generator().manual_seed(0)
    eager = _rebuild(model, gen)
    if eager is None:
        return None
    device = next((t.device for t in model.state_dict().values()), torch.device("cpu"))
    return eager.to(device).train(model.training)
