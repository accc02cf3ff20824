"""Rules about steps that went wrong or were changed: non-finite gradients and clipping."""

from __future__ import annotations

import numpy as np

from gradwatch.diagnose import thresholds as th
from gradwatch.diagnose.findings import Evidence, Finding
from gradwatch.diagnose.flow import suggest_clip_threshold
from gradwatch.diagnose.rundata import RunData


def _first_bad_step(data: RunData, metric: str) -> tuple[int, int | None]:
    """How many steps of a run-level metric are bad, and the first one.

    Bad is non-finite for a value (loss, total norm), above zero for a count (nonfinite_params).
    """
    s = data.run.get(metric)
    if s is None:
        return 0, None
    v = s.values.astype(np.float64)
    bad = np.nan_to_num(v, nan=0.0) > 0 if metric == "nonfinite_params" else ~np.isfinite(v)
    idx = np.flatnonzero(bad)
    return len(idx), (int(s.steps[idx[0]]) if len(idx) else None)


def nonfinite(data: RunData) -> list[Finding]:
    """NaN or Inf in gradients (from guard events, the per-step count or the total norm) or in the loss."""
    events = [e for e in data.events if e.get("kind") == "nonfinite"]
    n_params, first_params = _first_bad_step(data, "nonfinite_params")
    n_norm, first_norm = _first_bad_step(data, "grad_norm_total")
    n_loss, first_loss = _first_bad_step(data, "loss")
    if not (events or n_params or n_norm or n_loss):
        return []
    firsts = [s for s in (first_params, first_norm, first_loss) if s is not None]
    firsts += [int(e["step"]) for e in events]
    first = min(firsts)
    layers: list[str] = []
    for e in sorted(events, key=lambda e: int(e["step"]))[:1]:
        layers = [str(x) for x in (e.get("data") or {}).get("layers", [])]
    summary = [f"first non-finite value at step {first}"]
    if layers:
        summary.append(f"first layers with NaN/Inf gradients: {', '.join(layers[:5])}")
    if n_norm or n_params:
        summary.append(f"non-finite gradients on {max(n_norm, n_params)} steps")
    if n_loss:
        summary.append(f"non-finite loss on {n_loss} steps, first at step {first_loss}")
    causes = ("gradients overflowed after exploding (see the total norm before this step)",
              "a learning rate so high that weights overflow",
              "an operation undefined at its input in the forward pass or the loss: log(0), x/0, sqrt of a negative",
              "float16 overflow without loss scaling")
    remedies = ("lower the learning rate and clip the total gradient norm",
                "set the guard to skip bad steps: config {'guards': {'nonfinite': 'skip'}}",
                "guard the loss: clamp probabilities before log, add eps to divisions; use bf16 or a GradScaler")
    evidence = Evidence(tuple(summary),
                        {"first_step": float(first), "nonfinite_steps": float(max(n_norm, n_params)),
                         "nonfinite_loss_steps": float(n_loss), "events": float(len(events))},
                        layers=tuple(layers), steps=(first,))
    return [Finding("nonfinite_gradients", "error", "Non-finite gradients (NaN/Inf)", evidence, causes, remedies)]


def clipping_rate(data: RunData) -> list[Finding]:
    """Clipping that acts on most steps: the threshold is below the typical gradient norm."""
    coef = data.run.get("clip_coef")
    clip = data.clip_config
    if coef is None or clip["mode"] == "none" or coef.values.size == 0:
        return []
    v = coef.values.astype(np.float64)
    measured = v[np.isfinite(v)]
    if not len(measured):
        return []
    rate = float(np.mean(measured < 1.0 - 1e-6))
    if rate <= th.CLIP_RATE:
        return []
    pre = data.run.get("grad_norm_total")
    norms = pre.values.astype(np.float64) if pre is not None else np.array([])
    finite = norms[np.isfinite(norms)]
    suggested = suggest_clip_threshold(norms) if len(norms) else None
    summary = [f"clipping ({clip['mode']}) changed the gradients on {rate:.0%} of {len(measured)} steps"]
    values = {"clip_rate": rate, "threshold_rate": th.CLIP_RATE}
    if clip.get("max_norm") is not None and len(finite):
        summary.append(f"threshold {clip['max_norm']:.3g}, median pre-clip norm {np.median(finite):.3g}")
        values.update(max_norm=float(clip["max_norm"]), median_norm=float(np.median(finite)))
    remedies = []
    if suggested is not None:
        values["suggested_clip"] = suggested
        remedies.append(f"raise the threshold to about {suggested:.3g} (the {th.CLIP_PERCENTILE:.0f}th percentile "
                        "of this run's ordinary pre-clip norms), so clipping only catches spikes")
    remedies.append("if the norms keep growing, lower the learning rate instead of clipping harder")
    causes = ("the threshold is below the typical gradient norm, so clipping rescales almost every step: "
              "it acts like a smaller, varying learning rate and hides how large the gradients are",
              "the gradients themselves are too large (learning rate, initialisation; see other findings)")
    return [Finding("clipping_rate", "warning", "Clipping on most steps", Evidence(tuple(summary), values),
                    causes, tuple(remedies))]
