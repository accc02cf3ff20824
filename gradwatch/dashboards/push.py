"""Upload the dashboards to a Grafana server through its HTTP API, with `grafana-client`.

`push()` is idempotent: it finds (or creates) the folder by title, optionally creates or
updates the Prometheus data source under a fixed uid, and saves every dashboard by its uid
with ``overwrite: true``, so running it again replaces them (Grafana keeps the versions).
Authentication is a service-account token sent as ``Authorization: Bearer``; nothing here
prints or logs it, and error messages are built from Grafana's answers and the URL only.
`grafana-client` (the maintained fork of `grafana-api`) is an optional dependency
(``pip install gradwatch[grafana]``), imported when `push()` runs.
"""

from __future__ import annotations

import copy
import urllib.parse
from dataclasses import dataclass
from typing import Any

from gradwatch import __version__
from gradwatch.dashboards import DASHBOARDS
from gradwatch.redact import redact

__all__ = ["DATASOURCE_NAME", "DATASOURCE_UID", "PushError", "PushInputError", "PushReport", "push", "valid_token"]

DATASOURCE_UID = "gradwatch-prometheus"  # the same uid deploy/grafana/provisioning uses
DATASOURCE_NAME = "Prometheus (gradwatch)"


class PushInputError(ValueError):
    """The request cannot be sent as given (a bad URL or token); one line."""


class PushError(Exception):
    """Grafana could not be reached or refused the request, or grafana-client is not installed;
    one line, without the token."""


@dataclass(frozen=True)
class PushReport:
    """What a push did: the folder (uid, title, created), the data source (uid, url, created) or
    None, and each dashboard saved (uid, title, version, url)."""

    folder: dict[str, Any]
    datasource: dict[str, Any] | None
    dashboards: list[dict[str, Any]]


def http_url(url: str, what: str) -> str:
    """`url` without a trailing slash, if it is http(s) with a host and no credentials in it."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PushInputError(f"{what} must be an http:// or https:// URL with a host, got {redact(url)!r}")
    if parts.username is not None or parts.password is not None:
        raise PushInputError(f"{what} must not hold credentials ({redact(url)}): give the token in GRAFANA_TOKEN "
                             "or --token-file")
    return url.rstrip("/")


def valid_token(token: str) -> bool:
    """Whether `token` can travel in an HTTP header: printable ASCII without spaces."""
    return bool(token) and all(33 <= ord(c) < 127 for c in token)


def push(url: str, token: str, folder: str = "gradwatch", datasource: str | None = None,
         timeout: float = 10.0) -> PushReport:
    """Save every dashboard in `folder` (a title; "" is Grafana's General folder) of the Grafana
    at `url`; with `datasource` (a Prometheus URL), create or update the data source
    `DATASOURCE_UID` first and make it the dashboards' default. Raises `PushInputError` or
    `PushError` (one line each)."""
    base = http_url(url, "the Grafana URL")
    prometheus = http_url(datasource, "the data source URL") if datasource is not None else None
    if not valid_token(token):
        raise PushInputError("the Grafana token must be printable ASCII without spaces (a service account token)")
    try:
        from grafana_client import GrafanaApi
        from grafana_client.client import GrafanaException, TokenAuth
        from niquests.exceptions import RequestException
    except ImportError:
        raise PushError("gradwatch dashboards push needs grafana-client: pip install 'gradwatch[grafana]'") from None
    api = GrafanaApi.from_url(base, credential=TokenAuth(token), timeout=timeout)
    try:
        source = _datasource(api, prometheus, GrafanaException) if prometheus is not None else None
        where = _folder(api, folder)
        saved = [_save(api, uid, where["uid"], source is not None) for uid in DASHBOARDS]
    except GrafanaException as exc:
        raise PushError(_refused(base, exc)) from None
    except RequestException as exc:
        raise PushError(f"cannot reach Grafana at {base}: {_one_line(exc)}") from None
    return PushReport(where, source, [{**d, "url": urllib.parse.urljoin(base, d["url"])} for d in saved])


def _datasource(api: Any, url: str, not_found: type[Exception]) -> dict[str, Any]:
    """Create or update the Prometheus data source `DATASOURCE_UID` to point at `url`."""
    body = {"uid": DATASOURCE_UID, "name": DATASOURCE_NAME, "type": "prometheus", "access": "proxy", "url": url,
            "jsonData": {"timeInterval": "5s", "httpMethod": "POST"}}
    try:
        api.datasource.get_datasource_by_uid(DATASOURCE_UID)
    except not_found as exc:
        if getattr(exc, "status_code", None) != 404:
            raise
        api.datasource.create_datasource(body)
        return {"uid": DATASOURCE_UID, "name": DATASOURCE_NAME, "url": url, "created": True}
    api.datasource.update_datasource_by_uid(DATASOURCE_UID, body)
    return {"uid": DATASOURCE_UID, "name": DATASOURCE_NAME, "url": url, "created": False}


def _folder(api: Any, title: str) -> dict[str, Any]:
    """The folder titled `title`, created when missing ("": the General folder, uid "")."""
    if not title:
        return {"uid": "", "title": "General", "created": False}
    for existing in api.folder.get_all_folders():
        if existing.get("title") == title:
            return {"uid": existing["uid"], "title": title, "created": False}
    created = api.folder.create_folder(title)
    return {"uid": created["uid"], "title": title, "created": True}


def _save(api: Any, uid: str, folder_uid: str, own_datasource: bool) -> dict[str, Any]:
    """Save one dashboard over whatever has its uid."""
    dashboard = copy.deepcopy(DASHBOARDS[uid]().to_json())
    dashboard["id"] = None  # match by uid, never by a database id
    if own_datasource:
        for variable in dashboard["templating"]["list"]:
            if variable["type"] == "datasource":
                variable["current"] = {"selected": True, "text": DATASOURCE_NAME, "value": DATASOURCE_UID}
    answer = api.dashboard.update_dashboard({"dashboard": dashboard, "folderUid": folder_uid, "overwrite": True,
                                             "message": f"gradwatch dashboards push (gradwatch {__version__})"})
    return {"uid": answer["uid"], "title": dashboard["title"], "version": answer["version"], "url": answer["url"]}


def _refused(base: str, exc: Any) -> str:
    """One line for an HTTP error answer of Grafana."""
    status = getattr(exc, "status_code", 0)
    response = getattr(exc, "response", None)
    message = response.get("message") if isinstance(response, dict) else None
    detail = _one_line(message or getattr(exc, "message", "") or exc)
    if status == 401:
        return f"Grafana at {base} refused the token (401 {detail}): check GRAFANA_TOKEN or --token-file"
    if status == 403:
        return f"Grafana at {base} denied the request (403 {detail}): the token needs the Editor role"
    if status == 0:  # a timeout or a transport error the client wrapped
        return f"cannot reach Grafana at {base}: {detail}"
    return f"Grafana at {base} refused the request ({status} {detail})"


def _one_line(text: object, limit: int = 200) -> str:
    """`text` on one line, credentials masked, cut at `limit` characters (a proxy's HTML page)."""
    line = redact(" ".join(str(text).split())) or "no details"
    return line if len(line) <= limit else line[:limit - 1] + "…"
