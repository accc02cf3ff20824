"""Schema v1 -> v2 through the Alembic migration, on a v1 store with data in it, on SQLite and
PostgreSQL: every row survives and reads back through the Store API, NaN and ±Inf last values
and free text holding ␀ or NUL included; the upgrade runs once under concurrent openers, all or
nothing; and back down to v1."""

from __future__ import annotations

import json
import math
import re
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, create_engine, inspect, text

from tests.fixtures.cli_runs import fails, ok
from tests.fixtures.pg import pg_database_url, store_url  # noqa: F401 - fixture
from tests.fixtures.store_v1 import V1Data, V1Series, fill_v1_store
from tests.fixtures.store_v1 import metadata as v1_metadata
from gradwatch.ingest.chunker import append_rows, load_series
from gradwatch.store import SCHEMA_VERSION, SchemaVersionError, Store, StoreError
from gradwatch.store import schema
from gradwatch.store.codec import encode_text
from gradwatch.store.engine import PG_LOCK_KEY, create_store_engine, migrate, writing
from gradwatch.store.migrations import VERSION_TABLE
from gradwatch.store.migrations.__main__ import main as migrations_main


@pytest.fixture
def v1(store_url: str) -> tuple[str, V1Data]:  # noqa: F811 - the fixture imported above
    """A schema v1 store with data, not yet opened by this gradwatch."""
    return store_url, fill_v1_store(store_url)


def _other_url(url: str, tmp_path: Path) -> str:
    """A second empty database on the same backend as `url`."""
    return f"sqlite:///{tmp_path / 'other.db'}" if url.startswith("sqlite") else pg_database_url()


def _raw(url: str, sql: str) -> list[tuple]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql))]
    finally:
        engine.dispose()


def _read(store: Store, s: V1Series):
    if s.scope in ("run", "group"):
        return store.run_series(s.run_id, s.metric, rank=s.rank, group=s.entity)
    if s.scope == "param":
        return store.param_history(s.run_id, s.entity, s.metric, rank=s.rank)
    return store.layer_history(s.run_id, s.entity, s.metric, rank=s.rank)


def _same_floats(got: np.ndarray, want: np.ndarray) -> None:
    """Equal as float32, bit for bit (NaN == NaN)."""
    assert got.astype(np.float32).tobytes() == np.asarray(want, np.float32).tobytes()


# ------------------------------------------------------------------ the upgrade


