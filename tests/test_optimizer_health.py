"""Optimizer health in the agent: every Adam-family statistic equals a plain-torch computation from
the optimizer's own state (Adam, AdamW, foreach, fused, amsgrad), an optimizer without such state
is recorded as such, the per-layer aggregates and weight-decay equilibria equal their definitions,
and none of it makes a host synchronisation."""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.agent import runlog
from gradwatch.agent.optimizer_health import UPDATE_RATIO_BAND, normalized_params
from gradwatch.agent.layers import build_tables

STEPS = 8
EVERY_STEP = {"flush_every": 5, "param_every": 1, "update_ratio_every": 1, "optimizer_every": 1,
              "activation_every": 0}


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16, bias=False), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 3))


def batches(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(24, 6, generator=g), torch.randint(0, 3, (24,), generator=g)) for _ in range(steps)]


def metric(path: Any, name: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """step -> (values, present) of one metric in a run log."""
    out = {}
    for record in runlog.read_log(path):
        if isinstance(record, runlog.Frame):
            for block in record.blocks:
                if block.metric.name == name:
                    for i, step in enumerate(block.steps):
                        out[int(step)] = (block.values[i], block.present[i])
    return out


def header(path: Any) -> runlog.Header:
    return next(r for r in runlog.read_log(path) if isinstance(r, runlog.Header))


class StateRecorder:
    """Registered before gradwatch, so its hooks see each step's gradients and the state before
    and after it: the reference statistics, computed with plain torch."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt
        self.params = [p for g in opt.param_groups for p in g["params"]]
        self.lag: list[dict[int, float]] = []
        self.rms: list[dict[int, float]] = []
        self.eps_frac: list[dict[int, float]] = []
        opt.register_step_pre_hook(self.before)
        opt.register_step_post_hook(self.after)

    def _group(self, p: torch.Tensor) -> dict[str, Any]:
        return next(g for g in self.opt.param_groups if any(q is p for q in g["params"]))

    def before(self, *_: Any) -> None:
        lag = {}
        for i, p in enumerate(self.params):
            state = self.opt.state.get(p)
            if not state:
                continue
            g = self._group(p)
            t = float(state["step"])
            bc2 = 1 - g["betas"][1] ** t
            denom = state["exp_avg_sq"].sqrt() / math.sqrt(bc2) + g["eps"]
            lag[i] = float(((p.grad / denom) ** 2).double().mean())
        self.lag.append(lag)

    def after(self, *_: Any) -> None:
        rms, frac = {}, {}
        for i, p in enumerate(self.params):
            state = self.opt.state[p]
            g = self._group(p)
            t = float(state["step"])
            bc1, bc2 = 1 - g["betas"][0] ** t, 1 - g["betas"][1] ** t
            v = state["max_exp_avg_sq"] if g["amsgrad"] else state["exp_avg_sq"]
            root = v.sqrt() / math.sqrt(bc2)
            u = (state["exp_avg"] / bc1) / (root + g["eps"])
            rms[i] = float(u.double().square().mean().sqrt())
            frac[i] = float((root < g["eps"]).double().mean())
        self.rms.append(rms)
        self.eps_frac.append(frac)


def train(opt_factory: Any, config: dict[str, Any] | None = None, steps: int = STEPS,
          record: bool = True) -> tuple[gradwatch.Watcher, StateRecorder | None, nn.Module]:
    net = model()
    opt = opt_factory(net.parameters())
    recorder = StateRecorder(opt) if record else None
    watcher = gradwatch.watch(net, opt, config=config or {"measure": EVERY_STEP})
    for x, y in batches(steps):
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    watcher.close()
    return watcher, recorder, net


OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, eps=3e-3),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, eps=3e-3, weight_decay=0.1),
    "adam-foreach": lambda ps: torch.optim.Adam(ps, lr=1e-2, eps=3e-3, foreach=True),
    "adamw-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, eps=3e-3, foreach=True),
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, eps=3e-3, fused=True),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, eps=3e-3, fused=True),
    "adam-amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-2, eps=3e-3, amsgrad=True),
    "adam-betas": lambda ps: torch.optim.Adam(ps, lr=1e-2, eps=3e-3, betas=(0.5, 0.9)),
}


def _fused_on_cpu() -> bool:
    try:
        p = nn.Parameter(torch.ones(2))
        p.grad = torch.ones(2)
        torch.optim.Adam([p], fused=True).step()
        return True
    except (RuntimeError, ValueError):
        return False


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_adam_statistics_equal_a_plain_torch_reference(name):
    if "fused" in name and not _fused_on_cpu():
        pytest.skip("this torch has no fused Adam on the CPU")
    watcher, ref, _ = train(OPTIMIZERS[name])
    assert watcher.errors == {}
    rms, frac, lag = (metric(watcher.path, m) for m in ("adam_update_rms", "adam_eps_frac", "adam_v_lag"))
    assert sorted(rms) == sorted(frac) == list(range(STEPS))
    assert sorted(lag) == list(range(1, STEPS))  # before the first step there is no state to lag behind
    fractions = []
    for step in range(STEPS):
        values, present = rms[step]
        assert present.all()
        for i, expected in ref.rms[step].items():
            assert values[i] == pytest.approx(expected, rel=2e-5), (step, i)
        values, present = frac[step]
        for i, expected in ref.eps_frac[step].items():
            assert values[i] == pytest.approx(expected, rel=1e-6, abs=1e-7), (step, i)
            fractions.append(expected)
        if step:
            values, present = lag[step]
            assert present.all()
            for i, expected in ref.lag[step].items():
                assert values[i] == pytest.approx(expected, rel=2e-5), (step, i)
    assert 0 < np.mean(fractions) < 1  # ε is chosen so that it dominates some elements, not all


class MixedPrecision(nn.Module):
    """A float64 layer between float32 ones: the statistics are computed per device and dtype."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(6, 16), nn.Linear(16, 16).double(), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)).double())).float())


def test_params_of_several_dtypes_in_small_chunks(monkeypatch):
    monkeypatch.setattr("gradwatch.agent.optimizer_health.CHUNK_ELEMENTS", 40)  # a chunk per param or two
    net = MixedPrecision()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, eps=3e-3)
    ref = StateRecorder(opt)
    watcher = gradwatch.watch(net, opt, config={"measure": EVERY_STEP})
    for x, y in batches(4):
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    watcher.close()
    assert watcher.errors == {}
    rms, lag = metric(watcher.path, "adam_update_rms"), metric(watcher.path, "adam_v_lag")
    for step in range(1, 4):
        for i in range(len(ref.params)):
            assert rms[step][0][i] == pytest.approx(ref.rms[step][i], rel=2e-5), (step, i)
            assert lag[step][0][i] == pytest.approx(ref.lag[step][i], rel=2e-5), (step, i)


