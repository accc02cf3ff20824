"""The `gradwatch serve` click command: parse options, run `Service` until SIGTERM/SIGINT."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import click

from gradwatch.cli._errors import BadInput
from gradwatch.service.logs import log_event, setup_logging
from gradwatch.service.runner import Service, ServiceError
from gradwatch.service.settings import PASSWORD_ENV, SettingsError, load_settings

_EXAMPLE = f"""
\b
Example:
    gradwatch serve --port 9464 --grace 600
    gradwatch serve --webhook https://hooks.example.com/gradwatch --alertmanager http://localhost:9093
    {PASSWORD_ENV}=s3cret gradwatch serve --host 0.0.0.0 \\
        --tls-cert cert.pem --tls-key key.pem --basic-auth-user prometheus
"""


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
               epilog=_EXAMPLE)
@click.option("--host", help="Address to listen on.  [default: 127.0.0.1]")
@click.option("--port", type=click.IntRange(0, 65535), help="Port of /metrics.  [default: 9464]")
@click.option("--db", "db", metavar="URL", help="Store URL (SQLAlchemy).  [default: sqlite:///HOME/gradwatch.db]")
@click.option("--home", type=click.Path(file_okay=False, path_type=Path),
              help="gradwatch home holding logs/.  [default: $GRADWATCH_HOME or ~/.gradwatch]")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML file with these settings (flags and GRADWATCH_* variables override it).")
@click.option("--poll-interval", type=float, help="Seconds between ingest passes.  [default: 0.5]")
@click.option("--grace", type=float, metavar="SECONDS",
              help="How long a finished run's series stay on /metrics.  [default: 300]")
@click.option("--per-param/--no-per-param", default=None, help="Also export per-param series.  [default: off]")
@click.option("--pushgateway", metavar="URL", help="Also push the metrics to this Prometheus Pushgateway.")
@click.option("--push-interval", type=float, metavar="SECONDS", help="Seconds between pushes.  [default: 15]")
@click.option("--push-job", help="Job label of pushed metrics.  [default: gradwatch]")
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), help="Serve HTTPS: certificate (PEM).")
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), help="Serve HTTPS: private key (PEM).")
@click.option("--basic-auth-user", help=f"Require basic auth; the password comes from ${PASSWORD_ENV} "
              "or --basic-auth-password-file.")
@click.option("--basic-auth-password-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File whose first line is the basic auth password.")
@click.option("--log-format", type=click.Choice(["json", "text"]), help="Log line format.  [default: text]")
@click.option("--alerts/--no-alerts", "alerts", default=None,
              help="Evaluate the diagnosis rules on live runs and raise alerts.  [default: on]")
@click.option("--webhook", "webhooks", metavar="URL", multiple=True,
              help="POST every alert that fires or resolves to this URL (repeatable; added to the config "
                   "file's [[alerts.webhooks]]). The URL is treated as a secret.")
@click.option("--webhook-format", type=click.Choice(["json", "slack"]),
              help="Body of the --webhook POSTs: gradwatch JSON or Slack-compatible.  [default: json]")
@click.option("--alertmanager", metavar="URL", help="Also post alerts to this Alertmanager (/api/v2/alerts).")
def serve(host: str | None, port: int | None, db: str | None, home: Path | None, config_file: Path | None,
          poll_interval: float | None, grace: float | None, per_param: bool | None, pushgateway: str | None,
          push_interval: float | None, push_job: str | None, tls_cert: Path | None, tls_key: Path | None,
          basic_auth_user: str | None, basic_auth_password_file: Path | None, log_format: str | None,
          alerts: bool | None, webhooks: tuple[str, ...], webhook_format: str | None,
          alertmanager: str | None) -> None:
    """Ingest run logs continuously, serve their latest values on /metrics for Prometheus, and
    evaluate the diagnosis rules on live runs: alerts go to the log, webhooks and Alertmanager.

    One line per event goes to stderr. Stops cleanly on SIGTERM or SIGINT, with everything
    written so far ingested. Only one server runs per store. Alert rules: docs/alerts.md.
    """
    hooks = [{"url": url, **({"format": webhook_format} if webhook_format else {})} for url in webhooks] or None
    flags: dict[str, Any] = {
        "host": host, "port": port, "db": db, "home": home, "poll_interval": poll_interval, "grace": grace,
        "per_param": per_param, "log_format": log_format,
        "pushgateway": {"url": pushgateway, "interval": push_interval, "job": push_job},
        "tls": {"cert": tls_cert, "key": tls_key},
        "basic_auth": {"user": basic_auth_user, "password_file": basic_auth_password_file},
        "alerts": {"enabled": alerts, "webhooks": hooks, "alertmanager": {"url": alertmanager}},
    }
    try:
        settings = load_settings(flags, config_file)
    except SettingsError as exc:
        raise BadInput(str(exc)) from None
    logger = setup_logging(settings.log_format)
    service = Service(settings, logger)
    try:
        service.start()
    except ServiceError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        _wait_for_signal(logger)
    finally:
        service.stop()


def _wait_for_signal(logger: Any) -> None:
    """Block until SIGTERM or SIGINT; the handlers only set an event (no work in a handler)."""
    stop = threading.Event()
    received: list[str] = []

    def handler(signum: int, _frame: Any) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if received:
        log_event(logger, "signal", signal=received[0])
