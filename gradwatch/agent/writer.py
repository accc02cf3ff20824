"""Background writer of a run log: a thread behind a bounded queue that never blocks training.

Every write is checked to its last byte. A write cut short or refused (a full disk, a file
size limit, an unwritable home) is cut back to the last complete record, so the log never
holds a torn record in its middle. What did not fit is handled by its kind: the header and
the metric definitions, without which nothing after them can be read, are kept and written
first at the next attempt (a full disk costs records, never the run); frames, events and the
close record are lost and counted, and an `unwritten` event says which once everything fits
again. Each later job is such an attempt, so writing resumes as soon as space returns.

A reader tailing the log never sees a record vanish: it reads only complete records, and the
only complete records a cut removes are copies of a header or definition whose last copy did
not fit; those are kept and written again first, at the same offset, as the same bytes.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from gradwatch.agent import framing, runlog

log = logging.getLogger("gradwatch.agent")

# A job runs on the writer thread and returns the encoded records to append.
Job = Callable[[], list[bytes]]

_KEPT = (runlog.KIND_HEADER, runlog.KIND_METRIC)  # written whole or kept for the next attempt
_LOST = {runlog.KIND_FRAME: "frames", runlog.KIND_EVENT: "events", runlog.KIND_CLOSE: "close"}
_NOTICE = -1  # pseudo-kind of the `unwritten` event built by the writer itself
_BLOCK_HEAD = struct.Struct("<IIII")  # block length, metric id, rows, flags (docs/runlog.md)


class LogWriter:
    """Appends encoded records to one run log from a daemon thread.

    `submit()` never blocks: when the queue is full the job is dropped and counted
    (`dropped`). A failed write is counted in `errors` (`write:<errno>`, `open:<errno>`)
    and its records are handled as the module says; the records lost that way are counted
    there too, by kind (`unwritten_frames`, `unwritten_events`, `unwritten_close`), so the
    close record's stats carry them.
    """

    def __init__(self, path: Path, header: bytes, queue_size: int = 64) -> None:
        self.path = path
        self.dropped = 0
        self.bytes_written = 0
        self._errors: Counter[str] = Counter()
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._kept: list[bytes] = [header]  # the header first, as soon as the file opens
        self._fd: int | None = None
        self._closed = False
        self._end = 0  # end of the last complete record
        self._gap = _Gap()  # losses not yet reported in the log
        self._append([])
        self._thread = threading.Thread(target=self._run, name=f"gradwatch-writer-{path.stem}", daemon=True)
        self._thread.start()

    @property
    def errors(self) -> Counter[str]:
        """Failures so far, by kind: a copy, taken whole (the writer thread adds to the original)."""
        return Counter(dict(self._errors))

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
            self._errors["writer_timeout"] += 1
            log.warning("gradwatch: the run log writer did not finish within %.0f s: %s", timeout, self.path)
            return
        if self._fd is None:
            return
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self._errors[f"fsync:{exc.errno}"] += 1
        os.close(self._fd)
        self._fd = None

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                chunks = job()
            except Exception as exc:  # a failing job must not kill the writer
                self._errors[f"job:{type(exc).__name__}"] += 1
                log.warning("gradwatch: failed to prepare a run log record: %r", exc)
                continue
            try:
                self._append(chunks)
            except Exception as exc:  # nor may a bug in writing: the records are lost, counted
                self._errors[f"append:{type(exc).__name__}"] += 1
                log.warning("gradwatch: failed to write run log records: %r", exc)

    def _open(self) -> int | None:
        """The log's descriptor, opened on first success; None while it cannot be."""
        if self._fd is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                self._failed("open", exc)
                return None
            self._fd, self._end = fd, os.fstat(fd).st_size
        return self._fd

    def _append(self, chunks: list[bytes]) -> None:
        """Write the kept records, the notice of earlier losses and `chunks`, as one write."""
        batch = [(_kind(c), c) for c in [*self._kept, *chunks]]
        if not batch:
            return
        if self._gap:  # last (before a close): written only once everything before it fits again
            at = next((i for i, (kind, _) in enumerate(batch) if kind == runlog.KIND_CLOSE), len(batch))
            batch.insert(at, (_NOTICE, self._gap.event()))
        self._kept = []
        fd = self._open()
        data = b"".join(c for _, c in batch)
        done, error = (0, None) if fd is None else _write_all(fd, data)
        written = end = 0
        for kind, chunk in batch:
            end += len(chunk)
            if end <= done:
                written = end
                self.bytes_written += len(chunk)
                if kind == _NOTICE:
                    self._resumed()
            elif kind in _KEPT:
                self._kept.append(chunk)
            elif kind != _NOTICE:
                self._lose(kind, chunk)
        if fd is None:
            return
        if error is not None:
            self._failed("write", error)
        if written < done:
            self._cut(fd, self._end + written)
        else:
            self._end += written

    def _cut(self, fd: int, end: int) -> None:
        """Truncate the log back to `end`, the end of its last complete record."""
        try:
            os.ftruncate(fd, end)
            self._end = end
        except OSError as exc:
            self._failed("truncate", exc)
            self._end = os.fstat(fd).st_size  # the torn bytes stay; readers skip them as damage

    def _lose(self, kind: int, chunk: bytes) -> None:
        what = _LOST.get(kind, "records")
        self._errors[f"unwritten_{what}"] += 1
        self._gap.add(what, _frame_steps(chunk) if kind == runlog.KIND_FRAME else None)

    def _resumed(self) -> None:
        log.warning("gradwatch: writing the run log %s again; %s", self.path, self._gap.summary())
        self._gap = _Gap()

    def _failed(self, what: str, exc: OSError) -> None:
        key = f"{what}:{exc.errno}"
        self._errors[key] += 1
        self._gap.error = f"{what}: {exc.strerror or exc}"
        if self._errors[key] == 1:
            log.warning("gradwatch: cannot %s the run log %s: %s (counted; records that do not fit are "
                        "dropped and the log is kept whole)", what, self.path, exc.strerror or exc)


