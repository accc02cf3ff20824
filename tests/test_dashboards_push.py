"""`gradwatch dashboards push`: grafana-client against a strict stand-in of Grafana's HTTP API.

No Grafana server can be installed here, so tests/fixtures/grafana.py implements the endpoints
the push uses with the refusals Grafana's source defines (bad or missing token, empty title,
bad uid, unknown folder, ...), plus stricter checks of gradwatch's own contract (a uid on
every dashboard, the dashboard model's shape). The first tests show the stand-in refuses what
it must; the others run the real command (CliRunner, and once a subprocess) and check what
grafana-client sent, that pushing twice replaces rather than duplicates, and that the token
never reaches the output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from gradwatch.cli import main
from gradwatch.dashboards import DASHBOARDS
from tests.fixtures.grafana import GrafanaStandIn
from tests.fixtures.prometheus import free_port

TOKEN = "glsa_s3cr3tT0kenValue_0123456789abcdef"
VIEWER = "glsa_viewerOnlyToken_fedcba9876543210"

pytest.importorskip("grafana_client", reason="grafana-client is not installed (pip install 'gradwatch[grafana]')")


@pytest.fixture
def grafana() -> Iterator[GrafanaStandIn]:
    server = GrafanaStandIn(tokens={TOKEN: "Editor", VIEWER: "Viewer"}).start()
    try:
        yield server
    finally:
        server.stop()


def _push(grafana: GrafanaStandIn, *args: str, token: str | None = TOKEN, env: dict[str, str] | None = None) -> Result:
    environ = {"GRAFANA_TOKEN": token} if token is not None else {"GRAFANA_TOKEN": ""}
    return CliRunner().invoke(main, ["dashboards", "push", "--url", grafana.url, *args], env={**environ, **(env or {})})


def _raw(grafana: GrafanaStandIn, method: str, path: str, body: Any, token: str | None = TOKEN,
         content_type: str = "application/json") -> tuple[int, dict[str, Any]]:
    """A request as any client could send it, bypassing grafana-client."""
    headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {token}"} if token else {})}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(grafana.url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _dashboard(**changes: Any) -> dict[str, Any]:
    return {**DASHBOARDS["gradwatch-overview"]().to_json(), **changes}


# --------------------------------------------------------------------------- the stand-in is strict
@pytest.mark.parametrize(("body", "token", "status", "message"), [
    pytest.param({"dashboard": _dashboard()}, None, 401, "Unauthorized", id="no-token"),
    pytest.param({"dashboard": _dashboard()}, "glsa_wrong", 401, "Invalid API key", id="bad-token"),
    pytest.param({"dashboard": _dashboard()}, VIEWER, 403, "Access denied", id="viewer-token"),
    pytest.param(_dashboard(), TOKEN, 400, "bad request data", id="bare-dashboard-without-envelope"),
    pytest.param({"dashboard": _dashboard(title="  ")}, TOKEN, 400, "Dashboard title cannot be empty",
                 id="blank-title"),
    pytest.param({"dashboard": {k: v for k, v in _dashboard().items() if k != "title"}}, TOKEN, 400,
                 "Dashboard title cannot be empty", id="no-title"),
    pytest.param({"dashboard": _dashboard(uid="a b")}, TOKEN, 400, "uid contains illegal characters", id="bad-uid"),
    pytest.param({"dashboard": _dashboard(uid="x" * 41)}, TOKEN, 400, "uid too long, max 40 characters", id="long-uid"),
    pytest.param({"dashboard": _dashboard(uid="")}, TOKEN, 400, "stand-in: a dashboard must carry its uid",
                 id="no-uid"),
    pytest.param({"dashboard": _dashboard(), "folderUid": "nope"}, TOKEN, 400, "folder not found", id="no-folder"),
    pytest.param({"dashboard": _dashboard(id=7)}, TOKEN, 404, "Dashboard not found", id="unknown-id"),
    pytest.param({"dashboard": _dashboard(panels={"a": 1})}, TOKEN, 400, "stand-in: panels must be a list",
                 id="panels-not-a-list"),
    pytest.param({"dashboard": _dashboard(panels=[{"type": "stat", "gridPos": {"x": 20, "y": 0, "w": 8, "h": 2}}])},
                 TOKEN, 400, "stand-in: panel", id="panel-outside-the-grid"),
    pytest.param({"dashboard": _dashboard(schemaVersion="39")}, TOKEN, 400, "stand-in: schemaVersion", id="schema"),
])
def test_the_stand_in_refuses_what_grafana_refuses(grafana: GrafanaStandIn, body: Any, token: str | None,
                                                   status: int, message: str) -> None:
    got_status, got = _raw(grafana, "POST", "/api/dashboards/db", body, token=token)
    assert got_status == status and got["message"].startswith(message), got
    assert grafana.dashboards == {}


def test_the_stand_in_refuses_a_body_that_is_not_json(grafana: GrafanaStandIn) -> None:
    assert _raw(grafana, "POST", "/api/dashboards/db", b"{nope", content_type="application/json") == (
        400, {"message": "bad request data"})
    assert _raw(grafana, "POST", "/api/dashboards/db", {"dashboard": _dashboard()}, content_type="text/plain")[0] == 400


def test_the_stand_in_versions_and_refuses_stale_saves(grafana: GrafanaStandIn) -> None:
    assert _raw(grafana, "POST", "/api/dashboards/db", {"dashboard": _dashboard()})[1]["version"] == 1
    status, got = _raw(grafana, "POST", "/api/dashboards/db", {"dashboard": _dashboard(version=7)})
    assert (status, got["status"]) == (412, "version-mismatch")
    status, got = _raw(grafana, "POST", "/api/dashboards/db", {"dashboard": _dashboard(uid="other")})
    assert (status, got["status"]) == (412, "name-exists")  # the same title in the same folder
    saved = _raw(grafana, "POST", "/api/dashboards/db", {"dashboard": _dashboard(), "overwrite": True})
    assert saved[1]["version"] == 2


# --------------------------------------------------------------------------- the push
def test_push_creates_folder_and_dashboards_and_sends_what_grafana_expects(grafana: GrafanaStandIn) -> None:
    result = _push(grafana)
    assert result.exit_code == 0, result.output
    (folder,) = grafana.folders.values()
    assert folder["title"] == "gradwatch"
    assert set(grafana.dashboards) == set(DASHBOARDS)
    for stored in grafana.dashboards.values():
        assert stored["folderUid"] == folder["uid"] and stored["version"] == 1
    saves = [r for r in grafana.requests if r.path == "/api/dashboards/db"]
    assert len(saves) == 2
    for request in saves:
        uid = request.body["dashboard"]["uid"]
        assert request.body["dashboard"] == {**DASHBOARDS[uid]().to_json(), "id": None}  # the generated dashboard
        assert request.headers["Authorization"] == f"Bearer {TOKEN}"
        assert request.headers["Content-Type"].startswith("application/json")
        assert request.headers["User-Agent"].startswith("grafana-client/")
        assert request.body["overwrite"] is True and request.body["dashboard"]["id"] is None
        assert request.body["message"].startswith("gradwatch dashboards push (gradwatch ")
    assert grafana.datasources == {}  # only with --datasource
    assert result.output.splitlines() == [
        "folder 'gradwatch' (created)",
        *(f"{uid}  version 1  {grafana.url}/d/{uid}/{DASHBOARDS[uid]().title.lower().replace(' / ', '-')}"
          for uid in DASHBOARDS)]
    assert TOKEN not in result.output


def test_pushing_again_replaces_by_uid(grafana: GrafanaStandIn) -> None:
    for version in (1, 2, 3):
        result = _push(grafana, "--json")
        assert result.exit_code == 0, result.output
        data = json.loads(result.output)
        assert [d["version"] for d in data["dashboards"]] == [version, version]
        assert data["folder"]["created"] is (version == 1)
    assert len(grafana.folders) == 1 and set(grafana.dashboards) == set(DASHBOARDS)
    assert [r.method for r in grafana.requests if r.path == "/api/folders"] == ["GET", "POST", "GET", "GET"]


def test_push_provisions_the_datasource_and_makes_it_the_dashboards_default(grafana: GrafanaStandIn) -> None:
    first = _push(grafana, "--datasource", "http://prometheus.internal:9090", "--folder", "ML runs")
    assert first.exit_code == 0, first.output
    assert first.output.splitlines()[0] == ("data source Prometheus (gradwatch) (gradwatch-prometheus) created: "
                                            "http://prometheus.internal:9090")
    (source,) = grafana.datasources.values()
    assert {k: source[k] for k in ("uid", "name", "type", "access", "url")} == {
        "uid": "gradwatch-prometheus", "name": "Prometheus (gradwatch)", "type": "prometheus", "access": "proxy",
        "url": "http://prometheus.internal:9090"}
    for stored in grafana.dashboards.values():
        (variable,) = [v for v in stored["dashboard"]["templating"]["list"] if v["type"] == "datasource"]
        assert variable["current"] == {"selected": True, "text": "Prometheus (gradwatch)",
                                       "value": "gradwatch-prometheus"}
    second = _push(grafana, "--datasource", "http://prometheus.internal:9091", "--folder", "ML runs")
    assert second.exit_code == 0 and "updated: http://prometheus.internal:9091" in second.output
    assert len(grafana.datasources) == 1 and grafana.datasources["gradwatch-prometheus"]["url"].endswith(":9091")
    assert [f["title"] for f in grafana.folders.values()] == ["ML runs"]


def test_push_into_the_general_folder(grafana: GrafanaStandIn) -> None:
    result = _push(grafana, "--folder", "")
    assert result.exit_code == 0, result.output
    assert grafana.folders == {} and {d["folderUid"] for d in grafana.dashboards.values()} == {""}


def test_token_from_a_file(grafana: GrafanaStandIn, tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"{TOKEN}\n")
    result = _push(grafana, "--token-file", str(path), token="glsa_overridden_by_the_file")
    assert result.exit_code == 0, result.output


# --------------------------------------------------------------------------- errors: one line, no token
def _error(result: Result, code: int) -> str:
    assert result.exit_code == code, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("Error: ") and TOKEN not in result.output and "Traceback" not in result.output
    return line


def test_a_refused_token_is_a_runtime_error_and_never_printed(grafana: GrafanaStandIn) -> None:
    line = _error(_push(grafana, token=TOKEN[:-1] + "X"), 1)
    assert line == (f"Error: Grafana at {grafana.url} refused the token (401 Invalid API key): check GRAFANA_TOKEN "
                    "or --token-file")
    assert TOKEN[:-1] not in line


def test_a_viewer_token_is_told_it_needs_editor(grafana: GrafanaStandIn) -> None:
    line = _error(_push(grafana, token=VIEWER), 1)
    assert "denied the request (403 Access denied): the token needs the Editor role" in line and VIEWER not in line


def test_grafana_down_is_a_runtime_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = CliRunner().invoke(main, ["dashboards", "push", "--url", url, "--timeout", "5"],
                                env={"GRAFANA_TOKEN": TOKEN})
    assert _error(result, 1).startswith(f"Error: cannot reach Grafana at {url}: ")


@pytest.mark.parametrize(("args", "env", "message"), [
    pytest.param([], {"GRAFANA_TOKEN": ""}, "no Grafana token: set GRAFANA_TOKEN or give --token-file",
                 id="no-token"),
    pytest.param(["--url", "localhost:3000"], {}, "the Grafana URL must be an http:// or https:// URL", id="no-scheme"),
    pytest.param(["--url", "http://admin:hunter2@localhost:3000"], {}, "must not hold credentials", id="userinfo"),
    pytest.param(["--datasource", "prometheus:9090"], {}, "the data source URL must be an http:// or https:// URL",
                 id="datasource-url"),
    pytest.param([], {"GRAFANA_TOKEN": "two words"}, "the Grafana token must be printable ASCII", id="token-space"),
    pytest.param(["--timeout", "0"], {}, "Invalid value for '--timeout'", id="timeout"),
])
def test_bad_input_is_exit_2(grafana: GrafanaStandIn, args: list[str], env: dict[str, str], message: str) -> None:
    result = CliRunner().invoke(main, ["dashboards", "push", "--url", grafana.url, *args],
                                env={"GRAFANA_TOKEN": TOKEN, **env})
    assert result.exit_code == 2, result.output
    assert message in result.output and "hunter2" not in result.output and TOKEN not in result.output
    assert grafana.requests == []  # refused before anything was sent


@pytest.mark.parametrize(("content", "message"), [
    pytest.param(None, "cannot read the token file", id="missing"),
    pytest.param("\n\n", "is empty", id="empty"),
    pytest.param(b"\xff\xfe", "not UTF-8 text", id="binary"),
])
def test_bad_token_file_is_exit_2(grafana: GrafanaStandIn, tmp_path: Path, content: str | bytes | None,
                                  message: str) -> None:
    path = tmp_path / "token"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    line = _error(_push(grafana, "--token-file", str(path)), 2)
    assert message in line and grafana.requests == []


def test_without_grafana_client_it_says_what_to_install(grafana: GrafanaStandIn) -> None:
    code = ("import sys; sys.modules['grafana_client'] = None\n"  # as if the extra were not installed
            "from gradwatch.cli import main; main(['dashboards', 'push', '--url', sys.argv[1]])")
    proc = subprocess.run([sys.executable, "-c", code, grafana.url], capture_output=True, text=True,
                          env={**os.environ, "GRAFANA_TOKEN": TOKEN}, timeout=120)
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        "Error: gradwatch dashboards push needs grafana-client: pip install 'gradwatch[grafana]'"]
    assert grafana.requests == []


def test_the_command_in_a_subprocess_prints_one_line_and_nothing_else(grafana: GrafanaStandIn) -> None:
    """The real console entry point: no warnings of the HTTP stack, no traceback, no token."""
    proc = subprocess.run([sys.executable, "-m", "gradwatch.cli", "dashboards", "push", "--url", grafana.url],
                          capture_output=True, text=True, env={**os.environ, "GRAFANA_TOKEN": TOKEN + "x"}, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"Error: Grafana at {grafana.url} refused the token (401 Invalid API key): "
                                        "check GRAFANA_TOKEN or --token-file"]
    ok = subprocess.run([sys.executable, "-m", "gradwatch.cli", "dashboards", "push", "--url", grafana.url],
                        capture_output=True, text=True, env={**os.environ, "GRAFANA_TOKEN": TOKEN}, timeout=120)
    assert ok.returncode == 0 and ok.stderr == "" and TOKEN not in ok.stdout