def test_v1_store_with_data_is_upgraded_in_place(v1: tuple[str, V1Data]) -> None:
    url, data = v1
    with Store.open(url) as store:
        assert sorted(r.id for r in store.list_runs()) == ["r1", "r2", "r3"]
        for want in data.runs:
            got = store.run(want["id"])
            assert (got.name, got.project, got.status, got.status_at, got.started_at, got.ended_at, got.last_step,
                    got.host, got.pid, got.world_size) == tuple(want[k] for k in (
                        "name", "project", "status", "status_at", "started_at", "ended_at", "last_step", "host",
                        "pid", "world_size"))
        summary = store.run_summary("r1")
        r1 = data.runs[0]
        assert (summary.config, summary.model, summary.groups, summary.init_check) == (
            r1["config"], r1["model"], r1["groups"], r1["init_check"])
        assert summary.optimizer == {} and store.run_summary("r2").optimizer == {}
        assert (summary.torch_version, summary.device) == ("2.3.0", "cuda:0")
        assert summary.latest["loss"] == (4999, float(data.series[0].values[-1]))
        assert summary.event_counts == {e["kind"]: 1 for e in data.events}
        for run_id in ("r1", "r3"):
            assert [(p.index, p.name, p.layer, p.shape, p.numel, p.requires_grad, p.group)
                    for p in store.params(run_id)] == [
                (p["idx"], p["name"], p["layer"], tuple(p["shape"]), p["numel"], p["requires_grad"], p["group"])
                for p in data.params if p["run_id"] == run_id]
        assert [(la.index, la.name, la.type, la.kind, la.family, la.params) for la in store.layers("r1")] == [
            (la["idx"], la["name"], la["type"], la["kind"], la["family"], tuple(la["params"])) for la in data.layers]
        for s in data.series:
            steps, values = _read(store, s)
            np.testing.assert_array_equal(steps, s.steps)
            _same_floats(values, s.values)
        latest = {(v.run_id, v.rank, v.metric, v.scope, v.entity): (v.step, v.value) for v in store.latest()}
        assert latest[("r1", 0, "loss", "run", "")] == (4999, float(data.series[0].values[-1]))
        assert latest[("r1", 0, "grad_norm", "param", "l0.weight")] == (990, math.inf)
        assert latest[("r1", 0, "grad_norm", "param", "l0.bias")] == (990, -math.inf)
        assert latest[("r1", 0, "grad_norm", "layer", "l0")] == (990, math.inf)
        step, value = latest[("r1", 0, "act_mean", "layer", "l1")]
        assert step == 980 and math.isnan(value)
        assert latest[("r2", 1, "loss", "run", "")] == (9, float(np.float32(1e30)))
        events = store.events("r1")
        assert [(e.step, e.time, e.kind) for e in events] == [(e["step"], e["time"], e["kind"]) for e in data.events]
        assert [json.dumps(e.data) for e in events] == [json.dumps(e["data"]) for e in data.events]  # NaN too
        assert [(a.run_id, a.rule, a.severity, a.step, a.message, a.labels, a.started_at, a.ended_at)
                for a in store.alerts()] == [tuple(a.values()) for a in data.alerts]
        assert [(lg.name, lg.path, lg.run_id, lg.rank, lg.offset, lg.state, lg.state_at, lg.last_step,
                 lg.close_stats) for lg in store.logs()] == sorted(
            (lg["name"], lg["path"], lg["run_id"], lg["rank"], lg["offset"], lg["state"], lg["state_at"],
             lg["last_step"], lg["close_stats"]) for lg in data.logs)
        assert [(e.log, e.path, e.offset, e.reason, e.at) for e in store.ingest_errors()] == [
            tuple(e.values()) for e in data.ingest_errors]
    meta = dict(_raw(url, "SELECT key, value FROM gw_meta"))
    assert meta == {**data.meta, "schema_version": str(SCHEMA_VERSION)}
    assert _raw(url, f"SELECT version_num FROM {VERSION_TABLE}") == [(f"v{SCHEMA_VERSION}",)]
    assert sorted(_raw(url, "SELECT metric, entity, last_value, last_nonfinite FROM gw_series "
                            "WHERE last_nonfinite IS NOT NULL")) == [
        ("act_mean", 1, None, "nan"), ("grad_norm", 0, None, "inf"), ("grad_norm", 1, None, "-inf")]
    r3 = data.runs[2]
    assert _raw(url, "SELECT name, project, host, device FROM gw_runs WHERE id = 'r3'") == [
        tuple(encode_text(r3[k]) for k in ("name", "project", "host", "device"))]  # stored escaped


def test_v1_text_is_escaped_as_v2_stores_it(v1: tuple[str, V1Data]) -> None:
    """A v1 value holding ␀ is re-escaped (a literal ␀0 stays ␀0), a NUL that SQLite held raw is
    escaped, and a query by the value finds the row."""
    url, data = v1
    r3 = data.runs[2]
    with Store.open(url) as store:
        assert store.resolve_run(r3["name"]) == "r3"
        assert [r.id for r in store.list_runs(project=r3["project"])] == ["r3"]
        assert store.logs("r3")[0].name == data.logs[3]["name"]
    stored = [v for (v,) in _raw(url, "SELECT name FROM gw_logs ORDER BY name")]
    assert encode_text(data.logs[3]["name"]) in stored
    assert all("\x00" not in v for v in stored)