def test_sgd_has_no_adam_state_and_says_so():
    watcher, _, _ = train(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), record=False)
    names = {d.name for d in header(watcher.path).metrics}
    assert not names & {"adam_update_rms", "adam_eps_frac", "adam_v_lag", "layer_adam_update_rms"}
    assert header(watcher.path).info["optimizer_health"]["state"] == "none"
    assert metric(watcher.path, "update_to_weight")  # the update ratio against its band still is


def test_optimizer_every_sets_the_cadence_and_zero_turns_it_off():
    factory = OPTIMIZERS["adam"]
    watcher, _, _ = train(factory, {"measure": {**EVERY_STEP, "optimizer_every": 3}}, record=False)
    assert sorted(metric(watcher.path, "adam_update_rms")) == [0, 3, 6]
    assert sorted(metric(watcher.path, "adam_v_lag")) == [3, 6]
    watcher, _, _ = train(factory, {"measure": {**EVERY_STEP, "param_every": 2, "optimizer_every": None}},
                          record=False)
    assert sorted(metric(watcher.path, "adam_update_rms")) == [0, 2, 4, 6]  # by default: param_every's cadence
    watcher, _, _ = train(factory, {"measure": {**EVERY_STEP, "optimizer_every": 0}}, record=False)
    assert "adam_update_rms" not in {d.name for d in header(watcher.path).metrics}


def test_params_without_a_gradient_are_not_measured_not_zero():
    net = model()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    watcher = gradwatch.watch(net, opt, config={"measure": EVERY_STEP})
    for step, (x, y) in enumerate(batches(4)):
        nn.functional.cross_entropy(net(x), y).backward()
        if step == 2:
            net[5].weight.grad = None  # as if the head had not been used this step
            net[5].bias.grad = None
        opt.step()
        opt.zero_grad()
    watcher.close()
    values, present = metric(watcher.path, "adam_update_rms")[2]
    params = [p.name for p in watcher.params]
    assert not present[params.index("5.weight")] and present[params.index("0.weight")]
    assert metric(watcher.path, "adam_update_rms")[3][1].all()


def test_layer_aggregates_and_equilibria_follow_their_definitions():
    watcher, ref, net = train(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05))
    params = watcher.params
    numel = np.array([p.tensor.numel() for p in params], float)
    rms = metric(watcher.path, "adam_update_rms")
    layer_rms = metric(watcher.path, "layer_adam_update_rms")
    layer_ids = [d for d in header(watcher.path).metrics if d.name == "layer_adam_update_rms"][0].indices
    step = STEPS - 1
    for col, layer in enumerate(layer_ids):
        members = [p.index for p in params if p.layer == layer]
        expected = math.sqrt(sum(numel[i] * float(rms[step][0][i]) ** 2 for i in members) / numel[members].sum())
        assert layer_rms[step][0][col] == pytest.approx(expected, rel=1e-5)
    # ‖Δθ‖/‖θ‖ of a layer from its params' norms and ratios; √(2·lr·wd) for the normalised layer
    ratio = metric(watcher.path, "update_ratio")[step][0]
    norms = metric(watcher.path, "param_norm")[step][0]
    layer_ratio = metric(watcher.path, "update_to_weight")[step][0]
    members = [p.index for p in params if p.layer == layer_ids[-1]]
    expected = math.sqrt(sum((ratio[i] * norms[i]) ** 2 for i in members)) / math.sqrt(sum(norms[i] ** 2
                                                                                        for i in members))
    assert layer_ratio[-1] == pytest.approx(expected, rel=1e-5)
    eq = metric(watcher.path, "update_to_weight_equilibrium")[step]
    assert eq[0][0] == pytest.approx(math.sqrt(2 * 1e-2 * 0.05), rel=1e-6) and eq[1].all()
    info = header(watcher.path).info["optimizer_health"]
    assert info["normalized_params"] == [0] and info["update_ratio_band"] == list(UPDATE_RATIO_BAND)
    assert "grad_to_weight_equilibrium" not in {d.name for d in header(watcher.path).metrics}  # SGD's, not AdamW's


