"""Option bundles shared by the commands (`--db`/`--home`, `--json`) and argument parsing helpers."""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from gradwatch.cli._errors import BadInput, CliError

if TYPE_CHECKING:
    from gradwatch.store import RunInfo, Store

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def home_option(f: F) -> F:
    """`--home`: the gradwatch home (logs/ and the default SQLite store)."""
    return click.option("--home", type=click.Path(file_okay=False, path_type=Path), envvar="GRADWATCH_HOME",
                        help="gradwatch home holding logs/ and gradwatch.db.  [default: $GRADWATCH_HOME or "
                             "~/.gradwatch]")(f)


def json_option(f: F) -> F:
    """`--json`: machine-readable output with stable keys instead of tables."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON (stable keys) instead of a table.")(f)


def with_store(f: F) -> F:
    """`--db` and `--home`; the command receives an open `store` (pending run logs ingested),
    closed when the command's context closes."""

    @click.option("--db", metavar="URL", envvar="GRADWATCH_DB",
                  help="Store URL (SQLAlchemy), e.g. postgresql+psycopg://u@host/gw.  [default: "
                       "sqlite:///HOME/gradwatch.db]")
    @home_option
    @functools.wraps(f)
    def wrapper(*args: Any, db: str | None, home: Path | None, **kwargs: Any) -> Any:
        store = open_store(click.get_current_context(), db, home)
        return f(*args, store=store, **kwargs)

    return wrapper  # type: ignore[return-value]


def resolve_home(home: Path | None) -> Path:
    """`home`, else $GRADWATCH_HOME, else ~/.gradwatch."""
    from gradwatch.agent.runlog import default_home

    return home.expanduser() if home is not None else default_home()


def open_store(ctx: click.Context, db: str | None, home: Path | None, create: bool = False) -> Store:
    """Open the store, ingest the run logs waiting in the home, close it with the context.

    A read creates nothing: no home, folder or database, unless `create` (the demo) or run logs
    wait in the home for the default store (the CLI ingests them itself when no service runs,
    so the first `gradwatch runs` after a training job creates it). Otherwise a missing store
    is a one-line error (exit 1).
    """
    from gradwatch.agent.runlog import LOG_SUFFIX
    from gradwatch.ingest import ingest_pending
    from gradwatch.store import Store, StoreNotFound

    home = resolve_home(home)
    if db is None:
        if home.exists() and not home.is_dir():
            raise BadInput(f"gradwatch home {home} is not a directory")
        logs = home / "logs"
        create = create or (logs.is_dir() and any(logs.glob(f"*{LOG_SUFFIX}")))
        if create:
            home.mkdir(parents=True, exist_ok=True)
    try:
        store = Store.open(url=db, home=home, create=create)
    except StoreNotFound as exc:
        how = ("`gradwatch serve --db URL` creates it" if db is not None else
               f"record a run with gradwatch.watch() (its logs go to {home / 'logs'}) or try `gradwatch demo`")
        raise CliError(f"{exc}; {how}") from None
    ctx.call_on_close(store.close)
    if (home / "logs").is_dir():
        report = ingest_pending(store, home)
        if report.errors:
            click.echo(f"gradwatch: {report.errors} corrupt records skipped while ingesting run logs", err=True)
    return store


def resolve_run(store: Store, ref: str) -> str:
    """The run id for what the user typed: a run id, a unique id prefix, a run name (its newest run)
    or a prefix of one run name; unknown or ambiguous: a one-line error listing candidates.

    A full name wins over a longer name it is a prefix of (`demo-rnn` over `demo-rnn-clipped`);
    a reference that is a prefix of a run id and of another run's name is ambiguous.
    """
    from gradwatch.store import AmbiguousRun, RunNotFound

    try:
        run_id = store.resolve_run(ref)
    except AmbiguousRun as exc:
        runs = {r.id: r for r in store.list_runs()}
        cands = [f"{c} ({runs[c].name})" if c in runs else c for c in exc.candidates[:8]]
        raise BadInput(f"run {ref!r} is ambiguous; candidates: {', '.join(cands)}") from None
    except RunNotFound:
        return _by_name_prefix(store, ref)
    name = store.run(run_id).name if run_id != ref else ref
    if name != ref:  # found as an id prefix: no other run's name may start with it
        others = list(dict.fromkeys(r.name for r in store.list_runs() if r.id != run_id and r.name.startswith(ref)))
        if others:
            raise BadInput(f"run {ref!r} is ambiguous; candidates: {run_id} ({name}), {', '.join(others[:8])}")
    return run_id


