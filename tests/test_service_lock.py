"""The single-instance lock: held per store, names the holder, never stale after a crash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gradwatch.service.lock import LockHeld, ServiceLock, lock_path_for

HOLDER = """
import sys
from pathlib import Path
from gradwatch.service.lock import ServiceLock
lock = ServiceLock(Path(sys.argv[1]))
lock.acquire()
print("locked", flush=True)
sys.stdin.read()
"""


def _hold_in_child(path: Path) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "locked"
    return child


def test_second_holder_is_refused_with_the_first_pid(tmp_path: Path) -> None:
    path = tmp_path / "serve.lock"
    child = _hold_in_child(path)
    try:
        with pytest.raises(LockHeld, match=rf"another gradwatch serve \(pid {child.pid}\)") as info:
            ServiceLock(path).acquire()
        assert info.value.pid == child.pid
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
    with ServiceLock(path) as lock:  # released when the holder exits
        assert lock.held and path.read_text().strip() == str(os.getpid())


def test_lock_of_a_killed_holder_is_free(tmp_path: Path) -> None:
    path = tmp_path / "serve.lock"
    child = _hold_in_child(path)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert path.read_text().strip() == str(child.pid)  # the stale pid is still in the file...
    lock = ServiceLock(path)
    lock.acquire()  # ...but the kernel dropped the flock with the process
    lock.release()
    assert not lock.held and path.read_text() == ""


def test_release_is_idempotent(tmp_path: Path) -> None:
    lock = ServiceLock(tmp_path / "a" / "serve.lock")
    lock.acquire()
    lock.release()
    lock.release()
    lock.acquire()
    lock.release()


@pytest.mark.parametrize(("url", "expected"), [
    pytest.param("sqlite:///{tmp}/db/store.db", "{tmp}/db/store.db.serve.lock", id="sqlite-file"),
    pytest.param("sqlite://", "{home}/serve.lock", id="sqlite-memory"),
    pytest.param("postgresql+psycopg://u:p@db/gw", "{home}/serve.lock", id="postgres"),
])
def test_lock_path(tmp_path: Path, url: str, expected: str) -> None:
    home = tmp_path / "home"
    got = lock_path_for(url.format(tmp=tmp_path), home)
    assert got == Path(expected.format(tmp=tmp_path.resolve(), home=home))
