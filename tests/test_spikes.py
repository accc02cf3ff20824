"""Spikes: robust z-scores of the loss and of the total gradient norm, computed every step on the
device, equal a plain numpy computation over the logged series; the spike guard warns, skips
(the update and the optimizer state left exactly as they were, fused or not), raises or calls
back, records each spike with its reason, and counts the skip rate.

The spiking job is a small regression MLP whose targets are multiplied by 100 at step SPIKE: its
loss and gradient norm jump by orders of magnitude for that one step.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.agent import runlog
from gradwatch.agent.config import ConfigError, load_config
from gradwatch.agent.guards import GradientGuardError
from gradwatch.agent.spikes import ABS_FLOOR, MAD_SCALE, REL_FLOOR, SpikeDetector, robust_z, spike_flag
from tests.test_optimizer_health import _fused_on_cpu, header, metric

STEPS = 30
SPIKE = 22
WINDOW, WARMUP = 16, 8
MEASURE = {"flush_every": 7, "param_every": 0, "update_ratio_every": 0, "activation_every": 0}


def lower_median(values: np.ndarray) -> float:
    """torch's median of an even count: the lower of the two middle values."""
    s = np.sort(values)
    return float(s[(len(s) - 1) // 2])


def reference_z(history: list[float], x: float, window: int = WINDOW) -> float:
    """x against the finite values among the last `window` of `history`."""
    ring = np.array([v for v in history[-window:] if math.isfinite(v)], np.float64)
    med = lower_median(ring)
    mad = lower_median(np.abs(ring - med))
    return (x - med) / max(MAD_SCALE * mad, REL_FLOOR * abs(med), ABS_FLOOR)


def regression() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))


def data(steps: int = STEPS, spike: int | None = SPIKE) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    out = []
    for step in range(steps):
        x = torch.randn(32, 4, generator=g)
        y = x[:, :1] - 0.5 * x[:, 1:2] + 0.1 * torch.randn(32, 1, generator=g)
        out.append((x, y * (100.0 if step == spike else 1.0)))
    return out


def train(opt_factory: Any = None, spike_config: dict[str, Any] | None = None, log_before_step: bool = True,
          steps: int = STEPS, spike: int | None = SPIKE, watch_steps: Any = None,
          scaler: Any = None) -> tuple[gradwatch.Watcher, nn.Module, torch.optim.Optimizer]:
    net = regression()
    opt = (opt_factory or (lambda ps: torch.optim.Adam(ps, lr=1e-2)))(net.parameters())
    config = {"measure": MEASURE, "guards": {"spike": {"window": WINDOW, "warmup": WARMUP, **(spike_config or {})}}}
    watcher = gradwatch.watch(net, opt, config=config, scaler=scaler)
    for step, (x, y) in enumerate(data(steps, spike)):
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        if log_before_step:
            watcher.log(loss=loss)
        if watch_steps is not None:
            watch_steps(step, net, opt, lambda: opt.step())
        else:
            opt.step()
        if not log_before_step:
            watcher.log(loss=loss)
        opt.zero_grad()
    watcher.close()
    return watcher, net, opt


def series(path: Any, name: str) -> dict[int, float]:
    return {step: float(v[0]) for step, (v, present) in metric(path, name).items() if present[0]}


def events(path: Any, kind: str = "spike") -> list[runlog.Event]:
    return [r for r in runlog.read_log(path) if isinstance(r, runlog.Event) and r.kind == kind]


def test_robust_z_is_median_and_mad_of_the_finite_history():
    g = torch.Generator().manual_seed(0)
    history = torch.randn(3, 20, generator=g).double() * 3 + 1
    history[1, ::3] = float("nan")  # not yet filled, or not finite
    x = torch.tensor([10.0, -2.0, 1.0], dtype=torch.float64)
    z = robust_z(history, x)
    for row in range(3):
        ring = history[row].numpy()
        assert float(z[row]) == pytest.approx(reference_z(list(ring), float(x[row]), 20), rel=1e-12)
    assert math.isnan(float(robust_z(torch.full((1, 4), float("nan")), torch.tensor([1.0]))[0]))


