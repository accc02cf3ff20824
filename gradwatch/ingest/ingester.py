"""Polling the run logs of a gradwatch home into a store.

Each log is locked (`flock` on the log file itself) while it is ingested, so two ingesters
(the service and a CLI command) never write the same log at once; the offset update is
also conditional on the offset read, so even without the lock a log is ingested once.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError

from gradwatch.agent.runlog import LOG_SUFFIX, LogReader, logs_dir
from gradwatch.ingest.batch import LogState, OffsetConflict, apply_batch, refresh_run_status
from gradwatch.ingest.liveness import DEFAULT_STALE_AFTER_S, writer_gone
from gradwatch.ingest.report import Batch, IngestReport
from gradwatch.store import Store, StoreError
from gradwatch.store import schema as s
from gradwatch.store.engine import writing

log = logging.getLogger("gradwatch.ingest")

MAX_BATCH_BYTES = 16 * 1024 * 1024
_DONE_STATES = ("broken", "deleted")


class Ingester:
    """Ingests every run log under `home/logs` into `store`, incrementally.

    `poll_once()` is one pass (what the CLI runs before it answers); `poll_forever()` is
    the service's loop. `stale_after` is how long an unclosed log may stay silent before
    its run is declared crashed (sooner when its writer ran on this host and is gone).
    `on_batch`, when given, is called with each batch of a run's records once it is committed.
    """

    def __init__(self, store: Store, home: Path | None = None, stale_after: float = DEFAULT_STALE_AFTER_S,
                 max_batch_bytes: int = MAX_BATCH_BYTES, clock: Callable[[], float] = time.time,
                 hostname: str | None = None, on_batch: Callable[[Batch], None] | None = None) -> None:
        self.store = store
        self.dir = logs_dir(home)
        self.stale_after = stale_after
        self.max_batch_bytes = max_batch_bytes
        self.clock = clock
        self.hostname = hostname or socket.gethostname()
        self.on_batch = on_batch
        self._logs: dict[str, LogState] = {}

    def poll_once(self) -> IngestReport:
        """Ingest everything new in every log (round robin, one bounded transaction at a
        time), then decide crashed runs. Returns what was done."""
        report = IngestReport()
        rows = self._log_rows()
        pending, idle = [], []
        for path in sorted(self.dir.glob(f"*{LOG_SUFFIX}")) if self.dir.is_dir() else []:
            if not path.is_file():  # a directory or FIFO named like a log: reading it would fail or block
                continue
            row = rows.get(path.name)
            if row is not None and row.state in _DONE_STATES:
                self._logs.pop(path.name, None)
                continue
            if row is not None and _size(path) <= row.offset and row.state != "running":
                self._logs.pop(path.name, None)  # finished or crashed and caught up: free its cache
                continue
            st = self._logs.setdefault(path.name, LogState(path.name, path))
            if row is not None and _size(path) <= row.offset:
                idle.append(st)
            else:
                pending.append(st)
        while pending:
            still = []
            for st in pending:
                with _locked(st.path) as ok:
                    if ok is None:
                        continue  # removed since the listing
                    if not ok:
                        report.busy.append(st.name)
                    elif self._ingest_batch(st, report):
                        still.append(st)
                    else:
                        idle.append(st)
            pending = still
        for st in idle:
            self._check_alive(st, report)
        return report

    def poll_forever(self, stop: threading.Event, interval: float = 0.5,
                     on_report: Callable[[IngestReport], None] | None = None) -> None:
        """Poll until `stop` is set; a failing pass is logged and retried after `interval`."""
        while not stop.is_set():
            try:
                rep = self.poll_once()
                if on_report is not None:
                    on_report(rep)
            except Exception as exc:  # the service keeps polling through a database outage
                log.warning("gradwatch: ingest pass failed: %s", str(exc).splitlines()[0] if str(exc) else exc)
            stop.wait(interval)

    # ------------------------------------------------------------------ internals

    def _log_rows(self) -> dict:
        c = s.logs.c
        with self.store.engine.connect() as conn:
            return {r.name: r for r in conn.execute(select(c.name, c.state, c.offset))}

    def _ingest_batch(self, st: LogState, report: IngestReport) -> bool:
        """One transaction for one log; False when there was nothing (complete) to read."""
        try:
            stat = st.path.stat()
        except FileNotFoundError:
            return False
        size, grew_at = stat.st_size, min(self.clock(), stat.st_mtime)
        try:
            with writing(self.store.engine) as conn:
                row = conn.execute(select(s.logs.c.offset, s.logs.c.state)
                                   .where(s.logs.c.name == st.name)).first()
                offset = 0 if row is None else int(row.offset)
                if row is not None and row.state in _DONE_STATES or size <= offset:
                    return False
                if st.reader is None or st.reader.offset != offset:
                    st.reset()
                    st.reader = LogReader(st.path, offset=offset)
                records = st.reader.read(self.max_batch_bytes)
                if not records and offset + self.max_batch_bytes < size:
                    records = st.reader.read()  # one record (or a damaged stretch) larger than a batch
                if not records:
                    return False
                end = st.reader.offset
                rep = apply_batch(conn, st, offset, records, end, self.clock(), grew_at, tail=st.reader.torn_tail)
        except OffsetConflict:
            st.reset()
            return True
        except (OperationalError, InterfaceError, OSError):  # the database or the disk: the whole pass stops
            st.reset()
            raise
        except Exception as exc:  # a record the store cannot take (a malformed header): this log only
            st.reset()
            self._mark_broken(st, f"cannot store its records: {type(exc).__name__}: {_first_line(exc)}")
            report.errors += 1
            return False
        report.add(rep)
        if self.on_batch is not None and st.run_id is not None:
            self.on_batch(Batch(st.run_id, st.rank, offset, end, tuple(record for _, record in records)))
        return True

    def _mark_broken(self, st: LogState, reason: str) -> None:
        """Record why the log cannot be ingested and stop reading it; the other logs go on."""
        log.warning("gradwatch: run log %s is not ingested: %s", st.name, reason)
        now = self.clock()
        with writing(self.store.engine) as conn:
            row = conn.execute(select(s.logs.c.offset).where(s.logs.c.name == st.name)).first()
            if row is None:
                conn.execute(insert(s.logs).values(name=st.name, path=str(st.path), offset=0, state="broken",
                                                   state_at=now, last_growth_at=now))
            else:
                conn.execute(update(s.logs).where(s.logs.c.name == st.name).values(state="broken", state_at=now))
            conn.execute(insert(s.ingest_errors).values(log=st.name, path=str(st.path),
                                                        offset=0 if row is None else int(row.offset),
                                                        reason=reason, at=now))

    def _running_row(self, st: LogState) -> Any:
        """The log's row while its run is running (None otherwise)."""
        c = s.logs.c
        with self.store.engine.connect() as conn:
            row = conn.execute(select(c.state, c.host, c.pid, c.last_growth_at, c.run_id, c.offset)
                               .where(c.name == st.name)).first()
        return None if row is None or row.state != "running" or row.run_id is None else row

    def _check_alive(self, st: LogState, report: IngestReport) -> None:
        """Declare the log's run crashed when its unclosed log's writer is gone.

        A writer may append its last records (its close among them) and exit after this pass
        listed the log as idle: once it is found gone, what the log holds past the committed
        offset is ingested first, and only a tail with no complete record left is an error.
        """
        now = self.clock()
        row = self._running_row(st)
        if row is None:
            return
        alive_at = max(row.last_growth_at, _mtime(st.path, row.last_growth_at))
        if not writer_gone(row.host, row.pid, alive_at, now, self.stale_after, self.hostname):
            return
        if _size(st.path) > row.offset:
            with _locked(st.path) as ok:
                if not ok:
                    return  # another ingester reads it now, and decides
                while self._ingest_batch(st, report):
                    pass
            row = self._running_row(st)
            if row is None:
                return  # it was closed after all
            alive_at = max(row.last_growth_at, _mtime(st.path, row.last_growth_at))
        c = s.logs.c
        with writing(self.store.engine) as conn:
            done = conn.execute(update(s.logs).where(c.name == st.name, c.state == "running",
                                                     c.offset == row.offset)
                                .values(state="crashed", state_at=now, last_growth_at=alive_at))
            if done.rowcount == 1 and _size(st.path) > row.offset:  # a tail that will never complete
                conn.execute(insert(s.ingest_errors).values(
                    log=st.name, path=str(st.path), offset=int(row.offset), at=now,
                    reason=f"the log ends in {_size(st.path) - row.offset} bytes that are not a complete "
                           "record, and its writer is gone"))
                report.errors += 1
            if done.rowcount == 1 and refresh_run_status(conn, row.run_id, now) == "crashed":
                report.crashed.append(row.run_id)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _mtime(path: Path, default: float) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return default


@contextmanager
def _locked(path: Path) -> Iterator[bool | None]:
    """Hold an exclusive flock on the log file; yields False when another ingester holds it,
    None when the file is gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def ingest_pending(store: Store, home: Path | None = None, stale_after: float = DEFAULT_STALE_AFTER_S) -> IngestReport:
    """One ingest pass over every log of `home` (what the CLI runs before it answers).

    A database failure is raised as a one-line StoreError."""
    try:
        return Ingester(store, home, stale_after=stale_after).poll_once()
    except SQLAlchemyError as exc:
        reason = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StoreError(f"cannot ingest into {store.url}: {reason}") from None