class _Gap:
    """Records lost since the log was last written whole, until an `unwritten` event reports them."""

    def __init__(self) -> None:
        self.lost: Counter[str] = Counter()
        self.steps: tuple[int, int] | None = None
        self.error = ""

    def __bool__(self) -> bool:
        return bool(self.lost)

    def add(self, what: str, steps: tuple[int, int] | None) -> None:
        self.lost[what] += 1
        if steps is not None:
            lo, hi = steps if self.steps is None else (min(self.steps[0], steps[0]), max(self.steps[1], steps[1]))
            self.steps = (lo, hi)

    def event(self) -> bytes:
        """The `unwritten` event: {"frames", "events", "steps": [first, last] or None, "error"}."""
        data = {"frames": self.lost["frames"], "events": self.lost["events"],
                "steps": list(self.steps) if self.steps else None, "error": self.error}
        step = self.steps[0] if self.steps else 0
        return runlog.encode_event(runlog.Event("unwritten", step, time.time(), data))

    def summary(self) -> str:
        steps = f" (steps {self.steps[0]}-{self.steps[1]})" if self.steps else ""
        return f"lost {self.lost['frames']} frame(s){steps} and {self.lost['events']} event(s) ({self.error})"


def _kind(chunk: bytes) -> int:
    """The record kind of an encoded record (of its first record, for copies back to back)."""
    return chunk[framing.PREFIX.size] if len(chunk) > framing.PREFIX.size else 0


def _write_all(fd: int, data: bytes) -> tuple[int, OSError | None]:
    """Append `data`; (bytes written, the error that stopped it short or None)."""
    view = memoryview(data)
    done = 0
    while done < len(data):
        try:
            n = os.write(fd, view[done:])
        except OSError as exc:
            return done, exc
        if n == 0:
            return done, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done += n
    return done, None


def _frame_steps(record: bytes) -> tuple[int, int] | None:
    """First and last step of an encoded frame record (docs/runlog.md's layout); None without rows."""
    pos = framing.PREFIX.size + 1
    steps: list[int] = []
    try:
        (count,) = struct.unpack_from("<I", record, pos)
        pos += 4
        for _ in range(count):
            length, _, rows, _ = _BLOCK_HEAD.unpack_from(record, pos)
            if rows:
                steps += struct.unpack_from("<q", record, pos + _BLOCK_HEAD.size)
                steps += struct.unpack_from("<q", record, pos + _BLOCK_HEAD.size + 8 * (rows - 1))
            pos += 4 + length
    except struct.error:
        pass  # not a frame of ours: its steps are not reported
    return (min(steps), max(steps)) if steps else None
