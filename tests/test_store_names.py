"""Hostile names on both backends: free text of any length and content, ingested from a real run
log and read back exactly; the reversible text escape; run ids the store refuses alike."""

from __future__ import annotations

import glob
import random
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from tests.fixtures.pg import store_url  # noqa: F401 - fixture
from tests.fixtures.runlogs import SyntheticRun
from gradwatch.agent.runlog import Event, Header, MetricDef
from gradwatch.ingest import ingest_pending
from gradwatch.store import Store
from gradwatch.store.codec import TEXT_ESCAPE, decode_text, encode_text

_rng = random.Random(12)


def _noise(n: int) -> str:
    """`n` characters no compressor shrinks much: PostgreSQL could not index them in a btree."""
    pool = [chr(c) for c in range(0x21, 0x7F)] + ["é", "ß", "中", "😀", "\u200b"]
    return "".join(_rng.choice(pool) for _ in range(n))


CONTROL = "".join(chr(c) for c in range(1, 32)) + "\x7f\x85\u2028\u2029"
NAME = ("run\x00with NUL\nnewline\r\n\ttab" + CONTROL + TEXT_ESCAPE + "0 " + TEXT_ESCAPE + TEXT_ESCAPE
        + " lone \udcff surrogate " + _noise(300))[:300]
PROJECT = _noise(10_000)
HOST = "host\x00" + _noise(400)
PARAM = "blocks.0.\x00weight\n" + _noise(2_000)
LAYER = "blocks\x00.0\u2400\ud800" + _noise(3_000)
METRIC = "user/loss\x00" + _noise(4_000)
VERSIONS = {"torch_version": "2.\x00" + _noise(100), "gradwatch_version": TEXT_ESCAPE * 3, "python_version": "3.11\n",
            "device": "cuda:0\x00" + _noise(200)}


