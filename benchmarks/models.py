"""The four models of the overhead benchmark, each with a fixed random batch and its loss."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VOCAB = 1024


@dataclass(frozen=True)
class Workload:
    """A model, the fixed batch it trains on and the loss of one forward pass."""

    model: nn.Module
    inputs: Tensor
    targets: Tensor
    loss_fn: Callable[[Tensor, Tensor], Tensor]

    def loss(self, model: nn.Module) -> Tensor:
        """Forward `model` (this workload's model or a copy of it) on the batch; return the loss."""
        return self.loss_fn(model(self.inputs), self.targets)


def _cross_entropy_tokens(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def mlp() -> nn.Module:
    """Ten Linear layers of width 512, a Sigmoid after each hidden one, 10 classes out."""
    layers: list[nn.Module] = []
    for _ in range(9):
        layers += [nn.Linear(512, 512), nn.Sigmoid()]
    layers.append(nn.Linear(512, 10))
    return nn.Sequential(*layers)


def cnn() -> nn.Module:
    """Four Conv3x3 + BatchNorm + ReLU blocks (32, 64, 128, 128 channels, 2x2 max-pool after each)."""
    layers: list[nn.Module] = []
    channels = [3, 32, 64, 128, 128]
    for c_in, c_out in itertools.pairwise(channels):
        layers += [
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
    layers += [nn.Flatten(), nn.Linear(128 * 2 * 2, 10)]
    return nn.Sequential(*layers)


class LSTMLanguageModel(nn.Module):
    """Embedding(1024, 128), a 2-layer LSTM of 256 units and a linear head over the vocabulary."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 128)
        self.lstm = nn.LSTM(128, 256, num_layers=2, batch_first=True)
        self.head = nn.Linear(256, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        hidden, _ = self.lstm(self.embed(tokens))
        return self.head(hidden)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused QKV projection."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """A pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A small decoder-only transformer: token and position embeddings, pre-LN blocks, a head."""

    def __init__(self, layers: int = 4, d_model: int = 256, heads: int = 4, seq: int = 128) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Embedding(seq, d_model)
        self.blocks = nn.Sequential(*[Block(d_model, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.head(self.ln_f(self.blocks(self.tok(tokens) + self.pos(positions))))


def build(name: str, device: torch.device, batch_scale: int = 1, seed: int = 0) -> Workload:
    """Build model `name` (mlp, cnn, lstm, gpt) on `device` with its batch times `batch_scale`."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "mlp":
        n = 128 * batch_scale
        model = mlp()
        inputs = torch.randn(n, 512, generator=gen)
        targets = torch.randint(0, 10, (n,), generator=gen)
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy
    elif name == "cnn":
        n = 64 * batch_scale
        model = cnn()
        inputs = torch.randn(n, 3, 32, 32, generator=gen)
        targets = torch.randint(0, 10, (n,), generator=gen)
        loss_fn = F.cross_entropy
    elif name == "lstm":
        n, seq = 32 * batch_scale, 64
        model = LSTMLanguageModel()
        tokens = torch.randint(0, VOCAB, (n, seq + 1), generator=gen)
        inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        loss_fn = _cross_entropy_tokens
    elif name == "gpt":
        n, seq = 16 * batch_scale, 128
        model = GPT(seq=seq)
        tokens = torch.randint(0, VOCAB, (n, seq + 1), generator=gen)
        inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        loss_fn = _cross_entropy_tokens
    else:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return Workload(model.to(device), inputs.to(device), targets.to(device), loss_fn)


MODELS: tuple[str, ...] = ("mlp", "cnn", "lstm", "gpt")
