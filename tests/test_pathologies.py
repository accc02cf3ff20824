"""The agent's metrics shown on real pathologies: each one is trained for real and must read as such.

Vanishing gradients (a deep sigmoid MLP with the "standard" init of Glorot & Bengio 2010),
saturation (sigmoid / tanh with too-large weights), exploding gradients (a tanh RNN whose
recurrent matrix has spectral radius > 1) held by clipping, dead ReLUs (a strongly negative
bias), and a healthy network that shows none of them. The builders (`mlp`, `fixed_batch`,
`RNNClassifier`, `relu_mlp_with_negative_bias`) also serve tests/test_diagnose_training.py,
which diagnoses these models.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.agent import runlog
from gradwatch.agent.config import MeasureConfig

EVERY_STEP = {"measure": {"activation_every": 1}}
WIDTH, DEPTH, BATCH, CLASSES = 256, 10, 32, 10


def mlp(activation: Callable[[], nn.Module], init: Callable[[nn.Linear], None] | None = None,
         depth: int = DEPTH, width: int = WIDTH) -> nn.Sequential:
    """`depth` hidden Linear+activation pairs and a Linear head (PyTorch's default init unless `init`)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        linear = nn.Linear(width, width)
        if init is not None:
            init(linear)
        layers += [linear, activation()]
    layers.append(nn.Linear(width, CLASSES))
    return nn.Sequential(*layers)


def fixed_batch(features: int = WIDTH, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, features, generator=gen), torch.randint(0, CLASSES, (BATCH,), generator=gen)


def _train(model: nn.Module, steps: int = 1, config: dict[str, Any] | None = None,
           batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[gradwatch.Watcher, dict[str, Any]]:
    """Train with SGD on a fixed batch; returns the closed watcher and its last snapshot."""
    x, y = batch if batch is not None else fixed_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, config=config or EVERY_STEP) as watcher:
        for _ in range(steps):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            watcher.log(loss=loss)
        snap = watcher.snapshot()
    assert snap["errors"] == {} and snap["steps"] == steps
    return watcher, snap


def _names_of(model: nn.Sequential, kind: type[nn.Module]) -> list[str]:
    return [name for name, m in model.named_children() if isinstance(m, kind)]


def _series(watcher: gradwatch.Watcher, metric: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(steps, values, layer/param indices of the columns) of one metric from the run log."""
    blocks = [b for r in runlog.read_log(watcher.path) if isinstance(r, runlog.Frame)
              for b in r.blocks if b.metric.name == metric]
    assert blocks, f"{metric} not in the run log"
    return (np.concatenate([b.steps for b in blocks]), np.concatenate([np.where(b.present, b.values, np.nan) for b in blocks]),
            list(blocks[0].metric.indices))


# ---------------------------------------------------------------------------------- vanishing


def test_vanishing_gradients_in_deep_sigmoid_mlp_with_standard_init():
    model = mlp(nn.Sigmoid)
    x, y = fixed_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, config=EVERY_STEP) as watcher:
        outputs = []
        h = x
        for module in model:  # the same forward, keeping every layer output's gradient as a reference
            h = module(h)
            h.retain_grad()
            outputs.append(h)
        nn.functional.cross_entropy(h, y).backward()
        reference = [float(o.grad.norm()) for o in outputs]
        opt.step()
        snap = watcher.snapshot()
    layers = snap["layers"]
    measured = [layers[str(i)]["act_grad_norm"] for i in range(len(model))]
    np.testing.assert_allclose(measured, reference, rtol=1e-4)

    linears = _names_of(model, nn.Linear)
    first, last = layers[linears[0]]["act_grad_norm"], layers[linears[-1]]["act_grad_norm"]
    assert last / first > 1000, (first, last)  # measured ~1e-10 at the input vs ~1e-1 at the head
    flow = [layers[name]["act_grad_norm"] for name in linears]
    assert all(a < b for a, b in zip(flow, flow[1:])), flow  # shrinks at every layer going down
    # The cause is in the init check: U[-1/sqrt(n), 1/sqrt(n)] is below Glorot's std for a sigmoid.
    check = {c["param"]: c for c in snap["init_check"]}
    hidden = [f"{name}.weight" for name in linears[:-1]]
    assert {check[p]["verdict"] for p in hidden} == {"too_small"}
    assert {check[p]["recommended"] for p in hidden} == {"glorot"}


# ---------------------------------------------------------------------------------- saturation


SATURATING = {
    "sigmoid-normal-1": (nn.Sigmoid, 1.0),
    "tanh-normal-0.5": (nn.Tanh, 0.5),
}


@pytest.mark.parametrize("activation, std", SATURATING.values(), ids=SATURATING.keys())
def test_saturation_with_too_large_weights(activation, std):
    model = mlp(activation, init=lambda l: nn.init.normal_(l.weight, 0.0, std))
    acts = _names_of(model, activation)
    # An independent count of the outputs within eps of the asymptotes, on the initial weights.
    x, _ = fixed_batch()
    low, high = (0.0, 1.0) if activation is nn.Sigmoid else (-1.0, 1.0)
    eps = MeasureConfig().saturation_eps
    with torch.no_grad():
        h, expected = x, []
        for module in model:
            h = module(h)
            if isinstance(module, activation):
                expected.append(float(((h < low + eps) | (h > high - eps)).float().mean()))

    watcher, snap = _train(model, steps=2)
    steps, values, indices = _series(watcher, "saturation_ratio")
    np.testing.assert_array_equal(steps, [0, 1])
    np.testing.assert_allclose(values[0], expected, atol=1e-6)
    header = runlog.read_log(watcher.path)[0].info
    assert {header["layers"][i]["type"] for i in indices} == {activation.__name__}  # bounded layers only
    assert [header["layers"][i]["name"] for i in indices] == acts
    ratios = [snap["layers"][name]["saturation_ratio"] for name in acts]
    assert sum(r > 0.5 for r in ratios) > len(ratios) / 2, ratios  # measured ~0.65-0.77
    assert (values > 0.5).sum(axis=1).min() > len(acts) / 2  # at every step
    assert {c["verdict"] for c in snap["init_check"] if c["activation"] is not None} == {"too_large"}


def test_default_init_sigmoid_is_not_saturated():
    """The vanishing-gradient MLP above is not a saturation case: its sigmoids sit near 0.5."""
    model = mlp(nn.Sigmoid)
    snap = _train(model)[1]
    ratios = [snap["layers"][name]["saturation_ratio"] for name in _names_of(model, nn.Sigmoid)]
    assert max(ratios) < 0.05, ratios


# ---------------------------------------------------------------------------------- exploding


class RNNClassifier(nn.Module):
    """A vanilla tanh RNN whose recurrent weights have spectral radius ~3 (a chaotic regime)."""

    def __init__(self, gain: float = 3.0, hidden: int = 64, features: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.RNN(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 4)
        with torch.no_grad():
            self.rnn.weight_hh_l0.normal_(0.0, gain / math.sqrt(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _rnn_step(seq_len: int, config: dict[str, Any] | None = None) -> tuple[dict[str, Any], float, float]:
    """One training step on a sequence of `seq_len`; (snapshot, torch's total norm before, after the step)."""
    model = RNNClassifier()
    assert float(torch.linalg.eigvals(model.rnn.weight_hh_l0.detach()).abs().max()) > 2.5
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, seq_len, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, config=config) as watcher:
        nn.functional.cross_entropy(model(x), y).backward()
        before = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in model.parameters()))
        opt.step()  # the agent clips in its pre-step hook; the clipped grads stay in .grad
        after = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in model.parameters()))
        snap = watcher.snapshot()
    assert snap["errors"] == {}
    return snap, before, after


