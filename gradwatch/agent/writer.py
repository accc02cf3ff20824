"""Background writer of a run log: a thread behind a bounded queue that never blocks training."""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from gradwatch.agent import runlog

log = logging.getLogger("gradwatch.agent")

# A job runs on the writer thread and returns the encoded records to append.
Job = Callable[[], list[bytes]]


class LogWriter:
    """Appends encoded records to one run log from a daemon thread.

    `submit()` never blocks: when the queue is full the job is dropped and counted. A failed
    write (disk full, file removed) is counted, the file is cut back to its last complete
    record so the log stays readable, and later writes are tried again.
    """

    def __init__(self, path: Path, header: bytes, queue_size: int = 64) -> None:
        self.path = path
        self.errors: Counter[str] = Counter()
        self.dropped = 0
        self.bytes_written = 0
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._header: bytes | None = header  # written first, as soon as the file opens
        self._file: BinaryIO | None = None
        self._closed = False
        self._good_offset = 0
        self._append([])
        self._thread = threading.Thread(target=self._run, name=f"gradwatch-writer-{path.stem}", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> bool:
        """Queue a job; False (and counted as dropped) when the queue is full or closed."""
        if self._closed:
            self.dropped += 1
            return False
        try:
            self._queue.put_nowait(job)
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def close(self, final: Job | None = None, timeout: float = 30.0) -> None:
        """Drain the queue, run `final` last, fsync and close the file."""
        if self._closed:
            return
        self._closed = True
        if final is not None:
            self._queue.put(final)
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.errors["writer_timeout"] += 1
            log.warning("gradwatch: the run log writer did not finish within %.0f s: %s", timeout, self.path)
            return
        if self._file is None:
            return
        try:
            os.fsync(self._file.fileno())
        except OSError:
            self.errors["fsync"] += 1
        self._file.close()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                chunks = job()
            except Exception as exc:  # a failing job must not kill the writer
                self.errors[f"job:{type(exc).__name__}"] += 1
                log.warning("gradwatch: failed to prepare a run log record: %r", exc)
                continue
            self._append(chunks)

    def _open(self) -> BinaryIO | None:
        """The log file, opened (and its header written) on first success; None while it cannot be."""
        if self._file is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - closed by close()
                self._good_offset = self._file.tell()
            except OSError as exc:
                self.errors[f"open:{exc.errno}"] += 1
                if self.errors[f"open:{exc.errno}"] == 1:
                    log.warning("gradwatch: cannot open the run log %s: %s", self.path, exc.strerror)
                return None
        return self._file

    def _append(self, chunks: list[bytes]) -> None:
        f = self._open()
        if f is None:
            return
        if self._header is not None:
            chunks = [self._header, *chunks]
        if not chunks:
            return
        try:
            runlog.append_records(f, chunks)
            self._header = None
            self._good_offset = f.tell()
            self.bytes_written += sum(len(c) for c in chunks)
        except OSError as exc:
            self.errors[f"write:{exc.errno}"] += 1
            if self.errors[f"write:{exc.errno}"] == 1:
                log.warning("gradwatch: cannot write the run log %s: %s", self.path, exc.strerror)
            try:
                f.truncate(self._good_offset)
                f.seek(self._good_offset)
            except OSError:
                self.errors["truncate"] += 1
