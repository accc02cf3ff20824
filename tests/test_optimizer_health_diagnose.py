"""The optimizer-health diagnoses on small real training jobs, read back through the store as
`gradwatch diagnose` reads them: each fires on a job that has its problem, with its cause and
remedy, and stays silent on the same job without it.

- `adam_second_moment`: a normalised MLP trained with Adam whose hidden weight is scaled by 0.01
  at step RESCALE (as a faulty checkpoint conversion would). The loss does not move (the layer is
  scale-invariant), its gradient grows x100, Adam's v̂ lags far behind it, and the oversized update
  makes the loss spike at the next step.
- `update_ratio_band`: a ReLU MLP trained with AdamW at lr 0.3 (weight decay 0.5) and with Adam at
  lr 1e-7.
- `skipped_spikes`: a regression whose targets are x100 on one step (information) or on every
  fifth step (a warning), under the spike guard's `skip`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.diagnose import Finding, diagnose
from gradwatch.diagnose import thresholds as th
from gradwatch.diagnose.load import load_run_data
from gradwatch.diagnose.optimizer import adam_second_moment, skipped_spikes, update_ratio_band
from gradwatch.diagnose.rundata import LayerInfo, RunData, Series
from gradwatch.ingest.ingester import ingest_pending
from gradwatch.store import Store
from tests.fixtures.findings_text import check_text

RESCALE = 80
BAD = 60
MEASURE = {"flush_every": 20, "param_every": 1, "update_ratio_every": 1, "activation_every": 0}


def normalised() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64, bias=False), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 64, bias=False),
                         nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 4))


def teacher(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    w1, w2 = torch.randn(16, 32, generator=g), torch.randn(32, 4, generator=g)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(100 + step))
    return x, (torch.tanh(x @ w1) @ w2).argmax(1)


def relu_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def regression() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))


def noisy_line(bad: Callable[[int], bool]) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    def make(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(step)
        x = torch.randn(32, 4, generator=g)
        y = x[:, :1] - 0.5 * x[:, 1:2] + 0.1 * torch.randn(32, 1, generator=g)
        return x, y * (100.0 if bad(step) else 1.0)
    return make


def rescale_at(step: int) -> Callable[[int, nn.Module], None]:
    def hook(i: int, model: nn.Module) -> None:
        if i == step:
            with torch.no_grad():
                model[3].weight.mul_(0.01)
    return hook


JOBS: dict[str, dict[str, Any]] = {
    "adam-rescaled": dict(model=normalised, batches=teacher, loss=nn.functional.cross_entropy, steps=140,
                          opt=lambda ps: torch.optim.Adam(ps, lr=1e-2), before=rescale_at(RESCALE)),
    "adam-healthy": dict(model=normalised, batches=teacher, loss=nn.functional.cross_entropy, steps=140,
                         opt=lambda ps: torch.optim.Adam(ps, lr=1e-2)),
    "adamw-healthy": dict(model=normalised, batches=teacher, loss=nn.functional.cross_entropy, steps=140,
                          opt=lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.1)),
    "adam-lr-high": dict(model=relu_mlp, batches=teacher, loss=nn.functional.cross_entropy, steps=60,
                         opt=lambda ps: torch.optim.AdamW(ps, lr=0.3, weight_decay=0.5)),
    "adam-lr-low": dict(model=relu_mlp, batches=teacher, loss=nn.functional.cross_entropy, steps=60,
                        opt=lambda ps: torch.optim.Adam(ps, lr=1e-7)),
    "skip-once": dict(model=regression, batches=noisy_line(lambda s: s == BAD), loss=nn.functional.mse_loss,
                      steps=100, opt=lambda ps: torch.optim.Adam(ps, lr=1e-2),
                      config={"guards": {"spike": {"action": "skip"}}}),
    "skip-often": dict(model=regression, batches=noisy_line(lambda s: s >= 40 and s % 5 == 0),
                       loss=nn.functional.mse_loss, steps=100, opt=lambda ps: torch.optim.Adam(ps, lr=1e-2),
                       config={"guards": {"spike": {"action": "skip"}}}),
}


def train(name: str, home: Path) -> str:
    job = JOBS[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = job["model"]()
        opt = job["opt"](model.parameters())
        config = {"home": str(home), "measure": MEASURE, **job.get("config", {})}
        with gradwatch.watch(model, opt, run=name, config=config) as watcher:
            for step in range(job["steps"]):
                if "before" in job:
                    job["before"](step, model)
                x, y = job["batches"](step)
                loss = job["loss"](model(x), y)
                loss.backward()
                watcher.log(loss=loss.detach())
                opt.step()
                opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
    return watcher.run_id


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Trains each job the first time a test asks for it; returns its RunData as diagnose reads it."""
    home = tmp_path_factory.mktemp("optimizer") / "home"
    trained: dict[str, RunData] = {}
    with Store.open(home=home) as store:
        def get(name: str) -> RunData:
            if name not in trained:
                run_id = train(name, home)
                report = ingest_pending(store, home)
                assert not report.errors, report.errors
                trained[name] = load_run_data(store, run_id)
            return trained[name]
        yield get


