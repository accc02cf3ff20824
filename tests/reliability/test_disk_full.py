"""A full disk costs records, never the run: a real trainer whose log cannot grow (a file size
limit, or a full tmpfs) loses the frames that did not fit, counts them, writes again once
there is room, and its closed run is `finished` with every record it kept readable."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gradwatch.agent.runlog import Header
from gradwatch.ingest import Ingester
from gradwatch.store import Store
from tests.reliability.checks import LogContents, compare, record_figure, stored_values
from tests.reliability.procs import TrainerProcess

pytestmark = pytest.mark.reliability


def _spec(home: Path, layers: int = 3, flush_every: int = 5) -> dict[str, Any]:
    # The time bound far away, so what is written is decided by the steps alone.
    return {"run": "full-disk", "layers": layers,
            "config": {"home": str(home), "measure": {"flush_every": flush_every, "max_flush_interval": 3600}}}


def _ingest(home: Path, tmp_path: Path, run_id: str) -> tuple[Store, Any]:
    store = Store.open(f"sqlite:///{tmp_path / 'store.db'}")
    Ingester(store, home).poll_once()
    return store, store.run(run_id)


def _check_run(log: LogContents, home: Path, tmp_path: Path, run_id: str, kept: list[int],
               lost: tuple[int, int]) -> dict[str, Any]:
    """The log holds no damage, the steps `kept`, one `unwritten` event for `lost`, a close
    whose stats count the same frames; its ingest is `finished` and stores all it holds."""
    assert log.corrupt == []
    assert log.steps() == kept
    (notice,) = [e for e in log.events if e.kind == "unwritten"]
    assert notice.data["steps"] == list(lost) and notice.data["frames"] >= 1
    assert "File too large" in notice.data["error"] or "No space left" in notice.data["error"]
    (close,) = log.closes
    assert close.stats["errors"]["writer:unwritten_frames"] == notice.data["frames"]
    store, run = _ingest(home, tmp_path, run_id)
    try:
        assert run.status == "finished"
        assert store.ingest_errors() == []
        assert compare(log.values, stored_values(store, run_id)) == (0, 0)
    finally:
        store.close()
    return notice.data


def test_a_file_size_limit_mid_run_loses_the_frames_that_do_not_fit_and_the_run_finishes(
        tmp_path: Path, gradwatch_home: Path) -> None:
    trainer = TrainerProcess(_spec(gradwatch_home), tmp_path / "trainer.err")
    run_id = trainer.send("watch")["run_id"]
    trainer.send("train 10")
    trainer.send("limit +100")  # room for part of the next frame only
    trainer.send("train 10")
    trainer.send("unlimit")
    trainer.send("train 10")
    trainer.send("close")
    assert trainer.wait() == 0
    log = LogContents(Path(trainer.lines[0]["path"]))
    data = _check_run(log, gradwatch_home, tmp_path, run_id, list(range(10)) + list(range(20, 30)), (10, 19))
    assert "writer:write:27" in log.closes[0].stats["errors"]  # EFBIG, as the child saw it
    assert trainer.stderr().count("cannot write the run log") == 1
    record_figure("file_size_limit_mid_run", frames_lost=data["frames"], steps_lost=20 - 10, corrupt=0,
                  status="finished")


def test_a_header_larger_than_the_room_left_is_kept_and_written_when_room_returns(
        tmp_path: Path, gradwatch_home: Path) -> None:
    trainer = TrainerProcess(_spec(gradwatch_home, layers=12), tmp_path / "trainer.err")
    trainer.send("limit 4096")
    run_id = trainer.send("watch")["run_id"]
    path = Path(trainer.lines[-1]["path"])
    trainer.send("train 10")
    assert path.stat().st_size == 0  # no part of the header was left behind
    trainer.send("unlimit")
    trainer.send("train 10")
    trainer.send("close")
    assert trainer.wait() == 0
    log = LogContents(path)
    header = next(r for r in log.records if isinstance(r, Header))
    assert len(header.info["layers"]) == 23 and log.records[0] is header
    assert path.read_bytes().find(b'"metrics"') > 4096 // 3  # each copy alone is larger than a third of the room
    data = _check_run(log, gradwatch_home, tmp_path, run_id, list(range(10, 20)), (0, 9))
    record_figure("header_larger_than_room", frames_lost=data["frames"], status="finished")


def test_a_disk_still_full_at_close_loses_the_close_record_and_nothing_before_it(
        tmp_path: Path, gradwatch_home: Path) -> None:
    trainer = TrainerProcess(_spec(gradwatch_home), tmp_path / "trainer.err")
    run_id = trainer.send("watch")["run_id"]
    trainer.send("train 10")
    trainer.send("limit +0")
    trainer.send("train 10")
    trainer.send("close")
    assert trainer.wait() == 0
    log = LogContents(Path(trainer.lines[0]["path"]))
    assert log.corrupt == [] and log.closes == [] and log.steps() == list(range(10))
    store, run = _ingest(gradwatch_home, tmp_path, run_id)
    try:
        assert run.status == "crashed"  # no close record, and its writer is gone
        assert compare(log.values, stored_values(store, run_id)) == (0, 0)
    finally:
        store.close()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted for the test (root only; skips where mounting is not allowed)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mnt)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def _fill(path: Path) -> int:
    """Write zeros to `path` until the file system is full; returns the bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                written += os.write(fd, bytes(4096))
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                return written
    finally:
        os.close(fd)


def test_a_full_file_system_then_freed_loses_only_what_did_not_fit(tmp_path: Path, small_tmpfs: Path) -> None:
    home = small_tmpfs / "home"
    # Frames larger than a page, so that a full tmpfs has no room left for them in the log's last page.
    trainer = TrainerProcess(_spec(home, layers=12, flush_every=20), tmp_path / "trainer.err")
    run_id = trainer.send("watch")["run_id"]
    trainer.send("train 40")
    filler = small_tmpfs / "filler"
    assert _fill(filler) > 0
    trainer.send("train 40")
    filler.unlink()
    trainer.send("train 40")
    trainer.send("close")
    assert trainer.wait() == 0
    log = LogContents(Path(trainer.lines[0]["path"]))
    data = _check_run(log, home, tmp_path, run_id, list(range(40)) + list(range(80, 120)), (40, 79))
    assert "writer:write:28" in log.closes[0].stats["errors"]  # ENOSPC
    record_figure("full_tmpfs_mid_run", frames_lost=data["frames"], status="finished")
