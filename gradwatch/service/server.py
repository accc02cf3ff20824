"""The HTTP endpoint: /metrics from a registry, with optional TLS and basic auth.

Built on prometheus_client's WSGI app (content negotiation, OpenMetrics, gzip) and the
standard library's threaded WSGI server. Two things are added around it: HTTP basic auth
(constant-time comparison, 401 with a challenge) and a TLS handshake done in the request's
own thread, so a client that connects and stalls cannot block the accept loop.
"""

from __future__ import annotations

import base64
import errno
import hmac
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app

from gradwatch.service.logs import log_event

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

REQUEST_TIMEOUT_S = 30.0
_INDEX = b"gradwatch: metrics at /metrics\n"
HEALTH_PATHS = ("/healthz", "/-/healthy")  # for systemd, compose and Kubernetes health checks, as Prometheus has


class ServerError(Exception):
    """The server cannot start; the message is one line."""


@dataclass(frozen=True)
class BasicAuth:
    """Credentials /metrics requires. The password is left out of repr()."""

    user: str
    password: str = field(repr=False)

    def check(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries these credentials (constant time)."""
        expected = "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        return header is not None and hmac.compare_digest(header.strip().encode(), expected.encode())


def metrics_app(registry: CollectorRegistry, auth: BasicAuth | None = None,
                logger: logging.Logger | None = None) -> WSGIApp:
    """WSGI app serving `registry` at /metrics, "ok" at /healthz and /-/healthy, a pointer at /,
    404 elsewhere; auth when given (not for the health paths)."""
    prometheus = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") in HEALTH_PATHS:  # no auth: it tells nothing but "up"
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if auth is not None and not auth.check(environ.get("HTTP_AUTHORIZATION")):
            if logger is not None:
                log_event(logger, "auth_failed", logging.WARNING,
                          client=environ.get("REMOTE_ADDR"), path=environ.get("PATH_INFO"))
            start_response("401 Unauthorized", [("Content-Type", "text/plain"),
                                                ("WWW-Authenticate", 'Basic realm="gradwatch"')])
            return [b"401 unauthorized\n"]
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            try:
                return prometheus(environ, start_response)
            except Exception as exc:  # a collector bug: one log line and a 500, never a traceback
                if logger is not None:
                    log_event(logger, "scrape_failed", logging.ERROR, error=f"{type(exc).__name__}: {exc}")
                start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
                return [b"500 internal server error: see the gradwatch serve log\n"]
        if path == "/":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [_INDEX]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"404 not found: metrics are at /metrics\n"]

    return app


class _Handler(WSGIRequestHandler):
    """Quiet request handler with a socket timeout (a stalled client frees its thread)."""

    timeout = REQUEST_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged: a scrape every few seconds would flood the log."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    ssl_context: ssl.SSLContext | None = None
    logger: logging.Logger | None = None

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        if self.ssl_context is not None:
            # Handshake lazily, on first read in the request thread, not in the accept loop.
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        if self.logger is not None:
            log_event(self.logger, "request_error", logging.WARNING, client=client_address[0])


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server TLS context (TLS 1.2+) from PEM files, or a one-line `ServerError`."""
    for path in (cert, key):
        if not Path(path).is_file():
            raise ServerError(f"cannot load TLS certificate: {path}: no such file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        raise ServerError(f"cannot load TLS certificate {cert} / key {key}: {reason}") from None
    return ctx


class MetricsServer:
    """Serves a registry over HTTP(S) in a background thread.

    `port=0` picks a free port (see `port` after `start()`). `start()` raises `ServerError`
    when the address is taken or cannot be bound; `stop()` closes the socket.
    """

    def __init__(self, registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 9464,
                 tls: ssl.SSLContext | None = None, auth: BasicAuth | None = None,
                 logger: logging.Logger | None = None) -> None:
        self.registry = registry
        self.host = host
        self.requested_port = port
        self.tls = tls
        self.auth = auth
        self.logger = logger
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind, listen and serve in a daemon thread."""
        family, addr = _family_for(self.host, self.requested_port)

        class Server(_Server):
            address_family = family

        Server.ssl_context = self.tls
        Server.logger = self.logger
        try:
            httpd = Server((addr, self.requested_port), _Handler)
        except OSError as exc:
            raise ServerError(_bind_message(self.host, self.requested_port, exc)) from None
        httpd.set_app(metrics_app(self.registry, self.auth, self.logger))
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="gradwatch-http", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        """The bound port (the real one when started with port 0)."""
        if self._httpd is None:
            return self.requested_port
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving and close the listening socket (idempotent)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join()


def _family_for(host: str, port: int) -> tuple[socket.AddressFamily, str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServerError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    return family, str(sockaddr[0])


def _bind_message(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (f"cannot listen on {host}:{port}: address already in use "
                "(another process holds the port; choose another with --port)")
    if exc.errno == errno.EACCES:
        return f"cannot listen on {host}:{port}: permission denied"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
