"""`gradwatch show RUN`: one run's summary: config, status, steps, init check, guard events, layers at risk."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from gradwatch.cli import _format as fmt
from gradwatch.cli._options import CONTEXT, json_option, resolve_run, with_store
from gradwatch.cli.runs import run_row

if TYPE_CHECKING:
    import numpy as np

    from gradwatch.store import LayerTable, Store

#: How many layers each "at risk" list names.
AT_RISK = 3
#: Events listed one by one (the rest are counted).
EVENTS_SHOWN = 10


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


def at_risk(table: LayerTable) -> dict[str, Any]:
    """The layers most at risk at the table's step: smallest and largest gradient flow, most saturated, most dead."""
    flow = "act_grad_norm" if "act_grad_norm" in table.values else "grad_norm"
    return {"step": table.step, "flow_metric": flow,
            "smallest_flow": _ranked(table, flow, largest=False), "largest_flow": _ranked(table, flow, largest=True),
            "most_saturated": _ranked(table, "saturation_ratio", largest=True),
            "most_dead": _ranked(table, "dead_ratio", largest=True)}


def summarise(store: Store, run_id: str) -> dict[str, Any]:
    """Everything `show` prints, as plain data with stable keys."""
    s = store.run_summary(run_id)
    events = store.events(run_id)
    table = store.layers_at_step(run_id)
    return {
        "run": run_row(store, s.run),
        "versions": {"torch": s.torch_version, "gradwatch": s.gradwatch_version, "python": s.python_version},
        "device": s.device, "model": s.model, "num_params": s.num_params, "num_layers": s.num_layers,
        "groups": s.groups, "config": s.config, "metrics": s.metrics,
        "latest": {m: {"step": st, "value": v} for m, (st, v) in sorted(s.latest.items())},
        "init_check": s.init_check,
        "event_counts": s.event_counts,
        "events": [{"kind": e.kind, "step": e.step, "rank": e.rank, "time": e.time, "data": e.data}
                   for e in events[:EVENTS_SHOWN]],
        "active_alerts": s.active_alerts,
        "at_risk": at_risk(table),
    }


def _event_text(data: dict[str, Any]) -> str:
    parts = []
    for key in ("layers", "params", "total", "limit", "action", "steps", "errors", "frames"):
        if key in data and data[key] not in (None, [], {}):
            v = data[key]
            v = ", ".join(map(str, v[:4])) + (" ..." if len(v) > 4 else "") if isinstance(v, list) else fmt.num(v)
            parts.append(f"{key} {v}")
    return "; ".join(parts)


def _clip_text(clip: dict[str, Any]) -> str:
    mode = clip.get("mode", "none")
    if mode in ("norm", "param_norm"):
        return f"{mode}, max_norm {fmt.num(clip.get('max_norm'))}"
    if mode == "value":
        return f"value, max_value {fmt.num(clip.get('max_value'))}"
    return mode


def _render(d: dict[str, Any]) -> str:
    r, cfg = d["run"], d["config"]
    measure = cfg.get("measure", {})
    lines = [
        f"run        {r['id']}  {r['name']}  (project {r['project']})",
        f"status     {r['status']}, {fmt.num(r['steps'])} steps in {fmt.duration(r['duration_s'])}, "
        f"started {fmt.when(r['started_at'])} on {r['host'] or '-'}",
        f"model      {d['model'].get('class', '-')}, {d['num_params']} params, {d['num_layers']} layers, "
        f"device {d['device'] or '-'}",
        "optimizer  " + ", ".join(f"group {g.get('index')}: lr {fmt.num(g.get('lr'))}" for g in d["groups"]),
        f"clipping   {_clip_text(cfg.get('clip', {}))}",
        f"measure    activations every {measure.get('activation_every', '-')} steps, params every "
        f"{measure.get('param_every', '-')}, flush every {measure.get('flush_every', '-')}",
        f"versions   torch {d['versions']['torch']}, gradwatch {d['versions']['gradwatch']}, "
        f"python {d['versions']['python']}",
        "latest     " + ", ".join(f"{m} {fmt.num(v['value'])}" for m, v in d["latest"].items()
                                  if m in ("loss", "grad_norm_total", "grad_norm_total_clipped", "clip_coef")),
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
        lines.append(fmt.table(("STEP", "KIND", "DETAIL"), [(e["step"], e["kind"], _event_text(e["data"]))
                                                              for e in d["events"]], right=(0,)))
    else:
        lines.append("  none")
    risk = d["at_risk"]
    lines += ["", f"layers at risk (step {fmt.num(risk['step'])})"]
    labels = (("smallest_flow", f"smallest {risk['flow_metric']}", risk["flow_metric"]),
              ("largest_flow", f"largest {risk['flow_metric']}", risk["flow_metric"]),
              ("most_saturated", "most saturated", "saturation_ratio"), ("most_dead", "most dead", "dead_ratio"))
    width = max(len(label) for _, label, _ in labels)
    for key, label, metric in labels:
        entries = risk[key]
        text = ", ".join(f"{e['layer']} ({e['type']}) {fmt.pct(e[metric]) if metric.endswith('ratio') else fmt.num(e[metric])}"
                         for e in entries) or "-"
        lines.append(f"  {label.ljust(width)}  {text}")
    if d["active_alerts"]:
        lines.append(f"\n{d['active_alerts']} active alerts")
    return "\n".join(lines)


@click.command(context_settings=CONTEXT, epilog="""\b
Example:
    gradwatch show demo-rnn-high-lr
    gradwatch show 3f9a --json""")
@click.argument("run")
@json_option
@with_store
def show(store: Store, run: str, as_json: bool) -> None:
    """Summarise one run: config, status, steps, the init check, guard events and the layers most at
    risk (smallest and largest gradient flow, most saturated, most dead)."""
    fmt.emit(summarise(store, resolve_run(store, run)), as_json, _render)
