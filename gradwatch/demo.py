"""The demo: small CPU training jobs that show each gradient pathology, recorded with the agent.

A deep sigmoid MLP with PyTorch's default init (vanishing gradients) and its twin with
N(0, 1) weights (saturation); a vanilla RNN on long sequences with a high learning rate
(exploding) and the same run clipped; and a healthy ReLU network. `gradwatch demo` runs them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradwatch

PROJECT = "demo"
SEED = 0
Batch = tuple[torch.Tensor, torch.Tensor]
Setup = tuple[nn.Module, torch.optim.Optimizer, Callable[[int], Batch], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]

#: The agent's measurement cadence for demo runs: dense enough for plots of short runs.
MEASURE = {"activation_every": 5, "param_every": 5, "update_ratio_every": 5, "flush_every": 20}


def sigmoid_mlp(depth: int = 8, width: int = 256, inputs: int = 16, classes: int = 2,
                weight_std: float | None = None) -> nn.Sequential:
    """A deep MLP of Linear + Sigmoid blocks; default PyTorch init, or N(0, weight_std) weights."""
    layers: list[nn.Module] = []
    d = inputs
    for _ in range(depth):
        linear = nn.Linear(d, width)
        if weight_std is not None:
            nn.init.normal_(linear.weight, 0.0, weight_std)
        layers += [linear, nn.Sigmoid()]
        d = width
    layers.append(nn.Linear(d, classes))
    return nn.Sequential(*layers)


def relu_mlp(depth: int = 4, width: int = 64, inputs: int = 16, classes: int = 2) -> nn.Sequential:
    """A ReLU MLP with He init, zero biases and LayerNorm: the healthy reference."""
    layers: list[nn.Module] = []
    d = inputs
    for _ in range(depth):
        linear = nn.Linear(d, width)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.LayerNorm(width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, classes))
    return nn.Sequential(*layers)


class SequenceRegressor(nn.Module):
    """A vanilla tanh RNN reading a sequence, and a linear head on its last hidden state."""

    def __init__(self, inputs: int = 4, hidden: int = 32) -> None:
        super().__init__()
        self.rnn = nn.RNN(inputs, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def xor_batches(inputs: int = 16, size: int = 4096, batch: int = 64) -> Callable[[int], Batch]:
    """Batches of a fixed classification set: the label is the sign of x0 * x1 (not linearly separable)."""
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(size, inputs, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).long()
    order = torch.randint(0, size, (100_000 // batch + 1, batch), generator=g)
    return lambda step: (x[order[step % len(order)]], y[order[step % len(order)]])


def long_range_batches(length: int = 100, inputs: int = 4, batch: int = 32) -> Callable[[int], Batch]:
    """Random sequences whose target is the sum of the first five values: a long-range dependency."""
    def make(step: int) -> Batch:
        g = torch.Generator().manual_seed(SEED * 100_003 + step)
        x = torch.randn(batch, length, inputs, generator=g)
        return x, x[:, :5, 0].sum(dim=1, keepdim=True)
    return make


def _sigmoid_setup(weight_std: float | None) -> Setup:
    model = sigmoid_mlp(weight_std=weight_std)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), xor_batches(), nn.functional.cross_entropy


def _rnn_setup() -> Setup:
    model = SequenceRegressor()
    for weight in (model.rnn.weight_ih_l0, model.rnn.weight_hh_l0, model.head.weight):
        nn.init.xavier_normal_(weight)  # the init check's choice: the explosion comes from lr and recurrence
    return model, torch.optim.SGD(model.parameters(), lr=0.5), long_range_batches(), nn.functional.mse_loss


def _healthy_setup() -> Setup:
    model = relu_mlp()
    return model, torch.optim.Adam(model.parameters(), lr=1e-3), xor_batches(), nn.functional.cross_entropy


@dataclass(frozen=True)
class DemoJob:
    """One demo training run: its name, what it shows, how long, and how it is built."""

    name: str
    shows: str
    steps: int
    setup: Callable[[], Setup]
    config: dict[str, Any] = field(default_factory=dict)


JOBS: tuple[DemoJob, ...] = (
    DemoJob("demo-sigmoid-default-init", "vanishing gradients: deep sigmoid MLP, PyTorch default init", 300,
            lambda: _sigmoid_setup(None)),
    DemoJob("demo-sigmoid-normal-init", "saturation: the same MLP with N(0, 1) weights", 300,
            lambda: _sigmoid_setup(1.0)),
    DemoJob("demo-rnn-high-lr", "exploding gradients: vanilla RNN, 100-step sequences, SGD lr 0.5", 200,
            _rnn_setup),
    DemoJob("demo-rnn-high-lr-clipped", "the same RNN with the total norm clipped at 1.0", 200,
            _rnn_setup, {"clip": {"mode": "norm", "max_norm": 1.0}}),
    DemoJob("demo-healthy", "healthy: ReLU MLP with He init, LayerNorm and Adam", 300, _healthy_setup),
)


def job_steps(job: DemoJob, quick: bool) -> int:
    """Steps a job trains for; `quick` (for tests and CI) runs the same code for a third of them."""
    return max(60, job.steps // 3) if quick else job.steps


def train(job: DemoJob, home: Path, steps: int, on_step: Callable[[], None] | None = None) -> str:
    """Train one demo job under the agent, recording into `home`; returns the run id."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # models this small run fastest on one thread, and do not fight other processes
    try:
        torch.manual_seed(SEED)
        model, optimizer, batches, loss_fn = job.setup()
        config = {"project": PROJECT, "home": str(home), "measure": MEASURE, **job.config}
        with gradwatch.watch(model, optimizer, run=job.name, config=config) as watcher:
            for step in range(steps):
                x, y = batches(step)
                loss = loss_fn(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                watcher.log(loss=loss.detach())
                if on_step is not None:
                    on_step()
    finally:
        torch.set_num_threads(threads)
    return watcher.run_id
