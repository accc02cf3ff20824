"""Single-instance lock: one `gradwatch serve` per store.

The lock is an ``fcntl.flock`` on a small file that holds the owner's pid. The kernel drops
the lock when the owning process dies, so a crashed server never leaves a stale lock: a
left-over file with an old pid in it is simply locked again by the next server.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

LOCK_NAME = "serve.lock"


class LockHeld(Exception):
    """Another live process holds the lock; `pid` is its pid when it could be read."""

    def __init__(self, path: Path, pid: int | None) -> None:
        who = f"pid {pid}" if pid is not None else "another process"
        super().__init__(f"another gradwatch serve ({who}) already serves this store (lock {path})")
        self.path = path
        self.pid = pid


def lock_path_for(db_url: str, home: Path) -> Path:
    """Where the lock of a store lives: next to a SQLite file, else in the gradwatch home."""
    try:
        url = make_url(db_url)
    except ArgumentError:
        return home / LOCK_NAME
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        db = Path(url.database).expanduser().resolve()
        return db.with_name(db.name + "." + LOCK_NAME)
    return home / LOCK_NAME


class ServiceLock:
    """An exclusive, non-blocking, process-lifetime lock on `path`.

    `acquire()` raises `LockHeld` naming the holder's pid; `release()` unlocks and empties
    the file. Usable as a context manager.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and write our pid into the file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise LockHeld(self.path, pid) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Empty the file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> ServiceLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
