"""The CLI without rough edges (issue 17): run names matched by prefix, tables and JSON that agree on
names and types, prompts off stdout, `compare` that pairs layers by name, says when a run is compared
with itself and agrees with `history`, and `diagnose` that does not call a run with no steps healthy.

Runs: the real runs of `gradwatch demo --quick`, synthetic run logs written with the run log encoder
(names and ids chosen so that prefixes collide on purpose), and a real agent run with no step.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.store import Store
from tests.fixtures.cli_runs import REPO, demo_home, fails, invoke, ok
from tests.fixtures.runlogs import SyntheticRun

#: name -> (run id, start time): `bert` is a name and a prefix of two others; `dee…` is an id that
#: `deep-net` starts like; `dup` names two runs.
NAMED = {"bert": ("c00000000001", 100.0), "bert-base": ("c00000000002", 200.0),
         "bert-large": ("c00000000003", 300.0), "deep-net": ("a00000000001", 400.0),
         "x": ("dee000000001", 500.0), "dup": ("d00000000001", 600.0)}
DUP_NEWEST = "d00000000002"


def _named_home(home: Path) -> str:
    for name, (run_id, started) in NAMED.items():
        SyntheticRun(run_id=run_id, name=name, started_at=started).write(home, 20)
    SyntheticRun(run_id=DUP_NEWEST, name="dup", started_at=700.0).write(home, 20)
    ok("runs", "--home", home)
    return str(home)


@pytest.fixture(scope="module")
def named(tmp_path_factory):
    return _named_home(tmp_path_factory.mktemp("named"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path, proc = demo_home(tmp_path_factory)
    assert proc.returncode == 0, proc.stderr
    return str(path)


@pytest.fixture(scope="module")
def store(demo):
    with Store.open(home=Path(demo)) as s:
        yield s


def _json(*args):
    return json.loads(ok(*args, "--json"))


def _id(home: str, ref: str) -> str:
    return _json("show", ref, "--home", home)["run"]["id"]


# ---------------------------------------------------------------- run names by prefix

@pytest.mark.parametrize("ref, run_id", [
    ("bert-l", "c00000000003"), ("bert-large", "c00000000003"), ("bert", "c00000000001"),
    ("deep", "a00000000001"), ("du", DUP_NEWEST), ("c00000000002", "c00000000002"),
], ids=["name-prefix", "full-name", "full-name-beats-longer-names", "name-prefix-like-an-id", "newest-of-the-name",
        "full-id"])
def test_a_run_name_prefix_finds_the_run(named, ref, run_id):
    assert _id(named, ref) == run_id


@pytest.mark.parametrize("ref, candidates", [
    ("bert-", "bert-large, bert-base"),
    ("dee", "dee000000001 (x), deep-net"),
], ids=["two-names", "an-id-and-a-name"])
def test_an_ambiguous_prefix_is_refused_with_candidates(named, ref, candidates):
    assert fails(2, "show", ref, "--home", named) == f"Error: run {ref!r} is ambiguous; candidates: {candidates}"


def test_delete_never_guesses_between_an_id_prefix_and_a_name_prefix(named):
    fails(2, "delete", "dee", "--home", named, "--yes")
    assert {r["name"] for r in _json("runs", "--home", named)} == set(NAMED)


def test_demo_run_names_by_prefix(demo, store):
    assert _id(demo, "demo-h") == store.resolve_run("demo-healthy")
    line = fails(2, "show", "demo-s", "--home", demo)
    assert line == "Error: run 'demo-s' is ambiguous; candidates: demo-sigmoid-normal-init, demo-sigmoid-default-init"


# ---------------------------------------------------------------- the same numbers, named the same way

def test_show_names_tensors_and_parameters_as_its_json_does(demo, store):
    run_id = store.resolve_run("demo-rnn-high-lr")
    d = _json("show", "demo-rnn-high-lr", "--home", demo)
    params = store.params(run_id)
    assert "num_params" not in d and d["num_param_tensors"] == len(params) == 6
    assert d["model"]["num_params"] == sum(p.numel for p in params) == 1249
    assert (f"model      SequenceRegressor, 1,249 parameters in 6 tensors, {d['num_layers']} layers, device cpu"
            in ok("show", "demo-rnn-high-lr", "--home", demo).splitlines())


def test_counts_are_integers_in_every_output(demo, store):
    run_id = store.resolve_run("demo-rnn-high-lr")
    latest = _json("show", "demo-rnn-high-lr", "--home", demo)["latest"]
    assert latest["nonfinite_params"]["value"] == 6 and type(latest["nonfinite_params"]["value"]) is int
    assert type(latest["skipped"]["value"]) is int and type(latest["overflow_params"]["value"]) is int
    history = _json("history", "demo-rnn-high-lr", "-m", "nonfinite_params", "--home", demo)
    assert {type(v) for v in history["values"]} == {int} and type(history["summary"]["max"]) is int
    step = store.layers_at_step(run_id).step
    layers = _json("layers", "demo-rnn-high-lr", "--home", demo)
    outputs = {r["layer"]: r["act_nonfinite"] for r in layers["layers"] if r["act_nonfinite"] is not None}
    assert outputs and all(type(v) is int for v in outputs.values())
    row = next(line.split() for line in ok("layers", "demo-rnn-high-lr", "--home", demo).splitlines()
               if line.split()[1:2] == ["rnn"])
    assert str(outputs["rnn"]) in row  # the table prints the count JSON has, not 1.02e+05
    records = [json.loads(line) for line in ok("export", "demo-rnn-high-lr", "--home", demo, "--format",
                                               "jsonl").splitlines()]
    counts = [r["value"] for r in records if r["record"] == "value" and r["metric"] in ("nonfinite_params", "skipped")]
    assert counts and {type(v) for v in counts} == {int}
    cells = [r["value"] for r in csv.DictReader(io.StringIO(ok("export", "demo-rnn-high-lr", "--home", demo)))
             if r["record"] == "value" and r["metric"] == "nonfinite_params"]
    assert "6" in cells and not any(c.endswith(".0") for c in cells)
    assert step == layers["step"]


def test_history_json_summary_is_what_the_table_prints(demo):
    d = _json("history", "demo-rnn-high-lr", "-m", "grad_norm_total", "--home", demo)
    s = d["summary"]
    values = np.array([np.nan if v == "nan" else v for v in d["values"]], dtype=float)
    assert s["values"] == len(values) and s["nan"] == int(np.isnan(values).sum()) > 0
    assert s["median"] == pytest.approx(np.median(values[~np.isnan(values)]))
    text = ok("history", "demo-rnn-high-lr", "-m", "grad_norm_total", "--home", demo).splitlines()[3]
    from gradwatch.cli._format import num

    assert f"min {num(s['min'])}, median {num(s['median'])}, max {num(s['max'])} (NaN left out)" in text


# ---------------------------------------------------------------- prompts on stderr

def _cli(home: str, *args: str, answer: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "gradwatch.cli", *args, "--home", home], input=answer,
                          capture_output=True, text=True, cwd=REPO, env=env, check=False)


def test_delete_asks_on_stderr_so_json_stays_json(tmp_path):
    home = _named_home(tmp_path / "gw")
    proc = _cli(home, "delete", "bert-large", "--json", answer="y\n")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"deleted": ["c00000000003"], "names": ["bert-large"], "logs_removed": False}
    assert "delete run c00000000003 (bert-large, last step 19)? [y/N]" in proc.stderr
    declined = _cli(home, "delete", "bert-base", "--json", answer="n\n")
    assert declined.returncode == 1 and declined.stdout == "" and "[y/N]" in declined.stderr


def test_gc_asks_on_stderr_so_json_stays_json(tmp_path):
    home = _named_home(tmp_path / "gw")
    proc = _cli(home, "gc", "--older-than", "0s", "--json", answer="y\n")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["deleted"]) == len(NAMED) + 1
    assert "runs that ended more than 0s ago? [y/N]" in proc.stderr


# ---------------------------------------------------------------- compare

def test_compare_a_run_with_itself_says_so(named, demo):
    assert fails(2, "compare", "demo-healthy", "demo-h", "--home", demo) == \
        f"Error: 'demo-healthy' and 'demo-h' are the same run {_id(demo, 'demo-healthy')} (demo-healthy): " \
        "nothing to compare"
    assert fails(2, "compare", "dup", "dup", "--home", named).endswith(
        f"are the same run {DUP_NEWEST} (dup): nothing to compare; other runs named dup: d00000000001")


def test_compare_pairs_layers_by_name_and_type_and_warns_when_they_differ(demo, store):
    a, b = store.layers(store.resolve_run("demo-sigmoid-default-init")), store.layers(store.resolve_run("demo-healthy"))
    result = invoke("compare", "demo-sigmoid-default-init", "demo-healthy", "--home", demo, "--json")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    types_b = {ly.name: ly.type for ly in b}
    same = [ly.name for ly in a if types_b.get(ly.name) == ly.type]
    assert sorted(r["layer"] for r in d["layers"]) == sorted(same) and len(same) < len(b)
    assert d["type_differs"] == [{"layer": ly.name, "a": ly.type, "b": types_b[ly.name]} for ly in a
                                 if ly.name in types_b and types_b[ly.name] != ly.type]
    assert d["only_a"] == [ly.name for ly in a if ly.name not in types_b]
    assert result.stderr.strip() == (
        f"gradwatch: warning: A and B have different layers ({len(a)} in A, {len(b)} in B; {len(d['only_a'])} only "
        f"in A, {len(d['type_differs'])} with another type in B): layers are compared by name, {len(same)} paired")
    same_arch = invoke("compare", "demo-sigmoid-default-init", "demo-sigmoid-normal-init", "--home", demo)
    assert same_arch.exit_code == 0 and same_arch.stderr == ""


def test_compare_medians_are_historys_medians(demo):
    d = _json("compare", "demo-sigmoid-default-init", "demo-sigmoid-normal-init", "--home", demo, "--top", "0")
    for side in ("a", "b"):
        run, (start, end) = d[side]["name"], d[side]["steady_steps"]
        whole = _json("history", run, "-m", "grad_norm_total", "--home", demo)
        assert d[side]["median_grad_norm_total"] == whole["summary"]["median"]
        for row in d["layers"][:4]:
            h = _json("history", run, "-m", d["metric"], "--layer", row["layer"], "--steps", f"{start}:{end}",
                      "--home", demo)
            assert row[side] == h["summary"]["median"]
    assert f"steps {start}-{end} of each run" in ok("compare", "demo-sigmoid-default-init",
                                                    "demo-sigmoid-normal-init", "--home", demo)


def test_compare_writes_readable_ratios(demo):
    text = ok("compare", "demo-sigmoid-default-init", "demo-sigmoid-normal-init", "--home", demo, "--top", "0")
    table = text[text.index("LAYER"):].splitlines()
    assert table[0].split() == ["LAYER", "A", "B", "B", "VS", "A"]
    factors = [line.split(None, 3)[3] for line in table[1:] if not line.startswith(("only", "same", "..."))]
    assert factors and all(re.fullmatch(r"×\d+(\.\d+)?(e\d+)? (larger|smaller)|same|-", f) for f in factors), factors
    assert "e+" not in "".join(factors) and "/" not in "".join(factors)
    assert factors[0].startswith("×") and factors[0].endswith("larger")  # the vanishing run's first layers


# ---------------------------------------------------------------- a run with no steps

@pytest.fixture(scope="module")
def empty(tmp_path_factory):
    home = tmp_path_factory.mktemp("empty")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    with gradwatch.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), run="no-steps",
                         config={"home": str(home)}) as watcher:
        pass  # the job failed before its first optimizer step
    SyntheticRun(run_id="e00000000002", name="header-only").write(home, 0, close=False)
    return str(home), watcher.run_id


@pytest.mark.parametrize("name", ["no-steps", "header-only"])
def test_diagnose_a_run_with_no_steps_says_so_and_fails(empty, name):
    home, _ = empty
    for extra in ((), ("--json",), ("--strict",)):
        line = fails(1, "diagnose", name, "--home", home, *extra)
        assert re.fullmatch(rf"Error: run {name} \(\w+, \w+\) has no steps stored: nothing to diagnose", line), line


@pytest.mark.parametrize("command, what", [
    (("plot", "no-steps", "--out", "x.png"), "nothing to plot"),
    (("layers", "no-steps"), "no layer measurements to show"),
    (("history", "no-steps", "-m", "loss"), "no history to show"),
    (("compare", "no-steps", "header-only"), "nothing to compare"),
], ids=["plot", "layers", "history", "compare"])
def test_other_commands_on_a_run_with_no_steps(empty, tmp_path, command, what):
    home, run_id = empty
    args = [str(tmp_path / a) if a == "x.png" else a for a in command]
    assert fails(1, *args, "--home", home) == f"Error: run no-steps ({run_id}, finished) has no steps stored: {what}"
    assert not (tmp_path / "x.png").exists()


def test_show_a_run_with_no_steps(empty):
    home, _ = empty
    assert ok("show", "no-steps", "--home", home).splitlines()[1].startswith("status     finished, no steps stored in")


# ---------------------------------------------------------------- docs

def test_nonfinite_json_values_are_documented_once_for_every_command():
    docs = (REPO / "docs" / "cli.md").read_text()
    assert docs.count('`"-inf"`') == 1
