"""Small models and a training loop shared by the agent tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


class LSTMTagger(nn.Module):
    def __init__(self, kind: type[nn.RNNBase] = nn.LSTM) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.rnn = kind(16, 24, num_layers=2, batch_first=True)
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(x))
        return self.head(out[:, -1])


class Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.block = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(x)).mean(dim=1))


class SharedTwice(nn.Module):
    """One Linear used twice, a frozen layer and a layer that never gets a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(12, 12)
        self.act = nn.ReLU(inplace=True)
        self.frozen = nn.Linear(12, 12).requires_grad_(False)
        self.unused = nn.Linear(12, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.shared(x))
        h = self.act(self.shared(h))
        return self.head(self.frozen(h))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def batch_for(name: str, generator: torch.Generator) -> Batch:
    """A fixed-shape random batch for the named model."""
    y = torch.randint(0, 5, (16,), generator=generator)
    if name in ("lstm", "gru", "transformer"):
        return torch.randint(0, 50, (16, 10), generator=generator), y
    if name == "cnn":
        return torch.randn(16, 3, 8, 8, generator=generator), y
    return torch.randn(16, 12, generator=generator), y


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "lstm": lambda: LSTMTagger(nn.LSTM),
    "gru": lambda: LSTMTagger(nn.GRU),
    "transformer": Transformer,
    "shared": SharedTwice,
}


def train(model: nn.Module, optimizer: torch.optim.Optimizer, name: str, steps: int, seed: int = 0,
          watcher: object | None = None, after_backward: Callable[[], None] | None = None) -> list[float]:
    """Train on seeded random batches; returns the losses."""
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x, y = batch_for(name, gen)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
        optimizer.zero_grad()
        if watcher is not None:
            watcher.log(loss=loss)  # type: ignore[attr-defined]
        losses.append(loss.item())
    return losses