def test_a_constant_series_needs_a_relative_change_to_spike():
    detector = SpikeDetector(8, 4, torch.device("cpu"))
    for _ in range(6):
        detector.score(None, torch.tensor(2.0))
    z, warm = detector.score(None, torch.tensor(2.002))
    assert warm == (False, True)
    assert float(z[1]) == pytest.approx(0.002 / (REL_FLOOR * 2.0), rel=1e-4)  # 0.1 %: z 0.1, no spike


@pytest.mark.parametrize("on, warm, z, expected", [
    ("either", (True, True), (7.0, 1.0), 1.0), ("either", (True, False), (1.0, 9.0), 0.0),
    ("either", (False, False), (9.0, 9.0), None), ("loss", (False, True), (9.0, 9.0), None),
    ("grad_norm", (True, True), (9.0, 1.0), 0.0), ("both", (True, True), (9.0, 7.0), 1.0),
    ("both", (True, True), (9.0, 1.0), 0.0), ("both", (True, False), (9.0, 9.0), None),
    ("either", (True, True), (math.inf, math.nan), 0.0)])
def test_spike_flag(on, warm, z, expected):
    flag = spike_flag(torch.tensor(z), warm, on, 6.0)
    assert (None if flag is None else float(flag)) == expected


@pytest.mark.parametrize("before", [True, False], ids=["logged-before-step", "logged-after-step"])
def test_logged_z_scores_equal_the_reference_over_the_logged_series(before):
    watcher, _, _ = train(log_before_step=before)
    assert watcher.errors == {}
    loss, norm = series(watcher.path, "loss"), series(watcher.path, "grad_norm_total")
    for name, values in (("loss_z", loss), ("grad_norm_z", norm)):
        got = series(watcher.path, name)
        assert sorted(got) == list(range(WARMUP, STEPS))  # from the step with `warmup` values before it
        history = [values[s] for s in range(STEPS)]
        for step, z in got.items():
            assert z == pytest.approx(reference_z(history[:step], history[step]), rel=1e-4, abs=1e-5), (name, step)
    assert series(watcher.path, "loss_z")[SPIKE] > 1e3 and series(watcher.path, "grad_norm_z")[SPIKE] > 10


def test_warn_records_each_spike_with_its_reasons_and_warns_once(caplog):
    with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
        watcher, _, _ = train()
    (event,) = events(watcher.path)
    assert event.step == SPIKE and event.data["action"] == "warn" and event.data["skipped"] is False
    assert event.data["reasons"] == ["loss", "grad_norm"] and event.data["loss_z"] > 6
    assert event.data["loss"] == pytest.approx(series(watcher.path, "loss")[SPIKE], rel=1e-6)
    assert event.data["grad_norm"] == pytest.approx(series(watcher.path, "grad_norm_total")[SPIKE], rel=1e-6)
    counts = series(watcher.path, "spike_count")
    assert counts[SPIKE - 1] == 0 and counts[SPIKE] == 1 and counts[STEPS - 1] == 1
    assert series(watcher.path, "skipped")[SPIKE] == 0
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert f"spike at step {SPIKE}" in caplog.records[0].message


def _capture(at: int, store: dict[str, Any]) -> Any:
    """A step wrapper that keeps params and optimizer state before and after step `at`."""
    def step(i: int, net: nn.Module, opt: torch.optim.Optimizer, do: Any) -> None:
        if i == at:
            store["before"] = (copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict()["state"]))
        do()
        if i == at:
            store["after"] = (copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict()["state"]))
    return step


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return bool(a == b)


SKIPPERS = {
    "adam-fused": (lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True), True),
    "adamw-fused": (lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True, weight_decay=0.1), True),
    "sgd-momentum-fused": (lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, fused=True), True),
    "adam-foreach": (lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True), False),
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), False),
    "sgd-momentum": (lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9), False),
}


