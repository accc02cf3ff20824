"""Periodic push of the metrics to a Prometheus Pushgateway.

For clusters where Prometheus cannot reach the training nodes. Each push is a PUT of the
whole registry under ``job=<job>/instance=<host>``, so it replaces that group: series of
runs that left /metrics (after their grace period) leave the gateway on the next push.
Failures are logged when the state changes (first failure, recovery), never raised: the
service keeps ingesting while the gateway is down.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from prometheus_client import CollectorRegistry, push_to_gateway
from prometheus_client.exposition import basic_auth_handler, default_handler

from gradwatch.redact import redact
from gradwatch.service.logs import log_event

PUSH_TIMEOUT_S = 10.0


def redact_url(url: str) -> str:
    """The URL with its password and credential query values masked, safe for a log line."""
    return redact(url)


def gateway_and_handler(url: str) -> tuple[str, Callable[..., Any]]:
    """The gateway URL without its ``user:password@`` part, and the prometheus_client handler
    that sends those credentials as HTTP basic auth (the default handler when there are none)."""
    parts = urlsplit(url)
    if parts.username is None:
        return url, default_handler
    user, password = unquote(parts.username), unquote(parts.password or "")
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    bare = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    def handler(url: str, method: str, timeout: float | None, headers: list, data: bytes) -> Callable[[], None]:
        return basic_auth_handler(url, method, timeout, headers, data, user, password)

    return bare, handler


class Pusher:
    """Pushes `registry` to `url` every `interval` seconds in a background thread.

    `push_once()` pushes now and returns whether it worked; `stop()` ends the thread after
    one final push, so the gateway holds the state the service stopped with.
    """

    def __init__(self, url: str, registry: CollectorRegistry, interval: float = 15.0,
                 job: str = "gradwatch", instance: str | None = None,
                 logger: logging.Logger | None = None) -> None:
        self.url = url
        self._gateway, self._handler = gateway_and_handler(url)
        self.registry = registry
        self.interval = interval
        self.job = job
        self.grouping_key = {"instance": instance or socket.gethostname()}
        self.logger = logger
        self._ok: bool | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def push_once(self) -> bool:
        """Push the registry now; log state changes; True on success."""
        try:
            push_to_gateway(self._gateway, job=self.job, registry=self.registry,
                            grouping_key=self.grouping_key, timeout=PUSH_TIMEOUT_S, handler=self._handler)
        except Exception as exc:  # any network/HTTP failure: keep serving, log once per outage
            if self._ok is not False and self.logger is not None:
                log_event(self.logger, "push_failed", logging.WARNING, gateway=redact_url(self.url),
                          error=redact(f"{type(exc).__name__}: {exc}"))
            self._ok = False
            return False
        if self._ok is not True and self.logger is not None:
            log_event(self.logger, "push_ok", gateway=redact_url(self.url), job=self.job,
                      **self.grouping_key)
        self._ok = True
        return True

    def start(self) -> None:
        """Push now, then every `interval` seconds."""
        self._thread = threading.Thread(target=self._run, name="gradwatch-push", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.push_once()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        """Stop the thread and push one last time."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.push_once()
