"""`gradwatch demo --quick` as a subprocess: real training jobs, stored, diagnosed, printed."""

from __future__ import annotations

import math

import pytest
import torch

from gradwatch import demo
from gradwatch.store import Store
from tests.fixtures.cli_runs import demo_home


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    return demo_home(tmp_path_factory)


def _section(stdout: str, job: demo.DemoJob) -> str:
    """The part of the demo's output about one job."""
    start = stdout.index(f"== {job.shows}")
    end = stdout.find("\n== ", start + 1)
    return stdout[start:end if end != -1 else stdout.index("look further:")]


def test_demo_exits_cleanly_and_records_every_job(demo_run):
    home, proc = demo_run
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    with Store.open(home=home) as store:
        runs = {r.name: r for r in store.list_runs(project=demo.PROJECT)}
    assert set(runs) == {job.name for job in demo.JOBS}
    for job in demo.JOBS:
        assert runs[job.name].status == "finished"
        assert runs[job.name].last_step == demo.job_steps(job, quick=True) - 1


@pytest.mark.parametrize("job_name, expected", [
    ("demo-sigmoid-default-init", "[ERROR] Vanishing gradients"),
    ("demo-sigmoid-normal-init", "Saturated sigmoid/tanh activations"),
    ("demo-rnn-high-lr", "[ERROR] Exploding gradients"),
    ("demo-rnn-high-lr", "[ERROR] Non-finite gradients"),
    ("demo-rnn-high-lr-clipped", "[WARNING] Clipping on most steps"),
    ("demo-healthy", "no problems found"),
], ids=["vanishing", "saturation", "exploding", "nonfinite", "clipping", "healthy"])
def test_demo_prints_each_diagnosis(demo_run, job_name, expected):
    _, proc = demo_run
    job = next(j for j in demo.JOBS if j.name == job_name)
    assert expected in _section(proc.stdout, job)


def test_demo_prints_commands_for_its_home(demo_run):
    home, proc = demo_run
    tail = proc.stdout[proc.stdout.index("look further:"):].splitlines()[1:]
    assert len(tail) >= 5
    assert all(line.strip().startswith("gradwatch ") and line.endswith(f"--home {home}") for line in tail)


def test_quick_runs_the_same_jobs_for_fewer_steps():
    for job in demo.JOBS:
        assert 0 < demo.job_steps(job, quick=True) < demo.job_steps(job, quick=False) == job.steps


def test_sigmoid_twins_differ_only_in_init():
    torch.manual_seed(0)
    default = demo.sigmoid_mlp()
    normal = demo.sigmoid_mlp(weight_std=1.0)
    assert [type(m) for m in default] == [type(m) for m in normal]
    hidden = default[2].weight
    assert hidden.std().item() == pytest.approx(1 / math.sqrt(3 * hidden.shape[1]), rel=0.05)
    assert normal[2].weight.std().item() == pytest.approx(1.0, rel=0.05)


def test_healthy_mlp_uses_he_init():
    weight = demo.relu_mlp()[3].weight
    assert weight.std().item() == pytest.approx(math.sqrt(2 / weight.shape[1]), rel=0.1)


def test_long_range_target_is_the_sum_of_the_first_values():
    x, y = demo.long_range_batches(length=50)(3)
    assert x.shape == (32, 50, 4)
    torch.testing.assert_close(y[:, 0], x[:, :5, 0].sum(dim=1))
    x2, _ = demo.long_range_batches(length=50)(3)
    torch.testing.assert_close(x, x2)  # batches are reproducible


def test_xor_labels():
    x, y = demo.xor_batches()(0)
    torch.testing.assert_close(y, (x[:, 0] * x[:, 1] > 0).long())


def test_train_restores_the_thread_count(tmp_path):
    before = torch.get_num_threads()
    run_id = demo.train(demo.JOBS[-1], tmp_path, steps=3)
    assert torch.get_num_threads() == before
    assert list((tmp_path / "logs").glob(f"{run_id}.rank0.gwlog"))