SEQ_LENS = [5, 10, 20, 40]


def test_exploding_gradients_grow_with_sequence_length_in_a_tanh_rnn():
    totals = []
    for seq_len in SEQ_LENS:
        snap, before, _ = _rnn_step(seq_len)
        total = snap["grad_norm_total"]["before_clip"]
        assert total == pytest.approx(before, rel=1e-4)
        assert snap["grad_norm_total"]["after_clip"] == pytest.approx(total, rel=1e-6)  # no clipping configured
        totals.append(total)
    assert all(a < b for a, b in zip(totals, totals[1:])), totals
    assert totals[-1] > 1000 * totals[0], totals  # measured ~4 at 5 steps, ~2e5 at 40


@pytest.mark.parametrize("seq_len", [SEQ_LENS[0], SEQ_LENS[-1]], ids=lambda n: f"seq{n}")
def test_norm_clipping_holds_the_exploding_rnn_at_the_threshold(seq_len):
    snap, before, after = _rnn_step(seq_len, config={"clip": {"mode": "norm", "max_norm": 1.0}})
    total, clipped = snap["grad_norm_total"]["before_clip"], snap["grad_norm_total"]["after_clip"]
    assert total == pytest.approx(before, rel=1e-4) and total > 2.0
    assert clipped == pytest.approx(1.0, rel=1e-4)
    assert after == pytest.approx(1.0, rel=1e-4)  # what the optimizer really applied
    assert snap["clip_coef"] == pytest.approx(1.0 / total, rel=1e-4)
    if seq_len == SEQ_LENS[-1]:
        assert total > 1e4


