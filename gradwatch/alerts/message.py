"""What a notification says, in each format: a log line, a JSON body, a Slack-compatible body and
an Alertmanager alert. Every one names the run (name and id), the layer, the step, the value
and threshold, the cause, the first remedy and the command to look further."""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from gradwatch.alerts.lifecycle import Alert

#: gradwatch severity -> Alertmanager's conventional `severity` label (deploy/alertmanager routes on it).
ALERTMANAGER_SEVERITY = {"error": "critical", "warning": "warning", "info": "info"}
PAYLOAD_VERSION = 1


@dataclass(frozen=True)
class Notification:
    """One alert that fired (`status` "firing") or resolved, as the receivers are told."""

    status: str  # firing | resolved
    alert: Alert
    escalated_from: str | None = None  # the alert fired before with this lower severity


def number(x: float | None) -> str:
    """A value as '3.2e+05', '0.75', 'nan', 'inf'; '-' when there is none."""
    if x is None:
        return "-"
    if not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return f"{x:.3g}"


def command(alert: Alert) -> str:
    """The command that shows everything about the alert's run."""
    return f"gradwatch diagnose {shlex.quote(alert.run_name or alert.run_id)}"


def where(alert: Alert) -> str:
    """'run NAME (ID), layer L, step S'."""
    parts = [f"run {alert.run_name} ({alert.run_id})"]
    if alert.layer:
        parts.append(f"layer {alert.layer}")
    if alert.step is not None:
        parts.append(f"step {alert.step}")
    return ", ".join(parts)


def measured(alert: Alert) -> str:
    """'value 0.93 (threshold 0.5)', or '' when the rule gives no number."""
    if alert.value is None:
        return ""
    limit = f" (threshold {number(alert.threshold)})" if alert.threshold is not None else ""
    return f"value {number(alert.value)}{limit}"


def headline(n: Notification) -> str:
    """'[ERROR] Non-finite loss (NaN/Inf): run r (id), step 53' or 'RESOLVED ...'."""
    a = n.alert
    tag = "RESOLVED" if n.status == "resolved" else f"{a.severity.upper()}"
    return f"[{tag}] {a.title}: {where(a)}"


def text(n: Notification) -> str:
    """The whole notification as plain text, one fact per line."""
    a = n.alert
    lines = [headline(n)]
    if n.escalated_from:
        lines.append(f"severity raised from {n.escalated_from}")
    if a.value is not None:
        lines.append(measured(a))
    if n.status == "firing":
        lines += list(a.summary[:3])
        if a.cause:
            lines.append(f"likely cause: {a.cause}")
        if a.remedy:
            lines.append(f"remedy: {a.remedy}")
    lines.append(f"look further: {command(a)}")
    return "\n".join(lines)


def _iso(t: float | None) -> str | None:
    """RFC 3339 UTC with milliseconds, as Alertmanager's API takes it."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json_number(x: float | None) -> float | str | None:
    """JSON has no NaN/Inf: those travel as the strings 'nan', 'inf', '-inf' (as in `--json`)."""
    return x if x is None or math.isfinite(x) else number(x)


def payload(n: Notification) -> dict[str, Any]:
    """The JSON body of a webhook POST (stable keys, docs/alerts.md)."""
    a = n.alert
    return {
        "version": PAYLOAD_VERSION, "status": n.status,
        "alert": {
            "id": a.id, "rule": a.rule, "severity": a.severity, "title": a.title,
            "run": {"id": a.run_id, "name": a.run_name}, "layer": a.layer or None, "step": a.step,
            "value": _json_number(a.value), "threshold": _json_number(a.threshold),
            "cause": a.cause, "remedy": a.remedy, "summary": list(a.summary),
            "started_at": _iso(a.started_at), "ended_at": _iso(a.ended_at),
            "escalated_from": n.escalated_from, "command": command(a),
        },
        "text": text(n),
    }


def slack(n: Notification) -> dict[str, Any]:
    """A Slack-compatible body (`text` in mrkdwn), understood by Slack, Mattermost and others."""
    lines = text(n).splitlines()
    body = [f"*{lines[0]}*"] + [line.replace("look further: ", "look further: `") + "`"
                                if line.startswith("look further: ") else line for line in lines[1:]]
    return {"text": "\n".join(body)}


def alertname(rule: str) -> str:
    """The Alertmanager `alertname` of a rule: 'nonfinite_loss' -> 'GradwatchNonfiniteLoss'."""
    return "Gradwatch" + "".join(p.capitalize() for p in re.split(r"[^A-Za-z0-9]+", rule) if p)


def alertmanager_labels(a: Alert) -> dict[str, str]:
    """The labels that identify an alert in Alertmanager (stable while it fires)."""
    labels = {"alertname": alertname(a.rule), "severity": ALERTMANAGER_SEVERITY.get(a.severity, a.severity),
              "run": a.run_id, "run_name": a.run_name, "rule": a.rule, "source": "gradwatch"}
    if a.layer:
        labels["layer"] = a.layer
    return labels


def alertmanager_alert(a: Alert, ends_at: float | None) -> dict[str, Any]:
    """One element of an `/api/v2/alerts` POST; `ends_at` resolves it (in the past) or bounds how
    long Alertmanager keeps it without a re-send (in the future)."""
    annotations = {"summary": f"{a.title}: {where(a)}", "description": "\n".join(a.summary),
                   "cause": a.cause, "remedy": a.remedy, "command": command(a),
                   "step": "" if a.step is None else str(a.step),
                   "value": "" if a.value is None else number(a.value),
                   "threshold": "" if a.threshold is None else number(a.threshold)}
    out: dict[str, Any] = {"labels": alertmanager_labels(a),
                           "annotations": {k: v for k, v in annotations.items() if v}}
    if a.started_at is not None:
        out["startsAt"] = _iso(a.started_at)
    if ends_at is not None:
        out["endsAt"] = _iso(ends_at)
    return out
