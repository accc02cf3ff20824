"""Bad input and bad stores: one line on stderr, a non-zero exit, never a traceback.

Runs here are real (tiny demo jobs trained in-process); run ids are chosen with
GRADWATCH_RUN_ID so that prefixes can be ambiguous on purpose.
"""

from __future__ import annotations

import sqlite3

import pytest

from gradwatch import demo
from tests.fixtures.cli_runs import fails, invoke, ok, run_cli

HEALTHY = next(j for j in demo.JOBS if j.name == "demo-healthy")


def _train(home, run_id, monkeypatch, name=None):
    monkeypatch.setenv("GRADWATCH_RUN_ID", run_id)
    job = HEALTHY if name is None else demo.DemoJob(name, HEALTHY.shows, HEALTHY.steps, HEALTHY.setup)
    demo.train(job, home, steps=4)
    monkeypatch.delenv("GRADWATCH_RUN_ID")


@pytest.fixture
def two_runs(tmp_path, monkeypatch):
    home = tmp_path / "gw"
    _train(home, "abc000000001", monkeypatch, "first")
    _train(home, "abc000000002", monkeypatch, "second")
    return str(home)


def test_ambiguous_prefix_lists_candidates(two_runs):
    line = fails(2, "show", "abc", "--home", two_runs)
    assert "ambiguous" in line and "abc000000001 (first)" in line and "abc000000002 (second)" in line


def test_unknown_run_lists_close_names(two_runs):
    line = fails(2, "diagnose", "secnd", "--home", two_runs)
    assert "no run matches 'secnd'" in line and "candidates: second" in line


def test_unknown_run_in_an_empty_store(tmp_path):
    from gradwatch.store import Store

    Store.open(home=tmp_path / "empty").close()
    assert "gradwatch demo" in fails(2, "show", "x", "--home", tmp_path / "empty")


def test_full_id_and_name_resolve(two_runs):
    assert '"abc000000002"' in ok("show", "abc000000002", "--home", two_runs, "--json")
    assert '"abc000000001"' in ok("show", "first", "--home", two_runs, "--json")


@pytest.mark.parametrize("args, message", [
    (("history", "first", "--metric", "nope"), "no metric 'nope'"),
    (("history", "first", "--metric", "act_grad_norm"), "give --layer"),
    (("history", "first", "--metric", "act_grad_norm", "--layer", "nope"), "no layer 'nope'"),
    (("history", "first", "--metric", "grad_norm", "--param", "nope"), "no param 'nope'"),
    (("history", "first", "--metric", "loss", "--layer", "0"), "not a layer metric"),
    (("history", "first", "--metric", "loss", "--steps", "9:2"), "start 9 is after end 2"),
    (("history", "first", "--metric", "loss", "--steps", "a:b"), "bad step range"),
    (("history", "first", "--metric", "lr", "--group", "5"), "no param group 5; its groups are 0"),
    (("layers", "first", "--step", "999"), "after the run's last step"),
    (("layers", "first", "--steps", "900:999"), "no layer measurements in steps 900:999"),
    (("layers", "first", "--steps", "1:2", "--step", "1"), "either --step or --steps"),
    (("layers", "first", "--sort", "nope"), "cannot sort by 'nope'"),
    (("compare", "first", "second", "--metric", "nope"), "not a layer metric of both runs"),
    (("runs", "--since", "yesterday"), "bad time 'yesterday'"),
    (("gc", "--older-than", "soon"), "bad duration 'soon'"),
    (("runs", "--since", "99999999999d"), "number out of range"),
    (("history", "first", "--metric", "loss", "--steps", "99999999999999999999999:"), "number out of range"),
    (("runs", "--db", "postgresql://u@h:notaport/db"), "not a database URL"),
    (("runs", "--db", "sqlite:///x.db?timeout=abc"), "bad database URL"),
], ids=lambda v: v if isinstance(v, str) else "-".join(v[:2]))
def test_bad_input_is_one_line_exit_2(two_runs, args, message):
    assert message in fails(2, *args, "--home", two_runs)


def test_not_a_store_file(tmp_path):
    (tmp_path / "gradwatch.db").write_bytes(b"this is not a database, just text" * 100)
    line = fails(1, "runs", "--home", tmp_path)
    assert "gradwatch.db" in line or "not" in line


def test_a_database_of_another_application(tmp_path):
    db = tmp_path / "other.db"
    with sqlite3.connect(db) as conn:
        conn.execute("create table invoices (id integer primary key, total real)")
    line = fails(1, "runs", "--db", f"sqlite:///{db}", "--home", tmp_path)
    assert "gradwatch" in line


