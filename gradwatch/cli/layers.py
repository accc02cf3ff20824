"""`gradwatch layers RUN`: every layer's measurements at one step, or aggregated over a step range."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from gradwatch.cli import _format as fmt
from gradwatch.cli._errors import BadInput
from gradwatch.cli._options import (
    CONTEXT,
    json_option,
    parse_steps,
    rank_metrics,
    rank_option,
    require_steps,
    resolve_run,
    with_store,
)

if TYPE_CHECKING:
    import numpy as np

    from gradwatch.store import LayerInfo, LayerTable, Store

AGGREGATES = ("median", "mean", "min", "max", "last")
#: Column order: gradient flow first, then activation health.
PREFERRED = ("grad_norm", "act_grad_norm", "saturation_ratio", "dead_ratio", "zero_ratio", "act_nonfinite", "act_mean",
             "act_std")


def layer_metrics(names: dict[str, str]) -> list[str]:
    """The per-layer metrics among `names` (metric -> scope, of one rank of a run; grad_norm derived
    from params included), in display order."""
    have = [m for m, scope in names.items() if scope == "layer"]
    have += ["grad_norm"] if names.get("grad_norm") == "param" else []
    return sorted(have, key=lambda m: (PREFERRED.index(m) if m in PREFERRED else len(PREFERRED), m))


def _aggregate(values: np.ndarray, how: str) -> float | None:
    """A layer's values over a range combined: None when none was measured; NaN values left out
    of median, mean, min and max (NaN when every value is NaN); `last` as it is."""
    import warnings

    import numpy as np

    from gradwatch.cli._stats import median

    if not len(values):
        return None
    funcs = {"median": median, "mean": np.nanmean, "min": np.nanmin, "max": np.nanmax}
    if how == "last":
        return float(values[-1])
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices give NaN
        return float(funcs[how](values))


def over_range(store: Store, run_id: str, layers: list[LayerInfo], metrics: list[str], start: int | None,
               end: int | None, how: str, rank: int = 0) -> tuple[dict[str, list[float | None]], dict[str, list[int]]]:
    """Each metric aggregated per layer over steps start..end on one rank (None where a layer has no
    value there), and per layer how many of those values were NaN."""
    import numpy as np

    from gradwatch.store import UnknownEntity, UnknownMetric

    out: dict[str, list[float | None]] = {}
    nans: dict[str, list[int]] = {}
    for m in metrics:
        col: list[float | None] = []
        counts: list[int] = []
        for ly in layers:
            try:
                values = store.layer_history(run_id, ly.index, m, start, end, rank=rank).values
            except (UnknownMetric, UnknownEntity):
                values = np.array([])
            value = _aggregate(values, how)
            col.append(fmt.typed(m, value) if how in ("min", "max", "last") else value)
            counts.append(int(np.count_nonzero(np.isnan(values))))
        out[m], nans[m] = col, counts
    return out, nans


def at_step(table: LayerTable, metrics: list[str]) -> dict[str, list[float | None]]:
    """A layer table's columns with None where a layer was not measured (NaN stays a value; counts
    are ints)."""
    return {m: [fmt.typed(m, float(v)) if ok else None for v, ok in zip(table.values[m], table.measured[m])]
            for m in metrics}


def _render(d: dict[str, Any]) -> str:
    metrics = d["metrics"]
    first = d["start"] if d["start"] is not None else "start"
    last = d["end"] if d["end"] is not None else "end"
    where = f"step {d['step']}" if d["step"] is not None else f"steps {first}..{last} ({d['aggregate']})"
    rows = [(r["index"], r["layer"], r["type"], r["family"] or "-",
             *(fmt.pct(r[m]) if m.endswith("_ratio") else fmt.num(r[m]) for m in metrics)) for r in d["layers"]]
    on_rank = f", rank {d['rank']}" if d["ranked"] else ""
    text = f"{d['run']['name']} ({d['run']['id']}){on_rank}, {where}\n" + fmt.table(
        ("#", "LAYER", "TYPE", "FAMILY", *(m.upper() for m in metrics)), rows,
        right=[0, *range(4, 4 + len(metrics))])
    nans = [f"{r['layer']} {m} on {n} step{'s' * (n != 1)}"
            for r in d["layers"] for m, n in r.get("nan_steps", {}).items()]
    if nans and d["aggregate"] != "last":
        text += f"\nNaN values left out of the {d['aggregate']}: " + ", ".join(nans)
    return text


@click.command(context_settings=CONTEXT, epilog="""\b
Example:
    gradwatch layers demo-sigmoid-default-init
    gradwatch layers demo-sigmoid-normal-init --step 100 --sort saturation_ratio
    gradwatch layers demo-healthy --steps 50:250 --aggregate max --json
    gradwatch layers my-ddp-run --rank 3 --sort dead_ratio""")
@click.argument("run")
@click.option("--step", type=click.IntRange(min=0), help="The step to show.  [default: the last measured]")
@click.option("--steps", "step_range", metavar="START:END", help="Aggregate over this step range instead.")
@click.option("--aggregate", type=click.Choice(AGGREGATES), default="median", show_default=True,
              help="How --steps combines a layer's values.")
@click.option("--sort", "sort_by", metavar="METRIC", help="Sort by this metric, largest first.  [default: depth]")
@click.option("--asc", is_flag=True, help="With --sort: smallest first.")
@rank_option
@json_option
@with_store
def layers(store: Store, run: str, step: int | None, step_range: str | None, aggregate: str, sort_by: str | None,
           asc: bool, rank: int | None, as_json: bool) -> None:
    """Every layer's measurements at a step (default: the last), or aggregated over a step range."""
    import math

    if step is not None and step_range is not None:
        raise BadInput("give either --step or --steps, not both")
    run_id = resolve_run(store, run)
    info = store.run(run_id)
    chosen, names = rank_metrics(store, run_id, rank)
    require_steps(info, "no layer measurements to show")
    metrics = layer_metrics(names)
    if sort_by is not None and sort_by not in metrics:
        raise BadInput(f"cannot sort by {sort_by!r}: this run's layer metrics are {', '.join(metrics) or 'none'}")
    if step_range is not None:
        start, end = parse_steps(step_range)
        layer_list = store.layers(run_id)
        values, nans = over_range(store, run_id, layer_list, metrics, start, end, aggregate, chosen)
        shown_step = None
    else:
        if step is not None and info.last_step is not None and step > info.last_step:
            raise BadInput(f"step {step} is after the run's last step {info.last_step}")
        table = store.layers_at_step(run_id, step, metrics or None, rank=chosen)
        layer_list, shown_step = table.layers, table.step
        values, nans = at_step(table, metrics), {}
        start = end = None
    if metrics and all(v is None for m in metrics for v in values[m]):
        what = f"at step {shown_step}" if step_range is None else f"in steps {step_range}"
        raise BadInput(f"no layer measurements {what}; activations are measured every few steps "
                       f"(see gradwatch show {run})")
    rows = [{"index": ly.index, "layer": ly.name, "type": ly.type, "family": ly.family,
             **{m: values[m][i] for m in metrics}} for i, ly in enumerate(layer_list)]
    if step_range is not None:
        for i, r in enumerate(rows):
            r["nan_steps"] = {m: nans[m][i] for m in metrics if nans[m][i]}
    if sort_by is not None:  # NaN has no order: after the numbers, before the layers not measured
        ordered = [r for r in rows if r[sort_by] is not None and not math.isnan(r[sort_by])]
        ordered.sort(key=lambda r: r[sort_by], reverse=not asc)
        rows = ordered + [r for r in rows if r[sort_by] is not None and math.isnan(r[sort_by])] + \
            [r for r in rows if r[sort_by] is None]
    data = {"run": {"id": run_id, "name": info.name}, "rank": chosen, "step": shown_step, "start": start,
            "end": end, "aggregate": aggregate if step_range is not None else None, "metrics": metrics, "layers": rows}
    fmt.emit(data, as_json, lambda d: _render({**d, "ranked": rank is not None or info.world_size > 1}))
