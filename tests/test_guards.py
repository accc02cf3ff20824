"""Guards that act on the training job: non-finite gradients and a hard total-norm limit.

`warn` (the default) logs and records an event, `skip` leaves the step unapplied, `raise`
stops training with an error naming what is affected, a callable is called with the event,
and `ignore` records no event. The non-finite cases run a model that really produces a NaN
gradient at a chosen step: a per-feature gate `sqrt(s * scale)` whose forward is finite
for a sample with `s == 0` but whose backward is `inf * 0 = NaN` for `gate.scale`.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.agent import runlog
from gradwatch.agent.config import GuardConfig
from gradwatch.agent.watcher import GradientGuardError
from tests.agent_models import batch_for, mlp

BAD_STEP = 3
STEPS = 6
FEATURES = 7


class SqrtGate(nn.Module):
    """Scales each feature by sqrt(s * scale): s is a per-sample magnitude from the input."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return h * torch.sqrt(s * self.scale)


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(FEATURES, 16)
        self.act = nn.ReLU()
        self.gate = SqrtGate(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gate(self.act(self.body(x[:, :FEATURES])), x[:, FEATURES:]))


def gated_batches(steps: int = STEPS, bad_step: int | None = BAD_STEP) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Seeded batches whose last column (s) is in [0.5, 1.5], except one sample with s = 0 at `bad_step`."""
    gen = torch.Generator().manual_seed(0)
    batches = []
    for step in range(steps):
        x = torch.cat([torch.randn(16, FEATURES, generator=gen), 0.5 + torch.rand(16, 1, generator=gen)], dim=1)
        if step == bad_step:
            x[5, FEATURES] = 0.0
        batches.append((x, torch.randint(0, 4, (16,), generator=gen)))
    return batches


def train(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[tuple[torch.Tensor, torch.Tensor]],
          watcher: gradwatch.Watcher | None = None, loss_scale: dict[int, float] | None = None,
          after_step: Any = None) -> None:
    for step, (x, y) in enumerate(batches):
        loss = nn.functional.cross_entropy(model(x), y) * (loss_scale or {}).get(step, 1.0)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(step)
        optimizer.zero_grad()
        if watcher is not None:
            watcher.log(loss=loss)


def events(watcher: gradwatch.Watcher) -> list[runlog.Event]:
    return [r for r in runlog.read_log(watcher.path) if isinstance(r, runlog.Event)]


def series(watcher: gradwatch.Watcher, metric: str) -> tuple[np.ndarray, np.ndarray]:
    blocks = [b for r in runlog.read_log(watcher.path) if isinstance(r, runlog.Frame)
              for b in r.blocks if b.metric.name == metric]
    return np.concatenate([b.steps for b in blocks]), np.concatenate([np.where(b.present, b.values, np.nan) for b in blocks])[:, 0]


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_the_gated_model_really_produces_a_nan_gradient_at_the_bad_step_only():
    model = GatedNet()
    for step, (x, y) in enumerate(gated_batches()):
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        assert torch.isfinite(loss)
        bad = sorted(n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all())
        assert bad == (["gate.scale"] if step == BAD_STEP else []), step


# ---------------------------------------------------------------------------------- non-finite


def test_warn_logs_records_the_event_and_training_goes_on(caplog):
    model = GatedNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
        with gradwatch.watch(model, opt, run="gated") as watcher:  # warn is the default
            train(model, opt, gated_batches(), watcher)
            snap = watcher.snapshot()
    assert snap["steps"] == STEPS and snap["errors"] == {}
    [event] = events(watcher)
    assert event.kind == "nonfinite" and event.step == BAD_STEP
    assert event.data["params"] == ["gate.scale"] and event.data["layers"] == ["gate"]
    assert event.data["action"] == "warn"
    warnings = [r for r in caplog.records if r.name == "gradwatch.agent"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert f"NaN/Inf gradient elements at step {BAD_STEP}" in warnings[0].getMessage()
    assert "gate.scale" in warnings[0].getMessage() and "gated" in warnings[0].getMessage()
    steps, nonfinite = series(watcher, "nonfinite_params")
    np.testing.assert_array_equal(steps, np.arange(STEPS))
    assert nonfinite[BAD_STEP] == 1 and (nonfinite[:BAD_STEP] == 0).all()
    # warn does not protect the model: the NaN update was applied, and every later step is non-finite.
    assert torch.isnan(model.gate.scale).all()
    assert (nonfinite[BAD_STEP + 1:] == len(list(model.parameters()))).all()
    _, skipped = series(watcher, "skipped")
    assert (skipped == 0).all()


def test_skip_leaves_the_bad_step_unapplied_and_applies_the_good_ones():
    model = GatedNet()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = gated_batches()
    history: list[dict[str, torch.Tensor]] = [params_of(model)]
    with gradwatch.watch(model, opt, config={"guards": {"nonfinite": "skip"}}) as watcher:
        train(model, opt, batches, watcher, after_step=lambda _: history.append(params_of(model)))
        snap = watcher.snapshot()
    assert snap["steps"] == STEPS and snap["errors"] == {}
    for step in range(STEPS):
        moved = {n for n in history[step] if not torch.equal(history[step][n], history[step + 1][n])}
        assert moved == (set() if step == BAD_STEP else set(history[step])), step
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # Exactly the training without the bad batch: momentum did not see it either.
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    train(reference, ref_opt, [b for i, b in enumerate(batches) if i != BAD_STEP])
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    steps, skipped = series(watcher, "skipped")
    np.testing.assert_array_equal(steps, np.arange(STEPS))
    np.testing.assert_array_equal(skipped, [1.0 if s == BAD_STEP else 0.0 for s in range(STEPS)])
    _, nonfinite = series(watcher, "nonfinite_params")
    np.testing.assert_array_equal(nonfinite, [1.0 if s == BAD_STEP else 0.0 for s in range(STEPS)])
    [event] = events(watcher)
    assert (event.kind, event.step, event.data["action"]) == ("nonfinite", BAD_STEP, "skip")
    assert event.data["params"] == ["gate.scale"] and event.data["layers"] == ["gate"]


def _inf_weight(model: GatedNet) -> None:
    with torch.no_grad():
        model.body.weight[2, 1] = float("inf")  # the loss becomes NaN: every gradient is non-finite


POISONS = {
    "nan-grad-in-gate": (None, r"params gate\.scale \(layers gate\)"),
    "inf-weight": (_inf_weight, r"params body\.weight, body\.bias, gate\.scale, head\.weight, head\.bias "
                                r"\(layers body, gate, head\)"),
}


@pytest.mark.parametrize("poison, names", POISONS.values(), ids=POISONS.keys())
def test_raise_stops_at_the_bad_step_naming_the_params_and_layers(poison, names):
    model = GatedNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = gated_batches(bad_step=None if poison else BAD_STEP)
    before: dict[str, torch.Tensor] = {}
    with gradwatch.watch(model, opt, config={"guards": {"nonfinite": "raise"}}) as watcher:
        with pytest.raises(GradientGuardError, match=rf"NaN/Inf gradient elements at step {BAD_STEP} in {names}"):
            for step, (x, y) in enumerate(batches):
                if step == BAD_STEP and poison is not None:
                    poison(model)
                nn.functional.cross_entropy(model(x), y).backward()
                if step == BAD_STEP:
                    before = params_of(model)
                opt.step()
                opt.zero_grad()
        assert watcher.step == BAD_STEP
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name  # the raising step changed nothing
    [event] = events(watcher)
    assert (event.kind, event.step, event.data["action"]) == ("nonfinite", BAD_STEP, "raise")
    assert event.data["params"][0] == ("gate.scale" if poison is None else "body.weight")


def test_callback_is_called_once_with_the_event_and_training_goes_on():
    calls: list[dict[str, Any]] = []
    model = GatedNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, config={"guards": {"nonfinite": calls.append}}) as watcher:
        train(model, opt, gated_batches(), watcher)
        snap = watcher.snapshot()
    assert snap["steps"] == STEPS and snap["errors"] == {}
    [call] = calls
    assert call["kind"] == "nonfinite" and call["step"] == BAD_STEP
    assert call["params"] == ["gate.scale"] and call["layers"] == ["gate"]
    [event] = events(watcher)
    assert event.step == BAD_STEP and event.data["action"] == "callback"
    assert runlog.read_log(watcher.path)[0].info["config"]["guards"]["nonfinite"] == "callback"


def test_a_failing_callback_is_counted_not_raised():
    def callback(event: dict[str, Any]) -> None:
        raise ValueError("pager is down")

    model = GatedNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, config={"guards": {"nonfinite": callback}}) as watcher:
        train(model, opt, gated_batches(), watcher)
        snap = watcher.snapshot()
    assert snap["steps"] == STEPS
    assert snap["errors"] == {"guard_callback:ValueError": 1}


def test_ignore_records_no_event_but_still_counts_nonfinite_params(caplog):
    model = GatedNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    config = {"guards": {"nonfinite": "ignore", "max_total_norm": 1e-6, "max_total_norm_action": "ignore"}}
    with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
        with gradwatch.watch(model, opt, config=config) as watcher:
            train(model, opt, gated_batches(), watcher)
            snap = watcher.snapshot()
    assert snap["steps"] == STEPS and snap["errors"] == {}
    assert events(watcher) == []
    assert not [r for r in caplog.records if r.name == "gradwatch.agent"]
    _, nonfinite = series(watcher, "nonfinite_params")
    assert nonfinite[BAD_STEP] == 1  # the measurement stays; only the guard is off


# ---------------------------------------------------------------------------------- norm limit

SPIKE_STEP = 2
LIMIT = 50.0


def _spiking_run(action: Any) -> tuple[nn.Module, list[dict[str, torch.Tensor]], gradwatch.Watcher]:
    """A normal MLP whose loss is scaled by 1e4 at SPIKE_STEP: only that step's total norm exceeds LIMIT."""
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    batches = [batch_for("mlp", gen) for _ in range(STEPS)]
    history = [params_of(model)]
    config = {"guards": {"max_total_norm": LIMIT, "max_total_norm_action": action}}
    with gradwatch.watch(model, opt, config=config) as watcher:
        train(model, opt, batches, watcher, loss_scale={SPIKE_STEP: 1e4},
              after_step=lambda _: history.append(params_of(model)))
    return model, history, watcher


