"""Activation statistics against a plain reference computed from the same outputs.

The reference uses boolean masks, `torch.mean` and float64: the obvious, slow way. The agent's
sums-and-counts path (`gradwatch.agent.stats` and the host-side division) must agree with it,
on every activation family, on 2-D, 3-D and 4-D outputs, with planted zeros, -0.0 and dead
units, pooled over two micro-batches per step.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.agent.layers import NONNEGATIVE, RELU, activation_family, saturation_bounds
from gradwatch.agent.stats import unit_dims

EPS = 1e-3


class NegativeZeros(nn.Module):
    """Replace every third output with -0.0: ReLU passes -0.0 on, and it must count as zero."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros_like(x, dtype=torch.bool).view(-1)
        mask[::3] = True
        return torch.where(mask.view_as(x), torch.full_like(x, -0.0), x)


class Net(nn.Module):
    """Every activation family on 2-D, 3-D (sequence) and 4-D (conv) outputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        with torch.no_grad():
            self.conv.bias[:2] = -50.0  # two dead channels
        self.conv_relu = nn.ReLU()
        self.conv_leaky = nn.LeakyReLU(0.1)
        self.fc = nn.Linear(6 * 8 * 8, 32)
        with torch.no_grad():
            self.fc.bias[:5] = -50.0  # five dead features
            self.fc.weight.mul_(8.0)  # wide pre-activations: the bounded ones saturate
        self.zeros = NegativeZeros()
        self.relu = nn.ReLU()
        self.relu6 = nn.ReLU6()
        self.sigmoid = nn.Sigmoid()
        self.tanh = nn.Tanh()
        self.hardtanh = nn.Hardtanh(-2.0, 2.0)
        self.gelu = nn.GELU()
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.seq_relu = nn.ReLU()
        self.head = nn.Linear(32 * 6 + 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv(x)
        h = self.fc((self.conv_relu(c) + self.conv_leaky(c)).flatten(1))
        branches = [self.relu(self.zeros(h)), self.relu6(h * 3), self.sigmoid(h), self.tanh(h),
                    self.hardtanh(h), self.gelu(h)]
        seq, _ = self.lstm(h[:, :24].reshape(-1, 6, 4))
        s = self.seq_relu(seq).mean(dim=1)
        return self.head(torch.cat(branches + [s], dim=1))


def _reference(module: nn.Module, outputs: list[torch.Tensor]) -> dict[str, float]:
    """The statistics of a step's outputs (its micro-batches pooled), the plain way."""
    y = torch.cat([o.reshape(-1) for o in outputs]).double()
    ref = {"act_mean": y.mean().item(), "act_std": y.std(correction=0).item()}
    family = activation_family(module)
    if family == "bounded":
        low, high = saturation_bounds(module)
        ref["saturation_ratio"] = ((y < low + EPS) | (y > high - EPS)).double().mean().item()
    if family == "relu":  # dead: zero for every sample of every micro-batch of the step
        all_zero = torch.stack([(o == 0).all(dim=unit_dims(o.dim())) if unit_dims(o.dim()) else o == 0
                                for o in outputs]).all(dim=0)
        ref["dead_ratio"] = all_zero.double().mean().item()
        ref["zero_ratio"] = (y == 0).double().mean().item()
    return ref


def test_statistics_match_a_plain_reference_on_every_family():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    captured: dict[str, list[torch.Tensor]] = defaultdict(list)
    names = {m: n for n, m in model.named_modules()}
    stat_modules = [m for m in model.modules() if activation_family(m) is not None]
    for m in stat_modules:
        m.register_forward_hook(lambda mod, i, o: captured[names[mod]].append(
            (o[0] if isinstance(o, tuple) else o).detach().clone()))
    gen = torch.Generator().manual_seed(1)
    config = {"measure": {"activation_every": 1, "saturation_eps": EPS}}
    with gradwatch.watch(model, opt, config=config) as watcher:
        for _ in range(3):
            captured.clear()
            for _ in range(2):  # two micro-batches, one optimizer step
                x = torch.randn(4, 3, 8, 8, generator=gen)
                y = torch.randint(0, 5, (4,), generator=gen)
                nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        snap = watcher.snapshot()
    assert snap["errors"] == {}
    seen = set()
    for module in stat_modules:
        name = names[module]
        for metric, expected in _reference(module, captured[name]).items():
            got = snap["layers"][name][metric]
            assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), (name, metric, got, expected)
            seen.add(metric)
    assert seen == {"act_mean", "act_std", "saturation_ratio", "dead_ratio", "zero_ratio"}
    # the planted cases are really there, so the comparison above means something
    layers = snap["layers"]
    assert layers["conv_relu"]["dead_ratio"] == pytest.approx(2 / 6)
    assert layers["relu"]["dead_ratio"] >= 5 / 32 and layers["relu"]["zero_ratio"] > 1 / 3
    assert layers["conv_leaky"]["dead_ratio"] == 0.0  # leaky: negative, never exactly zero
    assert layers["sigmoid"]["saturation_ratio"] > 0.1 and layers["hardtanh"]["saturation_ratio"] > 0.1


def test_nonnegative_relus_are_a_subset_of_the_family():
    assert set(NONNEGATIVE) <= set(RELU)
    for cls in NONNEGATIVE:
        assert (cls()(torch.randn(1000)) >= 0).all()


def test_conv1d_outputs_have_channels_as_units():
    """(batch, channels, length) after a Conv1d (and its BatchNorm1d): dead channels, not positions."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 16, 2))
    with torch.no_grad():
        model[1].bias[:2] = -50.0  # two channels below zero everywhere
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradwatch.watch(model, opt, config={"measure": {"activation_every": 1}}) as watcher:
        model(torch.randn(4, 3, 16)).sum().backward()
        opt.step()
        snap = watcher.snapshot()
    assert snap["layers"]["2"]["dead_ratio"] == pytest.approx(2 / 8)
