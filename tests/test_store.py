"""The store's query API on real SQLite files and a real PostgreSQL server, fed by ingestion."""

from __future__ import annotations

import math
import sqlite3
import time
import traceback
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, func, inspect, select, text
from sqlalchemy.engine import make_url

from tests.fixtures.pg import pg_database_url, pg_server_url, store_url  # noqa: F401 - fixture
from tests.fixtures.runlogs import LAYER_METRICS, PARAM_METRICS, RUN_METRICS, SyntheticRun
from gradwatch.agent import runlog
from gradwatch.agent.runlog import Close, Event
from gradwatch.ingest import ingest_pending
from gradwatch.store import (
    AmbiguousRun,
    BadStoreURL,
    NotAStoreError,
    RunNotFound,
    Store,
    StoreError,
    StoreNotFound,
    UnknownEntity,
    UnknownMetric,
)
from gradwatch.store import schema

STEPS = 1000


@pytest.fixture
def store(store_url: str, tmp_path: Path):  # noqa: F811 - the fixture imported above
    with Store.open(store_url, home=tmp_path) as st:  # the tests write their run logs under tmp_path
        yield st


@pytest.fixture
def run(store: Store, tmp_path: Path) -> SyntheticRun:
    """One finished run of STEPS steps with two events, ingested."""
    r = SyntheticRun(started_at=1_000.0)
    r.write(tmp_path, STEPS, events=[Event("nonfinite", 17, 1.0, {"params": ["net.0.weight"], "layers": ["net.0"]}),
                                     Event("dropped", 40, 2.0, {"frames": 1})])
    ingest_pending(store, tmp_path)
    return r


# ------------------------------------------------------------------ opening


def test_open_creates_then_reopens_the_same_store(store_url: str) -> None:  # noqa: F811
    with Store.open(store_url) as st:
        st.add_alert("r", "warning", "kept")
    with Store.open(store_url) as st:
        assert [a.message for a in st.alerts()] == ["kept"]