class HostileRun(SyntheticRun):
    """A SyntheticRun whose header and metric names are hostile."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.params[0]["name"] = PARAM
        self.layers[0]["name"] = LAYER
        self.metrics[METRIC] = MetricDef(len(self.metrics), METRIC, "run")
        twin = METRIC[:-1] + "!"  # shares 4,009 characters with METRIC: the series key tells them apart
        self.metrics[twin] = MetricDef(len(self.metrics), twin, "run")

    def header(self) -> Header:
        head = super().header()
        head.info.update(VERSIONS)
        return head


def test_the_text_escape_is_reversible_and_leaves_plain_text_alone() -> None:
    plain = ["", "bert-base", "é中😀", "a␁b", "50% of \\x00", "U+2400 is not here"]
    for s in plain:
        assert encode_text(s) == s
    tricky = ["\x00", TEXT_ESCAPE, TEXT_ESCAPE + "0", "\x00" + TEXT_ESCAPE, TEXT_ESCAPE + "\x00",
              TEXT_ESCAPE + "u0041", "\ud800\udc00", "x\udcff", TEXT_ESCAPE * 5 + "\x00" * 3, NAME, LAYER]
    rng = random.Random(3)
    alphabet = ["\x00", TEXT_ESCAPE, "0", "u", "a", "f", "\ud83d", "\ude00", "\n", "😀"]
    tricky += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(2000)]
    for s in tricky:
        stored = encode_text(s)
        assert decode_text(stored) == s, repr(s)
        assert "\x00" not in stored and all(not 0xD800 <= ord(c) <= 0xDFFF for c in stored)
        stored.encode("utf-8")  # what the drivers do: no lone surrogate left
    assert len({encode_text(s) for s in set(tricky)}) == len(set(tricky))  # no two texts stored alike
    assert decode_text("a" + TEXT_ESCAPE + "x") == "a" + TEXT_ESCAPE + "x"  # no escape: kept


def test_hostile_names_are_stored_and_read_back_exactly(store_url: str, tmp_path: Path) -> None:  # noqa: F811
    run = HostileRun(run_id="hostile1", name=NAME, project=PROJECT, host=HOST, started_at=1_000.0)
    run.write(tmp_path, 50, events=[Event("nonfinite\x00" + _noise(100), 3, 1.0, {"params": [PARAM]})])
    other = SyntheticRun(run_id="other1", name="plain", project=PROJECT[:-1] + "#", started_at=900.0)
    other.write(tmp_path, 10)
    with Store.open(store_url, home=tmp_path) as store:
        report = ingest_pending(store, tmp_path)
        assert report.errors == 0 and store.ingest_errors() == []
        assert {lg.state for lg in store.logs()} == {"finished"}
        info = store.run("hostile1")
        assert (info.name, info.project, info.host) == (NAME, PROJECT, HOST)
        assert [r.id for r in store.list_runs(project=PROJECT)] == ["hostile1"]
        assert [r.id for r in store.list_runs(project=PROJECT[:-1] + "#")] == ["other1"]
        assert [r.id for r in store.list_runs(name=glob.escape(NAME))] == ["hostile1"]  # `name` is a glob
        assert store.resolve_run(NAME) == "hostile1"
        summary = store.run_summary("hostile1")
        assert {k: getattr(summary, k) for k in VERSIONS} == VERSIONS
        assert summary.metrics[METRIC] == "run"
        assert store.params("hostile1")[0].name == PARAM
        assert store.layers("hostile1")[0].name == LAYER
        steps, values = store.run_series("hostile1", METRIC)
        np.testing.assert_array_equal(steps, np.arange(50))
        np.testing.assert_array_equal(values, run.value(METRIC, np.arange(50), 0))
        twin = METRIC[:-1] + "!"
        np.testing.assert_array_equal(store.run_series("hostile1", twin).values, run.value(twin, np.arange(50), 0))
        np.testing.assert_array_equal(store.param_history("hostile1", PARAM, "grad_norm").values,
                                      run.value("grad_norm", np.arange(50), 0))
        assert store.layer_history("hostile1", LAYER, "grad_norm").steps.shape == (50,)
        entities = {(v.metric, v.entity) for v in store.latest(["hostile1"])}
        assert {(METRIC, ""), ("grad_norm", PARAM), ("grad_norm", LAYER), ("act_mean", LAYER)} <= entities
        [event] = store.events("hostile1")
        assert event.kind.startswith("nonfinite\x00") and event.data == {"params": [PARAM]}
        alert = store.add_alert("rule\x00" + _noise(500), "sev\x00", f"{NAME} exploded", run_id="hostile1")
        assert [(a.rule[:5], a.severity, a.message) for a in store.alerts() if a.id == alert] == [
            ("rule\x00", "sev\x00", f"{NAME} exploded")]
        records = list(store.export_records("hostile1"))
        assert records[0]["name"] == NAME and records[0]["project"] == PROJECT
        assert any(r["record"] == "value" and r["metric"] == METRIC for r in records)
        store.delete_run("hostile1")
        assert [r.id for r in store.list_runs()] == ["other1"]


def test_names_are_stored_escaped_the_same_on_both_backends(store_url: str, tmp_path: Path) -> None:  # noqa: F811
    run = SyntheticRun(run_id="esc1", name="a\x00b" + TEXT_ESCAPE, project="p")
    run.write(tmp_path, 5)
    with Store.open(store_url, home=tmp_path) as store:
        ingest_pending(store, tmp_path)
    engine = create_engine(store_url)
    try:
        with engine.connect() as conn:
            raw = conn.execute(text("SELECT name FROM gw_runs WHERE id = 'esc1'")).scalar_one()
    finally:
        engine.dispose()
    assert raw == f"a{TEXT_ESCAPE}0b{TEXT_ESCAPE}{TEXT_ESCAPE}"


@pytest.mark.parametrize("run_id", ["x" * 65, "tab\tid", "nul\x00id", "sur\udcffid"],
                         ids=["65-chars", "control", "nul", "surrogate"])
def test_a_run_id_the_store_cannot_take_breaks_that_log_alike_on_both_backends(
        store_url: str, tmp_path: Path, run_id: str) -> None:  # noqa: F811
    bad = SyntheticRun(run_id="placeholder")
    path = bad.write(tmp_path, 5)
    head = bad.header()
    head.info["run_id"] = run_id
    from gradwatch.agent import runlog

    frames = path.read_bytes()[len(runlog.encode_header(bad.header())):]
    path.write_bytes(runlog.encode_header(head) + frames)
    good = SyntheticRun(run_id="good1")
    good.write(tmp_path, 5)
    with Store.open(store_url, home=tmp_path) as store:
        report = ingest_pending(store, tmp_path)
        assert report.errors == 1
        assert [r.id for r in store.list_runs()] == ["good1"]
        states = {lg.name: lg.state for lg in store.logs()}
        assert states[path.name] == "broken"
        [error] = store.ingest_errors()
        assert "is not 1-64 printable characters" in error.reason and "\n" not in error.reason