def findings(data: RunData) -> dict[str, Finding]:
    found = diagnose(data)
    for f in found:
        check_text(f)
    return {f.id: f for f in found}


def test_lagging_second_moments_before_a_loss_spike(runs):
    data = runs("adam-rescaled")
    f = findings(data)["adam_second_moment"]
    assert f.severity == "warning" and f.evidence.steps == (RESCALE + 1,)
    lag = data.layer["layer_adam_v_lag"]
    row = [layer.name for layer in data.layers].index("3")
    col = int(np.flatnonzero(lag.steps == RESCALE)[0])
    assert f.evidence.values["value"] == pytest.approx(lag.values[row, col]) and f.evidence.values["value"] > 1e3
    assert f.evidence.layers[0] == "3" and f.evidence.values["threshold"] == th.ADAM_LAG_RATIO
    assert f.evidence.summary[1].startswith(f"before the spike at step {RESCALE + 1}: "
                                            "mean g²/(sqrt(v̂)+eps)² reached 3 ")
    assert f.causes[0].startswith("Adam's second-moment estimate v̂ fell behind the squared gradients")
    assert f.remedies[0].startswith("lower beta2") and "warmup" in f.remedies[1]
    # the loss did not move at the rescale: the spike is the update's, one step later
    z = data.run["loss_z"]
    assert z.values[z.steps == RESCALE][0] < 6 < z.values[z.steps == RESCALE + 1][0]


@pytest.mark.parametrize("name", ["adam-healthy", "adamw-healthy"])
def test_healthy_adam_jobs_have_no_optimizer_finding(runs, name):
    data = runs(name)
    assert "layer_adam_v_lag" in data.layer and "update_to_weight" in data.layer
    found = findings(data)
    assert not {"adam_second_moment", "update_ratio_band", "skipped_spikes"} & set(found)
    assert all(f.severity == "info" for f in found.values()), [(f.id, f.evidence.summary) for f in found.values()]


def test_adamw_records_the_equilibrium_of_its_normalised_weights(runs):
    data = runs("adamw-healthy")
    eq = data.layer["update_to_weight_equilibrium"]
    names = [layer.name for layer in data.layers]
    rows = [names.index("0"), names.index("3")]
    assert np.allclose(eq.values[rows][eq.measured[rows]], np.sqrt(2 * 3e-3 * 0.1), rtol=1e-6)