def test_upgraded_series_take_new_rows(v1: tuple[str, V1Data]) -> None:
    """Ingestion goes on where v1 left off: cached state from the migrated rows (a NaN last value
    included), pending v1 chunks merged with new rows into full ones."""
    url, data = v1
    old = data.series[0]  # r1 loss: one full chunk, two pending
    new_steps = np.arange(5000, 8700, dtype=np.int64)
    new_values = np.linspace(-1, 1, new_steps.shape[0], dtype=np.float32)
    new_values[-1] = np.nan
    with Store.open(url) as store:
        with writing(store.engine) as conn:
            cache = load_series(conn, "r1", 0)
            assert math.isnan(cache[("act_mean", "layer", 1)].last_value)
            assert cache[("grad_norm", "param", 0)].last_value == math.inf
            append_rows(conn, "r1", 0, cache, [(cache[("loss", "run", 0)], new_steps, new_values)])
        steps, values = store.run_series("r1", "loss")
        np.testing.assert_array_equal(steps, np.concatenate([old.steps, new_steps]))
        _same_floats(values, np.concatenate([old.values, new_values]))
        step, value = store.run_summary("r1").latest["loss"]
        assert step == 8699 and math.isnan(value)
    sizes = _raw(url, "SELECT c.n FROM gw_chunks c JOIN gw_series s ON s.id = c.series_id "
                      "WHERE s.run_id = 'r1' AND s.metric = 'loss' ORDER BY c.seq")
    assert [n for (n,) in sizes] == [schema.CHUNK_ROWS, schema.CHUNK_ROWS, 5000 + 3700 - 2 * schema.CHUNK_ROWS]


def _layout(engine: Engine) -> dict:
    """Every gw_ table's columns (name, type, nullable, in order), keys and indexes.

    On SQLite a VARCHAR(n) counts as TEXT: SQLite ignores the length and gives both the text
    affinity, and the v2 migration leaves v1's declared types (changing one means copying the
    table; see its docstring)."""
    insp = inspect(engine)
    sqlite = engine.dialect.name == "sqlite"
    out = {}
    for table in sorted(t for t in insp.get_table_names() if t.startswith("gw_")):
        out[table] = {
            "columns": [(c["name"], _type_name(str(c["type"]), sqlite), c["nullable"])
                        for c in insp.get_columns(table)],
            "pk": insp.get_pk_constraint(table)["constrained_columns"],
            "fks": sorted((tuple(f["constrained_columns"]), f["referred_table"],
                           (f.get("options") or {}).get("ondelete")) for f in insp.get_foreign_keys(table)),
            "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                              for i in insp.get_indexes(table)),
        }
    return out


def _type_name(declared: str, sqlite: bool) -> str:
    return "TEXT" if sqlite and re.fullmatch(r"VARCHAR\(\d+\)", declared) else declared


def test_an_upgraded_store_has_the_layout_of_a_new_one(v1: tuple[str, V1Data], tmp_path: Path) -> None:
    url, _ = v1
    fresh = _other_url(url, tmp_path)
    Store.open(url).close()
    Store.open(fresh).close()
    a, b = create_engine(url), create_engine(fresh)
    try:
        upgraded, new = _layout(a), _layout(b)
    finally:
        a.dispose()
        b.dispose()
    assert set(upgraded) == set(schema.metadata.tables) | {VERSION_TABLE}
    assert upgraded == new
    assert _raw(fresh, f"SELECT version_num FROM {VERSION_TABLE}") == [(f"v{SCHEMA_VERSION}",)]


def test_a_failed_upgrade_leaves_the_v1_store_as_it_was(v1: tuple[str, V1Data]) -> None:
    """All or nothing: the second column cannot be added, so the first is taken back too."""
    url, _ = v1
    _raw_exec(url, "ALTER TABLE gw_series ADD COLUMN last_nonfinite INTEGER")
    before = _layout_of(url)
    with pytest.raises(StoreError, match="cannot migrate the store .* from schema version 1 to schema version 2: ") \
            as exc:
        Store.open(url)
    assert "\n" not in str(exc.value)
    assert _layout_of(url) == before
    assert _raw(url, "SELECT value FROM gw_meta WHERE key = 'schema_version'") == [("1",)]


