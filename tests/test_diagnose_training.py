"""Diagnosis of real training: every rule fires on a small job that really has its problem, with
the right cause, and nothing above `info` fires on healthy jobs trained to a falling loss.

The jobs (tests/fixtures/training.py and the pathological models of tests/test_pathologies.py)
train for a few seconds each on the CPU under `gradwatch.watch`, into one home; the store reads
them through the same loader as `gradwatch diagnose`. Expected numbers come from the store's
query API and from the jobs' own settings, not from the rules.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradwatch.diagnose import Finding, RunData, Series, diagnose
from gradwatch.diagnose import thresholds as th
from gradwatch.diagnose.load import load_run_data
from tests.fixtures import training
from tests.fixtures.cli_runs import invoke
from tests.fixtures.findings_text import check_text
from tests.fixtures.training import Job, cross_entropy, sgd
from tests.test_pathologies import RNNClassifier, fixed_batch, mlp, relu_mlp_with_negative_bias

EVERY_STEP = {"measure": {"activation_every": 1, "param_every": 1, "flush_every": 10}}


def _fixed(batch: tuple[torch.Tensor, torch.Tensor]):
    return lambda step: batch


def _sequences(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 40, 8, generator=g), torch.randint(0, 4, (16,), generator=g)


#: The pathological models of tests/test_pathologies.py, trained a few steps on a fixed batch.
MODELS: tuple[Job, ...] = (
    Job("sigmoid-default-init", lambda: mlp(nn.Sigmoid), _fixed(fixed_batch()), cross_entropy, sgd(0.01), 10,
        config=EVERY_STEP),
    Job("sigmoid-normal-1", lambda: mlp(nn.Sigmoid, init=lambda l: nn.init.normal_(l.weight, 0.0, 1.0)),
        _fixed(fixed_batch()), cross_entropy, sgd(0.01), 10, config=EVERY_STEP),
    Job("negative-bias-relu", lambda: relu_mlp_with_negative_bias(nn.ReLU), _fixed(fixed_batch(64)), cross_entropy,
        sgd(0.01), 10, config=EVERY_STEP),
    Job("rnn-unclipped", RNNClassifier, _sequences, cross_entropy, sgd(0.01), 6, config=EVERY_STEP),
)

JOBS = {job.name: job for job in training.HEALTHY + training.PATHOLOGICAL + MODELS}


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("training") / "home"


@pytest.fixture(scope="module")
def runs(home):
    """Trains each job the first time a test asks for it; returns (store, run id)."""
    yield from training.trained_runs(JOBS, home)


def _findings(runs, name: str) -> dict[str, Finding]:
    store, run_id = runs(name)
    found = diagnose(load_run_data(store, run_id))
    for f in found:
        check_text(f)
    return {f.id: f for f in found}


def _cut(series: Series, first: int, last: int) -> Series:
    keep = (series.steps >= first) & (series.steps <= last)
    present = None if series.present is None else series.present[..., keep]
    return Series(series.steps[keep], series.values[..., keep], present)


def windows(data: RunData, size: int, every: int) -> list[RunData]:
    """The run cut into windows of `size` recent steps, one every `every` steps, as the live
    rules engine sees it."""
    last = int(data.run["grad_norm_total"].steps[-1])
    out = []
    for end in range(size - 1, last + 1, every):
        first = end - size + 1
        out.append(replace(data, run={m: _cut(s, first, end) for m, s in data.run.items()},
                           layer={m: _cut(s, first, end) for m, s in data.layer.items()},
                           group={m: _cut(s, first, end) for m, s in data.group.items()},
                           events=tuple(e for e in data.events if first <= int(e["step"]) <= end)))
    return out


def _series(runs, name: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    store, run_id = runs(name)
    got = store.run_series(run_id, metric)
    return got.steps, got.values


# ---------------------------------------------------------------------------------- healthy


@pytest.mark.parametrize("name", [job.name for job in training.HEALTHY])
def test_healthy_jobs_have_nothing_above_info(runs, home, name):
    _, loss = _series(runs, name, "loss")
    assert np.all(np.isfinite(loss))
    assert loss[-10:].mean() < 0.8 * loss[:10].mean(), (loss[:10].mean(), loss[-10:].mean())  # it trains
    found = _findings(runs, name)
    assert {f.severity for f in found.values()} <= {"info"}, {f.id: f.evidence.summary for f in found.values()}
    result = invoke("diagnose", name, "--home", home, "--strict")
    assert result.exit_code == 0  # CI passes it
    assert result.output.splitlines()[0].endswith(": no problems found (1 note)")
    assert json.loads(invoke("diagnose", name, "--home", home, "--json").output)["healthy"] is True
    init = found["initialisation"]  # PyTorch's default init, said as information
    assert "PyTorch's default init" in init.evidence.summary[0]


@pytest.mark.parametrize("name", [job.name for job in training.HEALTHY])
def test_healthy_jobs_have_nothing_above_info_in_any_window(runs, name):
    """The live engine's view: windows of 50 recent steps, one every 10 steps."""
    store, run_id = runs(name)
    for window in windows(load_run_data(store, run_id), 50, 10):
        found = [f for f in diagnose(window) if f.severity != "info"]
        assert not found, (window.run["loss"].steps[0], [(f.id, f.evidence.summary) for f in found])