def test_foreign_database_is_not_a_store(store_url: str) -> None:  # noqa: F811
    engine = create_engine(store_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE customers (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    with pytest.raises(NotAStoreError, match="not a gradwatch store"):
        Store.open(store_url)


@pytest.mark.parametrize("content", [b"this is not a database, just some text\n" * 100, b"SQLite format 3\x00" + b"\xff" * 5000],
                         ids=["text", "damaged-header"])
def test_corrupt_sqlite_file_is_a_one_line_error(tmp_path: Path, content: bytes) -> None:
    db = tmp_path / "gradwatch.db"
    db.write_bytes(content)
    with pytest.raises(NotAStoreError) as exc:
        Store.open(home=tmp_path)
    assert "\n" not in str(exc.value) and str(db) in str(exc.value)


def test_sqlite_store_uses_wal(tmp_path: Path) -> None:
    Store.open(home=tmp_path).close()
    with sqlite3.connect(tmp_path / "gradwatch.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_bad_url_is_a_store_error() -> None:
    with pytest.raises(StoreError, match="not a database URL"):
        Store.open("::nonsense::")


SECRET = "DbSecret12"
MALFORMED = [
    f"postgresql//u:{SECRET}@h/db",
    f"postgresql://u:{SECRET}@[::1:5432/db",
    f"postgresql+psycopg://u:{SECRET}@[::1:5432",
    "postgresql://[::1:5432/db",
    f"postgresql+psycopg://u:{SECRET}@h:abc/db",
    f"postgresql+psycopg://u:{SECRET}@h:5432:1/db",
    f"postgresql+psycopg://u:{SECRET}@h/db?port=x",
    f"postgresql+psycopg://u:p@{SECRET}@h/db",
    f"u:{SECRET}@h/db",
    f"nosuchdriver+x://u:{SECRET}@h/db",
]


@pytest.mark.parametrize("url", MALFORMED, ids=[f"{i:02d}" for i in range(len(MALFORMED))])
def test_a_malformed_url_is_a_one_line_error_without_its_secret(url: str) -> None:
    with pytest.raises(StoreError) as exc:
        Store.open(url)
    assert type(exc.value) in (BadStoreURL, StoreError)  # never a ValueError or the like
    message = str(exc.value)
    assert "\n" not in message and SECRET not in message and SECRET[:5] not in message
    assert SECRET not in "".join(traceback.format_exception(exc.value))  # what a debug printer would show


def test_driver_errors_from_a_real_server_carry_no_secret() -> None:
    """A real PostgreSQL server refuses the database; the URL's password (userinfo and query)
    is masked in the message and in the traceback."""
    server = make_url(pg_server_url())
    for url in (server.set(password=SECRET, database="no_such_db"),
                server.set(database="no_such_db").update_query_dict({"password": SECRET})):
        with pytest.raises(StoreError) as exc:
            Store.open(url.render_as_string(hide_password=False))
        message = str(exc.value)
        assert "no_such_db" in message and "does not exist" in message and "***" in message
        assert SECRET not in "".join(traceback.format_exception(exc.value))


def test_the_store_url_property_masks_credentials() -> None:
    url = make_url(pg_database_url()).set(password=SECRET).update_query_dict({"sslpassword": SECRET})
    with Store.open(url.render_as_string(hide_password=False)) as st:  # the test server trusts any password
        assert SECRET not in st.url and ":***@" in st.url and st.url.endswith("sslpassword=***")


# ------------------------------------------------------------------ opening without creating


def test_open_without_create_makes_no_folder_and_no_file(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    for kwargs in ({"home": missing}, {"url": f"sqlite:///{missing / 'x.db'}"},
                   {"url": f"sqlite:///{tmp_path / 'x.db'}"}, {"url": f"sqlite:///file:{tmp_path / 'y.db'}?uri=true"}):
        with pytest.raises(StoreNotFound) as exc:
            Store.open(create=False, **kwargs)
        assert "\n" not in str(exc.value)
    assert str(StoreNotFound.__mro__[1].__name__) == "NotAStoreError"
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(StoreNotFound, match=f"no gradwatch store at {missing / 'gradwatch.db'}: the file does not"):
        Store.open(home=missing, create=False)


def test_open_without_create_changes_neither_an_empty_file_nor_a_foreign_database(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(StoreNotFound, match="is not a gradwatch store: it holds no tables"):
        Store.open(f"sqlite:///{empty}", create=False)
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY)")
    with pytest.raises(NotAStoreError, match="it holds other tables"):
        Store.open(f"sqlite:///{foreign}", create=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.db", "foreign.db"]
    assert empty.stat().st_size == 0
    with sqlite3.connect(foreign) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # not turned into WAL


def test_open_without_create_reads_an_existing_store(store_url: str, tmp_path: Path) -> None:  # noqa: F811
    SyntheticRun().write(tmp_path, 20)
    with Store.open(store_url, home=tmp_path) as st:
        ingest_pending(st, tmp_path)
    with Store.open(store_url, create=False) as st:
        assert [r.id for r in st.list_runs()] == ["run0001"]
        st.add_alert("run0001", "info", "a read store still takes writes")


def test_an_empty_postgresql_database_is_not_a_store_and_stays_empty() -> None:
    url = pg_database_url()
    with pytest.raises(StoreNotFound, match="is not a gradwatch store: it holds no tables"):
        Store.open(url, create=False)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            assert inspect(conn).get_table_names() == []
    finally:
        engine.dispose()
    with pytest.raises(StoreError, match="cannot open the store .*does not exist"):
        Store.open(make_url(url).set(database="gw_no_such_db").render_as_string(hide_password=False), create=False)


# ------------------------------------------------------------------ runs


def test_list_runs_filters(store: Store, tmp_path: Path) -> None:
    for i, (name, project) in enumerate([("bert-a", "nlp"), ("bert-b", "nlp"), ("resnet", "cv")]):
        SyntheticRun(run_id=f"id{i}", name=name, project=project, started_at=1000.0 + i).write(
            tmp_path, 20, close=i != 1)
    ingest_pending(store, tmp_path)
    assert [r.id for r in store.list_runs()] == ["id2", "id1", "id0"]
    assert [r.id for r in store.list_runs(project="nlp")] == ["id1", "id0"]
    assert [r.id for r in store.list_runs(name="bert-*")] == ["id1", "id0"]
    assert [r.id for r in store.list_runs(status="running")] == ["id1"]
    assert [r.id for r in store.list_runs(status="finished", project="nlp")] == ["id0"]
    assert [r.id for r in store.list_runs(since=1000.5, until=1001.5)] == ["id1"]


def test_resolve_run_by_id_prefix_and_name(store: Store, tmp_path: Path) -> None:
    SyntheticRun(run_id="abc111", name="same", started_at=1.0).write(tmp_path, 5)
    SyntheticRun(run_id="abc222", name="same", started_at=2.0).write(tmp_path, 5)
    SyntheticRun(run_id="xyz", name="other", started_at=3.0).write(tmp_path, 5)
    ingest_pending(store, tmp_path)
    assert store.resolve_run("abc111") == "abc111"
    assert store.resolve_run("x") == "xyz"
    assert store.resolve_run("same") == "abc222"  # newest of that name
    with pytest.raises(AmbiguousRun, match="matches 2 runs") as exc:
        store.resolve_run("abc")
    assert sorted(exc.value.candidates) == ["abc111", "abc222"]
    with pytest.raises(RunNotFound, match="'nope'"):
        store.resolve_run("nope")


def test_a_name_that_is_also_another_runs_id_prefix_is_ambiguous(store: Store, tmp_path: Path) -> None:
    """`delete cafe` must not remove the run whose id starts with cafe when a run is named cafe."""
    SyntheticRun(run_id="eeee1111", name="cafe", started_at=1.0).write(tmp_path, 5)
    SyntheticRun(run_id="cafe0000", name="other", started_at=2.0).write(tmp_path, 5)
    ingest_pending(store, tmp_path)
    with pytest.raises(AmbiguousRun, match="names run eeee1111 and is a prefix of run id cafe0000") as exc:
        store.resolve_run("cafe")
    assert sorted(exc.value.candidates) == ["cafe0000", "eeee1111"]
    assert store.resolve_run("cafe0000") == "cafe0000" and store.resolve_run("other") == "cafe0000"


def test_run_summary(store: Store, run: SyntheticRun) -> None:
    summary = store.run_summary(run.run_id)
    assert summary.run.status == "finished" and summary.run.last_step == STEPS - 1
    assert summary.run.started_at == 1000.0 and summary.run.ended_at is not None
    assert (summary.num_params, summary.num_layers) == (6, 6)
    assert summary.torch_version == "2.13.0" and summary.model["num_params"] == 216
    assert summary.init_check[0]["verdict"] == "ok"
    assert summary.metrics == {**{m: "run" for m in RUN_METRICS}, "lr": "group",
                               **{m: "param" for m in PARAM_METRICS}, **{m: "layer" for m in LAYER_METRICS}}
    step = np.array([STEPS - 1])
    assert summary.latest["loss"] == (STEPS - 1, pytest.approx(float(run.value("loss", step, 0)[0])))
    assert summary.event_counts == {"nonfinite": 1, "dropped": 1}
    assert [lg.state for lg in summary.logs] == ["finished"]


def test_params_and_layers_in_model_order(store: Store, run: SyntheticRun) -> None:
    params = store.params(run.run_id)
    assert [p.name for p in params] == [p["name"] for p in run.params]
    assert params[0].shape == (8, 8) and params[0].numel == 64 and params[0].layer == 0
    layers = store.layers(run.run_id)
    assert [(la.name, la.kind, la.family) for la in layers[:2]] == [("net.0", "param", None),
                                                                     ("net.1", "activation", "relu")]
    assert layers[0].params == (0, 1)


# ------------------------------------------------------------------ series


def test_param_history_equals_what_was_written(store: Store, run: SyntheticRun) -> None:
    steps, values = store.param_history(run.run_id, "net.2.bias", "grad_norm")
    np.testing.assert_array_equal(steps, np.arange(STEPS))
    np.testing.assert_array_equal(values, run.value("grad_norm", steps, 3).astype(np.float64))
    steps, values = store.param_history(run.run_id, 3, "param_norm", start=95, end=205)
    np.testing.assert_array_equal(steps, np.arange(100, 201, 10))  # measured every 10 steps only
    np.testing.assert_array_equal(values, run.value("param_norm", steps, 3))


def test_run_series_and_group_lr(store: Store, run: SyntheticRun) -> None:
    steps, values = store.run_series(run.run_id, "grad_norm_total", start=10, end=19)
    np.testing.assert_array_equal(steps, np.arange(10, 20))
    np.testing.assert_array_equal(values, run.value("grad_norm_total", steps, 0))
    steps, values = store.run_series(run.run_id, "lr", group=0)
    assert steps.shape == (STEPS,)


def test_layer_history_and_layer_grad_norm(store: Store, run: SyntheticRun) -> None:
    steps, values = store.layer_history(run.run_id, "net.3", "dead_ratio")
    np.testing.assert_array_equal(steps, np.arange(0, STEPS, 10))
    np.testing.assert_array_equal(values, run.value("dead_ratio", steps, 3))
    steps, values = store.layer_history(run.run_id, "net.2", "grad_norm", end=49)
    w, b = (run.value("grad_norm", steps, p).astype(np.float64) for p in (2, 3))
    np.testing.assert_allclose(values, np.sqrt(w * w + b * b), rtol=1e-12)


def test_layers_at_step(store: Store, run: SyntheticRun) -> None:
    table = store.layers_at_step(run.run_id)
    assert table.step == 990  # last step with layer measurements
    assert [la.name for la in table.layers] == [f"net.{i}" for i in range(6)]
    step = np.array([990])
    sat = table.values["saturation_ratio"]
    assert np.isnan(sat[:5]).all() and sat[5] == pytest.approx(float(run.value("saturation_ratio", step, 5)[0]))
    grad = table.values["grad_norm"]
    assert math.isnan(grad[1]) and grad[0] == pytest.approx(math.hypot(
        float(run.value("grad_norm", step, 0)[0]), float(run.value("grad_norm", step, 1)[0])))
    at7 = store.layers_at_step(run.run_id, step=7, metrics=["grad_norm", "act_mean"])
    assert set(at7.values) == {"grad_norm", "act_mean"}
    assert np.isnan(at7.values["act_mean"]).all() and not np.isnan(at7.values["grad_norm"][0])


def test_unknown_metric_and_entity(store: Store, run: SyntheticRun) -> None:
    with pytest.raises(UnknownMetric, match="no metric 'nope'"):
        store.run_series(run.run_id, "nope")
    with pytest.raises(UnknownMetric, match="param-level"):
        store.run_series(run.run_id, "grad_norm")
    with pytest.raises(UnknownEntity, match="no param 'missing'"):
        store.param_history(run.run_id, "missing", "grad_norm")
    with pytest.raises(UnknownEntity, match="no layer"):
        store.layer_history(run.run_id, "net.99", "act_mean")
    with pytest.raises(UnknownMetric):
        store.layers_at_step(run.run_id, metrics=["loss"])
    with pytest.raises(RunNotFound):
        store.param_history("no-such-run", "net.0.weight", "grad_norm")


def test_latest_values(store: Store, run: SyntheticRun) -> None:
    latest = {(v.metric, v.scope, v.entity): (v.step, v.value) for v in store.latest([run.run_id])}
    last = np.array([STEPS - 1])
    assert latest[("grad_norm", "param", "net.0.weight")] == (
        STEPS - 1, pytest.approx(float(run.value("grad_norm", last, 0)[0])))
    assert latest[("act_std", "layer", "net.5")][0] == 990
    assert latest[("lr", "group", "0")][0] == STEPS - 1
    assert latest[("grad_norm", "layer", "net.0")][1] == pytest.approx(math.hypot(
        float(run.value("grad_norm", last, 0)[0]), float(run.value("grad_norm", last, 1)[0])))
    assert store.latest(["other"]) == []


NAN, INF = math.nan, math.inf


def _write_nonfinite_run(home: Path, optimizer: object) -> SyntheticRun:
    """A 3-step run whose last values are NaN, +Inf and -Inf in every scope; layer net.1 is not
    measured at the last step (present False), which is not a value."""
    r = SyntheticRun(run_id="nf", started_at=1.0)
    header = r.header()
    header.info["optimizer"] = optimizer
    steps = np.arange(3, dtype=np.int64)
    m = r.metrics
    run_vals = {"loss": NAN, "grad_norm_total": INF, "clip_coef": -INF}
    blocks = [(m[name].id, steps, np.array([[1.0], [2.0], [last]], np.float32)) for name, last in run_vals.items()]
    grad = np.ones((3, 6), np.float32)
    grad[2, :4] = [NAN, 3.0, INF, -INF]
    blocks.append((m["grad_norm"].id, steps, grad))
    act_layers = m["act_mean"].indices
    act = np.ones((3, len(act_layers)), np.float32)
    act[2, 0] = NAN
    present = np.ones_like(act, dtype=bool)
    present[2, 1] = False
    blocks.append((m["act_mean"].id, steps, act, present))
    path = r.path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(runlog.encode_header(header) + runlog.encode_frame(blocks)
                     + runlog.encode_event(Event("nonfinite", 2, 5.0, {"params": ["net.0.weight"], "total": NAN,
                                                                        "limit": INF, "low": -INF}))
                     + runlog.encode_close(Close(6.0, 2, {})))
    return r


def _same(a: object, b: object) -> bool:
    """Equal, NaN equal to NaN."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def test_nan_and_inf_last_values_are_values_on_every_reader(store: Store, tmp_path: Path) -> None:
    _write_nonfinite_run(tmp_path, {"class": "SGD", "wrappers": ["AcceleratedOptimizer"]})
    ingest_pending(store, tmp_path)
    latest = store.run_summary("nf").latest
    assert all(_same(latest[k], v) for k, v in {"loss": (2, NAN), "grad_norm_total": (2, INF),
                                                "clip_coef": (2, -INF)}.items()), latest
    got = {(v.metric, v.scope, v.entity): v.value for v in store.latest(["nf"])}
    want = {("loss", "run", ""): NAN, ("grad_norm_total", "run", ""): INF, ("clip_coef", "run", ""): -INF,
            ("grad_norm", "param", "net.0.weight"): NAN, ("grad_norm", "param", "net.0.bias"): 3.0,
            ("grad_norm", "param", "net.2.weight"): INF, ("grad_norm", "param", "net.2.bias"): -INF,
            ("grad_norm", "layer", "net.0"): NAN, ("grad_norm", "layer", "net.2"): INF,
            ("grad_norm", "layer", "net.4"): math.sqrt(2.0), ("act_mean", "layer", "net.0"): NAN,
            ("act_mean", "layer", "net.1"): 1.0}
    assert all(_same(got[k], v) for k, v in want.items()), {k: got[k] for k in want}
    table = store.layers_at_step("nf", 2, ["grad_norm", "act_mean"])
    assert [(bool(ok), float(v)) for ok, v in zip(table.measured["grad_norm"], table.values["grad_norm"])][:3] \
        == [(True, pytest.approx(NAN, nan_ok=True)), (False, pytest.approx(NAN, nan_ok=True)), (True, INF)]
    assert table.measured["act_mean"][:2].tolist() == [True, False] and math.isnan(table.values["act_mean"][0])
    steps, values = store.param_history("nf", "net.0.weight", "grad_norm")
    assert steps.tolist() == [0, 1, 2] and math.isnan(values[2])
    steps, values = store.layer_history("nf", "net.1", "act_mean")
    assert steps.tolist() == [0, 1]  # not measured at step 2: no row, not a NaN
    exported = {(r["metric"], r["entity"], r["step"]): r["value"] for r in store.export_records("nf")
                if r["record"] == "value"}
    assert math.isnan(exported[("loss", "", 2)]) and exported[("clip_coef", "", 2)] == -INF
    (event,) = store.events("nf")
    assert math.isnan(event.data["total"]) and (event.data["limit"], event.data["low"]) == (INF, -INF)
    with store.engine.connect() as conn:
        stored = dict(conn.execute(select(schema.series.c.metric, schema.series.c.last_nonfinite).where(
            schema.series.c.run_id == "nf", schema.series.c.scope == "run")).all())
    assert stored == {"loss": "nan", "grad_norm_total": "inf", "clip_coef": "-inf"}


@pytest.mark.parametrize("optimizer,stored", [
    ({"class": "SGD", "wrappers": ["AcceleratedOptimizer"]}, {"class": "SGD", "wrappers": ["AcceleratedOptimizer"]}),
    ("SGD", {}),
], ids=["dict", "malformed"])
def test_the_optimizer_of_the_header_is_stored(store: Store, tmp_path: Path, optimizer: object,
                                               stored: dict) -> None:
    _write_nonfinite_run(tmp_path, optimizer)
    ingest_pending(store, tmp_path)
    assert store.run_summary("nf").optimizer == stored
    assert next(store.export_records("nf"))["optimizer"] == stored


def test_events(store: Store, run: SyntheticRun) -> None:
    events = store.events(run.run_id)
    assert [(e.kind, e.step) for e in events] == [("nonfinite", 17), ("dropped", 40)]
    assert events[0].data["layers"] == ["net.0"]
    assert [e.kind for e in store.events(run.run_id, kind="dropped")] == ["dropped"]


def test_alerts_add_resolve_query(store: Store, run: SyntheticRun) -> None:
    a = store.add_alert("exploding", "critical", "total norm 1e6", run_id=run.run_id, step=12,
                        labels={"layer": "net.0"}, started_at=5.0)
    b = store.add_alert("stalled", "warning", "no progress", started_at=6.0)
    assert [x.id for x in store.alerts(active=True)] == [a, b]
    store.resolve_alert(a, ended_at=9.0)
    assert [x.id for x in store.alerts(active=True)] == [b]
    (resolved,) = store.alerts(run_id=run.run_id)
    assert resolved.ended_at == 9.0 and not resolved.active and resolved.labels == {"layer": "net.0"}
    assert store.run_summary(run.run_id).active_alerts == 0
    with pytest.raises(StoreError, match="no alert 12345"):
        store.resolve_alert(12345)
    with pytest.raises(RunNotFound):
        store.add_alert("x", "info", "m", run_id="nope")


def test_export_records_stream_everything(store: Store, run: SyntheticRun) -> None:
    records = list(store.export_records(run.run_id))
    kinds = [r["record"] for r in records]
    assert kinds[0] == "run" and kinds.count("param") == 6 and kinds.count("layer") == 6
    assert kinds.count("event") == 2
    values = [r for r in records if r["record"] == "value"]
    expected = sum(int(np.count_nonzero(~np.isnan(run.value(m.name, np.arange(STEPS), e))))
                   for m in run.metrics.values() for e in ((0,) if m.scope == "run" else m.indices))
    assert len(values) == expected
    v = next(r for r in values if r["metric"] == "grad_norm" and r["entity"] == "net.4.weight" and r["step"] == 3)
    assert v["value"] == pytest.approx(float(run.value("grad_norm", np.array([3]), 4)[0]))


def test_delete_run_keeps_it_deleted(store: Store, run: SyntheticRun, tmp_path: Path) -> None:
    other = SyntheticRun(run_id="keep", started_at=5.0)
    other.write(tmp_path, 30)
    ingest_pending(store, tmp_path)
    store.delete_run(run.run_id)
    with pytest.raises(RunNotFound):
        store.run_summary(run.run_id)
    ingest_pending(store, tmp_path)  # the log is still there, but is not ingested again
    assert [r.id for r in store.list_runs()] == ["keep"]
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(schema.chunks).join(schema.series).where(
            schema.series.c.run_id == run.run_id)).scalar() == 0
    store.delete_run("keep", remove_logs=True)
    assert not other.path(tmp_path).exists() and store.logs(run_id="keep") == []


def test_delete_removes_logs_from_its_own_home_only(store_url: str,  # noqa: F811 - the fixture
                                                    tmp_path: Path) -> None:
    """A copy of a home (store and logs) deletes its own copy of a log, never the original's."""
    original, copy = tmp_path / "original", tmp_path / "copy"
    run = SyntheticRun(run_id="r1")
    run.write(original, 5)
    copied = copy / "logs" / run.path(original).name
    copied.parent.mkdir(parents=True)
    copied.write_bytes(run.path(original).read_bytes())
    with Store.open(store_url, home=original) as store:
        ingest_pending(store, original)  # the store records the original's absolute log path
        store.home = copy  # the same store, used from the copied home
        store.delete_run("r1", remove_logs=True)
    assert run.path(original).exists() and not copied.exists()


def test_gc_deletes_old_ended_runs(store: Store, tmp_path: Path) -> None:
    SyntheticRun(run_id="old").write(tmp_path, 5)
    SyntheticRun(run_id="live").write(tmp_path, 5, close=False)
    ingest_pending(store, tmp_path)
    assert store.gc(timedelta(hours=1)) == []
    assert store.gc(timedelta(hours=1), now=time.time() + 7200) == ["old"]
    assert [r.id for r in store.list_runs()] == ["live"]


def test_incremental_ingest_equals_one_pass(store: Store, tmp_path: Path) -> None:
    """Many small passes (pending chunks, merges across the 4096-row boundary) store exactly
    the same series as one pass, and leave full chunks behind."""
    r = SyntheticRun(run_id="inc", n_linear=1)
    sizes = [1, 7, 20, 400, 3000, 20, 20, 900, 5000, 13] + [20] * 40
    step = 0
    for i, n in enumerate(sizes):
        r.write(tmp_path, n, start=step, header=i == 0, close=False, flush_every=20)
        step += n
        ingest_pending(store, tmp_path)
    steps, values = store.param_history("inc", "net.0.weight", "grad_norm")
    np.testing.assert_array_equal(steps, np.arange(step))
    np.testing.assert_array_equal(values, r.value("grad_norm", steps, 0))
    steps, _ = store.run_series("inc", "loss", start=4090, end=4100)
    np.testing.assert_array_equal(steps, np.arange(4090, 4101))
    with store.engine.connect() as conn:
        sid = conn.execute(select(schema.series.c.id).where(
            schema.series.c.metric == "grad_norm", schema.series.c.entity == 0)).scalar_one()
        sizes_ = [n for (n,) in conn.execute(select(schema.chunks.c.n).where(
            schema.chunks.c.series_id == sid).order_by(schema.chunks.c.seq))]
    assert sizes_[:2] == [schema.CHUNK_ROWS] * 2 and sum(sizes_) == step
    assert len(sizes_) - 2 <= schema.MAX_PENDING_CHUNKS


def test_database_failure_after_open_is_a_one_line_store_error(tmp_path: Path) -> None:
    SyntheticRun().write(tmp_path, 5)
    with Store.open(home=tmp_path) as st:
        with sqlite3.connect(tmp_path / "gradwatch.db") as conn:
            conn.execute("DROP TABLE gw_logs")
            conn.execute("DROP TABLE gw_alerts")
        with pytest.raises(StoreError, match="no such table: gw_logs") as exc:
            ingest_pending(st, tmp_path)
        assert "\n" not in str(exc.value)
        with pytest.raises(StoreError, match="cannot read .*no such table: gw_alerts"):
            st.alerts()
        with pytest.raises(StoreError, match="cannot write"):
            st.add_alert("r", "info", "m")
