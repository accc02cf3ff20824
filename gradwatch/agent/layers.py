"""Model introspection: the layer and param tables a run is measured against.

A *layer* is a module that owns parameters directly or is an activation; a *param* is a
named parameter tensor as in `model.named_parameters()` (DESIGN.md).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # pydantic loads with the config, not with the agent's modules
    from gradwatch.agent.config import ForwardConfig

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
    kind: str  # "param", "activation", or the role of a module measured for its role only
    family: str | None
    params: list[int] = field(default_factory=list)
    role: str | None = None  # "attention", "block" or "logits" (see `detect_roles`)

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name or "<model>", "type": type(self.module).__name__,
                "kind": self.kind, "family": self.family, "params": self.params, "role": self.role}


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


def build_tables(model: nn.Module, optimizer: torch.optim.Optimizer,
                 forward: ForwardConfig | None = None) -> tuple[list[Layer], list[Param]]:
    """Layers in model order (index = depth) and params with their layer and param group.

    With `forward`, the attention layers, residual blocks and output layer it asks for
    (`detect_roles`) are layers too, with their role, even where they own no parameter.
    """
    group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
    roles = detect_roles(model, forward) if forward is not None else {}
    layers: list[Layer] = []
    params: list[Param] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        family = activation_family(module)
        role = roles.get(id(module))
        if not own and family is None and role is None:
            continue
        kind = "param" if own else "activation" if family is not None else str(role)
        layer = Layer(len(layers), name, module, kind, family, role=role)
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
        if isinstance(layer.module, nn.Linear) and layer.params:
            return [params[i].tensor for i in layer.params]
    return []


# ---------------------------------------------------------------------------------- roles


def is_attention_class(module: nn.Module) -> bool:
    """`nn.MultiheadAttention`, or a module whose class name says attention (`...Attention`,
    `...Attn`: Hugging Face's, nanoGPT's and torchtitan's attention modules)."""
    name = type(module).__name__
    return isinstance(module, nn.MultiheadAttention) or "Attention" in name or name.endswith("Attn")


def _matching(model: nn.Module, patterns: tuple[str, ...], what: str) -> list[tuple[str, nn.Module]]:
    """The modules whose names match any of `patterns` (fnmatch), each pattern matching one at least."""
    named = list(model.named_modules())
    found = []
    for pattern in patterns:
        hits = [(n, m) for n, m in named if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"gradwatch: forward.{what} {pattern!r} names no module of the model")
        found += [hit for hit in hits if hit not in found]
    return found


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The innermost attention modules (`is_attention_class`) in model order: a Hugging Face
    `BertAttention` holds a `BertSelfAttention`, which is the one that computes attention."""
    named = [(n, m) for n, m in model.named_modules() if is_attention_class(m)]
    return [(n, m) for n, m in named
            if not any(is_attention_class(d) for d in m.modules() if d is not m)]


def block_stacks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's main stacks of repeated blocks: ModuleLists / Sequentials of at least two
    children of one class, each holding an attention module; of those, the longest (several of
    one length: an encoder's and a decoder's)."""
    stacks = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(module.children())
        if len(children) < 2 or len({type(c) for c in children}) != 1:
            continue
        if all(any(is_attention_class(d) for d in c.modules() if d is not c) for c in children):
            stacks.append((name, module))
    longest = max((len(m) for _, m in stacks), default=0)
    return [(n, m) for n, m in stacks if len(m) == longest]


def _out_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    if is_transposed_linear(module):
        return int(getattr(module, "nf", 0))
    return 0


def logits_module(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The output (logits) layer of a model with attention layers: its last Linear (or HF
    `Conv1D`) in model order with at least two outputs, outside the attention modules and the
    blocks (GPT-2's and Llama's `lm_head`, a ViT's classifier). None in a model without
    attention: a last Linear there may be a regression head."""
    attention = attention_modules(model)
    if not attention:
        return None
    inside = {id(d) for _, m in attention + block_stacks(model) for d in m.modules()}
    last = None
    for name, module in model.named_modules():
        if _out_features(module) >= 2 and id(module) not in inside:
            last = (name, module)
    return last


def detect_roles(model: nn.Module, forward: ForwardConfig) -> dict[int, str]:
    """id(module) -> role: "attention", "block" or "logits", as `forward` asks.

    Attention layers: the modules named in `forward.attention_layers`, else `attention_modules`;
    blocks: the children of the containers named in `forward.blocks`, else of `block_stacks`;
    the logits layer: `forward.logits_layer`, else `logits_module`. A module has one role, the
    logits layer's first, then the attention layer's. A name that matches no module raises a
    ValueError naming it.
    """
    roles: dict[int, str] = {}
    if forward.scale:
        stacks = _matching(model, forward.blocks, "blocks") if forward.blocks else block_stacks(model)
        for _, stack in stacks:
            for child in stack.children():
                roles[id(child)] = "block"
    if forward.attention:
        named = (_matching(model, forward.attention_layers, "attention_layers") if forward.attention_layers
                 else attention_modules(model))
        for _, module in named:
            roles[id(module)] = "attention"
    if forward.logits:
        found = (_matching(model, (forward.logits_layer,), "logits_layer")[:1] if forward.logits_layer
                 else [hit for hit in [logits_module(model)] if hit is not None])
        for _, module in found:
            roles[id(module)] = "logits"
    return roles
