"""Delivery that never blocks ingestion: one bounded queue and one thread per receiver.

`Outbox.put()` returns at once; its thread POSTs each message in order, with a timeout per
attempt and retries after exponentially growing waits. When a receiver stays down the queue
fills and the oldest messages are dropped (counted and logged), so memory stays bounded. A
receiver is named in logs by a label that never holds its URL: webhook URLs carry tokens.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from gradwatch.service.logs import log_event

MAX_BACKOFF_S = 60.0
USER_AGENT = "gradwatch-alerts"


class DeliveryError(Exception):
    """A POST failed; the message is one line and never holds the URL."""


def url_label(url: str) -> str:
    """'scheme://host:port' of a URL: what logs may show of it (no user, path, query or token)."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port is not None else "")


def split_credentials(url: str) -> tuple[str, dict[str, str]]:
    """The URL without its `user:password@` part, and the basic auth header that part stood for."""
    parts = urlsplit(url)
    if parts.username is None:
        return url, {}
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = host + (f":{parts.port}" if parts.port is not None else "")
    token = base64.b64encode(f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()).decode()
    bare = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return bare, {"Authorization": f"Basic {token}"}


def post_json(url: str, body: Any, timeout: float, headers: dict[str, str] | None = None) -> None:
    """POST `body` as JSON; DeliveryError unless the receiver answers 2xx within `timeout` seconds."""
    data = json.dumps(body, allow_nan=False).encode()
    request = urllib.request.Request(url, data=data, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": USER_AGENT, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        raise DeliveryError(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise DeliveryError(f"cannot connect: {_reason(exc.reason)}") from None
    except TimeoutError:
        raise DeliveryError(f"no answer within {timeout:g} s") from None
    except OSError as exc:
        raise DeliveryError(_reason(exc)) from None


def _reason(reason: object) -> str:
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason).splitlines()[0] if str(reason) else type(reason).__name__


@dataclass(frozen=True)
class Message:
    """One POST: its body, and what the log says about it (rule and run, never the body); a
    `quiet` one (a periodic re-send) is logged only when it cannot be delivered."""

    body: Any
    about: dict[str, Any]
    quiet: bool = False


class Outbox:
    """Delivers messages to one receiver from a bounded queue in a background thread.

    `url` is where to POST (credentials in it become a basic auth header); `label` names the
    receiver in logs; `retries` more attempts follow a failed one after `backoff`, 2 x
    `backoff`, ... seconds (at most MAX_BACKOFF_S).
    """

    def __init__(self, url: str, label: str, timeout: float = 5.0, retries: int = 3, backoff: float = 1.0,
                 queue_size: int = 1000, logger: logging.Logger | None = None) -> None:
        self.url, self.headers = split_credentials(url)
        self.label = label
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.logger = logger
        self.delivered = 0
        self.failed = 0
        self.dropped = 0
        self._queue: deque[Message] = deque()
        self._size = queue_size
        self._cond = threading.Condition()
        self._stop = False
        self._deadline: float | None = None
        self._busy = False
        self._failing = False
        self._dropped_in_outage = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"gradwatch-notify-{self.label}", daemon=True)
        self._thread.start()

    def put(self, message: Message) -> None:
        """Queue a message (never blocks); the oldest is dropped when the queue is full."""
        with self._cond:
            if len(self._queue) >= self._size:
                self._queue.popleft()
                self.dropped += 1
                self._dropped_in_outage += 1
                if self._dropped_in_outage == 1:
                    self._log("alert_queue_full", logging.WARNING, queue_size=self._size)
            self._queue.append(message)
            self._cond.notify()

    def pending(self) -> int:
        """Messages queued or being sent."""
        with self._cond:
            return len(self._queue) + int(self._busy)

    def stop(self, timeout: float = 5.0) -> None:
        """Deliver what is queued for at most `timeout` seconds, then stop; the rest is dropped."""
        with self._cond:
            self._deadline = time.monotonic() + timeout
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout + self.timeout + 1.0)
            self._thread = None
        with self._cond:
            left = len(self._queue)
            self._queue.clear()
        if left:
            self.dropped += left
            self._log("alert_undelivered", logging.WARNING, messages=left)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if not self._queue or self._past_deadline():
                    return
                message = self._queue.popleft()
                self._busy = True
            try:
                self._deliver(message)
            finally:
                with self._cond:
                    self._busy = False

    def _past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _deliver(self, message: Message) -> None:
        error, attempts = "", 0
        while attempts <= self.retries:
            attempts += 1
            try:
                post_json(self.url, message.body, self.timeout, self.headers)
            except DeliveryError as exc:
                error = str(exc)
                if attempts > self.retries or not self._sleep(min(self.backoff * 2 ** (attempts - 1), MAX_BACKOFF_S)):
                    break
                continue
            self.delivered += 1
            if not message.quiet:
                self._log("alert_delivered", attempts=attempts, **message.about)
            if self._failing:
                self._log("alert_delivery_recovered", dropped=self._dropped_in_outage)
            self._failing, self._dropped_in_outage = False, 0
            return
        self.failed += 1
        self._failing = True
        self._log("alert_delivery_failed", logging.WARNING, attempts=attempts, error=error, **message.about)

    def _sleep(self, seconds: float) -> bool:
        """Wait before a retry; False when the service is stopping and the wait would pass its deadline."""
        end = time.monotonic() + seconds
        with self._cond:
            while True:
                if self._deadline is not None and end > self._deadline:
                    return False
                left = end - time.monotonic()
                if left <= 0:
                    return True
                self._cond.wait(left)

    def _log(self, event: str, level: int = logging.INFO, **fields: Any) -> None:
        if self.logger is not None:
            log_event(self.logger, event, level, receiver=self.label, **fields)