@pytest.mark.parametrize("name", sorted(SKIPPERS))
def test_skip_leaves_params_and_optimizer_state_as_they_were(name):
    factory, fused = SKIPPERS[name]
    if fused and not _fused_on_cpu():
        pytest.skip("this torch has no fused optimizers on the CPU")
    kept: dict[str, Any] = {}
    watcher, _, opt = train(factory, {"action": "skip"}, watch_steps=_capture(SPIKE, kept))
    assert watcher.errors == {}
    assert _same(kept["before"][0], kept["after"][0]), "params changed"
    assert _same(kept["before"][1], kept["after"][1]), "optimizer state changed"
    skipped = series(watcher.path, "skipped")
    assert skipped[SPIKE] == 1 and sum(skipped.values()) == 1
    (event,) = events(watcher.path)  # one event, whether decided on the device or on the host
    assert event.step == SPIKE and event.data["action"] == "skip" and event.data["skipped"] is True
    rate = series(watcher.path, "skip_rate")
    assert rate[SPIKE - 1] == 0 and rate[SPIKE] == pytest.approx(1 / WINDOW)
    assert not hasattr(opt, "found_inf")  # what the guard set for a fused step is gone after it
    # the next steps train on: the params move again
    assert header(watcher.path).info["optimizer_health"]["param_groups"][0]["fused"] is fused


