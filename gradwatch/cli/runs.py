"""`gradwatch runs`: list runs with their status, steps, duration, total-norm range and clip rate."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import click

from gradwatch.cli import _format as fmt
from gradwatch.cli._options import CONTEXT, json_option, parse_time, with_store

if TYPE_CHECKING:
    from gradwatch.store import RunInfo, Store


def run_row(store: Store, run: RunInfo) -> dict[str, Any]:
    """One run's listing: its metadata, duration, total-norm range (NaN left out, +Inf kept),
    clip rate and the number of steps whose total norm or loss is NaN/Inf (stable keys)."""
    import numpy as np

    metrics = store.metric_names(run.id)
    norm_min = norm_max = clip_rate = None
    read = {m: store.run_series(run.id, m) for m in ("grad_norm_total", "loss") if metrics.get(m) == "run"}
    bad_steps = np.unique(np.concatenate([np.array([], dtype=np.int64)]
                                         + [s.steps[~np.isfinite(s.values)] for s in read.values()]))
    if "grad_norm_total" in read:
        norms = read["grad_norm_total"].values
        finite, ordered = norms[np.isfinite(norms)], norms[~np.isnan(norms)]
        if len(norms):
            norm_min = float(finite.min()) if len(finite) else None
            norm_max = float(ordered.max()) if len(ordered) else None
    if metrics.get("clip_coef") == "run":
        coef = store.run_series(run.id, "clip_coef").values
        if len(coef):
            clip_rate = float(np.mean(coef < 1.0 - 1e-6))
    end = run.ended_at if run.ended_at is not None else (time.time() if run.status == "running" else run.status_at)
    steps = None if run.last_step is None else run.last_step + 1
    return {"id": run.id, "name": run.name, "project": run.project, "status": run.status,
            "started_at": run.started_at, "ended_at": run.ended_at, "steps": steps,
            "duration_s": None if run.started_at is None else max(0.0, end - run.started_at),
            "grad_norm_total_min": norm_min, "grad_norm_total_max": norm_max, "clip_rate": clip_rate,
            "nonfinite_steps": int(len(bad_steps)), "host": run.host, "world_size": run.world_size}


def _render(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no runs (record one with gradwatch.watch(model, optimizer), or try: gradwatch demo)"

    def norm_range(r: dict[str, Any]) -> str:
        lo, hi = r["grad_norm_total_min"], r["grad_norm_total_max"]
        return "-" if lo is None and hi is None else f"{fmt.num(lo)}..{fmt.num(hi)}"

    body = [(r["id"], r["name"], r["project"], r["status"], fmt.num(r["steps"]), fmt.when(r["started_at"]),
             fmt.duration(r["duration_s"]), norm_range(r), fmt.pct(r["clip_rate"]), r["nonfinite_steps"] or "-")
            for r in rows]
    return fmt.table(("ID", "NAME", "PROJECT", "STATUS", "STEPS", "STARTED", "DURATION", "TOTAL NORM", "CLIPPED",
                      "NAN/INF"), body, right=(4, 6, 8, 9))


@click.command(context_settings=CONTEXT, epilog="""\b
Example:
    gradwatch runs --project demo --since 2d
    gradwatch runs --name 'bert-*' --status crashed --json""")
@click.option("--project", help="Only runs of this project.")
@click.option("--name", "name_glob", metavar="GLOB", help="Only runs whose name matches this glob (bert-*).")
@click.option("--status", type=click.Choice(["running", "finished", "crashed"]), help="Only runs with this status.")
@click.option("--since", metavar="TIME", help="Started after TIME: a duration ago (2h, 7d) or an ISO date.")
@click.option("--until", metavar="TIME", help="Started before TIME: a duration ago (2h, 7d) or an ISO date.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="At most this many runs.")
@json_option
@with_store
def runs(store: Store, project: str | None, name_glob: str | None, status: str | None, since: str | None,
         until: str | None, limit: int, as_json: bool) -> None:
    """List runs, newest first, with status, steps, duration, total-norm range, clip rate and the steps
    whose total norm or loss is NaN/Inf."""
    since_t = parse_time(since) if since else None
    until_t = parse_time(until) if until else None
    found = store.list_runs(project=project, name=name_glob, status=status, since=since_t, until=until_t)
    rows = [run_row(store, r) for r in found[:limit]]
    fmt.emit(rows, as_json, _render)