def test_the_normalised_net_gradient_rises_as_the_cosine_schedule_decays(runs):
    """Scale-invariant weights under weight decay: |g| grows as the LR falls (Defazio 2025)."""
    _, norms = _series(runs, "normalised-cosine", "grad_norm_total")
    store, run_id = runs("normalised-cosine")
    lr = store.run_series(run_id, "lr", group=0).values
    q = len(norms) // 4
    assert np.median(norms[-q:]) > 1.5 * np.median(norms[:q])
    assert np.median(lr[-q:]) < 0.2 * np.median(lr[:q])
    assert "exploding_gradients" not in _findings(runs, "normalised-cosine")


# ---------------------------------------------------------------------------------- pathological


def test_an_rnn_exploding_under_clipping_is_an_explosion_that_keeps_its_clipping(runs):
    """Old main: only 'Clipping on most steps', with the remedy to raise the threshold ~1e5 times."""
    found = _findings(runs, "rnn-clipped")
    assert "clipping_rate" not in found
    f = found["exploding_gradients"]
    assert (f.severity, f.title) == ("error", "Exploding gradients, held down by clipping")
    _, norms = _series(runs, "rnn-clipped", "grad_norm_total")
    assert f.evidence.values["value"] == pytest.approx(np.median(norms), rel=1e-5)  # over a threshold of 1.0
    assert f.evidence.values["value"] > 1e4
    store, run_id = runs("rnn-clipped")
    hh = next(c for c in store.run_summary(run_id).init_check if c["param"] == "rnn.weight_hh_l0")
    assert f.causes[0].startswith("weights initialised too large")
    assert f"rnn.weight_hh_l0: std {hh['std']:.3g} before RNN; Glorot expects" in f.causes[0]
    assert f.remedies[0].startswith("keep the clipping at 1: ")
    assert not any("raise" in r or "threshold to" in r for r in f.remedies)
    for window in windows(load_run_data(store, run_id), 1, 7):  # from any single step
        assert [(f.id, f.severity) for f in diagnose(window) if f.severity != "info"] == \
            [("exploding_gradients", "error")]


def test_a_corrupt_batch_is_a_loss_spike_with_the_batch_as_its_cause(runs):
    """Old main: 'Exploding gradients' with 'learning rate too high' as the only cause."""
    found = _findings(runs, "corrupt-batch")
    assert "exploding_gradients" not in found
    f = found["loss_spike"]
    steps, loss = _series(runs, "corrupt-batch", "loss")
    step = training.CORRUPT_STEP
    assert f.evidence.steps == (step,) and f.evidence.values["value"] == pytest.approx(loss[steps == step][0])
    assert f.evidence.summary[0].startswith(f"loss spike at step {step}: ")
    assert f"with a gradient spike at step {step}" in f.evidence.summary[0]
    assert f.causes[0].startswith("a bad batch") and f.remedies[0].startswith(f"look at the batch of step {step}")
    assert {x.severity for x in found.values() if x.id != "loss_spike"} <= {"info"}