@pytest.mark.parametrize("name, side", [("adam-lr-high", "above"), ("adam-lr-low", "below")])
def test_update_ratios_far_outside_the_band(runs, name, side):
    data = runs(name)
    f = findings(data)["update_ratio_band"]
    ratio = data.layer["update_to_weight"]
    med = ratio.row_medians(th.WINDOW_FRACTION)
    extreme = np.nanmax(med) if side == "above" else np.nanmin(med[med > 0])
    assert f.evidence.values["value"] == pytest.approx(extreme)  # the layer furthest out
    if side == "above":
        assert f.evidence.values["value"] > th.UPDATE_RATIO_HIGH * th.UPDATE_RATIO_FAR
        assert f.causes[0].startswith("the learning rate is too high") and f.remedies[0].startswith("lower")
    else:
        assert f.evidence.values["value"] < th.UPDATE_RATIO_LOW / th.UPDATE_RATIO_FAR
        assert f.causes[0].startswith("the learning rate is too low") and f.remedies[0].startswith("raise")
    assert f"more than x10 {side} it" in " ".join(f.evidence.summary)
    assert "LayerNorm" not in {data.layers[[ly.name for ly in data.layers].index(n)].type for n in f.evidence.layers}


def test_a_skipped_spike_is_information_with_its_loss_and_norm(runs):
    data = runs("skip-once")
    f = findings(data)["skipped_spikes"]
    assert f.severity == "info" and f.evidence.steps == (BAD,) and f.evidence.values["skipped"] == 1
    assert f.evidence.summary[0].startswith(f"the spike guard skipped 1 step: {BAD} ")
    assert f.evidence.summary[1].startswith(f"step {BAD}: loss ") and "total gradient norm" in f.evidence.summary[1]
    assert f.evidence.values["value"] == pytest.approx(np.nanmax(data.run["skip_rate"].values))
    skipped = data.run["skipped"]
    assert skipped.values[skipped.steps == BAD][0] == 1


def test_frequent_skips_are_a_warning(runs):
    data = runs("skip-often")
    f = findings(data)["skipped_spikes"]
    assert f.severity == "warning" and f.evidence.values["value"] > th.SKIP_RATE
    assert f.causes[0].startswith("the run is unstable rather than unlucky")
    assert f.evidence.values["first_step"] >= 40


# ------------------------------------------------------------------------------ on arrays


def _layers(n: int) -> tuple[LayerInfo, ...]:
    return tuple(LayerInfo(i, f"l{i}", "Linear", "param") for i in range(n))


def test_eps_dominated_layers_whose_update_rms_jumps_before_a_spike():
    steps = np.arange(40)
    eps = np.full((2, 40), 0.05)
    eps[1, :30] = 0.9  # layer 1: eps dominates until step 30
    rms = np.full((2, 40), 0.5)
    rms[1, :30] = 0.1
    rms[1, 30:] = 0.8  # then its update RMS jumps x8
    z = np.zeros(40)
    z[33] = 50.0
    data = RunData("r", "r", _layers(2), run={"loss_z": Series(steps, z)},
                   layer={"layer_adam_eps_frac": Series(steps, eps), "layer_adam_update_rms": Series(steps, rms),
                          "layer_adam_v_lag": Series(steps, np.ones((2, 40)))})
    (f,) = adam_second_moment(data)
    assert f.evidence.layers == ("l1",) and f.evidence.values["eps_frac"] == pytest.approx(0.9)
    assert f.evidence.values["rms_jump"] == pytest.approx(8.0) and f.causes[0].startswith("eps dominated")
    assert "smaller eps" in f.remedies[1]
    check_text(f)


def test_a_lag_at_the_spiking_step_itself_is_a_bad_batch_not_a_precursor():
    steps = np.arange(40)
    lag = np.ones((1, 40))
    lag[0, 20] = 1e4  # the bad batch's own gradient, at the spike
    z = np.zeros(40)
    z[20] = 40.0
    data = RunData("r", "r", _layers(1), run={"loss_z": Series(steps, z)},
                   layer={"layer_adam_v_lag": Series(steps, lag)})
    assert adam_second_moment(data) == []
    z[22] = 40.0  # a spike two steps later: the lag at 20 was a spike's, still not a precursor
    assert adam_second_moment(data) == []


def test_rules_need_their_measurements():
    empty = RunData("r", "r", _layers(1))
    assert adam_second_moment(empty) == update_ratio_band(empty) == skipped_spikes(empty) == []
