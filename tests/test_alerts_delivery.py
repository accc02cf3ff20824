"""Delivery to real HTTP receivers on 127.0.0.1: bodies, retries with backoff after failures, a
receiver that is down or slow, a full queue, and URLs (tokens, credentials) kept out of logs."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging

from gradwatch.alerts.config import AlertmanagerConfig, WebhookConfig
from gradwatch.alerts.delivery import Message, Outbox, post_json, split_credentials, url_label
from gradwatch.alerts.lifecycle import Lifecycle
from gradwatch.alerts.message import Notification
from gradwatch.alerts.notifiers import AlertmanagerNotifier, WebhookNotifier
from gradwatch.diagnose import Evidence, Finding
from gradwatch.service.logs import JsonFormatter
from tests.fixtures.prometheus import free_port
from tests.fixtures.receiver import receiver_factory  # noqa: F401 - fixture


def _logger() -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(f"test-delivery-{id(out)}")
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    return logger, out


def _events(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def _alert(rule: str = "nonfinite_loss", severity: str = "error"):
    f = Finding(rule, severity, "Non-finite loss (NaN/Inf)", Evidence(("loss NaN on 7 steps: 53-59",),
                {"value": 7.0}, (), (53,)), ("a bad batch",), ("check the batches",))
    (t,) = Lifecycle(lambda r: (0, 0.0)).observe("r1", "nan-run", [f], step=59, now=1000.0)
    return t.alert


def test_webhook_posts_one_json_body_per_notification(receiver_factory) -> None:  # noqa: F811
    rec = receiver_factory()
    notifier = WebhookNotifier(WebhookConfig(url=rec.url + "/hook?token=T0K3N"), 1)
    notifier.start()
    notifier.notify(Notification("firing", _alert()))
    notifier.stop(10.0)
    (post,) = rec.posts
    assert post.path == "/hook?token=T0K3N" and post.headers["Content-Type"] == "application/json"
    assert post.body["status"] == "firing" and post.body["alert"]["rule"] == "nonfinite_loss"
    assert post.body["alert"]["command"] == "gradwatch diagnose nan-run"
    assert notifier.label == f"webhook #1 {rec.url}" and "T0K3N" not in notifier.label


def test_slack_body(receiver_factory) -> None:  # noqa: F811
    rec = receiver_factory()
    notifier = WebhookNotifier(WebhookConfig(url=rec.url, format="slack", name="team"), 1)
    notifier.start()
    notifier.notify(Notification("firing", _alert()))
    notifier.stop(10.0)
    (post,) = rec.posts
    assert list(post.body) == ["text"] and post.body["text"].startswith("*[ERROR] Non-finite loss")
    assert notifier.label == "webhook team"


def test_retries_with_backoff_until_the_receiver_answers(receiver_factory) -> None:  # noqa: F811
    rec = receiver_factory(fail_first=2)
    logger, out = _logger()
    box = Outbox(rec.url, "r", timeout=5.0, retries=3, backoff=0.05, logger=logger)
    box.start()
    box.put(Message({"n": 1}, {"rule": "x"}))
    box.stop(10.0)
    assert rec.attempts == 3 and [p.body for p in rec.posts] == [{"n": 1}]
    assert box.delivered == 1 and box.failed == 0
    (delivered,) = [e for e in _events(out) if e["event"] == "alert_delivered"]
    assert delivered["attempts"] == 3 and delivered["receiver"] == "r"


def test_a_receiver_that_is_down_costs_nothing_but_its_messages(receiver_factory) -> None:  # noqa: F811
    logger, out = _logger()
    down = f"http://user:PaSsW0rd@127.0.0.1:{free_port()}/hook/T0K3N"
    box = Outbox(down, url_label(down), timeout=1.0, retries=1, backoff=0.01, logger=logger)
    box.start()
    box.put(Message({"n": 1}, {"rule": "x", "run": "r1"}))
    box.stop(10.0)
    assert box.failed == 1
    (failed,) = [e for e in _events(out) if e["event"] == "alert_delivery_failed"]
    assert failed["attempts"] == 2 and failed["error"].startswith("cannot connect: ") and failed["run"] == "r1"
    log = out.getvalue()
    assert "T0K3N" not in log and "PaSsW0rd" not in log and "user" not in log


def test_a_slow_receiver_times_out_and_is_retried(receiver_factory) -> None:  # noqa: F811
    rec = receiver_factory(delay=1.5)
    logger, out = _logger()
    box = Outbox(rec.url, "slow", timeout=0.5, retries=1, backoff=0.01, logger=logger)
    box.start()
    box.put(Message({"n": 1}, {}))
    box.stop(10.0)
    assert box.failed == 1
    assert [e["error"] for e in _events(out) if e["event"] == "alert_delivery_failed"] == ["no answer within 0.5 s"]


def test_a_full_queue_drops_the_oldest_and_says_so() -> None:
    logger, out = _logger()
    box = Outbox(f"http://127.0.0.1:{free_port()}", "down", timeout=0.2, retries=0, queue_size=2, logger=logger)
    for n in range(5):  # not started: nothing leaves the queue
        box.put(Message({"n": n}, {}))
    assert box.dropped == 3 and box.pending() == 2
    assert [e["event"] for e in _events(out)] == ["alert_queue_full"]
    box.stop(0.0)


def test_credentials_in_a_url_become_a_basic_auth_header(receiver_factory) -> None:  # noqa: F811
    rec = receiver_factory()
    url, headers = split_credentials(rec.url.replace("http://", "http://am%40x:pa%3Ass@") + "/api/v2/alerts")
    assert url == rec.url + "/api/v2/alerts"
    post_json(url, [{"a": 1}], 5.0, headers)
    assert rec.posts[0].headers["Authorization"] == "Basic " + base64.b64encode(b"am@x:pa:ss").decode()


def test_alertmanager_gets_each_transition_and_regular_resends(receiver_factory) -> None:  # noqa: F811
    rec = receiver_factory()
    now = [1000.0]
    am = AlertmanagerNotifier(AlertmanagerConfig(url=rec.url, resend_interval=60), clock=lambda: now[0])
    am.start()
    alert = _alert()
    am.notify(Notification("firing", alert))
    am.tick([alert], now[0])  # the first tick re-sends at once: harmless, Alertmanager deduplicates
    now[0] += 30
    am.tick([alert], now[0])  # too soon
    now[0] += 31
    am.tick([alert], now[0])
    resolved = dataclasses.replace(alert, state="resolved", ended_at=now[0])
    am.notify(Notification("resolved", resolved))
    am.stop(10.0)
    assert [p.path for p in rec.posts] == ["/api/v2/alerts"] * 4
    first, _, resend, last = (p.body for p in rec.posts)
    assert first[0]["labels"]["alertname"] == "GradwatchNonfiniteLoss"
    assert first[0]["endsAt"] == "1970-01-01T00:20:40.000Z"  # 4 resend intervals ahead
    assert resend[0]["endsAt"] == "1970-01-01T00:21:41.000Z"  # 4 resend intervals ahead
    assert last[0]["endsAt"] == "1970-01-01T00:17:41.000Z" and last[0]["labels"] == first[0]["labels"]
