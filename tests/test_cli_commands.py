"""Every query command through click's CliRunner, against the real runs of `gradwatch demo --quick`.

Expected values are recomputed from the store's query API (or from numpy over it).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from gradwatch import demo
from gradwatch.store import Store
from tests.fixtures.cli_runs import demo_home, fails, ok

NAMES_NEWEST_FIRST = [job.name for job in reversed(demo.JOBS)]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    path, proc = demo_home(tmp_path_factory)
    assert proc.returncode == 0, proc.stderr
    return str(path)


@pytest.fixture(scope="module")
def store(home):
    with Store.open(home=Path(home)) as s:
        yield s


def _json(*args):
    return json.loads(ok(*args, "--json"))


# ---------------------------------------------------------------- runs

def test_runs_lists_newest_first_with_norm_range_and_clip_rate(home, store):
    rows = _json("runs", "--home", home)
    assert [r["name"] for r in rows] == NAMES_NEWEST_FIRST
    for r in rows:
        job = next(j for j in demo.JOBS if j.name == r["name"])
        assert r["status"] == "finished" and r["steps"] == demo.job_steps(job, quick=True)
        steps, norms = store.run_series(r["id"], "grad_norm_total")
        assert r["grad_norm_total_min"] == pytest.approx(norms[np.isfinite(norms)].min())
        assert r["grad_norm_total_max"] == pytest.approx(norms[~np.isnan(norms)].max())
        coef = store.run_series(r["id"], "clip_coef").values
        assert r["clip_rate"] == pytest.approx(np.mean(coef < 1 - 1e-6))
        loss_steps, loss = store.run_series(r["id"], "loss")
        bad = set(steps[~np.isfinite(norms)].tolist()) | set(loss_steps[~np.isfinite(loss)].tolist())
        assert r["nonfinite_steps"] == len(bad)
    by_name = {r["name"]: r for r in rows}
    assert by_name["demo-rnn-high-lr"]["nonfinite_steps"] > 0
    assert by_name["demo-rnn-high-lr-clipped"]["clip_rate"] > 0.5
    assert by_name["demo-healthy"]["clip_rate"] == 0.0


def test_runs_table(home):
    lines = ok("runs", "--home", home).splitlines()
    assert lines[0].split() == ["ID", "NAME", "PROJECT", "STATUS", "STEPS", "STARTED", "DURATION", "TOTAL",
                                "NORM", "CLIPPED", "NAN/INF"]
    assert [line.split()[1] for line in lines[1:]] == NAMES_NEWEST_FIRST
    assert len({line.index("finished") for line in lines[1:]}) == 1  # aligned


@pytest.mark.parametrize("args, expected", [
    (("--name", "demo-rnn*"), ["demo-rnn-high-lr-clipped", "demo-rnn-high-lr"]),
    (("--project", "demo", "--status", "finished", "--since", "1d"), NAMES_NEWEST_FIRST),
    (("--status", "crashed"), []),
    (("--until", "2000-01-01"), []),
    (("--project", "elsewhere"), []),
    (("--limit", "2"), NAMES_NEWEST_FIRST[:2]),
], ids=["name-glob", "project-status-since", "status", "until", "project", "limit"])
def test_runs_filters(home, args, expected):
    assert [r["name"] for r in _json("runs", "--home", home, *args)] == expected


def test_runs_without_a_store_says_how_to_start_and_creates_nothing(tmp_path):
    assert "gradwatch demo" in fails(1, "runs", "--home", tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_runs_on_an_empty_store_says_how_to_start(tmp_path):
    from gradwatch.store import Store

    Store.open(home=tmp_path / "fresh").close()
    assert "gradwatch demo" in ok("runs", "--home", tmp_path / "fresh")


# ---------------------------------------------------------------- show

def test_show_names_the_layers_at_risk(home, store):
    run_id = store.resolve_run("demo-sigmoid-normal-init")
    d = _json("show", "demo-sigmoid-normal-init", "--home", home)
    table = store.layers_at_step(run_id)
    flow, sat = table.values["act_grad_norm"], table.values["saturation_ratio"]
    assert d["at_risk"]["step"] == table.step
    assert d["at_risk"]["smallest_flow"][0]["layer"] == table.layers[int(np.nanargmin(flow))].name
    assert d["at_risk"]["largest_flow"][0]["layer"] == table.layers[int(np.nanargmax(flow))].name
    assert d["at_risk"]["most_saturated"][0]["saturation_ratio"] == pytest.approx(np.nanmax(sat))
    assert d["at_risk"]["most_dead"] == []
    assert {c["verdict"] for c in d["init_check"] if c["activation"] == "Sigmoid"} == {"too_large"}
    assert d["metrics"]["act_grad_norm"] == "layer"


def test_show_text_has_init_check_and_guard_events(home, store):
    text = ok("show", "demo-rnn-high-lr", "--home", home)
    run_id = store.resolve_run("demo-rnn-high-lr")
    first = min(e.step for e in store.events(run_id))
    assert "init check" in text and "rnn.weight_hh_l0" in text
    assert f"nonfinite: {len(store.events(run_id))}" in text
    event_lines = [line.split() for line in text.splitlines() if "nonfinite" in line and "layers" in line]
    assert int(event_lines[0][0]) == first
    assert "clipping   none" in text


def test_show_by_id_prefix(home, store):
    run_id = store.resolve_run("demo-healthy")
    prefixes = [run_id[:k] for k in range(4, 13)]
    unique = next(p for p in prefixes if sum(r.id.startswith(p) for r in store.list_runs()) == 1)
    assert _json("show", unique, "--home", home)["run"]["id"] == run_id


# ---------------------------------------------------------------- layers

def test_layers_at_the_last_step(home, store):
    run_id = store.resolve_run("demo-sigmoid-default-init")
    d = _json("layers", "demo-sigmoid-default-init", "--home", home)
    table = store.layers_at_step(run_id)
    assert d["step"] == table.step
    assert [r["layer"] for r in d["layers"]] == [ly.name for ly in table.layers]
    for m in d["metrics"]:
        assert [r[m] is None for r in d["layers"]] == (~table.measured[m]).tolist(), m  # null: not measured
        got = np.array([np.nan if r[m] is None else r[m] for r in d["layers"]], dtype=float)
        np.testing.assert_allclose(got, table.values[m], equal_nan=True)


def test_layers_at_a_step_sorted(home, store):
    run_id = store.resolve_run("demo-sigmoid-normal-init")
    d = _json("layers", "demo-sigmoid-normal-init", "--home", home, "--step", "50", "--sort", "saturation_ratio")
    table = store.layers_at_step(run_id, 50)
    sat = table.values["saturation_ratio"]
    expected = [table.layers[i].name for i in np.argsort(-sat, kind="stable") if np.isfinite(sat[i])]
    assert [r["layer"] for r in d["layers"]][: len(expected)] == expected
    assert d["step"] == 50


def test_layers_over_a_step_range(home, store):
    run_id = store.resolve_run("demo-healthy")
    d = _json("layers", "demo-healthy", "--home", home, "--steps", "20:60", "--aggregate", "max")
    assert (d["start"], d["end"], d["aggregate"], d["step"]) == (20, 60, "max", None)
    for r in d["layers"]:
        if r["family"] == "relu":
            steps, values = store.layer_history(run_id, r["layer"], "dead_ratio", 20, 60)
            assert steps.min() >= 20 and steps.max() <= 60
            assert r["dead_ratio"] == pytest.approx(values.max())


def test_layers_table_text(home):
    lines = ok("layers", "demo-healthy", "--home", home).splitlines()
    assert lines[0].startswith("demo-healthy (") and "step" in lines[0]
    assert lines[1].split()[:4] == ["#", "LAYER", "TYPE", "FAMILY"]
    assert len(lines) == 2 + 13


# ---------------------------------------------------------------- history

def test_history_of_a_run_metric(home, store):
    run_id = store.resolve_run("demo-rnn-high-lr-clipped")
    d = _json("history", "demo-rnn-high-lr-clipped", "--home", home, "--metric", "grad_norm_total")
    steps, values = store.run_series(run_id, "grad_norm_total")
    assert d["scope"] == "run" and d["steps"] == steps.tolist()
    np.testing.assert_allclose(d["values"], values)


def test_history_of_a_layer_and_a_param(home, store):
    run_id = store.resolve_run("demo-sigmoid-default-init")
    d = _json("history", "demo-sigmoid-default-init", "--home", home, "-m", "act_grad_norm", "--layer", "0",
              "--steps", "10:40")
    steps, values = store.layer_history(run_id, "0", "act_grad_norm", 10, 40)
    assert d["scope"] == "layer" and d["entity"] == "0" and d["steps"] == steps.tolist()
    np.testing.assert_allclose(d["values"], values)
    d = _json("history", "demo-sigmoid-default-init", "--home", home, "-m", "grad_norm", "--param", "2.weight")
    np.testing.assert_allclose(d["values"], store.param_history(run_id, "2.weight", "grad_norm").values)


def test_history_sparkline(home, store):
    text = ok("history", "demo-rnn-high-lr", "--home", home, "--metric", "grad_norm_total", "--width", "10")
    lines = text.splitlines()
    values = store.run_series(store.resolve_run("demo-rnn-high-lr"), "grad_norm_total").values
    assert len(lines[1]) == min(10, len(values))
    assert set(lines[1]) <= set("▁▂▃▄▅▆▇█!") and lines[1].endswith("!")  # ends in inf
    assert f"{len(values)} values" in lines[3]


# ---------------------------------------------------------------- compare

def _steady(values):
    return float(np.median(values[len(values) // 2:]))


def test_compare_ranks_layers_by_difference(home, store):
    a, b = store.resolve_run("demo-sigmoid-default-init"), store.resolve_run("demo-sigmoid-normal-init")
    d = _json("compare", "demo-sigmoid-default-init", "demo-sigmoid-normal-init", "--home", home)
    assert d["metric"] == "act_grad_norm" and d["a"]["id"] == a and d["b"]["id"] == b
    for row in d["layers"]:
        va = _steady(store.layer_history(a, row["layer"], "act_grad_norm").values)
        vb = _steady(store.layer_history(b, row["layer"], "act_grad_norm").values)
        assert row["ratio"] == pytest.approx(vb / va)
    diffs = [abs(r["log10_ratio"]) for r in d["layers"]]
    assert diffs == sorted(diffs, reverse=True)
    assert d["layers"][0]["layer"] in {"0", "1"}  # the earliest layers differ most: the vanishing end
    assert d["only_a"] == d["only_b"] == []


def test_compare_text_shows_both_runs(home):
    text = ok("compare", "demo-rnn-high-lr", "demo-rnn-high-lr-clipped", "--home", home, "--top", "1")
    assert "A: demo-rnn-high-lr (" in text and "B: demo-rnn-high-lr-clipped (" in text
    assert "... 1 more layer (--top 0 shows all)" in text


# ---------------------------------------------------------------- export

def _stored_value_count(store, run_id):
    names = store.metric_names(run_id)
    n = 0
    for metric, scope in names.items():
        if scope == "run":
            n += len(store.run_series(run_id, metric).steps)
        elif scope == "group":
            n += sum(len(store.run_series(run_id, metric, group=g["index"]).steps)
                     for g in store.run_summary(run_id).groups)
        elif scope == "param":
            n += sum(len(store.param_history(run_id, p.index, metric).steps) for p in store.params(run_id))
        else:
            for ly in store.layers(run_id):
                try:
                    n += len(store.layer_history(run_id, ly.index, metric).steps)
                except Exception:  # noqa: BLE001 - layers of another family have no such series
                    pass
    return n


def test_export_csv_has_every_value(home, store, tmp_path):
    run_id = store.resolve_run("demo-healthy")
    out = tmp_path / "healthy.csv"
    ok("export", "demo-healthy", "--home", home, "--format", "csv", "--out", out)
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    values = [r for r in rows if r["record"] == "value"]
    assert len(values) == _stored_value_count(store, run_id)
    assert rows[0]["record"] == "run" and json.loads(rows[0]["data"])["id"] == run_id
    loss = [float(r["value"]) for r in values if r["metric"] == "loss"]
    np.testing.assert_allclose(loss, store.run_series(run_id, "loss").values, rtol=1e-6)
    assert sum(r["record"] == "layer" for r in rows) == len(store.layers(run_id))


def test_export_json_and_jsonl_agree_and_encode_nan(home, store):
    array = json.loads(ok("export", "demo-rnn-high-lr", "--home", home, "--format", "json"))
    lines = [json.loads(line) for line in ok("export", "demo-rnn-high-lr", "--home", home,
                                             "--format", "jsonl").splitlines()]
    assert array == lines
    norms = [r["value"] for r in lines if r["record"] == "value" and r["metric"] == "grad_norm_total"]
    stored = store.run_series(store.resolve_run("demo-rnn-high-lr"), "grad_norm_total").values
    assert norms.count("nan") == np.isnan(stored).sum() > 0
    assert [r for r in lines if r["record"] == "event"][0]["kind"] == "nonfinite"


# ---------------------------------------------------------------- plot

def test_plot_writes_an_image(home, tmp_path):
    out = tmp_path / "vanishing.png"
    text = ok("plot", "demo-sigmoid-default-init", "--home", home, "--out", out)
    assert str(out) in text
    image = imread(out)
    assert image.shape[0] > 800 and image.shape[1] > 800
    assert image[..., :3].std() > 0.05  # not blank


@pytest.mark.parametrize("name, code, message", [("x.gif", 2, "must end in"), ("missing/x.png", 1, "does not exist")])
def test_plot_refuses_bad_outputs(home, tmp_path, name, code, message):
    assert message in fails(code, "plot", "demo-healthy", "--home", home, "--out", tmp_path / name)


# ---------------------------------------------------------------- diagnose

def test_diagnose_healthy_run(home):
    assert ok("diagnose", "demo-healthy", "--home", home).strip().endswith("no problems found")
    d = _json("diagnose", "demo-healthy", "--home", home)
    assert d["healthy"] is True and d["findings"] == []


def test_diagnose_text_and_json(home):
    text = ok("diagnose", "demo-sigmoid-default-init", "--home", home)
    assert "[ERROR] Vanishing gradients" in text and "likely causes:" in text and "remedies:" in text
    assert "remedies:" not in ok("diagnose", "demo-sigmoid-default-init", "--home", home, "--brief")
    d = _json("diagnose", "demo-sigmoid-default-init", "--home", home)
    vanishing = next(f for f in d["findings"] if f["id"] == "vanishing_gradients")
    assert vanishing["severity"] == "error" and vanishing["evidence"]["values"]["flow_ratio"] < 1e-3
    assert not math.isnan(vanishing["evidence"]["values"]["per_layer_factor"])


def test_diagnose_strict_exit_status(home):
    from tests.fixtures.cli_runs import invoke

    assert invoke("diagnose", "demo-rnn-high-lr", "--home", home, "--strict").exit_code == 1
    assert invoke("diagnose", "demo-healthy", "--home", home, "--strict").exit_code == 0
