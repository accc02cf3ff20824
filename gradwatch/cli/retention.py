"""`gradwatch delete RUN` and `gradwatch gc --older-than AGE`: retention of stored runs."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import click

from gradwatch.cli import _format as fmt
from gradwatch.cli._errors import BadInput
from gradwatch.cli._options import CONTEXT, json_option, parse_duration, resolve_run, with_store

if TYPE_CHECKING:
    from gradwatch.store import Store


@click.command(context_settings=CONTEXT, epilog="""\b
Example:
    gradwatch delete demo-healthy --yes
    gradwatch delete 3f9a2c --remove-logs""")
@click.argument("run")
@click.option("--remove-logs", is_flag=True, help="Also delete the run's log files (else they are kept, "
                                                   "marked deleted, and never ingested again).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@json_option
@with_store
def delete(store: Store, run: str, remove_logs: bool, yes: bool, as_json: bool) -> None:
    """Delete a run and everything stored about it."""
    run_id = resolve_run(store, run)
    info = store.run(run_id)
    if info.status == "running":
        raise BadInput(f"run {run_id} ({info.name}) is still running; stop it first")
    if not yes:
        click.confirm(f"delete run {run_id} ({info.name}, last step {fmt.num(info.last_step)})?", abort=True,
                      err=True)  # stdout stays the answer (--json stays JSON)
    store.delete_run(run_id, remove_logs=remove_logs)
    fmt.emit({"deleted": [run_id], "names": [info.name], "logs_removed": remove_logs}, as_json,
             lambda d: f"deleted run {run_id} ({info.name})")


@click.command(context_settings=CONTEXT, epilog="""\b
Example:
    gradwatch gc --older-than 30d --dry-run
    gradwatch gc --older-than 2w --remove-logs --yes""")
@click.option("--older-than", "older_than", required=True, metavar="AGE",
              help="Delete runs that ended more than AGE ago: a number and s, m, h, d or w (30d).")
@click.option("--remove-logs", is_flag=True, help="Also delete their log files.")
@click.option("--dry-run", is_flag=True, help="Only list the runs that would be deleted.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@json_option
@with_store
def gc(store: Store, older_than: str, remove_logs: bool, dry_run: bool, yes: bool, as_json: bool) -> None:
    """Delete every run that is no longer running and ended more than AGE ago (retention)."""
    age = parse_duration(older_than)
    now = time.time()
    cutoff = now - age.total_seconds()
    due = [r for r in store.list_runs() if r.status != "running"
           and (r.ended_at if r.ended_at is not None else r.status_at) < cutoff]
    if dry_run or not due:
        data = {"deleted": [], "would_delete": [r.id for r in due], "names": [r.name for r in due]}
        fmt.emit(data, as_json, lambda d: "\n".join([f"would delete {r.id} ({r.name})" for r in due])
                 or f"no run ended more than {older_than} ago")
        return
    if not yes:
        click.confirm(f"delete {len(due)} runs that ended more than {older_than} ago?", abort=True, err=True)
    deleted = store.gc(age, remove_logs=remove_logs, now=now)
    names = {r.id: r.name for r in due}
    data = {"deleted": deleted, "would_delete": [], "names": [names.get(i, "") for i in deleted]}
    fmt.emit(data, as_json, lambda d: "\n".join(f"deleted {i} ({names.get(i, '')})" for i in deleted)
             or "nothing deleted")
