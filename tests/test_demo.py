"""`gradwatch demo --quick` as a subprocess: real training jobs, stored, diagnosed, printed; its
progress line on a terminal (a pseudo-terminal here): steps, an honest ETA, warnings off the line."""

from __future__ import annotations

import io
import logging
import math
import os
import re
import subprocess
import sys
import threading

import pytest
import torch

from gradwatch import demo
from gradwatch.cli._progress import ETA_AFTER_S, ETA_AFTER_STEPS, StepProgress, progress
from gradwatch.store import Store
from tests.fixtures.cli_runs import REPO, demo_home

CLEAR = "\r\x1b[2K"


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


# ---------------------------------------------------------------- the progress line

def test_progress_shows_steps_and_no_eta_until_the_rate_is_known():
    now = [0.0]
    bar = StepProgress(1000, io.StringIO(), live=True, clock=lambda: now[0])
    now[0] = 5.0
    bar.step("demo-a")  # the first step carries the job's setup: it says nothing about the rate
    assert bar.line() == "training  [------------------------------]  1/1000 steps  demo-a"
    for _ in range(ETA_AFTER_STEPS):
        now[0] += 0.01
        bar.step("demo-a")
    assert bar.eta() is None  # enough steps, but not yet ETA_AFTER_S seconds of them
    while now[0] < 5.0 + ETA_AFTER_S:
        now[0] += 0.01
        bar.step("demo-b")
    assert bar.eta() == pytest.approx((1000 - bar.done) * 0.01)  # 0.01 s a step, the 5 s of setup left out
    assert bar.line().endswith(f"  {bar.done}/1000 steps  0:09 left  demo-b")


def test_agent_warnings_print_on_their_own_line_and_the_progress_is_redrawn_below(tmp_path):
    job = next(j for j in demo.JOBS if j.name == "demo-rnn-high-lr")  # NaN/Inf gradients from step 23
    out = io.StringIO()
    agent_log = logging.getLogger("gradwatch.agent")
    handlers, propagate = list(agent_log.handlers), agent_log.propagate
    with progress(40, out, live=True) as bar:
        demo.train(job, tmp_path, 40, on_step=lambda: bar.step(job.name))
    text = out.getvalue()
    warning = next(line for line in text.split("\n") if "gradwatch: NaN/Inf gradient elements at step 23" in line)
    assert warning.rsplit("\r", 1)[1].startswith("\x1b[2Kgradwatch: ")  # the line cleared, never written over
    assert text[text.index(warning) + len(warning):].startswith("\n" + CLEAR + "training  [")  # and drawn again
    assert re.search(r"\r\x1b\[2Ktraining  40/40 steps in \d+:\d\d\n$", text)
    assert (agent_log.handlers, agent_log.propagate) == (handlers, propagate)  # the logger as it was


def test_off_a_terminal_warnings_are_plain_lines():
    out = io.StringIO()
    with progress(3, out, live=False) as bar:
        bar.step("job")
        logging.getLogger("gradwatch.agent").warning("gradwatch: something at step %d", 1)
        bar.step("job")
    assert out.getvalue() == "gradwatch: something at step 1\n"


def _on_a_terminal(*args: str) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal (stdout a pipe): exit code, stdout, terminal text."""
    import pty

    master, replica = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "gradwatch.cli", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=replica, cwd=REPO, env=env, text=True)
    os.close(replica)
    chunks: list[bytes] = []

    def drain() -> None:  # the child blocks once the terminal's buffer is full: read it as it writes
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    stdout, _ = proc.communicate()
    reader.join()
    os.close(master)
    return proc.returncode, stdout, b"".join(chunks).decode()


def test_demo_on_a_terminal_shows_steps_an_honest_eta_and_warnings_on_their_own_lines(tmp_path):
    code, stdout, terminal = _on_a_terminal("demo", "--quick", "--home", str(tmp_path / "home"))
    assert code == 0, terminal
    total = sum(demo.job_steps(job, quick=True) for job in demo.JOBS)
    frames = [f for f in re.split(r"[\r\n]+", terminal.replace("\x1b[2K", "")) if f]
    bars = [f for f in frames if f.startswith("training  [")]
    assert bars[0] == f"training  [------------------------------]  1/{total} steps  demo-sigmoid-default-init"
    took = re.search(rf"training  {total}/{total} steps in (\d+):(\d\d)", terminal)
    assert took, terminal[-300:]
    seconds = 60 * int(took.group(1)) + int(took.group(2))
    etas = [(int(m.group(1)), 60 * int(m.group(2)) + int(m.group(3)))
            for m in (re.search(r"(\d+)/\d+ steps  (\d+):(\d\d) left", f) for f in bars) if m]
    assert etas and etas[0][0] > ETA_AFTER_STEPS  # no ETA before the rate is known
    assert max(eta for _, eta in etas) <= 3 * seconds + 2  # never the 00:23:41 of a 7 s job
    warnings = [f for f in frames if "gradwatch: NaN/Inf gradient elements" in f]
    assert warnings and all(w.startswith("gradwatch: ") and "training  [" not in w for w in warnings)
    assert "training  [" not in stdout and "== vanishing gradients" in stdout  # progress on the terminal only