def test_a_corrupt_database_file(two_runs, tmp_path):
    from pathlib import Path

    ok("runs", "--home", two_runs)  # ingests both runs, closes the store (WAL checkpointed)
    db = Path(two_runs) / "gradwatch.db"
    data = bytearray(db.read_bytes())
    assert len(data) > 8192
    data[4096:] = bytes((i * 37 + 11) % 256 for i in range(len(data) - 4096))
    db.write_bytes(bytes(data))
    for args in (("runs",), ("show", "first"), ("diagnose", "first")):
        result = invoke(*args, "--home", two_runs)
        assert result.exit_code != 0 and isinstance(result.exception, SystemExit), repr(result.exception)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr


def test_a_bad_store_url(tmp_path):
    fails(1, "runs", "--db", "nosuchdriver://x/y", "--home", tmp_path)


def test_damaged_chunks_in_a_readable_database(two_runs):
    """The store opens, but a stored series cannot be decoded: one line, not a zlib traceback."""
    from pathlib import Path

    ok("runs", "--home", two_runs)
    with sqlite3.connect(Path(two_runs) / "gradwatch.db") as conn:
        conn.execute("update gw_chunks set vals = x'deadbeef'")
    assert "damaged data" in fails(1, "history", "first", "--metric", "loss", "--home", two_runs)


def test_an_unexpected_error_is_one_line_unless_debugging(two_runs, monkeypatch):
    import gradwatch.cli.runs as runs_module

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(runs_module, "_render", broken, raising=True)
    assert "unexpected KeyError" in fails(1, "runs", "--home", two_runs)
    monkeypatch.setenv("GRADWATCH_DEBUG", "1")  # the traceback instead, on stderr, exit 1
    result = invoke("runs", "--home", two_runs)
    assert result.exit_code == 1 and "Traceback" in result.stderr and "KeyError: 'a bug'" in result.stderr


def test_errors_as_a_subprocess(two_runs):
    proc = run_cli("history", "first", "--metric", "nope", "--home", two_runs)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- delete and gc

def test_delete_asks_then_deletes_and_keeps_the_log_unread(two_runs):
    from pathlib import Path

    declined = invoke("delete", "first", "--home", two_runs, input="n\n")
    assert declined.exit_code == 1
    assert "first" in ok("runs", "--home", two_runs)
    assert "deleted run abc000000001 (first)" in ok("delete", "first", "--home", two_runs, input="y\n")
    names = [line.split()[1] for line in ok("runs", "--home", two_runs).splitlines()[1:]]
    assert names == ["second"]  # and the kept log is not ingested again
    assert (Path(two_runs) / "logs" / "abc000000001.rank0.gwlog").exists()
    fails(2, "delete", "first", "--home", two_runs, "--yes")


def test_delete_with_remove_logs(two_runs):
    from pathlib import Path

    ok("delete", "second", "--home", two_runs, "--yes", "--remove-logs")
    assert not (Path(two_runs) / "logs" / "abc000000002.rank0.gwlog").exists()


def test_gc_dry_run_then_delete(two_runs):
    assert ok("gc", "--older-than", "1d", "--home", two_runs).strip() == "no run ended more than 1d ago"
    dry = ok("gc", "--older-than", "0s", "--dry-run", "--home", two_runs)
    assert dry.splitlines() == ["would delete abc000000002 (second)", "would delete abc000000001 (first)"]
    assert ok("runs", "--home", two_runs, "--json").count('"id"') == 2
    done = ok("gc", "--older-than", "0s", "--yes", "--home", two_runs, "--json")
    assert sorted(__import__("json").loads(done)["deleted"]) == ["abc000000001", "abc000000002"]
    assert ok("runs", "--home", two_runs, "--json").strip() == "[]"


def test_malformed_fields_of_a_foreign_log_do_not_break_show_or_diagnose(tmp_path):
    """A header and an event whose JSON fields have the wrong shapes: stored as empty, readable."""
    from gradwatch.agent import runlog

    import numpy as np

    path = runlog.log_path("foreign000001", 0, tmp_path)
    path.parent.mkdir(parents=True)
    header = runlog.Header({"run_id": "foreign000001", "name": "foreign", "config": ["x"], "init_check": [1],
                            "groups": "g", "model": 3}, [runlog.MetricDef(0, "loss", "run")])
    steps = np.arange(3, dtype=np.int64)  # steps, so that diagnose reads them with the malformed fields
    frame = runlog.encode_frame([(0, steps, np.ones((3, 1), dtype=np.float32), np.ones((3, 1), dtype=bool))])
    path.write_bytes(runlog.encode_header(header) + frame
                     + runlog.encode_event(runlog.Event("nonfinite", 1, 0.0, [1]))  # type: ignore[arg-type]
                     + runlog.encode_close(runlog.Close(0.0, 2, {})))
    assert "foreign" in ok("show", "foreign", "--home", tmp_path)
    ok("diagnose", "foreign", "--home", tmp_path)
