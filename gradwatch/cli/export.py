"""`gradwatch export RUN`: every stored record of a run, streamed as CSV, a JSON array or JSON lines."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click

from gradwatch.cli._format import jsonable, typed
from gradwatch.cli._options import CONTEXT, rank_metrics, rank_option, resolve_run, with_store

if TYPE_CHECKING:
    from gradwatch.store import Store

#: CSV columns: value records fill the first seven; other records put their fields in `data` (JSON).
CSV_COLUMNS = ("record", "rank", "metric", "scope", "entity", "step", "value", "data")


def csv_rows(records: Iterable[dict[str, Any]]) -> Iterator[list[Any]]:
    """One CSV row per record: value records in columns (NaN, +Inf, -Inf as nan, inf, -inf, which
    `float()` reads back), the others as JSON in the `data` column."""
    for r in records:
        if r["record"] == "value":
            yield ["value", r["rank"], r["metric"], r["scope"], r["entity"], r["step"], jsonable(r["value"]), ""]
        else:
            rest = {k: v for k, v in r.items() if k not in ("record", "rank", "step")}
            yield [r["record"], r.get("rank", ""), "", "", "", r.get("step", ""), "",
                   json.dumps(jsonable(rest), allow_nan=False)]


def select(records: Iterable[dict[str, Any]], rank: int | None) -> Iterator[dict[str, Any]]:
    """The records to write: with `rank`, only that rank's value and event records (the run, its
    params, layers and alerts are every rank's); count metrics' values as ints."""
    for r in records:
        if rank is not None and r.get("rank", rank) != rank:
            continue
        yield {**r, "value": typed(r["metric"], r["value"])} if r["record"] == "value" else r


def write_records(records: Iterable[dict[str, Any]], out: IO[str], fmt: str) -> int:
    """Stream records to `out` as csv, json (one array) or jsonl; returns how many were written."""
    n = 0
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for n, row in enumerate(csv_rows(records), 1):
            writer.writerow(row)
        return n
    if fmt == "json":
        out.write("[")
    for n, r in enumerate(records, 1):
        text = json.dumps(jsonable(r), allow_nan=False)
        out.write(("\n" if n == 1 else ",\n") + text if fmt == "json" else text + "\n")
    if fmt == "json":
        out.write("\n]\n")
    return n


@click.command(context_settings=CONTEXT, epilog="""\b
Example:
    gradwatch export demo-healthy --format csv --out healthy.csv
    gradwatch export demo-rnn-high-lr --format jsonl | grep '"event"'
    gradwatch export my-ddp-run --rank 3 --out rank3.csv""")
@click.argument("run")
@click.option("--format", "fmt", type=click.Choice(["csv", "json", "jsonl"]), default="csv", show_default=True,
              help="csv (one row per record), json (one array) or jsonl (one object per line).")
@click.option("--out", "-o", type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="Write to this file instead of stdout.")
@rank_option
@with_store
def export(store: Store, run: str, fmt: str, out: Path | None, rank: int | None) -> None:
    """Export every record of a run (run, params, layers, events, alerts, then every value of every
    rank, or of one with --rank), streamed.

    A step that was not measured has no value record; NaN and infinities are written as nan, inf
    and -inf (JSON strings "nan", "inf", "-inf").
    """
    run_id = resolve_run(store, run)
    if rank is not None:
        rank_metrics(store, run_id, rank)  # a rank the run does not have: one line, exit 2
    records = select(store.export_records(run_id), rank)
    if out is None:
        write_records(records, sys.stdout, fmt)
        return
    with out.open("w", newline="" if fmt == "csv" else None) as f:
        n = write_records(records, f, fmt)
    click.echo(f"wrote {n} records of run {run_id} to {out}", err=True)