def test_sgd_grad_ratio_against_its_equilibrium():
    watcher, _, _ = train(lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=1e-3), record=False)
    step = STEPS - 1
    grad = metric(watcher.path, "grad_norm")[step][0][0]
    norm = metric(watcher.path, "param_norm")[step][0][0]
    assert metric(watcher.path, "grad_to_weight")[step][0][0] == pytest.approx(grad / norm, rel=1e-6)
    assert metric(watcher.path, "grad_to_weight_equilibrium")[step][0][0] == pytest.approx(math.sqrt(2 * 1e-3 / 0.1),
                                                                                        rel=1e-6)
    assert metric(watcher.path, "update_to_weight_equilibrium")[step][0][0] == pytest.approx(math.sqrt(2 * 0.1 * 1e-3),
                                                                                          rel=1e-6)


def test_without_weight_decay_no_equilibrium_is_given():
    watcher, _, _ = train(lambda ps: torch.optim.SGD(ps, lr=0.1), record=False)
    assert metric(watcher.path, "grad_to_weight")
    assert not metric(watcher.path, "grad_to_weight_equilibrium")


@pytest.mark.parametrize("case, expected", [
    ("linear-layernorm-nobias", True), ("linear-layernorm-bias", False), ("conv-batchnorm-bias", True),
    ("linear-relu-layernorm", False), ("modulelist", False)])
def test_scale_invariant_weights_are_found_only_where_execution_order_is_known(case, expected):
    first: nn.Module = {
        "linear-layernorm-nobias": lambda: nn.Sequential(nn.Linear(4, 4, bias=False), nn.LayerNorm(4)),
        "linear-layernorm-bias": lambda: nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)),
        "conv-batchnorm-bias": lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)),
        "linear-relu-layernorm": lambda: nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.LayerNorm(4)),
        "modulelist": lambda: nn.ModuleList([nn.Linear(4, 4, bias=False), nn.LayerNorm(4)]),
    }[case]()
    opt = torch.optim.SGD(first.parameters(), lr=0.1)
    _, params = build_tables(first, opt)
    assert normalized_params(first, params)[0] is expected


SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


class HostSync(AssertionError):
    pass


@pytest.fixture
def forbid_host_sync(monkeypatch):
    """Every syncing Tensor method called from gradwatch's code raises while the returned context
    is active (the optimizer's own, such as Adam reading its step count, are torch's business)."""
    originals = {name: getattr(torch.Tensor, name) for name in SYNCING}
    active = {"on": False}

    def guard(name):
        def method(self, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if active["on"] and caller.startswith("gradwatch"):
                raise HostSync(f"Tensor.{name} called on the step path by {caller}")
            return originals[name](self, *args, **kwargs)
        return method

    for name in SYNCING:
        monkeypatch.setattr(torch.Tensor, name, guard(name))

    class Switch:
        def __enter__(self):
            active["on"] = True

        def __exit__(self, *exc):
            active["on"] = False

    return Switch()


@pytest.mark.parametrize("name", ["adam", "adamw-foreach", "adam-fused", "adam-amsgrad"])
def test_optimizer_health_makes_no_host_sync(name, forbid_host_sync):
    if "fused" in name and not _fused_on_cpu():
        pytest.skip("this torch has no fused Adam on the CPU")
    net = model()
    opt = OPTIMIZERS[name](net.parameters())
    config = {"measure": {**EVERY_STEP, "noise_scale_every": 2},
              "guards": {"spike": {"action": "skip", "window": 8, "warmup": 4}}}
    data = batches(12)
    with gradwatch.watch(net, opt, config=config) as watcher:
        for x, y in data:
            with forbid_host_sync:  # backward (the noise scale's hooks), the step, log() and flushes
                for half in (slice(0, 12), slice(12, 24)):
                    loss = nn.functional.cross_entropy(net(x[half]), y[half])
                    loss.backward()
                    watcher.log(loss=loss)
                opt.step()
            opt.zero_grad()
        snap = watcher.snapshot()
    assert snap["errors"] == {}, snap["errors"]
    assert snap["params"]["0.weight"]["adam_update_rms"] is not None
    assert snap["spikes"]["grad_norm_z"] is not None and snap["noise_scale"]["noise_scale"] is not None
