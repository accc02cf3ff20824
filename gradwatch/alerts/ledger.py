"""Alerts in the store: a firing alert is a row of `gw_alerts` (run, rule, severity, layer, step,
value, threshold, cause, remedy, when it started); resolving it sets when it ended. The rows of
the alerts still firing are how a restarted service takes them up without notifying again."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gradwatch.alerts.lifecycle import Alert

if TYPE_CHECKING:
    from gradwatch.store import AlertInfo, Store


def add(store: Store, alert: Alert) -> int:
    """Store a firing alert (its title is the stored message); its id."""
    return store.add_alert(alert.rule, alert.severity, alert.title, run_id=alert.run_id, step=alert.step,
                           started_at=alert.started_at, layer=alert.layer or None, value=alert.value,
                           threshold=alert.threshold, cause=alert.cause or None, remedy=alert.remedy or None)


def resolve(store: Store, alert: Alert, ended_at: float) -> None:
    """Mark a stored alert resolved."""
    if alert.id is not None:
        store.resolve_alert(alert.id, ended_at)


def firing(store: Store) -> list[Alert]:
    """The stored alerts that have not ended, as firing alerts (run names read from the store)."""
    rows = [(a, a.run_id) for a in store.alerts(active=True) if a.run_id is not None]
    names = {r.id: r.name for r in store.list_runs()} if rows else {}
    return [_alert(a, run_id, names.get(run_id, "")) for a, run_id in rows]


def _alert(a: AlertInfo, run_id: str, run_name: str) -> Alert:
    return Alert(run_id=run_id, run_name=run_name, rule=a.rule, severity=a.severity,
                 title=a.message, layer=a.layer or "", step=a.step, value=a.value,
                 threshold=a.threshold, cause=a.cause or "", remedy=a.remedy or "", state="firing",
                 since_step=a.step or 0, since=a.started_at, started_at=a.started_at, id=a.id)