def _check_totals(watcher: gradwatch.Watcher, applied: bool) -> np.ndarray:
    """Only the spike exceeds the limit, up to it; after it too when the spiking update was applied."""
    steps, totals = series(watcher, "grad_norm_total")
    np.testing.assert_array_equal(steps, np.arange(STEPS))
    assert totals[SPIKE_STEP] > LIMIT, totals
    quiet = totals[:SPIKE_STEP] if applied else np.delete(totals, SPIKE_STEP)
    assert (quiet < LIMIT / 10).all(), totals
    return totals


def test_norm_limit_warn_records_the_step_and_applies_it(caplog):
    with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
        _, history, watcher = _spiking_run("warn")
    totals = _check_totals(watcher, applied=True)
    [event] = events(watcher)
    assert (event.kind, event.step, event.data["action"]) == ("norm_limit", SPIKE_STEP, "warn")
    assert event.data["total"] == pytest.approx(totals[SPIKE_STEP]) and event.data["limit"] == LIMIT
    [warning] = [r for r in caplog.records if r.name == "gradwatch.agent"]
    assert f"total gradient norm above the limit at step {SPIKE_STEP}" in warning.getMessage()
    assert not torch.equal(history[SPIKE_STEP]["0.weight"], history[SPIKE_STEP + 1]["0.weight"])  # applied


