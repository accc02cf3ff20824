"""`gradwatch show RUN`: one run's summary: config, status, steps, non-finite values, init check, guard
events, layers at risk (the per-step parts of one rank: rank 0 unless --rank)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from gradwatch.cli import _format as fmt
from gradwatch.cli._options import CONTEXT, json_option, rank_metrics, rank_option, resolve_run, with_store
from gradwatch.cli.runs import run_row

if TYPE_CHECKING:
    import numpy as np

    from gradwatch.store import LayerTable, Series, Store

#: How many layers each "at risk" list names.
AT_RISK = 3
#: Events listed one by one (the rest are counted).
EVENTS_SHOWN = 10
#: Run-level counts of bad params (NaN/Inf gradient elements, a norm that overflowed float32):
#: a value above zero marks a bad step.
COUNTS = ("nonfinite_params", "overflow_params")


def run_level(store: Store, run_id: str, rank: int, metrics: dict[str, str]) -> dict[str, Series]:
    """Every run-level series of one rank (`metrics`: that rank's metric -> scope), by name."""
    return {m: store.run_series(run_id, m, rank=rank) for m in sorted(metrics) if metrics[m] == "run"}


def latest(series: dict[str, Series]) -> dict[str, dict[str, Any]]:
    """The last stored step and value of each run-level series (counts as ints)."""
    return {m: {"step": int(s.steps[-1]), "value": fmt.typed(m, float(s.values[-1]))}
            for m, s in series.items() if len(s.steps)}


def nonfinite_summary(series: dict[str, Series]) -> list[dict[str, Any]]:
    """Per run-level metric with NaN/Inf values, or a count of bad params above zero: how many
    steps of each kind, the first step and the step ranges (exact: every stored step)."""
    import numpy as np

    from gradwatch.diagnose.nonfinite import step_ranges

    out = []
    for metric, (steps, values) in series.items():
        if metric in COUNTS:
            bad = np.nan_to_num(values, nan=1.0) > 0
            kinds: dict[str, int] = {}
        else:
            bad = ~np.isfinite(values)
            kinds = {"nan": int(np.isnan(values).sum()), "inf": int(np.isposinf(values).sum()),
                     "-inf": int(np.isneginf(values).sum())}
        if bad.any():
            out.append({"metric": metric, "steps": int(bad.sum()), **kinds, "first_step": int(steps[bad][0]),
                        "ranges": step_ranges(steps, bad)})
    return out


def _ranked(table: LayerTable, metric: str, largest: bool) -> list[dict[str, Any]]:
    import numpy as np

    values: np.ndarray | None = table.values.get(metric)
    if values is None:
        return []
    rows = [i for i in np.argsort(values, kind="stable") if np.isfinite(values[i])]
    if largest:
        rows = [i for i in reversed(rows) if values[i] > 0]
    return [{"layer": table.layers[i].name, "type": table.layers[i].type, metric: float(values[i])}
            for i in rows[:AT_RISK]]


def _nonfinite_layers(table: LayerTable) -> list[dict[str, Any]]:
    """Layers with a NaN/Inf measurement at the table's step, or NaN/Inf outputs (act_nonfinite > 0)."""
    import math

    out = []
    for i, ly in enumerate(table.layers):
        bad = [m for m, values in table.values.items() if table.measured[m][i]
               and (not math.isfinite(values[i]) or (m == "act_nonfinite" and values[i] > 0))]
        if bad:
            out.append({"layer": ly.name, "type": ly.type, "metrics": bad})
    return out


def at_risk(table: LayerTable) -> dict[str, Any]:
    """The layers most at risk at the table's step: smallest and largest gradient flow, most saturated,
    most dead, and those with NaN/Inf values or outputs."""
    flow = "act_grad_norm" if "act_grad_norm" in table.values else "grad_norm"
    return {"step": table.step, "flow_metric": flow,
            "smallest_flow": _ranked(table, flow, largest=False), "largest_flow": _ranked(table, flow, largest=True),
            "most_saturated": _ranked(table, "saturation_ratio", largest=True),
            "most_dead": _ranked(table, "dead_ratio", largest=True), "nonfinite": _nonfinite_layers(table)}


def summarise(store: Store, run_id: str, rank: int | None = None) -> dict[str, Any]:
    """Everything `show` prints, as plain data with stable keys; the per-step parts (latest values,
    non-finite values, layers at risk) are rank `rank`'s (default 0)."""
    s = store.run_summary(run_id)
    chosen, names = rank_metrics(store, run_id, rank)
    events = store.events(run_id)
    table = store.layers_at_step(run_id, rank=chosen)
    series = run_level(store, run_id, chosen, names)
    return {
        "run": run_row(store, s.run), "rank": chosen,
        "versions": {"torch": s.torch_version, "gradwatch": s.gradwatch_version, "python": s.python_version},
        "device": s.device, "model": s.model, "optimizer": s.optimizer, "num_param_tensors": s.num_params,
        "num_layers": s.num_layers, "groups": s.groups, "config": s.config, "metrics": s.metrics,
        "latest": latest(series),
        "nonfinite": nonfinite_summary(series),
        "init_check": s.init_check,
        "event_counts": s.event_counts,
        "events": [{"kind": e.kind, "step": e.step, "rank": e.rank, "time": e.time, "data": e.data}
                   for e in events[:EVENTS_SHOWN]],
        "active_alerts": s.active_alerts,
        "alerts": alert_counts(store, run_id),
        "at_risk": at_risk(table),
    }


def alert_counts(store: Store, run_id: str) -> dict[str, Any]:
    """How many alerts `gradwatch serve` raised on the run, and the rules of those still firing."""
    found = store.alerts(run_id=run_id)
    return {"total": len(found), "firing": sorted({a.rule for a in found if a.active})}


def _event_text(data: dict[str, Any]) -> str:
    parts = []
    for key in ("layers", "params", "total", "limit", "action", "steps", "errors", "frames"):
        if key in data and data[key] not in (None, [], {}):
            v = data[key]
            v = ", ".join(map(str, v[:4])) + (" ..." if len(v) > 4 else "") if isinstance(v, list) else fmt.num(v)
            parts.append(f"{key} {v}")
    return "; ".join(parts)


def _optimizer_text(optimizer: dict[str, Any]) -> str:
    """'SGD (via AcceleratedOptimizer); ' from the run header's optimizer, '' when it has none."""
    if not optimizer.get("class"):
        return ""
    wrappers = optimizer.get("wrappers") or []
    return optimizer["class"] + (f" (via {', '.join(wrappers)})" if wrappers else "") + "; "


def _nonfinite_lines(entries: list[dict[str, Any]]) -> list[str]:
    from gradwatch.diagnose.nonfinite import ranges_text

    def steps(n: int) -> str:
        return f"{n} step{'s' * (n != 1)}"

    width = max((len(e["metric"]) for e in entries), default=0)
    lines = []
    for e in entries:
        kinds = [f"{name} on {steps(e[key])}" for key, name in (("nan", "NaN"), ("inf", "+Inf"), ("-inf", "-Inf"))
                 if e.get(key)]
        what = ", ".join(kinds) or f"above 0 on {steps(e['steps'])}"
        lines.append(f"  {e['metric'].ljust(width)}  {what}: {ranges_text([tuple(r) for r in e['ranges']])}")
    return lines


def _clip_text(clip: dict[str, Any]) -> str:
    mode = clip.get("mode", "none")
    if mode in ("norm", "param_norm"):
        return f"{mode}, max_norm {fmt.num(clip.get('max_norm'))}"
    if mode == "value":
        return f"value, max_value {fmt.num(clip.get('max_value'))}"
    return mode


def _model_text(d: dict[str, Any]) -> str:
    """'MLP, 1,249 parameters in 6 tensors, 5 layers': the model's size as the header recorded it
    (`model.num_params` elements) beside the named parameter tensors stored (`num_param_tensors`)."""
    model = d["model"]
    n, trainable = model.get("num_params"), model.get("num_trainable")
    counted = isinstance(n, int) and not isinstance(n, bool)
    size = f"{n:,} parameters in {d['num_param_tensors']} tensors" if counted else \
        f"{d['num_param_tensors']} parameter tensors"
    if counted and isinstance(trainable, int) and trainable != n:
        size += f" ({trainable:,} trainable)"
    return f"{model.get('class', '-')}, {size}, {d['num_layers']} layers, device {d['device'] or '-'}"


def _render(d: dict[str, Any]) -> str:
    r, cfg = d["run"], d["config"]
    measure = cfg.get("measure", {})
    steps = "no steps stored" if r["steps"] is None else f"{fmt.num(r['steps'])} steps"
    lines = [
        f"run        {r['id']}  {r['name']}  (project {r['project']})",
        f"status     {r['status']}, {steps} in {fmt.duration(r['duration_s'])}, "
        f"started {fmt.when(r['started_at'])} on {r['host'] or '-'}",
        *([f"rank       {d['rank']} of {r['world_size']} (latest, non-finite values and layers at risk; "
           "--rank N for another)"] if d["ranked"] else []),
        f"model      {_model_text(d)}",
        "optimizer  " + _optimizer_text(d["optimizer"])
        + ", ".join(f"group {g.get('index')}: lr {fmt.num(g.get('lr'))}" for g in d["groups"]),
        f"clipping   {_clip_text(cfg.get('clip', {}))}",
        f"measure    activations every {measure.get('activation_every', '-')} steps, params every "
        f"{measure.get('param_every', '-')}, flush every {measure.get('flush_every', '-')}",
        f"versions   torch {d['versions']['torch']}, gradwatch {d['versions']['gradwatch']}, "
        f"python {d['versions']['python']}",
        "latest     " + ", ".join(f"{m} {fmt.num(v['value'])}" for m, v in d["latest"].items()
                                  if m in ("loss", "grad_norm_total", "grad_norm_total_clipped", "clip_coef")),
        "",
        "non-finite values",
        *(_nonfinite_lines(d["nonfinite"]) or ["  none"]),
        "",
        "init check",
    ]
    if d["init_check"]:
        lines.append(fmt.table(("LAYER", "PARAM", "STD", "ACTIVATION", "SCHEME", "EXPECTED", "RATIO", "VERDICT"), [
            (c.get("layer"), c.get("param"), fmt.num(c.get("std")), c.get("activation") or "-", c.get("recommended"),
             fmt.num((c.get("expected") or {}).get(c.get("recommended"))), fmt.num(c.get("ratio")), c.get("verdict"))
            for c in d["init_check"]], right=(2, 5, 6)))
    else:
        lines.append("  no weight matrices checked")
    lines += ["", "guard events"]
    if d["event_counts"]:
        lines.append("  " + ", ".join(f"{k}: {v}" for k, v in sorted(d["event_counts"].items())))
        if d["ranked"]:  # events of every rank
            lines.append(fmt.table(("STEP", "RANK", "KIND", "DETAIL"), [
                (e["step"], e["rank"], e["kind"], _event_text(e["data"])) for e in d["events"]], right=(0, 1)))
        else:
            lines.append(fmt.table(("STEP", "KIND", "DETAIL"), [(e["step"], e["kind"], _event_text(e["data"]))
                                                                  for e in d["events"]], right=(0,)))
    else:
        lines.append("  none")
    risk = d["at_risk"]
    lines += ["", f"layers at risk (step {fmt.num(risk['step'])})"]
    labels = (("smallest_flow", f"smallest {risk['flow_metric']}", risk["flow_metric"]),
              ("largest_flow", f"largest {risk['flow_metric']}", risk["flow_metric"]),
              ("most_saturated", "most saturated", "saturation_ratio"), ("most_dead", "most dead", "dead_ratio"))
    rows = [(label, ", ".join(f"{e['layer']} ({e['type']}) "
                              f"{fmt.pct(e[metric]) if metric.endswith('ratio') else fmt.num(e[metric])}"
                              for e in risk[key])) for key, label, metric in labels]
    rows.append(("NaN/Inf", ", ".join(f"{e['layer']} ({e['type']}) {'/'.join(e['metrics'])}"
                                      for e in risk["nonfinite"])))
    width = max(len(label) for label, _ in rows)
    lines += [f"  {label.ljust(width)}  {text or '-'}" for label, text in rows]
    alerts = d["alerts"]
    if alerts["total"]:
        firing = alerts["firing"]
        lines += ["", f"alerts     {len(firing)} firing" + (f" ({', '.join(firing)})" if firing else "")
                  + f", {alerts['total']} in all: gradwatch alerts --run {r['id']}"]
    return "\n".join(lines)


@click.command(context_settings=CONTEXT, epilog="""\b
Example:
    gradwatch show demo-rnn-high-lr
    gradwatch show 3f9a --json
    gradwatch show my-ddp-run --rank 3""")
@click.argument("run")
@rank_option
@json_option
@with_store
def show(store: Store, run: str, rank: int | None, as_json: bool) -> None:
    """Summarise one run: config, status, steps, NaN/Inf values, the init check, guard events and the
    layers most at risk (smallest and largest gradient flow, most saturated, most dead, NaN/Inf)."""
    data = summarise(store, resolve_run(store, run), rank)
    fmt.emit(data, as_json, lambda d: _render({**d, "ranked": rank is not None or d["run"]["world_size"] > 1}))
