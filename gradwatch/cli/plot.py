"""`gradwatch plot RUN --out FILE.png`: the gradient pictures of a run, drawn headless."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from gradwatch.cli import _format as fmt
from gradwatch.cli._errors import BadInput, CliError
from gradwatch.cli._options import (CONTEXT, json_option, rank_metrics, rank_option, require_steps, resolve_run,
                                    with_store)

if TYPE_CHECKING:
    from gradwatch.store import Store

FORMATS = (".png", ".svg", ".pdf")


@click.command(context_settings=CONTEXT, epilog="""\b
Example:
    gradwatch plot demo-sigmoid-default-init --out vanishing.png
    gradwatch plot demo-rnn-high-lr-clipped -o clipped.svg""")
@click.argument("run")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Image file to write: .png, .svg or .pdf.")
@rank_option
@json_option
@with_store
def plot(store: Store, run: str, out: Path, rank: int | None, as_json: bool) -> None:
    """Draw a run's gradient pictures on one step axis: a gradient-flow heatmap (layers x steps, log
    scale), the total norm before and after clipping, the loss and each param group's learning rate,
    and each activation layer's saturated or dead fraction over steps; NaN/Inf steps are marked in
    every panel, and a panel the run has nothing for is left out."""
    if out.suffix.lower() not in FORMATS:
        raise BadInput(f"cannot write {out.name!r}: the file name must end in {', '.join(FORMATS)}")
    if not out.parent.is_dir():
        raise CliError(f"cannot write {out}: folder {out.parent} does not exist")  # as export: exit 1
    run_id = resolve_run(store, run)
    require_steps(store.run(run_id), "nothing to plot")
    chosen, _ = rank_metrics(store, run_id, rank)
    from gradwatch.diagnose.load import load_run_data
    from gradwatch.plots import save_run_plot

    data = load_run_data(store, run_id, chosen)
    save_run_plot(data, out)
    result: dict[str, Any] = {"run": run_id, "name": data.name, "out": str(out)}
    if rank is not None:
        result["rank"] = chosen
    fmt.emit(result, as_json, lambda d: f"wrote {out} (run {data.name}, {run_id}"
             + (f", rank {chosen})" if rank is not None else ")"))
