"""Model introspection: the layer and param tables a run is measured against.

A *layer* is a module that owns parameters directly or is an activation; a *param* is a
named parameter tensor as in `model.named_parameters()` (DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# Activation families, by which statistic applies (docs/agent.md explains the choice).
BOUNDED: tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Softsign)
RELU: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU)
NONNEGATIVE: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)  # of the ReLU family, those with no negative output
SMOOTH: tuple[type[nn.Module], ...] = (nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish)
RNN: tuple[type[nn.Module], ...] = (nn.RNN, nn.LSTM, nn.GRU)
WEIGHTED: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) + RNN
CONV1D: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.ConvTranspose1d)
CHANNEL_NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.InstanceNorm1d, nn.GroupNorm)


def is_transposed_linear(module: nn.Module) -> bool:
    """Hugging Face's `Conv1D` (GPT-2's attention and MLP projections): a Linear whose weight is
    stored (in, out). Recognised by name so the agent never imports transformers."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def is_hf_smooth(module: nn.Module) -> bool:
    """One of Hugging Face's GELU/SiLU/Mish activation modules (see HF_SMOOTH)."""
    cls = type(module)
    return cls.__name__ in HF_SMOOTH and cls.__module__.startswith("transformers")


def is_weighted(module: nn.Module) -> bool:
    """Linear, Conv1d/2d/3d, RNN/LSTM/GRU and HF's Conv1D: the layers the init check judges."""
    return isinstance(module, WEIGHTED) or is_transposed_linear(module)


# Hugging Face's own activation modules (transformers.activations), by class name so that the
# agent never imports transformers: GELU variants, SiLU and Mish are smooth rectifiers.
HF_SMOOTH = frozenset({"GELUActivation", "NewGELUActivation", "FastGELUActivation", "QuickGELUActivation",
                       "AccurateGELUActivation", "GELUTanh", "PytorchGELUTanh", "SiLUActivation", "MishActivation",
                       "ClippedGELUActivation"})


def activation_family(module: nn.Module) -> str | None:
    """`bounded`, `relu`, `smooth`, or None when the module is not an activation.

    Recurrent layers count as `bounded`: their outputs are tanh-bounded hidden states.
    (`nn.ReLU6` subclasses `Hardtanh`, so the ReLU family is tested first.)
    """
    if isinstance(module, RELU):
        return "relu"
    if isinstance(module, BOUNDED):
        return "bounded"
    if isinstance(module, SMOOTH) or is_hf_smooth(module):
        return "smooth"
    if isinstance(module, nn.RNNBase) and getattr(module, "nonlinearity", "tanh") == "tanh":
        return "bounded"
    return None


def saturation_bounds(module: nn.Module) -> tuple[float, float]:
    """The asymptotes of a bounded activation's output."""
    if isinstance(module, nn.Hardtanh):
        return float(module.min_val), float(module.max_val)
    if isinstance(module, (nn.Sigmoid, nn.Hardsigmoid)):
        return 0.0, 1.0
    return -1.0, 1.0


@dataclass
class Layer:
    index: int
    name: str
    module: nn.Module
    kind: str  # "param" or "activation"
    family: str | None
    params: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name or "<model>", "type": type(self.module).__name__,
                "kind": self.kind, "family": self.family, "params": self.params}


@dataclass
class Param:
    index: int
    name: str
    tensor: torch.nn.Parameter
    layer: int
    group: int | None

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "layer": self.layer, "shape": list(self.tensor.shape),
                "numel": self.tensor.numel(), "requires_grad": self.tensor.requires_grad, "group": self.group}


def build_tables(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list[Layer], list[Param]]:
    """Layers in model order (index = depth) and params with their layer and param group."""
    group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
    layers: list[Layer] = []
    params: list[Param] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        family = activation_family(module)
        if not own and family is None:
            continue
        layer = Layer(len(layers), name, module, "param" if own else "activation", family)
        for pname, p in own:
            seen.add(id(p))
            layer.params.append(len(params))
            full = f"{name}.{pname}" if name else pname
            params.append(Param(len(params), full, p, layer.index, group_of.get(id(p))))
        layers.append(layer)
    return layers, params


def following_activation(layers: list[Layer]) -> dict[int, Layer | None]:
    """For each weighted layer, the activation that follows it in model order (None if a
    weighted layer comes first). Recurrent layers are their own activation (tanh)."""
    out: dict[int, Layer | None] = {}
    for i, layer in enumerate(layers):
        if not is_weighted(layer.module):
            continue
        if isinstance(layer.module, RNN):
            out[i] = layer
            continue
        nxt = None
        for later in layers[i + 1:]:
            if is_weighted(later.module):
                break
            if later.kind == "activation":
                nxt = later
                break
        out[i] = nxt
    return out


def channels_first(layers: list[Layer], index: int) -> bool:
    """Whether a 3-D output of layer `index` is (batch, channels, length), not (batch, sequence,
    features): the nearest parameter layer before it in model order is a 1-d convolution
    (channel norms between them are looked through)."""
    for layer in reversed(layers[:index]):
        if layer.kind == "param" and not isinstance(layer.module, CHANNEL_NORMS):
            return isinstance(layer.module, CONV1D)
    return False


def last_linear_params(layers: list[Layer], params: list[Param]) -> list[torch.Tensor]:
    """Params of the last Linear layer (AGC leaves the classifier unclipped by default)."""
    for layer in reversed(layers):
        if isinstance(layer.module, nn.Linear):
            return [params[i].tensor for i in layer.params]
    return []
