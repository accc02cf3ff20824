"""Ingestion from real run logs: torn tails, corruption, run status, ranks, locking, polling,
and an end-to-end run of the real agent."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.fixtures.pg import store_url  # noqa: F401 - fixture
from tests.fixtures.runlogs import SyntheticRun
from gradwatch.agent import framing, runlog
from gradwatch.ingest import Ingester, ingest_pending
from gradwatch.store import Store

DEADLINE_S = 60.0


@pytest.fixture
def store(store_url: str):  # noqa: F811 - the fixture imported above
    with Store.open(store_url) as st:
        yield st


def _poll_until(probe, what: str, deadline_s: float = DEADLINE_S):
    end = time.monotonic() + deadline_s
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_torn_tail_waits_until_complete(store: Store, tmp_path: Path) -> None:
    r = SyntheticRun()
    path = r.write(tmp_path, 20, close=False)
    frame = r.frame(20, 20)
    with open(path, "ab") as f:
        f.write(frame[:-9])
    ingest_pending(store, tmp_path)
    assert store.run_series(r.run_id, "loss").steps[-1] == 19
    (log,) = store.logs()
    assert log.offset == path.stat().st_size - len(frame) + 9
    with open(path, "ab") as f:
        f.write(frame[-9:])
    rep = ingest_pending(store, tmp_path)
    assert rep.records == 1 and rep.errors == 0
    np.testing.assert_array_equal(store.run_series(r.run_id, "loss").steps, np.arange(40))


def test_corrupt_record_becomes_an_ingest_error(store: Store, tmp_path: Path) -> None:
    r = SyntheticRun()
    path = r.write(tmp_path, 20, close=False)
    bad_at = path.stat().st_size
    bad = bytearray(r.frame(20, 20))
    bad[-3] ^= 0xFF
    with open(path, "ab") as f:
        f.write(bytes(bad) + r.frame(40, 20))
    rep = ingest_pending(store, tmp_path)
    assert rep.errors == 1
    (err,) = store.ingest_errors()
    assert (err.log, err.offset, err.reason) == (path.name, bad_at, "checksum mismatch")
    steps = store.run_series(r.run_id, "loss").steps
    np.testing.assert_array_equal(steps, np.r_[np.arange(20), np.arange(40, 60)])


def test_bad_logs_and_odd_entries_stop_only_themselves(store: Store, tmp_path: Path) -> None:
    """No header, a header the store cannot take, a directory and a FIFO named like logs: the
    good run is ingested, each bad log is broken with its reason, and nothing raises or blocks."""
    runlog.logs_dir(tmp_path).mkdir(parents=True)
    junk = runlog.log_path("junk", 0, tmp_path)
    junk.write_bytes(b"not a run log at all\n" * 50)
    no_run_id = runlog.log_path("norunid", 0, tmp_path)
    no_run_id.write_bytes(runlog.encode_header(runlog.Header({"name": "x"})))
    not_a_dict = runlog.log_path("notadict", 0, tmp_path)
    not_a_dict.write_bytes(runlog.encode_header(runlog.Header([])))  # type: ignore[arg-type]
    bad_rank = runlog.log_path("badrank", 0, tmp_path)
    bad_rank.write_bytes(runlog.encode_header(runlog.Header({"run_id": "badrank", "rank": "x"})))
    runlog.log_path("adir", 0, tmp_path).mkdir()
    os.mkfifo(runlog.log_path("afifo", 0, tmp_path))
    good = SyntheticRun(run_id="good")
    good.write(tmp_path, 10)
    ingest_pending(store, tmp_path)
    ingest_pending(store, tmp_path)
    assert [r.id for r in store.list_runs()] == ["good"]
    broken = {junk.name, no_run_id.name, not_a_dict.name, bad_rank.name}
    assert {lg.name: lg.state for lg in store.logs()} == {**dict.fromkeys(broken, "broken"),
                                                         good.path(tmp_path).name: "finished"}
    errors = {err.log: err for err in store.ingest_errors()}
    assert set(errors) == broken
    assert errors[junk.name].offset == 0 and errors[junk.name].reason.startswith("no valid header")
    assert all(errors[name].reason.startswith("cannot store its records") for name in broken - {junk.name})


def test_a_copied_log_is_not_stored_twice(store: Store, tmp_path: Path) -> None:
    run = SyntheticRun(run_id="orig")
    run.write(tmp_path, 10)
    copy = run.path(tmp_path).with_name("orig.rank0 (copy).gwlog")
    copy.write_bytes(run.path(tmp_path).read_bytes())
    ingest_pending(store, tmp_path)
    series = store.run_series("orig", "grad_norm_total")
    assert list(series.steps) == list(range(10))  # once each, not twice
    states = {lg.name: lg.state for lg in store.logs()}
    assert sorted(states.values()) == ["broken", "finished"]
    (err,) = store.ingest_errors()
    assert "already stored from log" in err.reason

def test_dead_writer_on_this_host_is_crashed(store: Store, tmp_path: Path) -> None:
    r = SyntheticRun(pid=_dead_pid())
    r.write(tmp_path, 20, close=False)
    before = time.time()
    rep = ingest_pending(store, tmp_path)  # everything is ingested first, then the writer is found gone
    run = store.run(r.run_id)
    assert rep.crashed == [r.run_id] and run.status == "crashed" and run.status_at >= before
    assert run.ended_at is not None and run.last_step == 19


def test_live_writer_on_this_host_stays_running(store: Store, tmp_path: Path) -> None:
    r = SyntheticRun()  # this test process is the writer
    r.write(tmp_path, 20, close=False)
    assert ingest_pending(store, tmp_path).crashed == []
    assert store.run(r.run_id).status == "running"


def test_silent_writer_elsewhere_is_crashed_then_revives(store: Store, tmp_path: Path) -> None:
    r = SyntheticRun(host="another-host", pid=1)
    path = r.write(tmp_path, 20, close=False)
    now = [time.time()]
    ing = Ingester(store, tmp_path, stale_after=60.0, clock=lambda: now[0])
    ing.poll_once()
    ing.poll_once()
    assert store.run(r.run_id).status == "running"
    now[0] += 61.0
    assert ing.poll_once().crashed == [r.run_id]
    assert store.run(r.run_id).status == "crashed" and store.run(r.run_id).status_at == now[0]
    r.write(tmp_path, 20, start=20, header=False, close=False)
    os.utime(path, (now[0], now[0]))  # it grew at the test clock's now
    assert ing.poll_once().crashed == []
    assert store.run(r.run_id).status == "running"
    with open(path, "ab") as f:
        f.write(runlog.encode_close(runlog.Close(time.time(), 39, {})))
    assert ing.poll_once().finished == [r.run_id]
    assert store.run(r.run_id).status == "finished"


def test_a_log_found_days_after_its_writer_died_ends_when_it_stopped_growing(store: Store, tmp_path: Path) -> None:
    r = SyntheticRun(host="another-host", pid=1)
    path = r.write(tmp_path, 20, close=False)
    stopped = time.time() - 3 * 86400
    os.utime(path, (stopped, stopped))
    ing = Ingester(store, tmp_path, stale_after=60.0)
    assert ing.poll_once().crashed == [r.run_id]  # read and judged in the same pass
    assert store.run(r.run_id).ended_at == pytest.approx(stopped, abs=1.0)


def test_a_damaged_last_record_is_reported_once_the_writer_is_gone(store: Store, tmp_path: Path) -> None:
    r = SyntheticRun(host="another-host", pid=1)
    path = r.write(tmp_path, 20, close=False)
    good = path.stat().st_size
    close = bytearray(runlog.encode_close(runlog.Close(time.time(), 19, {})))
    close[-3] ^= 0xFF  # the close record's checksum no longer matches: it reads as a torn tail
    with open(path, "ab") as f:
        f.write(bytes(close))
    now = [time.time()]
    os.utime(path, (now[0], now[0]))
    ing = Ingester(store, tmp_path, stale_after=60.0, clock=lambda: now[0])
    ing.poll_once()
    assert store.run(r.run_id).status == "running" and store.ingest_errors() == []  # it may still complete
    now[0] += 61.0
    report = ing.poll_once()
    assert report.crashed == [r.run_id] and report.errors == 1
    (err,) = store.ingest_errors()
    assert err.offset == good and "not a complete record" in err.reason
    assert ing.poll_once().errors == 0  # reported once

def test_ranks_are_one_run_with_data_per_rank(store: Store, tmp_path: Path) -> None:
    ranks = [SyntheticRun(rank=k, world_size=2) for k in (0, 1)]
    ranks[1].write(tmp_path, 30)
    ranks[0].write(tmp_path, 40, close=False)
    ingest_pending(store, tmp_path)
    (run,) = store.list_runs()
    assert run.world_size == 2 and run.status == "running" and run.last_step == 39
    for k, n in ((0, 40), (1, 30)):
        steps, values = store.param_history(run.id, "net.0.weight", "grad_norm", rank=k)
        np.testing.assert_array_equal(values, ranks[k].value("grad_norm", np.arange(n), 0))
    with open(ranks[0].path(tmp_path), "ab") as f:
        f.write(runlog.encode_close(runlog.Close(time.time(), 39, {})))
    ingest_pending(store, tmp_path)
    assert store.run(run.id).status == "finished"


def test_locked_log_is_skipped_until_released(store: Store, tmp_path: Path) -> None:
    r = SyntheticRun()
    path = r.write(tmp_path, 20)
    with open(path, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        rep = ingest_pending(store, tmp_path)
        assert rep.busy == [path.name] and store.list_runs() == []
    assert ingest_pending(store, tmp_path).values > 0
    assert store.run(r.run_id).status == "finished"


def test_two_ingesters_never_duplicate(store: Store, tmp_path: Path) -> None:
    """Two ingesters racing over the same logs (threads, separate locks) store each row once."""
    runs = [SyntheticRun(run_id=f"r{i}") for i in range(4)]
    for r in runs:
        r.write(tmp_path, 400)
    ingesters = [Ingester(store, tmp_path, max_batch_bytes=20_000) for _ in range(2)]
    threads = [threading.Thread(target=ing.poll_once) for ing in ingesters]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ingest_pending(store, tmp_path)
    for r in runs:
        steps, _ = store.param_history(r.run_id, "net.4.bias", "grad_norm")
        np.testing.assert_array_equal(steps, np.arange(400))
        assert len(store.events(r.run_id)) == 0 and store.run(r.run_id).status == "finished"


def test_poll_forever_follows_a_growing_log(store: Store, tmp_path: Path) -> None:
    r = SyntheticRun()
    r.write(tmp_path, 20, close=False)
    stop = threading.Event()
    ing = Ingester(store, tmp_path)
    thread = threading.Thread(target=ing.poll_forever, args=(stop,), kwargs={"interval": 0.2})
    thread.start()
    try:
        _poll_until(lambda: store.list_runs(), "the run to appear")
        r.write(tmp_path, 20, start=20, header=False)
        _poll_until(lambda: store.run(r.run_id).status == "finished", "the run to finish")
    finally:
        stop.set()
        thread.join()
    assert store.run_series(r.run_id, "loss").steps[-1] == 39


def test_real_agent_run_is_stored_as_measured(store: Store, tmp_path: Path) -> None:
    import gradwatch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    config = {"home": str(tmp_path), "project": "e2e",
              "measure": {"flush_every": 5, "param_every": 3, "activation_every": 2}}
    with gradwatch.watch(model, opt, run="tiny-e2e", config=config) as watcher:
        for _ in range(23):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            watcher.log(loss=loss)
            opt.step()
        snap = watcher.snapshot()
    ingest_pending(store, tmp_path)
    run = store.run(store.resolve_run("tiny-e2e"))
    assert run.status == "finished" and run.project == "e2e"
    assert run.last_step == snap["step"]
    latest = {(v.metric, v.scope, v.entity): v for v in store.latest([run.id])}
    assert latest[("grad_norm_total", "run", "")].value == pytest.approx(snap["grad_norm_total"]["before_clip"],
                                                                         rel=1e-6)
    assert latest[("loss", "run", "")].value == pytest.approx(snap["scalars"]["loss"], rel=1e-6)
    for name, entry in snap["params"].items():
        assert latest[("grad_norm", "param", name)].value == pytest.approx(entry["grad_norm"], rel=1e-6)
    for name, entry in snap["layers"].items():
        for metric, value in entry.items():
            if value is not None:
                assert latest[(metric, "layer", name)].value == pytest.approx(value, rel=1e-5), (name, metric)
    steps, _ = store.run_series(run.id, "grad_norm_total")
    np.testing.assert_array_equal(steps, np.arange(steps[0], snap["step"] + 1))


# ---------------------------------------------------------------- run log v2: damage and NaN

def _copy_starts(data: bytes, kind: int) -> list[int]:
    return [p.start for p in framing.scan(data, 2) if p.body is not None and p.body[0] == kind]


def _flip(path: Path, *offsets: int) -> None:
    buf = bytearray(path.read_bytes())
    for off in offsets:
        buf[off] ^= 0x04
    path.write_bytes(bytes(buf))


def test_a_damaged_header_copy_loses_nothing(store: Store, tmp_path: Path) -> None:
    r = SyntheticRun()
    path = r.write(tmp_path, 40)
    _flip(path, 60)  # inside the first copy of the header
    rep = ingest_pending(store, tmp_path)
    assert rep.values == 40 * r.values_per_step() - _not_measured(r, 40) and rep.errors == 1
    assert store.run(r.run_id).status == "finished"
    (err,) = store.ingest_errors()
    assert (err.offset, err.reason) == (0, "checksum mismatch")


def _not_measured(r: SyntheticRun, steps: int) -> int:
    return sum(int(np.isnan(r.value(m.name, np.arange(steps), e)).sum())
               for m in r.metrics.values() for e in ([0] if m.scope == "run" else m.indices))


def test_a_damaged_definition_copy_loses_no_frame(store: Store, tmp_path: Path) -> None:
    """The `loss` definition comes after the header, as a user scalar's does; one of its
    copies damaged, every later frame is still stored whole."""
    r = SyntheticRun()
    header = r.header()
    header.metrics = [m for m in header.metrics if m.name != "loss"]
    path = r.path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(runlog.encode_header(header) + runlog.encode_metric(r.metrics["loss"])
                     + r.frame(0, 20) + r.frame(20, 20))
    definition = _copy_starts(path.read_bytes(), runlog.KIND_METRIC)[0]
    _flip(path, definition + 20)
    ingest_pending(store, tmp_path)
    steps, values = store.run_series(r.run_id, "loss")
    np.testing.assert_array_equal(steps, np.arange(40))
    np.testing.assert_array_equal(values, r.value("loss", np.arange(40), 0))
    assert [e.offset for e in store.ingest_errors()] == [definition]


def test_a_log_whose_header_no_copy_can_give_back_is_broken(store: Store, tmp_path: Path) -> None:
    r = SyntheticRun()
    path = r.write(tmp_path, 20)
    first, second, third = _copy_starts(path.read_bytes(), runlog.KIND_HEADER)
    _flip(path, first + 50, second + 50, third + 51)  # the same byte in two copies: no majority
    ingest_pending(store, tmp_path)
    assert store.list_runs() == [] and [lg.state for lg in store.logs()] == ["broken"]
    (err,) = store.ingest_errors()
    assert err.offset == 0 and err.reason.startswith("no valid header: checksum mismatch")


def test_nan_and_inf_measured_are_stored_and_not_measured_is_not(store: Store, tmp_path: Path) -> None:
    r = SyntheticRun()
    path = r.write(tmp_path, 2, close=False)
    loss = r.metrics["loss"].id
    values = np.array([[np.nan], [np.inf], [np.nan], [-np.inf]], dtype=np.float32)
    present = np.array([[True], [True], [False], [True]])
    with open(path, "ab") as f:
        f.write(runlog.encode_frame([(loss, np.arange(2, 6), values, present)]))
    ingest_pending(store, tmp_path)
    steps, stored = store.run_series(r.run_id, "loss")
    np.testing.assert_array_equal(steps, [0, 1, 2, 3, 5])
    np.testing.assert_array_equal(stored[2:], [np.nan, np.inf, -np.inf])


def test_a_v1_log_written_by_the_previous_release_still_ingests(store: Store, tmp_path: Path) -> None:
    """tests/fixtures/v1_release.gwlog: 12 steps of a tiny MLP recorded by the release before
    run log v2, whose own reader found 276 measured values in it (NaN = not measured)."""
    path = runlog.logs_dir(tmp_path) / "33d28b8b7ecc.rank0.gwlog"
    path.parent.mkdir(parents=True)
    path.write_bytes((Path(__file__).parent / "fixtures" / "v1_release.gwlog").read_bytes())
    rep = ingest_pending(store, tmp_path)
    assert (rep.values, rep.errors) == (276, 0)
    run = store.run("33d28b8b7ecc")
    assert (run.name, run.status, run.last_step) == ("v1-release", "finished", 11)
    steps, loss = store.run_series(run.id, "loss")
    np.testing.assert_array_equal(steps, np.arange(12))
    assert loss[[0, 11]].tolist() == pytest.approx([0.6988592147827148, 0.6388620138168335], rel=1e-7)
    steps, _ = store.param_history(run.id, 0, "param_norm")
    np.testing.assert_array_equal(steps, np.arange(0, 12, 2))
