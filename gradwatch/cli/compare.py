"""`gradwatch compare RUN_A RUN_B`: two runs side by side, and the layers whose measurements differ most."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import click

from gradwatch.cli import _format as fmt
from gradwatch.cli._errors import BadInput
from gradwatch.cli._options import (
    CONTEXT,
    json_option,
    rank_metrics,
    rank_option,
    require_steps,
    resolve_run,
    with_store,
)
from gradwatch.cli.layers import layer_metrics

if TYPE_CHECKING:
    from gradwatch.store import LayerInfo, RunInfo, Store


def steady_steps(info: RunInfo) -> tuple[int, int]:
    """The steady part of a run, its last half: steps (last + 1) // 2 to last, inclusive (the range
    to give `history --steps` for the same median)."""
    last = int(info.last_step or 0)
    return (last + 1) // 2, last


def run_side(store: Store, info: RunInfo, rank: int, names: dict[str, str]) -> dict[str, Any]:
    """Run-level numbers compared (whole run, one rank): steps, status, final loss, total norm
    (median and max, NaN steps left out, as `history` computes them), clip rate, exact counts of
    the steps whose loss / total norm is NaN or ±Inf, and the steps the layer medians cover."""
    import numpy as np

    from gradwatch.cli._stats import median

    def series(metric: str) -> Any:
        return store.run_series(info.id, metric, rank=rank).values if names.get(metric) == "run" else None

    def nonfinite(values: Any) -> int | None:
        return None if values is None else int(np.count_nonzero(~np.isfinite(values)))

    loss, norms, coef = series("loss"), series("grad_norm_total"), series("clip_coef")
    ordered = norms[~np.isnan(norms)] if norms is not None else np.array([])
    return {"id": info.id, "name": info.name, "status": info.status,
            "steps": None if info.last_step is None else info.last_step + 1,
            "final_loss": float(loss[-1]) if loss is not None and len(loss) else None,
            "median_grad_norm_total": median(ordered) if len(ordered) else None,
            "max_grad_norm_total": float(ordered.max()) if len(ordered) else None,
            "clip_rate": float(np.mean(coef < 1 - 1e-6)) if coef is not None and len(coef) else None,
            "nonfinite_loss_steps": nonfinite(loss), "nonfinite_grad_norm_steps": nonfinite(norms),
            "steady_steps": list(steady_steps(info))}


def pair_layers(layers_a: list[LayerInfo], layers_b: list[LayerInfo]) -> dict[str, Any]:
    """Layers of A and B paired by name, never by position: a name whose type differs in B (the
    second `0` of another architecture) is not the same layer and is not paired."""
    type_b = {ly.name: ly.type for ly in layers_b}
    type_a = {ly.name: ly.type for ly in layers_a}
    return {"paired": [ly.name for ly in layers_a if type_b.get(ly.name) == ly.type],
            "only_a": [ly.name for ly in layers_a if ly.name not in type_b],
            "only_b": [ly.name for ly in layers_b if ly.name not in type_a],
            "type_differs": [{"layer": ly.name, "a": ly.type, "b": type_b[ly.name]} for ly in layers_a
                             if ly.name in type_b and type_b[ly.name] != ly.type]}


def layer_diffs(store: Store, a: dict[str, Any], b: dict[str, Any], names: list[str], metric: str,
                rank: int) -> list[dict[str, Any]]:
    """Per paired layer: the median of `metric` over each run's steady steps (NaN left out; NaN when
    every value is NaN) and the ratio B/A, largest difference first."""
    from gradwatch.cli._stats import median
    from gradwatch.store import UnknownEntity, UnknownMetric

    rows = []
    for name in names:
        try:
            va = median(store.layer_history(a["id"], name, metric, *a["steady_steps"], rank=rank).values)
            vb = median(store.layer_history(b["id"], name, metric, *b["steady_steps"], rank=rank).values)
        except (UnknownMetric, UnknownEntity):
            continue
        if va is None and vb is None:
            continue
        ratio = vb / va if va is not None and vb is not None and va > 0 and math.isfinite(va) and math.isfinite(vb) \
            else None
        rows.append({"layer": name, "a": va, "b": vb, "ratio": ratio,
                     "log10_ratio": math.log10(ratio) if ratio is not None and ratio > 0 else None})
    rows.sort(key=lambda r: -abs(r["log10_ratio"]) if r["log10_ratio"] is not None else math.inf)
    return rows


def layer_warning(pairing: dict[str, Any], n_a: int, n_b: int) -> str | None:
    """One line when A and B do not have the same layers (another architecture, or a changed model)."""
    if not (pairing["only_a"] or pairing["only_b"] or pairing["type_differs"]):
        return None
    parts = [f"{len(pairing[k])} {label}" for k, label in (("only_a", "only in A"), ("only_b", "only in B"),
                                                          ("type_differs", "with another type in B")) if pairing[k]]
    return (f"gradwatch: warning: A and B have different layers ({n_a} in A, {n_b} in B; {', '.join(parts)}): "
            f"layers are compared by name, {len(pairing['paired'])} paired")


def _render(d: dict[str, Any]) -> str:
    a, b = d["a"], d["b"]
    keys = (("status", str), ("steps", fmt.num), ("final_loss", fmt.num), ("median_grad_norm_total", fmt.num),
            ("max_grad_norm_total", fmt.num), ("clip_rate", fmt.pct), ("nonfinite_loss_steps", fmt.num),
            ("nonfinite_grad_norm_steps", fmt.num))
    on_rank = f", rank {d['rank']}" if d["ranked"] else ""
    (sa, ea), (sb, eb) = a["steady_steps"], b["steady_steps"]
    window = f"steps {sa}-{ea}" + (f" of A, {sb}-{eb} of B" if (sa, ea) != (sb, eb) else " of each run")
    lines = [fmt.table(("", f"A: {a['name']} ({a['id']})", f"B: {b['name']} ({b['id']})"),
                       [(k, f(a[k]), f(b[k])) for k, f in keys]), "",
             f"{d['metric']} per layer{on_rank}, median over the last half ({window}), largest difference first"]
    rows = d["layers"][: d["top"]] if d["top"] else d["layers"]
    lines.append(fmt.table(("LAYER", "A", "B", "B VS A"), [(r["layer"], fmt.num(r["a"]), fmt.num(r["b"]),
                                                            fmt.factor(r["ratio"])) for r in rows], right=(1, 2))
                 if rows else "  no layer has this metric in both runs")
    if d["top"] and len(d["layers"]) > d["top"]:
        more = len(d["layers"]) - d["top"]
        lines.append(f"... {more} more layer{'s' * (more != 1)} (--top 0 shows all)")
    for key, label in (("only_a", "only in A"), ("only_b", "only in B")):
        if d[key]:
            lines.append(f"{label}: {_some(d[key])}")
    if d["type_differs"]:
        lines.append("same name, another type (not compared): "
                     + _some([f"{t['layer']} ({t['a']} in A, {t['b']} in B)" for t in d["type_differs"]]))
    return "\n".join(lines)


def _some(names: list[str], shown: int = 8) -> str:
    """The first `shown` names, and how many more (--json lists them all)."""
    more = f", ... {len(names) - shown} more (--json lists all)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


@click.command(context_settings=CONTEXT, epilog="""\b
Example:
    gradwatch compare demo-rnn-high-lr demo-rnn-high-lr-clipped
    gradwatch compare demo-sigmoid-default-init demo-sigmoid-normal-init --metric saturation_ratio
    gradwatch compare my-ddp-run my-ddp-run-v2 --rank 3""")
@click.argument("run_a")
@click.argument("run_b")
@click.option("--metric", "-m", help="Layer metric to compare.  [default: act_grad_norm, else grad_norm]")
@click.option("--top", type=click.IntRange(min=0), default=15, show_default=True,
              help="Show the N layers that differ most (0: all).")
@rank_option
@json_option
@with_store
def compare(store: Store, run_a: str, run_b: str, metric: str | None, top: int, rank: int | None,
            as_json: bool) -> None:
    """Compare two runs side by side: run-level numbers, then, for the layers of the same name and
    type, which differ most (median over the last half of each run)."""
    id_a, id_b = resolve_run(store, run_a), resolve_run(store, run_b)
    info_a, info_b = store.run(id_a), store.run(id_b)
    if id_a == id_b:
        same = [r.id for r in store.list_runs() if r.name == info_a.name and r.id != id_a]
        hint = f"; other runs named {info_a.name}: {', '.join(same[:5])}" if same else ""
        raise BadInput(f"{run_a!r} and {run_b!r} are the same run {id_a} ({info_a.name}): nothing to compare{hint}")
    for info in (info_a, info_b):
        require_steps(info, "nothing to compare")
    chosen, names_a = rank_metrics(store, id_a, rank)
    _, names_b = rank_metrics(store, id_b, rank)
    common = [m for m in layer_metrics(names_a) if m in set(layer_metrics(names_b))]
    if metric is None:
        metric = "act_grad_norm" if "act_grad_norm" in common else "grad_norm"
    if metric not in common:
        raise BadInput(f"{metric!r} is not a layer metric of both runs; shared: {', '.join(common) or 'none'}")
    layers_a, layers_b = store.layers(id_a), store.layers(id_b)
    pairing = pair_layers(layers_a, layers_b)
    warning = layer_warning(pairing, len(layers_a), len(layers_b))
    if warning:
        click.echo(warning, err=True)
    a, b = run_side(store, info_a, chosen, names_a), run_side(store, info_b, chosen, names_b)
    data = {"a": a, "b": b, "rank": chosen, "metric": metric,
            "layers": layer_diffs(store, a, b, pairing["paired"], metric, chosen),
            "only_a": pairing["only_a"], "only_b": pairing["only_b"], "type_differs": pairing["type_differs"]}
    ranked = rank is not None or max(info_a.world_size, info_b.world_size) > 1
    fmt.emit(data, as_json, lambda d: _render({**d, "top": top, "ranked": ranked}))
