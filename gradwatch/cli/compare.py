"""`gradwatch compare RUN_A RUN_B`: two runs side by side, and the layers whose measurements differ most."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import click

from gradwatch.cli import _format as fmt
from gradwatch.cli._errors import BadInput
from gradwatch.cli._options import CONTEXT, json_option, resolve_run, with_store
from gradwatch.cli.layers import layer_metrics

if TYPE_CHECKING:
    from gradwatch.store import Store


def steady(values: Any) -> float | None:
    """Median of the last half of a history (the steady part of a run), NaN values left out;
    NaN when every one is NaN, None when nothing was measured."""
    import numpy as np

    from gradwatch.diagnose.rundata import nanmedian

    v = np.asarray(values, dtype=np.float64)
    return float(nanmedian(v[len(v) // 2:])) if len(v) else None


def run_side(store: Store, run_id: str) -> dict[str, Any]:
    """Run-level numbers compared: steps, status, final loss, total norm (median and max, NaN
    steps left out), clip rate, and exact counts of the steps whose loss / total norm is NaN or ±Inf."""
    import numpy as np

    info, names = store.run(run_id), store.metric_names(run_id)

    def series(metric: str) -> Any:
        return store.run_series(run_id, metric).values if names.get(metric) == "run" else None

    def nonfinite(values: Any) -> int | None:
        return None if values is None else int(np.count_nonzero(~np.isfinite(values)))

    loss, norms, coef = series("loss"), series("grad_norm_total"), series("clip_coef")
    ordered = norms[~np.isnan(norms)] if norms is not None else np.array([])
    return {"id": run_id, "name": info.name, "status": info.status,
            "steps": None if info.last_step is None else info.last_step + 1,
            "final_loss": float(loss[-1]) if loss is not None and len(loss) else None,
            "median_grad_norm_total": float(np.median(ordered)) if len(ordered) else None,
            "max_grad_norm_total": float(ordered.max()) if len(ordered) else None,
            "clip_rate": float(np.mean(coef < 1 - 1e-6)) if coef is not None and len(coef) else None,
            "nonfinite_loss_steps": nonfinite(loss), "nonfinite_grad_norm_steps": nonfinite(norms)}


def layer_diffs(store: Store, run_a: str, run_b: str, metric: str) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """Per layer present in both runs (matched by name): the steady value in each and the ratio B/A,
    largest difference first; and the layers only in A, only in B."""
    from gradwatch.store import UnknownEntity, UnknownMetric

    names_a = [ly.name for ly in store.layers(run_a)]
    names_b = [ly.name for ly in store.layers(run_b)]
    rows = []
    for name in [n for n in names_a if n in set(names_b)]:
        try:
            a = steady(store.layer_history(run_a, name, metric).values)
            b = steady(store.layer_history(run_b, name, metric).values)
        except (UnknownMetric, UnknownEntity):
            continue
        if a is None and b is None:
            continue
        ratio = b / a if a is not None and b is not None and a > 0 and math.isfinite(a) and math.isfinite(b) else None
        rows.append({"layer": name, "a": a, "b": b, "ratio": ratio,
                     "log10_ratio": math.log10(ratio) if ratio is not None and ratio > 0 else None})
    rows.sort(key=lambda r: -abs(r["log10_ratio"]) if r["log10_ratio"] is not None else math.inf)
    only_a = [n for n in names_a if n not in set(names_b)]
    only_b = [n for n in names_b if n not in set(names_a)]
    return rows, only_a, only_b


def _factor(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"x{ratio:.3g}" if ratio >= 1 else f"/{1 / ratio:.3g}" if ratio > 0 else "x0"


def _render(d: dict[str, Any]) -> str:
    a, b = d["a"], d["b"]
    keys = (("status", str), ("steps", fmt.num), ("final_loss", fmt.num), ("median_grad_norm_total", fmt.num),
            ("max_grad_norm_total", fmt.num), ("clip_rate", fmt.pct), ("nonfinite_loss_steps", fmt.num),
            ("nonfinite_grad_norm_steps", fmt.num))
    lines = [fmt.table(("", f"A: {a['name']} ({a['id']})", f"B: {b['name']} ({b['id']})"),
                       [(k, f(a[k]), f(b[k])) for k, f in keys]), "",
             f"{d['metric']} per layer (median over the last half of each run), largest difference first"]
    rows = d["layers"][: d["top"]] if d["top"] else d["layers"]
    lines.append(fmt.table(("LAYER", "A", "B", "B/A"), [(r["layer"], fmt.num(r["a"]), fmt.num(r["b"]),
                                                         _factor(r["ratio"])) for r in rows], right=(1, 2, 3))
                 if rows else "  no layer has this metric in both runs")
    if d["top"] and len(d["layers"]) > d["top"]:
        lines.append(f"... {len(d['layers']) - d['top']} more layers (--top 0 shows all)")
    for key, label in (("only_a", "only in A"), ("only_b", "only in B")):
        if d[key]:
            lines.append(f"{label}: {', '.join(d[key])}")
    return "\n".join(lines)


@click.command(context_settings=CONTEXT, epilog="""\b
Example:
    gradwatch compare demo-rnn-high-lr demo-rnn-high-lr-clipped
    gradwatch compare demo-sigmoid-default-init demo-sigmoid-normal-init --metric saturation_ratio""")
@click.argument("run_a")
@click.argument("run_b")
@click.option("--metric", "-m", help="Layer metric to compare.  [default: act_grad_norm, else grad_norm]")
@click.option("--top", type=click.IntRange(min=0), default=15, show_default=True,
              help="Show the N layers that differ most (0: all).")
@json_option
@with_store
def compare(store: Store, run_a: str, run_b: str, metric: str | None, top: int, as_json: bool) -> None:
    """Compare two runs side by side: run-level numbers, then per layer which layers differ most."""
    id_a, id_b = resolve_run(store, run_a), resolve_run(store, run_b)
    common = [m for m in layer_metrics(store, id_a) if m in set(layer_metrics(store, id_b))]
    if metric is None:
        metric = "act_grad_norm" if "act_grad_norm" in common else "grad_norm"
    if metric not in common:
        raise BadInput(f"{metric!r} is not a layer metric of both runs; shared: {', '.join(common) or 'none'}")
    rows, only_a, only_b = layer_diffs(store, id_a, id_b, metric)
    data = {"a": run_side(store, id_a), "b": run_side(store, id_b), "metric": metric, "layers": rows,
            "only_a": only_a, "only_b": only_b}
    fmt.emit(data, as_json, lambda d: _render({**d, "top": top}))
