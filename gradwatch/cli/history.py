"""`gradwatch history RUN --metric M`: one series over steps, as a sparkline (or every value with --json)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from gradwatch.cli import _format as fmt
from gradwatch.cli._errors import BadInput
from gradwatch.cli._options import CONTEXT, json_option, parse_steps, resolve_run, with_store

if TYPE_CHECKING:
    from gradwatch.store import Series, Store


def read_series(store: Store, run_id: str, metric: str, layer: str | None, param: str | None, group: int,
                start: int | None, end: int | None) -> tuple[str, str, Series]:
    """(scope, entity, series) of a metric; says which of --layer / --param the metric needs."""
    names = store.metric_names(run_id)
    scope = names.get(metric)
    if scope is None:
        raise BadInput(f"run has no metric {metric!r}; its metrics are {', '.join(sorted(names))}")
    if layer is not None and param is not None:
        raise BadInput("give either --layer or --param, not both")
    if layer is not None:
        if scope not in ("layer", "param") or (scope == "param" and metric != "grad_norm"):
            raise BadInput(f"{metric} is a {scope}-level metric, not a layer metric")
        return "layer", layer, store.layer_history(run_id, layer, metric, start, end)
    if param is not None:
        if scope != "param":
            raise BadInput(f"{metric} is a {scope}-level metric, not a param metric")
        return "param", param, store.param_history(run_id, param, metric, start, end)
    if scope in ("layer", "param"):
        what = "--layer L" if scope == "layer" else "--param P (or --layer L for grad_norm)"
        raise BadInput(f"{metric} is measured per {scope}: give {what} (see gradwatch layers)")
    return scope, str(group) if scope == "group" else "", store.run_series(run_id, metric, start, end, group=group)


def _render(d: dict[str, Any]) -> str:
    import numpy as np

    from gradwatch.diagnose.nonfinite import nonfinite_counts, ranges_text

    steps, values = np.asarray(d["steps"]), np.asarray(d["values"], dtype=np.float64)
    target = f" of {d['scope']} {d['entity']}" if d["entity"] else ""
    head = f"{d['metric']}{target}, run {d['run']['name']} ({d['run']['id']})"
    if not len(steps):
        return f"{head}\nno values in this step range"
    ordered = values[~np.isnan(values)]  # +-Inf order with the rest; NaN has no place
    finite = values[np.isfinite(values)]
    spread = []
    if len(ordered):
        spread.append(f"min {fmt.num(ordered.min())}, median {fmt.num(float(np.median(ordered)))}, "
                      f"max {fmt.num(ordered.max())}" + (" (NaN left out)" if len(ordered) < len(values) else ""))
    stats = f"{len(steps)} values, steps {steps[0]}..{steps[-1]}; " + ", ".join(
        [*spread, f"last {fmt.num(values[-1])}"])
    spark = fmt.sparkline(values, width=d["width"])
    scale = " (log scale)" if len(finite) and finite.min() > 0 and finite.max() > 100 * finite.min() else ""
    kinds = nonfinite_counts(steps, values)
    tail = ["non-finite values (! above): " + "; ".join(f"{name} on {n} step{'s' * (n != 1)} ({ranges_text(r)})"
                                                    for name, n, r in kinds)] if kinds else []
    return "\n".join([head, spark, f"{str(steps[0]).ljust(max(1, len(spark) - len(str(steps[-1]))))}{steps[-1]}",
                      stats + scale, *tail])


@click.command(context_settings=CONTEXT, epilog="""\b
Example:
    gradwatch history demo-rnn-high-lr --metric grad_norm_total
    gradwatch history demo-sigmoid-default-init --metric act_grad_norm --layer 0
    gradwatch history demo-healthy --metric grad_norm --param 0.weight --steps 100: --json""")
@click.argument("run")
@click.option("--metric", "-m", required=True, help="Metric name (gradwatch show RUN --json lists them).")
@click.option("--layer", "-l", help="Layer name, for per-layer metrics (and grad_norm of a layer).")
@click.option("--param", "-p", help="Param name, for per-param metrics.")
@click.option("--group", type=click.IntRange(min=0), default=0, show_default=True, help="Param group, for lr.")
@click.option("--steps", "step_range", metavar="START:END", help="Only this step range.")
@click.option("--width", type=click.IntRange(min=4, max=400), default=72, show_default=True,
              help="Sparkline width in characters.")
@json_option
@with_store
def history(store: Store, run: str, metric: str, layer: str | None, param: str | None, group: int,
            step_range: str | None, width: int, as_json: bool) -> None:
    """One metric over steps: run-level (loss, grad_norm_total, clip_coef ...), per layer or per param,
    with a terminal sparkline (each character shows the largest value of its steps)."""
    run_id = resolve_run(store, run)
    start, end = parse_steps(step_range) if step_range else (None, None)
    from gradwatch.store import UnknownEntity

    try:
        scope, entity, series = read_series(store, run_id, metric, layer, param, group, start, end)
    except UnknownEntity:
        if layer is None and param is None:
            groups = [str(g.get("index")) for g in store.run_summary(run_id).groups]
            raise BadInput(f"run has no param group {group}; its groups are {', '.join(groups)}") from None
        names = [x.name for x in (store.layers(run_id) if layer is not None else store.params(run_id))]
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        kind = "layer" if layer is not None else "param"
        raise BadInput(f"run has no {kind} {layer if layer is not None else param!r}; its {kind}s are {shown}") from None
    data = {"run": {"id": run_id, "name": store.run(run_id).name}, "metric": metric, "scope": scope,
            "entity": entity, "steps": series.steps, "values": series.values}
    fmt.emit(data, as_json, lambda d: _render({**d, "width": width}))