def test_norm_limit_skip_leaves_only_the_spiking_step_unapplied():
    _, history, watcher = _spiking_run("skip")
    totals = _check_totals(watcher, applied=False)
    for step in range(STEPS):
        moved = {n for n in history[step] if not torch.equal(history[step][n], history[step + 1][n])}
        assert moved == (set() if step == SPIKE_STEP else set(history[step])), step
    _, skipped = series(watcher, "skipped")
    np.testing.assert_array_equal(skipped, [1.0 if s == SPIKE_STEP else 0.0 for s in range(STEPS)])
    [event] = events(watcher)
    assert (event.kind, event.step, event.data["action"]) == ("norm_limit", SPIKE_STEP, "skip")
    assert event.data["limit"] == LIMIT
    assert event.data.get("total") == pytest.approx(totals[SPIKE_STEP])  # docs/runlog.md: {"total", "limit", "action"}


def test_norm_limit_raise_names_the_limit_step_and_largest_layers():
    pattern = rf"total gradient norm [0-9.e+]+ above {LIMIT} at step {SPIKE_STEP} in params \S+weight.*\(layers "
    with pytest.raises(GradientGuardError, match=pattern):
        _spiking_run("raise")


def test_norm_limit_callback_gets_total_and_limit():
    calls: list[dict[str, Any]] = []
    _, _, watcher = _spiking_run(calls.append)
    totals = _check_totals(watcher, applied=True)
    [call] = calls
    assert (call["kind"], call["step"], call["limit"]) == ("norm_limit", SPIKE_STEP, LIMIT)
    assert call["total"] == pytest.approx(totals[SPIKE_STEP])


@pytest.mark.parametrize("guards, synchronous", [
    ({}, False),
    ({"nonfinite": "skip"}, True),
    ({"nonfinite": "raise"}, True),
    ({"nonfinite": print}, False),
    ({"max_total_norm": 1.0}, False),
    ({"max_total_norm": 1.0, "max_total_norm_action": "skip"}, True),
    ({"max_total_norm_action": "raise"}, False),  # no limit set: the action never applies
], ids=["default-warn", "nonfinite-skip", "nonfinite-raise", "nonfinite-callback", "limit-warn", "limit-skip",
        "raise-without-limit"])
def test_only_skip_and_raise_decide_on_the_step_itself(guards, synchronous):
    """skip / raise cost one host sync per step, so they are opt-in; warn and callbacks need none."""
    assert GuardConfig(**guards).synchronous is synchronous


TINY = {"warn": "warn", "skip": "skip"}


@pytest.mark.parametrize("action", TINY.values(), ids=TINY.keys())
def test_tiny_limit_fires_on_every_step_of_a_normal_model(action):
    """With a limit no real gradient stays under, warn records the first step; skip freezes the model."""
    torch.manual_seed(0)
    model = mlp()
    start = params_of(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    config = {"guards": {"max_total_norm": 1e-6, "max_total_norm_action": action}}
    with gradwatch.watch(model, opt, config=config) as watcher:
        train(model, opt, [batch_for("mlp", gen) for _ in range(3)], watcher)
    found = events(watcher)
    assert {e.kind for e in found} == {"norm_limit"}
    _, skipped = series(watcher, "skipped")
    unchanged = all(torch.equal(p, start[n]) for n, p in model.named_parameters())
    if action == "skip":
        assert [e.step for e in found] == [0, 1, 2] and (skipped == 1).all() and unchanged
    else:
        assert [e.step for e in found] == [0] and found[0].data["steps"] == 3
        assert (skipped == 0).all() and not unchanged