def test_a_learning_rate_burst_that_kills_relus_is_named_as_their_cause(runs):
    found = _findings(runs, "lr-burst")
    f = found["dying_units"]
    store, run_id = runs("lr-burst")
    data = load_run_data(store, run_id)
    dead = data.layer["dead_ratio"]
    before = dead.steps < training.BURST[0]
    assert np.nanmax(dead.values[:, before]) < 0.2  # alive before the burst
    assert f.evidence.values["onset_step"] > training.BURST[0]
    first, last = training.BURST[0], training.BURST[-1]
    assert f.causes[0].startswith(f"a learning-rate burst: the LR reached 0.1 (x100 its median 0.001) on 5 steps "
                                  f"({first}-{last})")
    assert found["loss_spike"].causes[0].startswith("a learning-rate burst")
    assert found["loss_spike"].remedies[0] == "fix the learning-rate schedule that made it jump"


def test_a_loss_that_turns_nan_mid_run_names_the_loss_as_its_source(runs):
    found = _findings(runs, "nan-mid-run")
    step = training.EQUAL_TARGETS_STEP
    loss = found["nonfinite_loss"]
    assert loss.evidence.summary[:2] == (f"first non-finite loss at step {step}",
                                         f"loss NaN on 20 steps: {step}-79")
    assert loss.causes[0].endswith(f"the activations at step {step} were finite and the gradient norm before it "
                                   "ordinary, so the NaN/Inf was born in the loss")
    assert loss.causes[1].startswith(f"weights that went non-finite after the non-finite update of step {step}")
    grads = found["nonfinite_gradients"]
    assert grads.evidence.values["first_step"] == step
    assert grads.causes[0].startswith(f"the loss was non-finite at step {step}")
    acts = found["nonfinite_activations"]
    assert acts.evidence.values["first_step"] > step
    assert acts.causes[0].startswith("weights that went non-finite after a non-finite update")
    assert "exploding_gradients" not in found


def test_a_deep_sigmoid_mlp_on_default_init_vanishes_and_its_init_is_named(runs):
    found = _findings(runs, "sigmoid-default-init")
    f = found["vanishing_gradients"]
    assert f.severity == "error" and f.evidence.values["value"] < th.VANISHING_RATIO
    assert f.causes[0].startswith("weights initialised too small")
    assert "Glorot expects" in f.causes[0] and "PyTorch's default" in f.causes[0]
    assert found["initialisation"].severity == "info"


def test_too_large_sigmoid_weights_saturate_and_their_init_is_named(runs):
    found = _findings(runs, "sigmoid-normal-1")
    f = found["saturation"]
    assert f.causes[0].startswith("weights initialised too large")
    assert "std 1 before Sigmoid" in f.causes[0] or "std 0.99" in f.causes[0] or "std 1.0" in f.causes[0]


def test_a_relu_layer_dead_from_the_start(runs):
    f = _findings(runs, "negative-bias-relu")["dying_units"]
    assert f.evidence.layers[0] == "7" and f.evidence.values["value"] == 1.0  # the ReLU after the biased Linear
    assert f.causes[0].startswith("dead from the first measured step (0)")


def test_an_unclipped_exploding_rnn_is_found_from_its_first_step(runs):
    f = _findings(runs, "rnn-unclipped")["exploding_gradients"]
    assert f.severity == "error" and f.evidence.steps[0] == 0
    assert f.evidence.values["threshold"] == th.GRAD_PARAM_RATIO
    assert "'max_norm': 1.0" in f.remedies[0]
