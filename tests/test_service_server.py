"""The /metrics HTTP server: paths, port errors, TLS and basic auth, on real sockets."""

from __future__ import annotations

import base64
import io
import json
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Gauge

from tests.fixtures.tls import tls_files  # noqa: F401 - fixture
from gradwatch.service.logs import setup_logging
from gradwatch.service.server import BasicAuth, MetricsServer, ServerError, tls_context


@pytest.fixture
def registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    Gauge("gradwatch_test_value", "A test value", registry=reg).set(42)
    return reg


@pytest.fixture
def serving(registry: CollectorRegistry) -> Iterator[MetricsServer]:
    server = MetricsServer(registry, "127.0.0.1", 0)
    server.start()
    yield server
    server.stop()


def _get(url: str, headers: dict[str, str] | None = None,
         context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_serves_the_registry_at_metrics(serving: MetricsServer) -> None:
    assert serving.port != 0 and serving.url == f"http://127.0.0.1:{serving.port}/metrics"
    status, body = _get(serving.url)
    assert status == 200 and b"gradwatch_test_value 42.0" in body
    base = serving.url.removesuffix("/metrics")
    assert _get(base + "/")[0] == 200
    assert _get(base + "/nope")[0] == 404


def test_port_taken_is_a_clear_error(serving: MetricsServer, registry: CollectorRegistry) -> None:
    other = MetricsServer(registry, "127.0.0.1", serving.port)
    with pytest.raises(ServerError, match=rf"^cannot listen on 127.0.0.1:{serving.port}: address already in use"):
        other.start()


def test_unknown_host_is_a_clear_error(registry: CollectorRegistry) -> None:
    with pytest.raises(ServerError, match=r"^cannot listen on no-such-host.invalid:0: "):
        MetricsServer(registry, "no-such-host.invalid", 0).start()


def test_stop_frees_the_port(registry: CollectorRegistry) -> None:
    first = MetricsServer(registry, "127.0.0.1", 0)
    first.start()
    port = first.port
    first.stop()
    first.stop()
    again = MetricsServer(registry, "127.0.0.1", port)
    again.start()
    again.stop()


@pytest.mark.parametrize("path", ["/healthz", "/-/healthy"])
def test_health_paths_answer_ok_even_behind_basic_auth(registry: CollectorRegistry, path: str) -> None:
    server = MetricsServer(registry, "127.0.0.1", 0, auth=BasicAuth("prom", "pw-xyz"))
    server.start()
    try:
        assert _get(server.url.removesuffix("/metrics") + path) == (200, b"ok\n")
        assert _get(server.url)[0] == 401  # the metrics stay behind auth
    finally:
        server.stop()


def test_basic_auth(registry: CollectorRegistry) -> None:
    stream = io.StringIO()
    logger = setup_logging("json", stream)
    server = MetricsServer(registry, "127.0.0.1", 0, auth=BasicAuth("prom", "pw-xyz"), logger=logger)
    server.start()
    try:
        status, _ = _get(server.url)
        assert status == 401
        wrong = base64.b64encode(b"prom:wrong").decode()
        assert _get(server.url, {"Authorization": f"Basic {wrong}"})[0] == 401
        right = base64.b64encode(b"prom:pw-xyz").decode()
        status, body = _get(server.url, {"Authorization": f"Basic {right}"})
        assert status == 200 and b"gradwatch_test_value" in body
    finally:
        server.stop()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["auth_failed", "auth_failed"]
    assert "pw-xyz" not in stream.getvalue() and "wrong" not in stream.getvalue()
    assert "pw-xyz" not in repr(BasicAuth("prom", "pw-xyz"))


def test_tls(registry: CollectorRegistry, tls_files: tuple[Path, Path]) -> None:  # noqa: F811
    cert, key = tls_files
    server = MetricsServer(registry, "127.0.0.1", 0, tls=tls_context(cert, key))
    server.start()
    try:
        assert server.url.startswith("https://")
        client = ssl.create_default_context(cafile=str(cert))
        status, body = _get(server.url, context=client)
        assert status == 200 and b"gradwatch_test_value 42.0" in body
        # A client that speaks plain HTTP, or connects and says nothing, does not stop the server.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as plain:
            plain.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            plain.recv(100)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10):
            assert _get(server.url, context=client)[0] == 200
    finally:
        server.stop()


def test_tls_with_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ServerError, match=r"cannot load TLS certificate: .*missing.pem: no such file"):
        tls_context(tmp_path / "missing.pem", tmp_path / "missing.key")


def test_tls_with_a_bad_certificate(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ServerError, match=r"^cannot load TLS certificate .*bad.pem"):
        tls_context(bad, bad)


def test_collector_failure_is_a_500_and_one_log_line() -> None:
    class Broken:
        def collect(self) -> list:
            raise RuntimeError("collector bug\nsecond line")

    registry = CollectorRegistry()
    registry.register(Broken())  # type: ignore[arg-type]
    stream = io.StringIO()
    server = MetricsServer(registry, "127.0.0.1", 0, logger=setup_logging("json", stream))
    server.start()
    try:
        status, body = _get(server.url)
    finally:
        server.stop()
    assert status == 500 and b"see the gradwatch serve log" in body
    (line,) = stream.getvalue().splitlines()
    assert json.loads(line)["event"] == "scrape_failed"
    assert json.loads(line)["error"] == "RuntimeError: collector bug\nsecond line"