def _raw_exec(url: str, sql: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(sql))
    finally:
        engine.dispose()


def _layout_of(url: str) -> dict:
    engine = create_engine(url)
    try:
        return _layout(engine)
    finally:
        engine.dispose()


def test_a_read_only_v1_store_is_refused_in_one_line_and_left_alone(tmp_path: Path) -> None:
    db = tmp_path / "v1.db"
    fill_v1_store(f"sqlite:///{db}")
    with pytest.raises(StoreError, match="cannot .*readonly database") as exc:
        Store.open(f"sqlite:///file:{db}?mode=ro&uri=true")
    assert "\n" not in str(exc.value)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT value FROM gw_meta WHERE key = 'schema_version'").fetchone() == ("1",)
        assert "last_nonfinite" not in [r[1] for r in conn.execute("PRAGMA table_info(gw_series)")]


_OPENER = """
import sys
import gradwatch.store.engine as engine
from gradwatch.store import Store

real = engine.migrate
def traced(eng, target):
    print("migrating", flush=True)
    before = real(eng, target)
    print("from", before, flush=True)
    return before
engine.migrate = traced
Store.open(sys.argv[1]).close()
"""


@contextmanager
def _write_lock(url: str) -> Iterator[Callable[[], None]]:
    """Hold the lock that creating or migrating the store takes; yields the function that releases it."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield lambda: conn.execute("ROLLBACK")
        finally:
            conn.close()
        return
    engine = create_engine(url)
    try:
        with engine.connect() as pg:
            pg.execute(text(f"SELECT pg_advisory_lock({PG_LOCK_KEY})"))
            yield lambda: pg.execute(text(f"SELECT pg_advisory_unlock({PG_LOCK_KEY})"))
    finally:
        engine.dispose()


def test_concurrent_openers_of_a_v1_store_migrate_it_once(v1: tuple[str, V1Data]) -> None:
    """Both processes see v1 and enter the migration while another connection holds the lock;
    once it is released, one migrates (from 1) and the other finds it done (from 2)."""
    url, data = v1
    with _write_lock(url) as release:
        procs = [subprocess.Popen([sys.executable, "-c", _OPENER, url], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        try:
            for p in procs:
                assert p.stdout is not None and p.stdout.readline() == "migrating\n", p.communicate()
            release()
            outs = [p.communicate(timeout=120) for p in procs]  # a hang guard, not a time limit
        finally:
            for p in procs:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sorted(out for out, _ in outs) == ["from 1\n", "from 2\n"]
    assert _raw(url, f"SELECT version_num FROM {VERSION_TABLE}") == [(f"v{SCHEMA_VERSION}",)]
    with Store.open(url) as store:
        _same_floats(store.run_series("r1", "loss").values, data.series[0].values)


# ------------------------------------------------------------------ versions and the way back


def test_a_store_newer_than_this_gradwatch_is_refused_in_one_line(store_url: str) -> None:  # noqa: F811
    Store.open(store_url).close()
    _raw_exec(store_url, f"UPDATE gw_meta SET value = '{SCHEMA_VERSION + 1}' WHERE key = 'schema_version'")
    with pytest.raises(SchemaVersionError, match=f"schema version {SCHEMA_VERSION + 1}, newer than this gradwatch "
                                                 f"supports \\({SCHEMA_VERSION}\\): upgrade gradwatch") as exc:
        Store.open(store_url)
    assert "\n" not in str(exc.value)
    assert "newer than this gradwatch" in fails(1, "runs", "--db", store_url)
    with pytest.raises(StoreError, match="newer"):
        _migrate(store_url, 1)


def _migrate(url: str, version: int) -> int:
    engine = create_store_engine(url)
    try:
        return migrate(engine, version)
    finally:
        engine.dispose()


def test_a_read_command_on_a_v1_store_upgrades_it(v1: tuple[str, V1Data]) -> None:
    url, _ = v1
    shown = json.loads(ok("show", "r1", "--db", url, "--json"))
    assert shown["run"]["id"] == "r1"
    assert _raw(url, "SELECT value FROM gw_meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]


def test_downgrade_to_v1_and_up_again(v1: tuple[str, V1Data], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    url, data = v1
    Store.open(url).close()
    _raw_exec(url, """UPDATE gw_runs SET optimizer = '{"class": "SGD", "wrappers": []}' WHERE id = 'r1'""")
    assert migrations_main(["1", "--db", url]) == 0
    assert capsys.readouterr().out.endswith(f": schema version {SCHEMA_VERSION} -> 1\n")
    v1_tables = {t.name: [c.name for c in t.columns] for t in v1_metadata.sorted_tables}
    layout = _layout_of(url)
    assert {t: [c[0] for c in layout[t]["columns"]] for t in v1_tables} == v1_tables
    pristine = _other_url(url, tmp_path)
    fill_v1_store(pristine)
    assert {t: layout[t] for t in v1_tables} == _layout_of(pristine)  # types (VARCHAR(n) again) and indexes too
    r3 = data.runs[2]
    assert _raw(url, "SELECT name, project, host, device FROM gw_runs WHERE id = 'r3'") == [
        tuple(r3[k] for k in ("name", "project", "host", "device"))]  # as v1 wrote them, NUL included on SQLite
    assert _raw(url, "SELECT value FROM gw_meta WHERE key = 'schema_version'") == [("1",)]
    last = dict(((m, e), v) for m, e, v in _raw(url, "SELECT metric, entity, last_value FROM gw_series "
                                                     "WHERE run_id = 'r1' AND rank = 0"))
    assert last[("grad_norm", 0)] == math.inf and last[("grad_norm", 1)] == -math.inf
    assert (last[("act_mean", 1)] is None) if url.startswith("sqlite") else math.isnan(last[("act_mean", 1)])
    assert _raw(url, "SELECT COUNT(*) FROM gw_chunks") == [(sum(len(s.chunk_sizes) for s in data.series),)]
    with Store.open(url) as store:  # up again, on open
        assert math.isnan(next(v.value for v in store.latest(["r1"]) if v.metric == "act_mean"))
        for s in data.series:
            _same_floats(_read(store, s).values, s.values)
        assert store.run_summary("r1").optimizer == {}  # v1 has no place for it
        assert store.run("r3").name == r3["name"]


def test_a_downgrade_that_would_cut_a_long_name_is_refused_on_postgresql(v1: tuple[str, V1Data],
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """v1's PostgreSQL columns hold 255 characters: the downgrade fails whole rather than cut a
    name; SQLite never enforced the length and keeps it."""
    url, _ = v1
    Store.open(url).close()
    _raw_exec(url, f"UPDATE gw_runs SET name = '{'n' * 300}' WHERE id = 'r1'")
    if url.startswith("sqlite"):
        assert migrations_main(["1", "--db", url]) == 0
        assert _raw(url, "SELECT name FROM gw_runs WHERE id = 'r1'") == [("n" * 300,)]
        return
    assert migrations_main(["1", "--db", url]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "to schema version 1: " in err[0] and "too long" in err[0]
    assert _raw(url, "SELECT value FROM gw_meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]
    with Store.open(url) as store:
        assert store.run("r1").name == "n" * 300


def test_the_migration_command_says_what_is_wrong_in_one_line(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        migrations_main(["9", "--home", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"python -m gradwatch.store.migrations: no schema version 9: this gradwatch knows versions 1 to "
                   f"{SCHEMA_VERSION}"]
    assert migrations_main(["1", "--home", str(tmp_path / "nothing")]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"python -m gradwatch.store.migrations: no gradwatch store at {tmp_path / 'nothing' / 'gradwatch.db'}: "
        "the file does not exist"]
    assert not (tmp_path / "nothing").exists()
