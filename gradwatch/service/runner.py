"""The service's lifecycle: lock, store, HTTP server, ingest loop, pusher; clean shutdown.

`Service.start()` takes the single-instance lock first (so a second server is refused
before it touches anything), opens the store, takes up the alerts still firing, binds the
port, then starts ingesting and pushing. After every ingest pass the rules engine evaluates
the live runs (`gradwatch.alerts`) in a thread of its own, so a long evaluation never delays
ingestion; the ingester hands it each batch it commits, so the live windows need no read of
the store. `Service.stop()` ends the ingest loop after its current pass, runs one last pass
so everything written so far is committed, and one last evaluation of it, gives the alert
receivers a few seconds to take what is queued, pushes once more, closes the socket and the
store, and releases the lock. Each failure to start is a one-line `ServiceError`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry
from sqlalchemy.exc import SQLAlchemyError

from gradwatch.alerts import AlertEngine, build_notifiers
from gradwatch.ingest import IngestReport, Ingester
from gradwatch.service.alert_metrics import AlertCollector
from gradwatch.service.exporter import GradwatchCollector
from gradwatch.service.lock import LockHeld, ServiceLock, lock_path_for
from gradwatch.service.logs import log_event
from gradwatch.service.pushgateway import Pusher, redact_url
from gradwatch.service.server import BasicAuth, MetricsServer, ServerError, tls_context
from gradwatch.service.settings import ServiceSettings, SettingsError
from gradwatch.service.source import StoreSource
from gradwatch.store import Store, StoreError, default_url

STORE_ERRORS = (StoreError, SQLAlchemyError)
#: How long `stop()` lets the alert receivers deliver what is queued.
ALERT_DRAIN_S = 5.0


class ServiceError(Exception):
    """The service cannot start; the message is one line."""


class Service:
    """`gradwatch serve` as an object: `start()`, `wait(stop_event)`, `stop()`."""

    def __init__(self, settings: ServiceSettings, logger: logging.Logger,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.logger = logger
        self.clock = clock
        self.home = Path(settings.home).expanduser()
        self.db_url = settings.db or default_url(self.home)
        self.registry = CollectorRegistry()
        self.lock = ServiceLock(lock_path_for(self.db_url, self.home))
        self.store: Store | None = None
        self.server: MetricsServer | None = None
        self.pusher: Pusher | None = None
        self.alerts: AlertEngine | None = None
        self._stop_ingest = threading.Event()
        self._ingest_thread: threading.Thread | None = None
        self._ingest_failing = False
        self._alerts_due = threading.Event()  # set after each ingest pass
        self._stop_alerts = threading.Event()
        self._alerts_thread: threading.Thread | None = None
        self._ended: list[str] = []  # runs the ingest passes declared finished or crashed, not yet evaluated
        self._ended_lock = threading.Lock()
        self._alerts_failing = False

    def start(self) -> None:
        """Lock, open, bind and start the background loops; `ServiceError` when it cannot."""
        try:
            self._start()
        except BaseException:
            self._close()
            raise

    def _start(self) -> None:
        s = self.settings
        try:
            self.lock.acquire()
        except LockHeld as exc:
            raise ServiceError(str(exc)) from None
        except OSError as exc:
            raise ServiceError(f"cannot create lock file {self.lock.path}: {exc.strerror}") from None
        try:
            self.store = Store.open(self.db_url, self.home)
        except StoreError as exc:
            raise ServiceError(str(exc)) from None
        try:
            tls = tls_context(s.tls.cert, s.tls.key) if s.tls.cert and s.tls.key else None
            auth = BasicAuth(s.basic_auth.user, s.basic_auth.resolve_password()) if s.basic_auth.user else None
        except (ServerError, SettingsError) as exc:
            raise ServiceError(str(exc)) from None
        self.registry.register(GradwatchCollector(
            StoreSource(self.store, s.grace, self.clock), grace=s.grace, per_param=s.per_param,
            per_layer=s.per_layer, per_rank=s.per_rank, block_levels=s.block_levels,
            clock=self.clock, logger=self.logger, errors=STORE_ERRORS))
        if s.alerts.enabled:
            self.alerts = AlertEngine(self.store, s.alerts, build_notifiers(s.alerts, self.logger, self.clock),
                                      self.logger, self.clock, home=self.home)
            try:
                self.alerts.start()
            except STORE_ERRORS as exc:
                raise ServiceError(f"cannot read the alerts of {self.store.url}: {_one_line(exc)}") from None
            self.registry.register(AlertCollector(self.alerts.snapshot))
        self.server = MetricsServer(self.registry, s.host, s.port, tls=tls, auth=auth, logger=self.logger)
        try:
            self.server.start()
        except ServerError as exc:
            self.server = None
            raise ServiceError(str(exc)) from None
        if self.alerts is not None:
            self._alerts_thread = threading.Thread(target=self._alerts_loop, name="gradwatch-alerts", daemon=True)
            self._alerts_thread.start()
        self._ingest_thread = threading.Thread(target=self._ingest_loop, name="gradwatch-ingest", daemon=True)
        self._ingest_thread.start()
        if s.pushgateway.url:
            self.pusher = Pusher(s.pushgateway.url, self.registry, s.pushgateway.interval,
                                 s.pushgateway.job, logger=self.logger)
            self.pusher.start()
        log_event(self.logger, "started", url=self.server.url, store=self.store.url, home=str(self.home),
                  lock=str(self.lock.path), tls=tls is not None, basic_auth=auth is not None,
                  pushgateway=redact_url(s.pushgateway.url) if s.pushgateway.url else None,
                  grace_s=s.grace, poll_interval_s=s.poll_interval, alerts=self.alerts is not None,
                  alert_receivers=[n.label for n in self.alerts.notifiers] if self.alerts else [])

    def _ingest_loop(self) -> None:
        assert self.store is not None
        feed = self.alerts.feed if self.alerts is not None else None  # live windows follow what it commits
        ingester = Ingester(self.store, self.home, clock=self.clock, on_batch=feed)
        while not self._stop_ingest.is_set():
            self._alerts_after(self.ingest_once(ingester))
            self._stop_ingest.wait(self.settings.poll_interval)
        self._alerts_after(self.ingest_once(ingester))  # what was written up to the stop request

    def _alerts_after(self, report: IngestReport | None) -> None:
        """Hand an ingest pass over to the rules engine's thread."""
        if report is not None:
            with self._ended_lock:
                self._ended += report.finished + report.crashed
        self._alerts_due.set()

    def _alerts_loop(self) -> None:
        """Evaluate after each ingest pass; on stop, once more after the last one, then return."""
        while True:
            self._alerts_due.wait()
            self._alerts_due.clear()
            stopping = self._stop_alerts.is_set()
            self.evaluate_alerts()
            if stopping:
                return

    def ingest_once(self, ingester: Ingester) -> IngestReport | None:
        """One ingest pass, logged as events; failures are logged once per outage."""
        try:
            report = ingester.poll_once()
        except Exception as exc:  # database down, disk error, or a bug: log, keep serving, retry
            if not self._ingest_failing:
                log_event(self.logger, "ingest_failed", logging.ERROR, error=_one_line(exc))
            self._ingest_failing = True
            return None
        if self._ingest_failing:
            log_event(self.logger, "ingest_recovered")
        self._ingest_failing = False
        if report.records or report.errors:
            log_event(self.logger, "ingested", logs=report.logs, records=report.records,
                      values=report.values, bytes=report.bytes, errors=report.errors)
        for run_id in report.finished:
            log_event(self.logger, "run_finished", run=run_id)
        for run_id in report.crashed:
            log_event(self.logger, "run_crashed", logging.WARNING, run=run_id)
        return report

    def evaluate_alerts(self) -> None:
        """One pass of the rules engine; failures are logged once per outage."""
        if self.alerts is None:
            return
        with self._ended_lock:
            ended, self._ended = self._ended, []
        try:
            self.alerts.evaluate(ended)
        except Exception as exc:  # the store went away, or a bug: log, keep ingesting, retry next pass
            with self._ended_lock:
                self._ended = ended + self._ended
            if not self._alerts_failing:
                log_event(self.logger, "alerts_failed", logging.ERROR, error=_one_line(exc))
            self._alerts_failing = True
            return
        if self._alerts_failing:
            log_event(self.logger, "alerts_recovered")
        self._alerts_failing = False

    def stop(self) -> None:
        """Finish ingesting what is written, push once more, close everything (idempotent)."""
        self._stop_ingest.set()
        if self._ingest_thread is not None:
            self._ingest_thread.join()
            self._ingest_thread = None
        if self._alerts_thread is not None:
            self._stop_alerts.set()
            self._alerts_due.set()
            self._alerts_thread.join()
            self._alerts_thread = None
        if self.alerts is not None:
            self.alerts.stop(ALERT_DRAIN_S)
        if self.pusher is not None:
            self.pusher.stop()
            self.pusher = None
        was_running = self.server is not None
        self._close()
        if was_running:
            log_event(self.logger, "stopped")

    def _close(self) -> None:
        if self.alerts is not None:
            self.alerts.stop(0.0)
            self.alerts = None
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.store is not None:
            self.store.close()
            self.store = None
        self.lock.release()


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
