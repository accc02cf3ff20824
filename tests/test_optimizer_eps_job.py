"""The ε-dominated branch of `adam_second_moment` on a real training job, read back through the
store as `gradwatch diagnose` reads it.

The normalised MLP of tests/test_optimizer_health_diagnose.py trained with Adam at eps 0.03: the
gradients of its hidden layers are so small that eps dominates sqrt(v̂) for all of their elements,
so Adam takes SGD-like steps of lr·m̂/eps. When the hidden weight is scaled by 0.01 at step RESCALE
its gradient grows x100, the update RMS jumps with it and the loss spikes at the next step. The same
job without the rescale has eps dominating just as much and no spike, and is silent.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from gradwatch.diagnose import diagnose
from gradwatch.diagnose.load import load_run_data
from gradwatch.diagnose.rundata import RunData
from gradwatch.ingest.ingester import ingest_pending
from gradwatch.store import Store
from tests import test_optimizer_health_diagnose as jobs
from tests.fixtures.findings_text import check_text

EPS_JOBS = {
    "adam-eps-rescaled": dict(model=jobs.normalised, batches=jobs.teacher, loss=nn.functional.cross_entropy,
                              steps=120, opt=lambda ps: torch.optim.Adam(ps, lr=1e-2, eps=0.03),
                              before=jobs.rescale_at(jobs.RESCALE)),
    "adam-eps-steady": dict(model=jobs.normalised, batches=jobs.teacher, loss=nn.functional.cross_entropy,
                            steps=120, opt=lambda ps: torch.optim.Adam(ps, lr=1e-2, eps=0.03)),
}


@pytest.fixture(scope="module")
def eps_runs(tmp_path_factory: pytest.TempPathFactory, monkeypatch_module: pytest.MonkeyPatch
             ) -> Iterator[dict[str, RunData]]:
    home: Path = tmp_path_factory.mktemp("eps") / "home"
    for name, job in EPS_JOBS.items():
        monkeypatch_module.setitem(jobs.JOBS, name, job)
    with Store.open(home=home) as store:
        ids = {name: jobs.train(name, home) for name in EPS_JOBS}
        report = ingest_pending(store, home)
        assert not report.errors, report.errors
        yield {name: load_run_data(store, run_id) for name, run_id in ids.items()}


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_eps_dominated_hidden_layer_whose_update_rms_jumps_before_the_spike(eps_runs):
    found = {f.id: f for f in diagnose(eps_runs["adam-eps-rescaled"])}
    f = found["adam_second_moment"]
    check_text(f)
    assert f.evidence.steps == (jobs.RESCALE + 1,)
    assert "3" in f.evidence.layers  # the rescaled Linear
    assert f.evidence.values["eps_frac"] >= 0.9 and f.evidence.values["rms_jump"] >= 3.0
    assert any(c.startswith("eps dominated") for c in f.causes)
    assert any("smaller eps" in r for r in f.remedies)


def test_eps_dominating_without_a_spike_is_silent(eps_runs):
    data = eps_runs["adam-eps-steady"]
    assert float(data.layer["layer_adam_eps_frac"].values[3].max()) >= 0.9  # eps dominates there too
    assert "adam_second_moment" not in {f.id for f in diagnose(data)}
