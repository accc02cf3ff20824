"""Alert lifecycle, as pure state: pending -> firing -> resolved, one alert per (run, rule).

`Lifecycle.observe()` takes one evaluation of a run (its findings, the last step evaluated and
the time) and returns the transitions it causes. A finding seen for the first time makes a
*pending* alert; it *fires* once it has held for its `for` (steps and seconds, both); a
pending alert whose finding goes away is dropped unseen. A firing alert is *resolved* when its
rule no longer finds anything, or when its run ends (`end_run`). While it fires, later
evaluations update its numbers but cause no transition, so nothing is notified twice; a rise
in severity (warning -> error) is a transition of its own (`escalated`). No I/O here: the
engine stores and delivers what the transitions say.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from gradwatch.alerts.config import SEVERITY_RANK
from gradwatch.diagnose import Finding

State = Literal["pending", "firing", "resolved"]
Kind = Literal["firing", "escalated", "resolved"]


@dataclass(frozen=True)
class Alert:
    """One alert of a run: what fires, where, how large, why and what to do.

    `step` is the step that shows the problem (the finding's first step, else the last step
    evaluated); `value` and `threshold` are the finding's main number and the limit it crossed
    (None when the rule gives none); `cause` and `remedy` are the first of the finding's.
    """

    run_id: str
    run_name: str
    rule: str
    severity: str
    title: str
    layer: str
    step: int | None
    value: float | None
    threshold: float | None
    cause: str
    remedy: str
    summary: tuple[str, ...] = ()
    state: State = "pending"
    since_step: int = 0  # the last step evaluated when the finding first showed
    since: float = 0.0  # and when
    started_at: float | None = None  # when it fired
    ended_at: float | None = None
    id: int | None = None  # its row in the store, once stored
    previous_severity: str | None = None  # the severity it fired with before an escalation

    @property
    def key(self) -> tuple[str, str]:
        return self.run_id, self.rule


@dataclass(frozen=True)
class Transition:
    """What changed: `firing` (it fired), `escalated` (its severity rose while firing: `alert.
    previous_severity` says from what), `resolved` (it ended)."""

    kind: Kind
    alert: Alert


def alert_from(finding: Finding, run_id: str, run_name: str, step: int, now: float) -> Alert:
    """A pending alert for a finding seen at the evaluation of `step`."""
    values = finding.evidence.values
    return Alert(
        run_id=run_id, run_name=run_name, rule=finding.id, severity=finding.severity, title=finding.title,
        layer=finding.evidence.layers[0] if finding.evidence.layers else "",
        step=int(finding.evidence.steps[0]) if finding.evidence.steps else step,
        value=_number(values.get("value")), threshold=_number(values.get("threshold")),
        cause=finding.causes[0] if finding.causes else "", remedy=finding.remedies[0] if finding.remedies else "",
        summary=tuple(finding.evidence.summary), since_step=step, since=now)


def _number(x: object) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


class Lifecycle:
    """The alerts of every run the engine watches. `hold(rule)` gives a rule's `for` as
    (steps, seconds)."""

    def __init__(self, hold: Callable[[str], tuple[int, float]]) -> None:
        self.hold = hold
        self._alerts: dict[tuple[str, str], Alert] = {}

    def observe(self, run_id: str, run_name: str, findings: Iterable[Finding], step: int,
                now: float) -> list[Transition]:
        """One evaluation of a run: its findings (at most one per rule counts: the most severe)
        at its last evaluated `step`, at time `now`."""
        seen: dict[str, Finding] = {}
        for f in findings:
            if f.id not in seen or SEVERITY_RANK[f.severity] > SEVERITY_RANK[seen[f.id].severity]:
                seen[f.id] = f
        out = []
        for rule, finding in seen.items():
            fresh = alert_from(finding, run_id, run_name, step, now)
            old = self._alerts.get((run_id, rule))
            if old is None:
                old = fresh
            transition, alert = self._advance(old, fresh, step, now)
            self._alerts[alert.key] = alert
            if transition is not None:
                out.append(transition)
        for key in [k for k in self._alerts if k[0] == run_id and k[1] not in seen]:
            out += self._end(key, now)
        return out

    def _advance(self, old: Alert, fresh: Alert, step: int, now: float) -> tuple[Transition | None, Alert]:
        """The alert after one more evaluation that found its rule again."""
        if old.state == "pending":
            pending = dataclasses.replace(fresh, since_step=old.since_step, since=old.since)
            steps, seconds = self.hold(old.rule)
            if step - old.since_step >= steps and now - old.since >= seconds:
                firing = dataclasses.replace(pending, state="firing", started_at=now)
                return Transition("firing", firing), firing
            return None, pending
        keep = dict(layer=old.layer, step=old.step, since_step=old.since_step, since=old.since,
                    started_at=old.started_at, id=old.id, state=old.state)
        if SEVERITY_RANK[fresh.severity] > SEVERITY_RANK[old.severity]:
            raised = dataclasses.replace(fresh, **keep, previous_severity=old.severity)
            return Transition("escalated", raised), raised
        return None, dataclasses.replace(fresh, **keep, severity=old.severity,
                                         previous_severity=old.previous_severity)

    def end_run(self, run_id: str, now: float) -> list[Transition]:
        """The run ended: its firing alerts resolve, its pending ones are dropped."""
        out = []
        for key in [k for k in self._alerts if k[0] == run_id]:
            out += self._end(key, now)
        return out

    def _end(self, key: tuple[str, str], now: float) -> list[Transition]:
        alert = self._alerts.pop(key)
        if alert.state != "firing":
            return []
        return [Transition("resolved", dataclasses.replace(alert, state="resolved", ended_at=now))]

    def restore(self, alerts: Iterable[Alert]) -> None:
        """Take up firing alerts stored by an earlier service (they are not notified again)."""
        for alert in alerts:
            self._alerts[alert.key] = dataclasses.replace(alert, state="firing")

    def undo(self, t: Transition) -> None:
        """Take back a transition that could not be stored, so the next evaluation makes it
        again: a firing alert is forgotten (its finding makes it pending anew), an escalated one
        goes back to its previous severity, a resolved one fires again."""
        a = t.alert
        if t.kind == "resolved":
            self._alerts[a.key] = dataclasses.replace(a, state="firing", ended_at=None)
        elif t.kind == "escalated":
            self._alerts[a.key] = dataclasses.replace(a, severity=a.previous_severity or a.severity,
                                                      previous_severity=None)
        else:
            self._alerts.pop(a.key, None)

    def stored(self, key: tuple[str, str], alert_id: int) -> None:
        """Remember the store's id of the alert of `key` (run, rule), once it fired or escalated."""
        current = self._alerts.get(key)
        if current is not None:
            self._alerts[key] = dataclasses.replace(current, id=alert_id)

    def firing(self) -> list[Alert]:
        """Every firing alert."""
        return [a for a in self._alerts.values() if a.state == "firing"]

    def runs(self) -> set[str]:
        """The runs that have a pending or firing alert."""
        return {k[0] for k in self._alerts}
