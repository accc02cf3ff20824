"""`gradwatch alerts`: the alerts `gradwatch serve` raised, firing and past, newest first."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from gradwatch.cli import _format as fmt
from gradwatch.cli._options import CONTEXT, json_option, parse_time, resolve_run, with_store

if TYPE_CHECKING:
    from gradwatch.store import AlertInfo, Store

NONE = "no alerts (gradwatch serve raises them while it ingests live runs: docs/alerts.md)"


def alert_row(alert: AlertInfo, names: dict[str, str]) -> dict[str, Any]:
    """One alert with stable keys (NaN/Inf values are kept: `--json` spells them as strings)."""
    import shlex

    name = names.get(alert.run_id or "", "")
    return {"id": alert.id, "run": {"id": alert.run_id, "name": name}, "rule": alert.rule,
            "severity": alert.severity, "title": alert.message, "state": "firing" if alert.active else "resolved",
            "layer": alert.layer, "step": alert.step, "value": alert.value, "threshold": alert.threshold,
            "cause": alert.cause, "remedy": alert.remedy, "started_at": alert.started_at,
            "ended_at": alert.ended_at,
            "command": f"gradwatch diagnose {shlex.quote(name or alert.run_id or '')}" if alert.run_id else None}


def select(alerts: list[AlertInfo], since: float | None = None, firing: bool = False) -> list[AlertInfo]:
    """Alerts still firing, or active at some time after `since`; newest first."""
    kept = [a for a in alerts if (a.active or not firing)
            and (since is None or a.active or (a.ended_at is not None and a.ended_at >= since))]
    return sorted(kept, key=lambda a: (a.started_at, a.id), reverse=True)


def _render(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return NONE
    body = [(r["id"], r["run"]["name"] or r["run"]["id"] or "-", r["rule"], r["severity"], r["state"],
             r["layer"] or "-", fmt.num(r["step"]), fmt.num(r["value"]), fmt.num(r["threshold"]),
             fmt.when(r["started_at"]), fmt.when(r["ended_at"]) if r["ended_at"] is not None else "-")
            for r in rows]
    return fmt.table(("ID", "RUN", "RULE", "SEVERITY", "STATE", "LAYER", "STEP", "VALUE", "THRESHOLD", "STARTED",
                      "ENDED"), body, right=(0, 6, 7, 8))


@click.command(context_settings=CONTEXT, epilog="""\b
Example:
    gradwatch alerts
    gradwatch alerts --run my-run --since 2d
    gradwatch alerts --firing --json""")
@click.option("--run", "run", metavar="RUN", help="Only the alerts of this run.")
@click.option("--since", metavar="TIME", help="Only alerts firing at some time after TIME: a duration ago (2h, 7d) "
                                              "or an ISO date.")
@click.option("--firing", is_flag=True, help="Only the alerts firing now.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="At most this many alerts.")
@json_option
@with_store
def alerts(store: Store, run: str | None, since: str | None, firing: bool, limit: int, as_json: bool) -> None:
    """List the alerts `gradwatch serve` raised on live runs, newest first: rule, severity, firing or
    resolved, layer, step, value and threshold (`--json` adds the cause, the first remedy and the
    command to look further)."""
    since_t = parse_time(since) if since else None
    run_id = resolve_run(store, run) if run else None
    found = select(store.alerts(run_id=run_id), since_t, firing)[:limit]
    names = {r.id: r.name for r in store.list_runs()} if found else {}
    fmt.emit([alert_row(a, names) for a in found], as_json, _render)
