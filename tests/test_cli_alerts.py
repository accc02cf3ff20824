"""`gradwatch alerts` and the alert counts of `gradwatch show`, on a store holding alerts as the
rules engine writes them (a real run, real SQLite file, click's CliRunner)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from gradwatch.store import Store
from tests.fixtures.cli_runs import fails, ok
from tests.fixtures.live_log import LiveLog


@pytest.fixture
def home(tmp_path: Path) -> str:
    """Two runs; `live` has a resolved alert (a day ago) and a firing one with a +Inf value."""
    for run_id, name in (("aaaa1111", "live"), ("bbbb2222", "other run")):
        LiveLog(tmp_path, run_id=run_id, name=name).write(40)
    with Store.open(home=tmp_path) as store:
        from gradwatch.ingest import ingest_pending

        ingest_pending(store, tmp_path)
        now = time.time()
        old = store.add_alert("dying_units", "warning", "Dying ReLU units", run_id="aaaa1111", step=30,
                              started_at=now - 86400, layer="act", value=0.7, threshold=0.5,
                              cause="a learning rate too high", remedy="use LeakyReLU")
        store.resolve_alert(old, now - 86000)
        store.add_alert("exploding_gradients", "error", "Exploding gradients", run_id="aaaa1111", step=35,
                        started_at=now - 60, value=math.inf, threshold=100.0, cause="learning rate too high",
                        remedy="clip the total gradient norm at 1")
        store.add_alert("stalled_run", "warning", "Run stalled: no new step recorded", run_id="bbbb2222",
                        step=39, started_at=now - 30, value=700.0, threshold=600.0, cause="the job hangs",
                        remedy="py-spy dump --pid 1")
    return str(tmp_path)


def test_lists_firing_and_past_alerts_newest_first(home: str) -> None:
    lines = ok("alerts", "--home", home).splitlines()
    assert lines[0].split() == ["ID", "RUN", "RULE", "SEVERITY", "STATE", "LAYER", "STEP", "VALUE", "THRESHOLD",
                                "STARTED", "ENDED"]
    first, second, third = (line.replace("other run", "other-run").split() for line in lines[1:])
    assert first[:7] == ["3", "other-run", "stalled_run", "warning", "firing", "-", "39"]
    assert first[7:9] == ["700", "600"] and first[-1] == "-"
    assert second[:9] == ["2", "live", "exploding_gradients", "error", "firing", "-", "35", "inf", "100"]
    assert third[:9] == ["1", "live", "dying_units", "warning", "resolved", "act", "30", "0.7", "0.5"]
    assert third[-1] != "-" and len(lines) == 4


def test_json_has_stable_keys_and_nonfinite_values_as_strings(home: str) -> None:
    rows = json.loads(ok("alerts", "--home", home, "--json"))
    exploding = next(r for r in rows if r["rule"] == "exploding_gradients")
    assert exploding == {
        "id": 2, "run": {"id": "aaaa1111", "name": "live"}, "rule": "exploding_gradients", "severity": "error",
        "title": "Exploding gradients", "state": "firing", "layer": None, "step": 35, "value": "inf",
        "threshold": 100.0, "cause": "learning rate too high", "remedy": "clip the total gradient norm at 1",
        "started_at": exploding["started_at"], "ended_at": None, "command": "gradwatch diagnose live"}
    stalled = next(r for r in rows if r["rule"] == "stalled_run")
    assert stalled["command"] == "gradwatch diagnose 'other run'"


@pytest.mark.parametrize(("args", "rules"), [
    pytest.param(["--run", "live"], ["exploding_gradients", "dying_units"], id="run"),
    pytest.param(["--since", "1h"], ["stalled_run", "exploding_gradients"], id="since"),
    pytest.param(["--firing"], ["stalled_run", "exploding_gradients"], id="firing"),
    pytest.param(["--run", "live", "--since", "2d"], ["exploding_gradients", "dying_units"], id="run-since"),
    pytest.param(["--limit", "1"], ["stalled_run"], id="limit"),
])
def test_filters(home: str, args: list[str], rules: list[str]) -> None:
    assert [r["rule"] for r in json.loads(ok("alerts", "--home", home, "--json", *args))] == rules


def test_no_alerts_says_where_they_come_from(tmp_path: Path) -> None:
    LiveLog(tmp_path).write(20)
    assert ok("alerts", "--home", str(tmp_path)).strip() == (
        "no alerts (gradwatch serve raises them while it ingests live runs: docs/alerts.md)")


def test_bad_input_is_one_line(home: str) -> None:
    assert fails(2, "alerts", "--home", home, "--run", "nope").startswith("Error: no run matches 'nope'")
    assert fails(2, "alerts", "--home", home, "--since", "yesterday").startswith("Error: bad time 'yesterday'")


def test_show_counts_the_alerts_of_a_run(home: str) -> None:
    data = json.loads(ok("show", "live", "--home", home, "--json"))
    assert data["alerts"] == {"total": 2, "firing": ["exploding_gradients"]} and data["active_alerts"] == 1
    assert ok("show", "live", "--home", home).splitlines()[-1] == (
        "alerts     1 firing (exploding_gradients), 2 in all: gradwatch alerts --run aaaa1111")
    assert ok("show", "other run", "--home", home).splitlines()[-1] == (
        "alerts     1 firing (stalled_run), 1 in all: gradwatch alerts --run bbbb2222")
