"""`gradwatch dashboards generate|push`: regenerate the Grafana JSON, upload it to Grafana.

Thin shells over `gradwatch.dashboards` (the builder and the files) and
`gradwatch.dashboards.push` (the upload through grafana-client).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from gradwatch.cli import _format as fmt
from gradwatch.cli._errors import BadInput, CliError
from gradwatch.cli._options import CONTEXT, json_option

TOKEN_ENV = "GRAFANA_TOKEN"
URL_ENV = "GRAFANA_URL"


@click.group(context_settings=CONTEXT, epilog="""\b
Example:
    gradwatch dashboards generate --check
    GRAFANA_TOKEN=glsa_... gradwatch dashboards push --url https://grafana.example.com""")
def dashboards() -> None:
    """Generate gradwatch's Grafana dashboards from code, or upload them to a Grafana server."""


@dashboards.command(context_settings=CONTEXT, epilog="""\b
Example:
    gradwatch dashboards generate                 # rewrites dashboards/*.json
    gradwatch dashboards generate --check         # exit 1 if they are out of date""")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("dashboards"),
              show_default=True, help="Folder to write <uid>.json into (the repository's dashboards/).")
@click.option("--check", is_flag=True, help="Write nothing; exit 1 when a file differs from the code.")
def generate(out_dir: Path, check: bool) -> None:
    """Write the dashboards' JSON from their code.

    The code is in gradwatch/dashboards/; the JSON files are generated, never edited.
    """
    from gradwatch.dashboards import check as stale_files
    from gradwatch.dashboards import write

    if check:
        stale = stale_files(out_dir)
        if stale:
            raise CliError(f"out of date in {out_dir}: {', '.join(stale)} (run gradwatch dashboards generate)")
        click.echo(f"{out_dir}: up to date")
        return
    for path in write(out_dir):
        click.echo(f"wrote {path}")


@dashboards.command(context_settings=CONTEXT, epilog=f"""\b
Example:
    export {TOKEN_ENV}=glsa_...     # a service account token with the Editor role
    gradwatch dashboards push --url http://localhost:3000
    gradwatch dashboards push --url https://grafana.example.com --folder "ML runs" \\
        --token-file ~/.grafana-token --datasource http://prometheus:9090""")
@click.option("--url", envvar=URL_ENV, default="http://localhost:3000", show_default=True,
              help=f"Grafana's base URL (also ${URL_ENV}).")
@click.option("--folder", default="gradwatch", show_default=True,
              help='Folder title to save the dashboards in, created when missing ("" for General).')
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
              help=f"File whose first line is the Grafana token (else ${TOKEN_ENV}).")
@click.option("--datasource", metavar="URL",
              help="Also create or update the Prometheus data source 'Prometheus (gradwatch)' at this URL and "
                   "make it the dashboards' default.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Seconds to wait for each answer of Grafana.")
@json_option
def push(url: str, folder: str, token_file: Path | None, datasource: str | None, timeout: float,
         as_json: bool) -> None:
    """Upload the dashboards to Grafana (safe to repeat).

    Dashboards with the same uid are replaced (Grafana keeps their versions). The token (a
    service account token, Editor role) comes from --token-file or $GRAFANA_TOKEN and is
    never printed.
    """
    from gradwatch.dashboards.push import PushError, PushInputError
    from gradwatch.dashboards.push import push as push_dashboards

    try:
        report = push_dashboards(url, _token(token_file), folder=folder, datasource=datasource, timeout=timeout)
    except PushInputError as exc:
        raise BadInput(str(exc)) from None
    except PushError as exc:
        raise CliError(str(exc)) from None
    data = {"folder": report.folder, "datasource": report.datasource, "dashboards": report.dashboards}
    fmt.emit(data, as_json, _render)


def _token(path: Path | None) -> str:
    """The token from the file's first line, else from the environment (bad input when absent)."""
    if path is None:
        token = os.environ.get(TOKEN_ENV, "").strip()
        if not token:
            raise BadInput(f"no Grafana token: set {TOKEN_ENV} or give --token-file (a service account token)")
        return token
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise BadInput(f"cannot read the token file {path}: {reason}") from None
    token = text.splitlines()[0].strip() if text.strip() else ""
    if not token:
        raise BadInput(f"the token file {path} is empty")
    return token


def _render(data: dict[str, Any]) -> str:
    lines = []
    source = data["datasource"]
    if source is not None:
        lines.append(f"data source {source['name']} ({source['uid']}) {'created' if source['created'] else 'updated'}:"
                     f" {source['url']}")
    folder = data["folder"]
    lines.append(f"folder {folder['title']!r}{' (created)' if folder['created'] else ''}")
    lines += [f"{d['uid']}  version {d['version']}  {d['url']}" for d in data["dashboards"]]
    return "\n".join(lines)