def test_skip_under_an_amp_scaler_with_a_fused_optimizer():
    """The scaler sets its own `found_inf` on a fused optimizer: the spike's is combined with it,
    the scaler's own is left alone (its scale does not back off), and both are gone after the step.
    The second-moment lag divides out the loss scale the fused step unscales by."""
    if not _fused_on_cpu():
        pytest.skip("this torch has no fused optimizers on the CPU")
    results = {}
    for scaled in (False, True):
        net = regression()
        opt = torch.optim.Adam(net.parameters(), lr=1e-2, fused=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if scaled else None
        config = {"measure": {**MEASURE, "optimizer_every": 1},
                  "guards": {"spike": {"window": WINDOW, "warmup": WARMUP, "action": "skip"}}}
        kept: dict[str, Any] = {}
        with gradwatch.watch(net, opt, config=config, scaler=scaler) as watcher:
            for step, (x, y) in enumerate(data()):
                loss = nn.functional.mse_loss(net(x), y)
                (scaler.scale(loss) if scaler else loss).backward()
                watcher.log(loss=loss)
                _capture(SPIKE, kept)(step, net, opt, (lambda: scaler.step(opt)) if scaler else opt.step)
                if scaler:
                    scaler.update()
                opt.zero_grad()
        assert watcher.errors == {}
        assert _same(kept["before"][0], kept["after"][0]) and _same(kept["before"][1], kept["after"][1])
        assert [s for s, v in series(watcher.path, "skipped").items() if v] == [SPIKE]
        assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")
        if scaler:
            assert scaler.get_scale() == 1024.0
        results[scaled] = metric(watcher.path, "adam_v_lag")
    for step in (3, SPIKE - 1):
        np.testing.assert_allclose(results[True][step][0], results[False][step][0], rtol=1e-4)


def test_a_skipped_step_counts_in_the_rate_until_it_leaves_the_window():
    watcher, _, _ = train(lambda ps: torch.optim.Adam(ps, lr=1e-2), {"action": "skip"}, steps=SPIKE + WINDOW + 2)
    rate = series(watcher.path, "skip_rate")
    assert rate[SPIKE + WINDOW - 1] == pytest.approx(1 / WINDOW) and rate[SPIKE + WINDOW] == 0


def test_raise_stops_training_at_the_spike():
    with pytest.raises(GradientGuardError, match=f"spike at step {SPIKE}: loss .* above z 6"):
        train(spike_config={"action": "raise"})


def test_callback_gets_the_event():
    calls: list[dict[str, Any]] = []
    watcher, _, _ = train(spike_config={"action": calls.append})
    assert [c["step"] for c in calls] == [SPIKE] and calls[0]["kind"] == "spike"
    assert calls[0]["action"] == "callback" and calls[0]["reasons"] == ["loss", "grad_norm"]
    assert header(watcher.path).info["config"]["guards"]["spike"]["action"] == "callback"


@pytest.mark.parametrize("on, logged, fires", [
    ("loss", True, True), ("grad_norm", False, True), ("both", True, True), ("both", False, False),
    ("loss", False, False), ("either", False, True)])
def test_what_makes_a_spike(on, logged, fires):
    net = regression()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    config = {"measure": MEASURE, "guards": {"spike": {"window": WINDOW, "warmup": WARMUP, "on": on}}}
    with gradwatch.watch(net, opt, config=config) as watcher:
        for x, y in data():
            loss = nn.functional.mse_loss(net(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if logged:
                watcher.log(loss=loss)
    assert [e.step for e in events(watcher.path)] == ([SPIKE] if fires else [])
    assert series(watcher.path, "spike_count")[STEPS - 1] == (1 if fires else 0)


def test_skip_on_a_loss_logged_after_the_step_is_recorded_not_acted_on(caplog):
    with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
        watcher, _, _ = train(spike_config={"action": "skip", "on": "loss"}, log_before_step=False)
    (event,) = events(watcher.path)
    assert event.step == SPIKE and event.data["skipped"] is False and event.data["reasons"][0] == "loss"
    assert sum(series(watcher.path, "skipped").values()) == 0
    assert sum("comes before optimizer.step()" in r.message for r in caplog.records) == 1


def test_ignore_records_z_scores_and_no_event():
    watcher, _, _ = train(spike_config={"action": "ignore"})
    assert not events(watcher.path) and series(watcher.path, "spike_count")[STEPS - 1] == 1


def test_disabled_measures_nothing():
    watcher, _, _ = train(spike_config={"enabled": False})
    names = {d.name for d in header(watcher.path).metrics}
    assert not names & {"loss_z", "grad_norm_z", "spike_count", "skip_rate"} and not events(watcher.path)


def test_a_healthy_run_has_no_spike():
    watcher, _, _ = train(spike=None)
    assert not events(watcher.path) and series(watcher.path, "spike_count")[STEPS - 1] == 0
    assert max(abs(z) for z in series(watcher.path, "loss_z").values()) < 6


@pytest.mark.parametrize("spike, message", [
    ({"window": 4}, "guards.spike.window: Input should be greater than or equal to 8"),
    ({"warmup": 64, "window": 32}, "warmup (64) must not exceed window (32)"),
    ({"z_threshold": True}, "guards.spike.z_threshold: Value error, must be a number, not a boolean"),
    ({"z_threshold": 0}, "guards.spike.z_threshold: Input should be greater than 0"),
    ({"on": "sometimes"}, "guards.spike.on: Input should be 'loss', 'grad_norm', 'either' or 'both'"),
    ({"action": "stop"}, "guards.spike.action"),
    ({"window": 2.5}, "guards.spike.window: Input should be a valid integer"),
    ({"loss": ""}, "guards.spike.loss: String should have at least 1 character"),
    ({"frequency": 3}, "guards.spike.frequency: Extra inputs are not permitted"),
], ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_bad_spike_settings_are_refused_naming_the_field(spike, message):
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        load_config({"guards": {"spike": spike}})


@pytest.mark.parametrize("measure, message", [
    ({"optimizer_every": -1}, "measure.optimizer_every: Input should be greater than or equal to 0"),
    ({"optimizer_every": True}, "measure.optimizer_every: Value error, must be a number, not a boolean"),
    ({"noise_scale_every": 1.5}, "measure.noise_scale_every: Input should be a valid integer"),
])
def test_bad_measure_settings_are_refused(measure, message):
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        load_config({"measure": measure})


VIEWS = ("select", "slice", "unsqueeze", "view", "reshape", "expand", "alias", "detach", "as_strided", "squeeze")


@pytest.mark.parametrize("action, kernels", [("warn", 22), ("skip", 25)])
def test_the_spike_step_is_a_handful_of_device_ops(action, kernels):
    """What the step path pays for spikes, once both series are warm: counted as the aten ops
    that launch a kernel (views are free)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from gradwatch.agent.health import Health

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not any(v in str(func) for v in VIEWS):
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    counts: list[int] = []
    original = Health.before_update

    def counted(self, *args):
        with Count() as c:
            original(self, *args)
        counts.append(len(c.ops))

    net = regression()
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    config = {"measure": {**MEASURE, "optimizer_every": 0},
              "guards": {"spike": {"window": WINDOW, "warmup": WARMUP, "action": action}}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Health, "before_update", counted)
        with gradwatch.watch(net, opt, config=config) as watcher:
            for x, y in data(WARMUP + 4, spike=None):
                loss = nn.functional.mse_loss(net(x), y)
                loss.backward()
                watcher.log(loss=loss)
                opt.step()
                opt.zero_grad()
    assert max(counts[WARMUP + 1:]) <= kernels, counts
