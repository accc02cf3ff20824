"""`gradwatch history RUN --metric M`: one series over steps, as a sparkline (or every value with --json)."""

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
    from gradwatch.store import Series, Store


def read_series(store: Store, run_id: str, metric: str, layer: str | None, param: str | None, group: int,
                start: int | None, end: int | None, rank: int, names: dict[str, str]) -> tuple[str, str, Series]:
    """(scope, entity, series) of a metric on one rank (`names`: that rank's metrics); says which of
    --layer / --param the metric needs, and which ranks have a metric this rank did not record."""
    scope = names.get(metric)
    if scope is None:
        others = [str(r) for r, have in store.rank_metric_names(run_id).items() if metric in have]
        if others:  # under DDP rank 0 alone records the gradient norms, identical on every rank
            raise BadInput(f"rank {rank} recorded no {metric}; ranks that did: {', '.join(others)}")
        raise BadInput(f"run has no metric {metric!r}; its metrics are {', '.join(sorted(names))}")
    if layer is not None and param is not None:
        raise BadInput("give either --layer or --param, not both")
    if layer is not None:
        if scope not in ("layer", "param") or (scope == "param" and metric != "grad_norm"):
            raise BadInput(f"{metric} is a {scope}-level metric, not a layer metric")
        return "layer", layer, store.layer_history(run_id, layer, metric, start, end, rank=rank)
    if param is not None:
        if scope != "param":
            raise BadInput(f"{metric} is a {scope}-level metric, not a param metric")
        return "param", param, store.param_history(run_id, param, metric, start, end, rank=rank)
    if scope in ("layer", "param"):
        what = "--layer L" if scope == "layer" else "--param P (or --layer L for grad_norm)"
        raise BadInput(f"{metric} is measured per {scope}: give {what} (see gradwatch layers)")
    return scope, str(group) if scope == "group" else "", store.run_series(run_id, metric, start, end, rank=rank,
                                                                            group=group)


def _render(d: dict[str, Any]) -> str:
    import numpy as np

    from gradwatch.diagnose.nonfinite import nonfinite_counts, ranges_text

    steps, values = np.asarray(d["steps"]), np.asarray(d["values"], dtype=np.float64)
    target = f" of {d['scope']} {d['entity']}" if d["entity"] else ""
    on_rank = f", rank {d['rank']}" if d["ranked"] else ""
    head = f"{d['metric']}{target}, run {d['run']['name']} ({d['run']['id']}){on_rank}"
    if not len(steps):
        return f"{head}\nno values in this step range"
    s, finite = d["summary"], values[np.isfinite(values)]
    spread = []
    if s["nan"] < s["values"]:
        spread.append(f"min {fmt.num(s['min'])}, median {fmt.num(s['median'])}, max {fmt.num(s['max'])}"
                      + (" (NaN left out)" if s["nan"] else ""))
    stats = f"{s['values']} values, steps {steps[0]}..{steps[-1]}; " + ", ".join(
        [*spread, f"last {fmt.num(s['last'])}"])
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
    gradwatch history demo-healthy --metric grad_norm --param 0.weight --steps 100: --json
    gradwatch history my-ddp-run --metric act_grad_norm --layer fc1 --rank 3""")
@click.argument("run")
@click.option("--metric", "-m", required=True, help="Metric name (gradwatch show RUN --json lists them).")
@click.option("--layer", "-l", help="Layer name, for per-layer metrics (and grad_norm of a layer).")
@click.option("--param", "-p", help="Param name, for per-param metrics.")
@click.option("--group", type=click.IntRange(min=0), default=0, show_default=True, help="Param group, for lr.")
@click.option("--steps", "step_range", metavar="START:END", help="Only this step range.")
@click.option("--width", type=click.IntRange(min=4, max=400), default=72, show_default=True,
              help="Sparkline width in characters.")
@rank_option
@json_option
@with_store
def history(store: Store, run: str, metric: str, layer: str | None, param: str | None, group: int,
            step_range: str | None, width: int, rank: int | None, as_json: bool) -> None:
    """One metric over steps: run-level (loss, grad_norm_total, clip_coef ...), per layer or per param,
    with a terminal sparkline (each character shows the largest value of its steps)."""
    from gradwatch.cli._stats import summary
    from gradwatch.store import UnknownEntity

    run_id = resolve_run(store, run)
    start, end = parse_steps(step_range) if step_range else (None, None)
    info = store.run(run_id)
    chosen, names = rank_metrics(store, run_id, rank)
    require_steps(info, "no history to show")
    try:
        scope, entity, series = read_series(store, run_id, metric, layer, param, group, start, end, chosen, names)
    except UnknownEntity:
        if layer is None and param is None:
            groups = [str(g.get("index")) for g in store.run_summary(run_id).groups]
            raise BadInput(f"run has no param group {group}; its groups are {', '.join(groups)}") from None
        kind, wanted = ("layer", layer) if layer is not None else ("param", param)
        entities = [x.name for x in (store.layers(run_id) if layer is not None else store.params(run_id))]
        if wanted in entities:  # the layer exists: this rank recorded no such values for it
            raise BadInput(f"rank {chosen} recorded no {metric} for {kind} {wanted!r}") from None
        shown = ", ".join(entities[:12]) + (", ..." if len(entities) > 12 else "")
        raise BadInput(f"run has no {kind} {wanted!r}; its {kind}s are {shown}") from None
    data = {"run": {"id": run_id, "name": info.name}, "rank": chosen, "metric": metric, "scope": scope,
            "entity": entity, "steps": series.steps, "values": fmt.typed_list(metric, series.values),
            "summary": summary(metric, series.values)}
    fmt.emit(data, as_json, lambda d: _render({**d, "width": width, "ranked": rank is not None or info.world_size > 1}))
