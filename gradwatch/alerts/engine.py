"""The live rules engine: after each ingest pass, the diagnosis rules on a window of each live
run's recent steps, their alerts through the lifecycle, into the store, the log and the receivers.

`AlertEngine.evaluate()` is one pass. A run is evaluated again only when its rank-0 data
moved, at most every `evaluate_every` seconds; its findings are kept between evaluations, so a
run that did not move costs one comparison plus the `stalled_run` check. Its `RunWindow` is
fed the batches the service's ingester committed from rank 0's log (`feed`, called from the
ingest thread), so a live run costs no read of the store; a new window, a gap in those batches
(another process ingested part of the log) and an engine that nobody feeds read the store,
just the new rows (layer and param measurements, hundreds of series in a large model, at most
every `layers_every` seconds when nothing feeds the engine). A run that ended (or was decided
in this ingest pass) gets a last evaluation of its whole tail, then its alerts resolve.
Nothing here waits on a receiver: notifiers queue and deliver in their own threads.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import socket
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gradwatch.agent.runlog import LOG_SUFFIX, logs_dir
from gradwatch.alerts import ledger
from gradwatch.alerts.config import SEVERITY_RANK, AlertsConfig
from gradwatch.alerts.lifecycle import Alert, Lifecycle, Transition
from gradwatch.alerts.message import Notification, command, number
from gradwatch.alerts.notifiers import Notifier
from gradwatch.alerts.rules import DEFAULT_FOR_STEPS, Rule, run_rules, thresholds_applied
from gradwatch.alerts.stalled import stalled
from gradwatch.diagnose import RULES, Finding, RunData
from gradwatch.diagnose.load import RunWindow
from gradwatch.ingest import Batch
from gradwatch.ingest.liveness import pid_alive
from gradwatch.service.logs import log_event
from gradwatch.store import RunInfo, RunNotFound, Store


@dataclass
class _Watched:
    """A live run: its window, its last findings, when its last step last moved, and when its
    rules last ran and its layer measurements were last read."""

    window: RunWindow
    progress_at: float
    last_step: int | None
    findings: list[Finding] = field(default_factory=list)
    evaluated_at: float = -math.inf
    layers_at: float = -math.inf


#: Run-level counts of params whose gradients went non-finite or overflowed.
_BAD_COUNTS = ("nonfinite_params", "overflow_params")
#: Log bytes of batches a run may have waiting for its next evaluation; past it the oldest are
#: dropped, and the window, seeing the gap, reads the store instead (an evaluation thread that
#: fell far behind must not hold a backlog in memory).
MAX_WAITING_BYTES = 8 * 1024 * 1024


def _went_nonfinite(data: RunData, after: int | None) -> bool:
    """Whether a run-level value after step `after` is NaN/Inf, or counts non-finite gradients."""
    for metric, series in data.run.items():
        new = series.values[series.steps > after] if after is not None else series.values
        if metric in _BAD_COUNTS:
            if np.any(np.nan_to_num(new, nan=1.0) > 0):
                return True
        elif not np.all(np.isfinite(new)):
            return True
    return False


@dataclass(frozen=True)
class AlertsSnapshot:
    """What the exporter shows: the firing alerts and how many fired per (rule, severity)."""

    firing: tuple[Alert, ...] = ()
    totals: dict[tuple[str, str], int] = field(default_factory=dict)


class AlertEngine:
    """Evaluates the rules over live runs of `store` and delivers their alerts.

    `start()` takes up the alerts a previous service left firing; `evaluate(ended)` is one
    pass (`ended`: runs the ingest pass just declared finished or crashed); `stop()` gives
    the receivers a bounded time to deliver what is queued. `snapshot()` is thread-safe.
    With a `home`, only the runs whose logs lie in it are evaluated (the ones this service
    ingests), so services on several hosts sharing one store never alert twice on a run.
    `feed` takes the ingester's committed batches (`Ingester(on_batch=engine.feed)`).
    """

    def __init__(self, store: Store, config: AlertsConfig, notifiers: Iterable[Notifier] = (),
                 logger: logging.Logger | None = None, clock: Callable[[], float] = time.time,
                 rules: tuple[Rule, ...] = RULES, hostname: str | None = None, home: Path | None = None) -> None:
        self.store = store
        self.home = home
        self.config = config
        self.notifiers = list(notifiers)
        self.logger = logger
        self.clock = clock
        self.rules = rules
        self.hostname = hostname or socket.gethostname()
        self.lifecycle = Lifecycle(self._hold)
        self._watched: dict[str, _Watched] = {}
        self._totals: Counter[tuple[str, str]] = Counter()
        self._failed_rules: set[str] = set()
        self._lock = threading.Lock()
        self._snapshot = AlertsSnapshot()
        self._fed = False  # an ingester hands this engine its batches
        self._waiting: dict[str, list[Batch]] = {}  # per watched run, the batches since its last evaluation
        self._waiting_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle of the engine

    def start(self) -> None:
        """Start the receivers and take up the alerts still firing in the store."""
        for n in self.notifiers:
            n.start()
        owned = self._owned()
        self.lifecycle.restore(a for a in ledger.firing(self.store) if owned is None or a.run_id in owned)
        self._publish()

    def stop(self, timeout: float = 5.0) -> None:
        """Give every receiver at most `timeout` seconds to deliver what is queued."""
        for n in self.notifiers:
            n.stop(timeout)

    def snapshot(self) -> AlertsSnapshot:
        with self._lock:
            return self._snapshot

    def feed(self, batch: Batch) -> None:
        """Take a batch the ingester has just committed (called in its thread; never reads the
        store): rank 0's batches of a watched run wait for its next evaluation, which appends
        them to its window. Other runs' are dropped: a window, when made, reads the store."""
        with self._waiting_lock:
            self._fed = True
            waiting = self._waiting.get(batch.run_id)
            if batch.rank != 0 or waiting is None:
                return
            waiting.append(batch)
            while len(waiting) > 1 and sum(b.end - b.start for b in waiting) > MAX_WAITING_BYTES:
                waiting.pop(0)

    def _take(self, run_id: str) -> list[Batch]:
        with self._waiting_lock:
            batches = self._waiting.get(run_id, [])
            if batches:
                self._waiting[run_id] = []
            return batches

    # ------------------------------------------------------------------ one pass

    def evaluate(self, ended: Iterable[str] = ()) -> list[Transition]:
        """One pass over the live runs; the transitions it caused (already stored and queued). When
        the store fails, the transitions not stored are undone (tried again next pass) and the
        first error is raised after the others were applied."""
        now = self.clock()
        owned = self._owned()
        running = {r.id: r for r in self.store.list_runs(status="running") if owned is None or r.id in owned}
        transitions: list[Transition] = []
        gone = (set(self._watched) | self.lifecycle.runs() | set(ended)) - set(running)
        for run_id in sorted(gone):
            transitions += self._last_pass(run_id, now)
        for run in running.values():
            transitions += self._pass(run, now)
        applied, failure = [], None
        for t in transitions:
            try:
                applied.append(self._apply(t, now))
            except Exception as exc:  # the store is down: undo, so the next pass tries this one again
                self.lifecycle.undo(t)
                failure = failure or exc
        firing = self.lifecycle.firing()
        for n in self.notifiers:
            n.tick(firing, now)
        self._publish()
        if failure is not None:
            raise failure
        return applied

    def _pass(self, run: RunInfo, now: float) -> list[Transition]:
        w = self._watched.get(run.id)
        if w is None:
            with self._waiting_lock:  # before its first read: a batch committed after that read waits for it
                self._waiting[run.id] = []
            try:
                window = RunWindow(self.store, run.id, self.config.window_steps)
            except RunNotFound:  # deleted since it was listed
                self._forget(run.id)
                return []
            w = self._watched[run.id] = _Watched(window, now, run.last_step)
        if run.last_step != w.last_step:
            w.progress_at, w.last_step = now, run.last_step
        if now - w.evaluated_at >= self.config.evaluate_every and self._update(w, run, now):
            w.findings = self._findings(w.window.data)
            first = not math.isfinite(w.evaluated_at)  # then each run at its own phase, as the layer reads
            w.evaluated_at = now - self._phase(run.id, self.config.evaluate_every) if first else now
        findings = list(w.findings)
        if self._alive(run):
            findings += self._kept(stalled(now - w.progress_at, self.config.stalled_after, run.last_step, run.pid))
        step = w.window.last_step if w.window.last_step is not None else (run.last_step or 0)
        return self.lifecycle.observe(run.id, w.window.name, findings, step, now)

    def _update(self, w: _Watched, run: RunInfo, now: float) -> bool:
        """Bring a run's window up to date; False when there was nothing new to evaluate.

        Fed, the window appends the batches the ingester handed over; batches that it cannot
        append (a gap) make a new window read from the store. A window never read, or not fed,
        reads the store when the run moved: the run-level rows, and the layers' every
        `layers_every` seconds or at once when the new rows hold a NaN/Inf."""
        batches = self._take(run.id)
        if batches:
            if not w.window.feed(batches):
                w.window = RunWindow(self.store, run.id, self.config.window_steps)
                w.window.refresh()
            return True
        behind = run.last_step is not None and (w.window.last_step is None or run.last_step > w.window.last_step)
        if not behind or (self._fed and w.window.offset is not None):  # fed: its batches are on their way
            return False
        layers = now - w.layers_at >= self.config.layers_every
        read_to = w.window.last_step
        w.window.refresh(layers=layers)
        if not layers and _went_nonfinite(w.window.data, read_to):  # NaN/Inf: the layers' too, at once
            layers = True
            w.window.refresh(layers=True)
        if layers:  # after the first read, each run at its own phase: not all in one pass
            w.layers_at = now if math.isfinite(w.layers_at) else now - self._phase(run.id, self.config.layers_every)
        return True

    def _last_pass(self, run_id: str, now: float) -> list[Transition]:
        """A run that is no longer running: its tail evaluated once more, then its alerts resolved."""
        w = self._watched.get(run_id)
        out: list[Transition] = []
        try:
            window = w.window if w is not None else RunWindow(self.store, run_id, self.config.window_steps)
            findings = self._findings(window.data) if window.refresh() or w is None else w.findings
            out += self.lifecycle.observe(run_id, window.name, findings, window.last_step or 0, now)
        except RunNotFound:  # deleted meanwhile: its stored alerts went with it
            pass
        self._watched.pop(run_id, None)
        self._forget(run_id)
        return out + self.lifecycle.end_run(run_id, now)

    def _forget(self, run_id: str) -> None:
        with self._waiting_lock:
            self._waiting.pop(run_id, None)

    @staticmethod
    def _phase(run_id: str, interval: float) -> float:
        """A fraction of `interval` fixed by the run id, so runs started together spread their
        evaluations and layer reads over it."""
        return zlib.crc32(run_id.encode()) % 1000 / 1000 * interval

    def _owned(self) -> set[str] | None:
        """Ids of the runs whose logs lie in the home (None: every run of the store)."""
        if self.home is None:
            return None
        folder = logs_dir(self.home)
        names = [p.name for p in folder.glob(f"*{LOG_SUFFIX}")] if folder.is_dir() else []
        return {name.rsplit(".rank", 1)[0] for name in names}

    def _alive(self, run: RunInfo) -> bool:
        """Whether the run's process still lives, as far as this host can tell (elsewhere: assumed)."""
        if run.host == self.hostname and run.pid:
            return pid_alive(run.pid)
        return True

    # ------------------------------------------------------------------ rules and their settings

    def _findings(self, data: RunData) -> list[Finding]:
        with thresholds_applied(self.config.thresholds):
            found = run_rules(data, self.rules, self._rule_failed)
        return self._kept(found)

    def _kept(self, findings: list[Finding]) -> list[Finding]:
        """Findings the configuration makes alerts: rule enabled, severity (as configured) at
        least `min_severity`."""
        out = []
        for f in findings:
            rc = self.config.rule(f.id)
            if not rc.enabled:
                continue
            if rc.severity is not None:
                f = dataclasses.replace(f, severity=rc.severity)
            if SEVERITY_RANK[f.severity] >= SEVERITY_RANK[self.config.min_severity]:
                out.append(f)
        return out

    def _hold(self, rule: str) -> tuple[int, float]:
        rc = self.config.rule(rule)
        steps = rc.for_steps if rc.for_steps is not None else DEFAULT_FOR_STEPS.get(rule, 0)
        return steps, rc.for_seconds or 0.0

    def _rule_failed(self, rule: Rule, exc: Exception) -> None:
        name = getattr(rule, "__name__", repr(rule))
        if name not in self._failed_rules:
            self._failed_rules.add(name)
            self._log("rule_failed", logging.ERROR, rule=name, error=f"{type(exc).__name__}: {exc}".splitlines()[0])

    # ------------------------------------------------------------------ effects of a transition

    def _apply(self, t: Transition, now: float) -> Transition:
        """Store, log and notify a transition; the transition with the alert's store id."""
        a = t.alert
        if t.kind == "resolved":
            ledger.resolve(self.store, a, a.ended_at if a.ended_at is not None else now)
            self._notify(Notification("resolved", a), "alert_resolved")
            return t
        if t.kind == "escalated":
            ledger.resolve(self.store, a, now)
        alert_id = ledger.add(self.store, a)
        stored = dataclasses.replace(a, id=alert_id)
        self.lifecycle.stored(a.key, alert_id)
        self._totals[(a.rule, a.severity)] += 1
        escalated = a.previous_severity if t.kind == "escalated" else None
        self._notify(Notification("firing", stored, escalated), "alert_escalated" if escalated else "alert_firing")
        return Transition(t.kind, stored)

    def _notify(self, n: Notification, event: str) -> None:
        a = n.alert
        level = logging.INFO if n.status == "resolved" else logging.ERROR if a.severity == "error" else logging.WARNING
        self._log(event, level, run=a.run_id, run_name=a.run_name, rule=a.rule, severity=a.severity,
                  layer=a.layer or None, step=a.step, value=number(a.value), threshold=number(a.threshold),
                  title=a.title, cause=a.cause, remedy=a.remedy, command=command(a))
        for notifier in self.notifiers:
            notifier.notify(n)

    def _publish(self) -> None:
        snap = AlertsSnapshot(tuple(self.lifecycle.firing()), dict(self._totals))
        with self._lock:
            self._snapshot = snap

    def _log(self, event: str, level: int = logging.INFO, **fields: object) -> None:
        if self.logger is not None:
            log_event(self.logger, event, level, **fields)
