"""Initialisation check: each weight's std against Glorot, He and LeCun expectations."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from gradwatch.agent.layers import RNN, Layer, Param, following_activation, is_hf_smooth, is_transposed_linear
from gradwatch.agent.sharding import global_std, is_sharded

# Within this factor of the recommended std an initialisation counts as "ok".
TOLERANCE = 1.5


def fans(module: nn.Module, weight: torch.Tensor) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight; recurrent weights count one gate's outputs; HF's Conv1D
    stores its weight (in, out)."""
    if weight.dim() < 2:
        return weight.numel(), weight.numel()
    if is_transposed_linear(module):
        return int(weight.shape[0]), int(weight.shape[1])
    receptive = math.prod(weight.shape[2:]) if weight.dim() > 2 else 1
    fan_in = weight.shape[1] * receptive
    fan_out = weight.shape[0] * receptive
    if isinstance(module, RNN):
        gates = {"LSTM": 4, "GRU": 3}.get(type(module).__name__, 1)
        fan_out //= gates
    return fan_in, fan_out


def expected_stds(fan_in: int, fan_out: int) -> dict[str, float]:
    """The std each scheme gives a weight with these fans (gain 1 for Glorot and LeCun)."""
    return {"glorot": math.sqrt(2.0 / (fan_in + fan_out)), "he": math.sqrt(2.0 / fan_in),
            "lecun": math.sqrt(1.0 / fan_in)}


def recommended_scheme(activation: nn.Module | None) -> str:
    """He for the ReLU family and smooth rectifiers, LeCun for SELU, Glorot otherwise."""
    if isinstance(activation, nn.SELU):
        return "lecun"
    if isinstance(activation, (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU,
                               nn.GELU, nn.SiLU, nn.Mish)) or (activation is not None and is_hf_smooth(activation)):
        return "he"
    return "glorot"


def verdict(ratio: float) -> str:
    if not math.isfinite(ratio):
        return "nonfinite"
    if ratio < 1 / TOLERANCE:
        return "too_small"
    if ratio > TOLERANCE:
        return "too_large"
    return "ok"


@torch.no_grad()
def check_init(layers: list[Layer], params: list[Param]) -> list[dict[str, Any]]:
    """One entry per weight matrix of each Linear / Conv / RNN layer (runs once, at attach)."""
    followers = following_activation(layers)
    out = []
    for layer_index, follower in followers.items():
        layer = layers[layer_index]
        for pi in layer.params:
            param = params[pi]
            if param.tensor.dim() < 2 or param.tensor.is_complex():  # the schemes are for real weights
                continue
            fan_in, fan_out = fans(layer.module, param.tensor)
            expected = expected_stds(fan_in, fan_out)
            activation = follower.module if follower is not None else None
            scheme = recommended_scheme(activation)
            std = global_std(param.tensor) if is_sharded(param.tensor) else float(param.tensor.float().std())
            ratio = std / expected[scheme]
            out.append({"layer": layer.name, "param": param.name, "fan_in": fan_in, "fan_out": fan_out,
                        "std": std, "activation": type(activation).__name__ if activation is not None else None,
                        "recommended": scheme, "expected": expected, "ratio": ratio, "verdict": verdict(ratio)})
    return out
