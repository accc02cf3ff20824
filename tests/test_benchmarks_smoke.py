"""The overhead benchmark: its quickest run yields a well-formed table; its timers count what they should.

No timing is asserted: the numbers depend on the machine.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.methods import Gradwatch, HookTimer
from benchmarks.overhead import REPO, ratio_interval

FLOAT = r"\d+\.\d+"
RATIO = rf"{FLOAT} \[{FLOAT}, {FLOAT}\]"


def _methods() -> list[str]:
    return ["bare", "clip"] + ([] if Gradwatch.missing() else ["gradwatch"])


@pytest.mark.slow
def test_quick_run_writes_a_well_formed_table(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# B\n\n<!-- overhead:cpu:begin -->\nold\n<!-- overhead:cpu:end -->\n\n"
                    "<!-- overhead:cuda:begin -->\npending\n<!-- overhead:cuda:end -->\n")
    methods = _methods()
    argv = [sys.executable, "-m", "benchmarks.overhead", "--quick", "--models", "mlp", "--methods", ",".join(methods),
            "--rounds", "3", "--warmup", "1", "--rss-methods", "bare", "--rss-steps", "1", "--import-reps", "0",
            "--bootstrap", "50", "--write-docs", str(docs), "--json", str(tmp_path / "samples.json")]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]

    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and " | " in line]
    header = rows[0]
    assert header.startswith("| model | method | median step (ms) | ratio to bare [95% CI] | CPU-time ratio, mean [95% CI] |")
    table = [r for r in rows if re.match(r"\| (mlp \(.*\)|) \| (bare|clip|gradwatch) \|", r)]
    assert [r.split(" | ")[1] for r in table] == methods
    assert "mlp (2.37 M params, batch 128, 3 rounds)" in table[0]
    n_columns = header.count("|")
    for row in table:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert row.count("|") == n_columns
        assert re.fullmatch(FLOAT, cells[2]), row
        if cells[1] == "bare":
            assert cells[3] == cells[4] == "1" and cells[10].startswith("0 (bare: ")
        else:
            assert re.fullmatch(RATIO, cells[3]) and re.fullmatch(RATIO, cells[4]), row
            assert re.fullmatch(FLOAT, cells[5]) and re.fullmatch(rf"{FLOAT}%", cells[6]), row
            assert re.fullmatch(FLOAT, cells[8]), row  # the largest step's own time over the median step's
    if "gradwatch" in methods:
        assert re.search(rf"\| gradwatch: step-time ratio ≤ 1\.05 \| mlp \| CPU {RATIO}; wall {RATIO}; "
                         rf"1 \+ own / bare {FLOAT} \| (met|\*\*missed)", proc.stdout)
        assert re.search(rf"\| gradwatch: largest step's own time ≤ 3× the median step's \| mlp \| {FLOAT}× \| "
                         rf"(met|\*\*missed)", proc.stdout)

    text = docs.read_text()
    assert "old" not in text and "pending" in text
    assert text.count("<!-- overhead:cpu:begin -->") == 1 and "| mlp (2.37 M params" in text
    samples = json.loads((tmp_path / "samples.json").read_text())
    for name in methods:
        result = samples["models"][0]["methods"][name]
        assert len(result["step_ns"]) == len(result["own_ns"]) == 3


def test_hook_timer_times_module_optimizer_and_activation_gradient_hooks() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: list[str] = []

    def forward_hook(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        seen.append("forward")
        output.register_hook(lambda grad: seen.append("activation grad"))

    model[1].register_forward_hook(forward_hook)
    optimizer.register_step_pre_hook(lambda *args: seen.append("step pre"))
    timer = HookTimer(model, optimizer)
    assert timer.wrap_new() == 2
    assert timer.wrap_new() == 0  # already wrapped

    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    assert seen == ["forward", "activation grad", "step pre"]
    assert timer.calls == 3 and timer.ns > 0


def test_ratio_interval_is_paired_over_rounds() -> None:
    rng = np.random.default_rng(0)
    drift = rng.uniform(1.0, 3.0, size=200)  # the machine's state, shared by each round
    bare = (100 * drift).astype(int)
    method = (110 * drift).astype(int)
    ratio, low, high = ratio_interval(method.tolist(), bare.tolist(), resamples=500, seed=1)
    assert ratio == pytest.approx(1.1, abs=0.01)
    assert low <= ratio <= high and high - low < 0.02


@pytest.mark.slow
def test_profile_step_prints_an_operator_table_for_bare_and_the_method() -> None:
    method = "gradwatch" if not Gradwatch.missing() else "clip"
    argv = [sys.executable, "-m", "benchmarks.profile_step", "--model", "mlp", "--method", method, "--steps", "2"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## mlp: bare, 2 steps on cpu" in proc.stdout and f"## mlp: {method}, 2 steps on cpu" in proc.stdout
    assert proc.stdout.count("Self CPU time total") == 2 and "aten::addmm" in proc.stdout
