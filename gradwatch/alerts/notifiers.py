"""Receivers of alerts: webhooks (JSON or Slack-compatible) and Alertmanager's `/api/v2/alerts`.

Each turns a `Notification` into the receiver's body and hands it to its own `Outbox`, so a
slow or unreachable receiver delays nobody else. `tick()` runs after every evaluation pass:
Alertmanager needs the firing alerts re-sent regularly (it resolves an alert whose `endsAt`
passed), which it deduplicates, so this never notifies twice.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Protocol

from gradwatch.alerts.config import AlertmanagerConfig, AlertsConfig, WebhookConfig
from gradwatch.alerts.delivery import Message, Outbox, url_label
from gradwatch.alerts.lifecycle import Alert
from gradwatch.alerts.message import Notification, alertmanager_alert, payload, slack

ALERTMANAGER_PATH = "/api/v2/alerts"
#: A firing alert sent to Alertmanager stays firing this many resend intervals without a re-send.
ENDS_AFTER_RESENDS = 4


class Notifier(Protocol):
    """What the engine delivers through."""

    label: str

    def start(self) -> None: ...

    def notify(self, n: Notification) -> None: ...

    def tick(self, firing: list[Alert], now: float) -> None: ...

    def stop(self, timeout: float) -> None: ...


def _about(n: Notification) -> dict[str, object]:
    return {"status": n.status, "rule": n.alert.rule, "run": n.alert.run_id}


class WebhookNotifier:
    """POSTs one JSON body per alert that fires, escalates or resolves."""

    def __init__(self, config: WebhookConfig, index: int, queue_size: int = 1000,
                 logger: logging.Logger | None = None) -> None:
        url = config.url.get_secret_value()
        self.label = f"webhook {config.name}" if config.name else f"webhook #{index} {url_label(url)}"
        self.format = config.format
        self.outbox = Outbox(url, self.label, config.timeout, config.retries, config.backoff, queue_size, logger)

    def start(self) -> None:
        self.outbox.start()

    def notify(self, n: Notification) -> None:
        self.outbox.put(Message(slack(n) if self.format == "slack" else payload(n), _about(n)))

    def tick(self, firing: list[Alert], now: float) -> None:
        """Webhooks are told once per transition: nothing to re-send."""

    def stop(self, timeout: float) -> None:
        self.outbox.stop(timeout)


class AlertmanagerNotifier:
    """Posts alerts to Alertmanager: each transition at once, the firing ones again every
    `resend_interval` seconds with `endsAt` a few intervals ahead; resolved ones with `endsAt`
    set to when they ended."""

    def __init__(self, config: AlertmanagerConfig, queue_size: int = 1000,
                 logger: logging.Logger | None = None, clock: Callable[[], float] = time.time) -> None:
        if config.url is None:
            raise ValueError("an Alertmanager notifier needs the Alertmanager's URL")
        url = config.url.get_secret_value().rstrip("/")
        if not url.endswith(ALERTMANAGER_PATH):
            url += ALERTMANAGER_PATH
        self.label = f"alertmanager {url_label(url)}"
        self.resend_interval = config.resend_interval
        self.outbox = Outbox(url, self.label, config.timeout, config.retries, config.backoff, queue_size, logger)
        self.clock = clock
        self._last_sent: float | None = None

    def start(self) -> None:
        self.outbox.start()

    def _ends(self, now: float) -> float:
        return now + ENDS_AFTER_RESENDS * self.resend_interval

    def notify(self, n: Notification) -> None:
        a = n.alert
        now = self.clock()
        body = [alertmanager_alert(a, a.ended_at if n.status == "resolved" else self._ends(now))]
        if n.escalated_from is not None:  # the labels changed with the severity: end the old alert
            body.insert(0, alertmanager_alert(dataclasses.replace(a, severity=n.escalated_from), now))
        self.outbox.put(Message(body, _about(n)))

    def tick(self, firing: list[Alert], now: float) -> None:
        """Re-send every firing alert once `resend_interval` has passed since the last re-send."""
        if self._last_sent is not None and now - self._last_sent < self.resend_interval:
            return
        self._last_sent = now
        if firing:
            self.outbox.put(Message([alertmanager_alert(a, self._ends(now)) for a in firing],
                                    {"status": "firing", "alerts": len(firing)}, quiet=True))

    def stop(self, timeout: float) -> None:
        self.outbox.stop(timeout)


def build_notifiers(config: AlertsConfig, logger: logging.Logger | None = None,
                    clock: Callable[[], float] = time.time) -> list[Notifier]:
    """A notifier per configured webhook, and one for Alertmanager when its URL is set."""
    out: list[Notifier] = [WebhookNotifier(w, i, config.queue_size, logger) for i, w in enumerate(config.webhooks, 1)]
    if config.alertmanager.url is not None:
        out.append(AlertmanagerNotifier(config.alertmanager, config.queue_size, logger, clock))
    return out