# ---------------------------------------------------------------------------------- dead ReLU

DEAD_LAYER = 3  # the 4th hidden Linear


def relu_mlp_with_negative_bias(activation: Callable[[], nn.Module]) -> nn.Sequential:
    model = mlp(activation, init=lambda l: nn.init.kaiming_normal_(l.weight, nonlinearity="relu"),
                 depth=6, width=64)
    with torch.no_grad():
        model[2 * DEAD_LAYER].bias.fill_(-10.0)
    return model


DEAD = {"relu": (nn.ReLU, True), "leaky-relu": (lambda: nn.LeakyReLU(0.01), False)}


@pytest.mark.parametrize("activation, dies", DEAD.values(), ids=DEAD.keys())
def test_strongly_negative_bias_kills_a_relu_layer_not_a_leaky_one(activation, dies):
    model = relu_mlp_with_negative_bias(activation)
    dead_act = str(2 * DEAD_LAYER + 1)  # the activation after the biased Linear
    watcher, snap = _train(model, steps=3, batch=fixed_batch(64))
    steps, values, indices = _series(watcher, "dead_ratio")
    np.testing.assert_array_equal(steps, [0, 1, 2])
    header = runlog.read_log(watcher.path)[0].info
    column = indices.index(next(l["index"] for l in header["layers"] if l["name"] == dead_act))
    dead = values[:, column]
    zero = _series(watcher, "zero_ratio")[1][:, column]
    if dies:
        assert (dead > 0.95).all(), dead  # dead at every step: the layer is dying, not dipping
        assert (zero > 0.95).all(), zero
        # Nothing flows back through a dead layer: every Linear below it gets a zero gradient.
        for name in _names_of(model, nn.Linear)[:DEAD_LAYER + 1]:
            assert snap["layers"][name]["grad_norm"] == 0.0
    else:
        assert (dead < 0.05).all(), dead
        assert snap["layers"][_names_of(model, nn.Linear)[0]]["grad_norm"] > 0.0
    others = [snap["layers"][str(2 * i + 1)]["dead_ratio"] for i in range(DEAD_LAYER)]
    assert max(others) < 0.5, others  # the layers above the biased one are healthy


# ---------------------------------------------------------------------------------- healthy


class _ResidualBlock(nn.Module):
    def __init__(self, width: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.norm = norm(width)
        self.act = nn.ReLU()
        nn.init.kaiming_normal_(self.linear.weight, nonlinearity="relu")
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.norm(self.linear(x)))


class _HealthyNet(nn.Module):
    def __init__(self, norm: Callable[[int], nn.Module], depth: int = DEPTH, width: int = WIDTH) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(width, width)
        self.stem_act = nn.ReLU()
        nn.init.kaiming_normal_(self.stem.weight, nonlinearity="relu")
        self.blocks = nn.Sequential(*[_ResidualBlock(width, norm) for _ in range(depth - 1)])
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem_act(self.stem(x))))


HEALTHY = {"batchnorm": nn.BatchNorm1d, "layernorm": nn.LayerNorm}


@pytest.mark.parametrize("norm", HEALTHY.values(), ids=HEALTHY.keys())
def test_healthy_residual_relu_network_shows_no_pathology(norm):
    model = _HealthyNet(norm)
    watcher, snap = _train(model, steps=3)
    layers = snap["layers"]
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    first, last = layers[linears[0]]["act_grad_norm"], layers[linears[-1]]["act_grad_norm"]
    assert 1 / 100 < first / last < 100, (first, last)
    assert all(layer.get("saturation_ratio") is None for layer in layers.values())  # nothing bounded
    relus = [name for name, m in model.named_modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == DEPTH
    _, dead, _ = _series(watcher, "dead_ratio")
    assert dead.shape == (3, DEPTH) and dead.max() < 0.5, dead
    check = [c for c in snap["init_check"] if c["activation"] == "ReLU"]
    assert len(check) == DEPTH and {c["verdict"] for c in check} == {"ok"}
    assert {c["recommended"] for c in check} == {"he"}
    _, nonfinite, _ = _series(watcher, "nonfinite_params")
    assert nonfinite.sum() == 0 and snap["nonfinite_params"] == 0
    assert not [r for r in runlog.read_log(watcher.path) if isinstance(r, runlog.Event)]