def _by_name_prefix(store: Store, ref: str) -> str:
    """The newest run whose name starts with `ref`, when exactly one name does."""
    import difflib

    runs = store.list_runs()  # newest first
    names = list(dict.fromkeys(r.name for r in runs if r.name.startswith(ref)))
    if len(names) == 1:
        return next(r.id for r in runs if r.name == names[0])
    if names:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise BadInput(f"run {ref!r} is ambiguous; candidates: {shown}")
    all_names = list(dict.fromkeys(r.name for r in runs))
    close = difflib.get_close_matches(ref, all_names, n=5, cutoff=0.5)
    cands = close or [f"{r.id} ({r.name})" for r in runs[:5]]
    hint = f"; candidates: {', '.join(cands)}" if cands else "; the store has no runs yet (try: gradwatch demo)"
    raise BadInput(f"no run matches {ref!r}{hint}")


def rank_option(f: F) -> F:
    """`--rank N`: read one rank's measurements of a distributed run (default rank 0)."""
    return click.option("--rank", type=click.IntRange(min=0), metavar="N",
                        help="Read rank N's measurements (a distributed run stores each rank's).  [default: 0]")(f)


def rank_metrics(store: Store, run_id: str, rank: int | None) -> tuple[int, dict[str, str]]:
    """(the rank to read, its metrics -> scope); `rank` None is rank 0. A rank the run does not
    have is a one-line error listing the ranks it has."""
    by_rank = store.rank_metric_names(run_id)
    chosen = 0 if rank is None else rank
    if rank is not None and rank not in by_rank:
        ranks = sorted(set(by_rank) | {log.rank for log in store.logs(run_id) if log.rank is not None})
        if rank not in ranks:
            info = store.run(run_id)
            listed = ", ".join(map(str, ranks)) or "none stored yet"
            world = f" (world size {info.world_size})" if info.world_size > len(ranks) else ""
            raise BadInput(f"run {info.name} ({run_id}) has no rank {rank}; its ranks are {listed}{world}")
    return chosen, by_rank.get(chosen, {})


def require_steps(info: RunInfo, what: str) -> None:
    """A one-line error (exit 1) when a run stored no step yet: `what` cannot be done."""
    if info.last_step is None:
        raise CliError(f"run {info.name} ({info.id}, {info.status}) has no steps stored: {what}")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    """'90s', '15m', '12h', '30d', '2w' as a timedelta."""
    m = _DURATION.match(text)
    if not m:
        raise BadInput(f"bad duration {text!r}: use a number and a unit s, m, h, d or w (e.g. 30d)")
    return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])


def parse_time(text: str) -> float:
    """A point in time: a duration ago ('2h', '7d') or an ISO date/time ('2025-01-31', '2025-01-31T12:00')."""
    if _DURATION.match(text):
        return time.time() - parse_duration(text).total_seconds()
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise BadInput(f"bad time {text!r}: use a duration ago (2h, 7d) or an ISO date (2025-01-31)") from None


def parse_steps(text: str) -> tuple[int | None, int | None]:
    """A step range 'A:B' (inclusive; either end may be left out) as (start, end)."""
    m = re.fullmatch(r"\s*(\d*)\s*:\s*(\d*)\s*", text)
    if not m or text.strip() == ":":
        raise BadInput(f"bad step range {text!r}: use START:END, START: or :END (e.g. 100:500)")
    start = int(m.group(1)) if m.group(1) else None
    end = int(m.group(2)) if m.group(2) else None
    if start is not None and end is not None and start > end:
        raise BadInput(f"bad step range {text!r}: start {start} is after end {end}")
    return start, end
