"""Rules about the optimizer: Adam's second moments lagging (or ε dominating) before a spike,
update-to-weight ratios far outside their reference band, and spikes the agent's guard skipped.

They read what the agent records for optimizer health (docs/runlog.md): the per-layer Adam
statistics (`layer_adam_v_lag`, `layer_adam_eps_frac`, `layer_adam_update_rms`), the per-layer
update ratio (`update_to_weight`, with `update_to_weight_equilibrium` for scale-invariant weights
under weight decay), the spike detector's `spike_count`, `skip_rate` and `spike` events. A run
without them (an optimizer without Adam state, spike detection off) gets no judgement here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradwatch.diagnose import thresholds as th
from gradwatch.diagnose.findings import Evidence, Finding
from gradwatch.diagnose.rundata import RunData, Series
from gradwatch.diagnose.text import listing, num, plural, ranges_text, runs_of, span

LAG = ("Adam's second-moment estimate v̂ fell behind the squared gradients: v̂ averages over about "
       "1/(1 - beta2) steps, so a gradient that grows faster than that is divided by a stale, too small "
       "sqrt(v̂) and the update is several times its usual size (Wortsman et al. 2023; Molybog et al. 2023)")
EPS = ("eps dominated sqrt(v̂) for most elements of these layers: their gradients were so small that Adam "
       "took SGD-like steps of lr * m̂ / eps, and when the gradients grew the update RMS jumped")
SURGE = ("a sudden rise of the gradient: a bad or out-of-distribution batch, a change in the data, or weights "
         "shrunk (by weight decay or a rescale: the gradient of a weight followed by a normalisation layer grows "
         "as its norm shrinks)")
BATCH = "a batch whose gradient was far larger than the recent ones (a bad or out-of-distribution batch)"


def loss_spike_steps(data: RunData) -> np.ndarray:
    """Steps whose loss z-score (the agent's, against its rolling window) is above the spike guard's
    threshold: the loss spikes, whatever else spiked with them."""
    z = data.run.get("loss_z")
    if z is None or not z.values.size:
        return np.array([], dtype=np.int64)
    threshold = float(((data.config.get("guards") or {}).get("spike") or {}).get("z_threshold", 6.0))
    return z.steps[np.nan_to_num(z.values, nan=0.0) > threshold].astype(np.int64)


def _before(series: Series, step: int, spikes: np.ndarray) -> np.ndarray:
    """Columns of `series` in the ADAM_LOOKBACK steps before `step`, except loss-spike steps (a
    lag at a spiking step is that step's own gradient: a bad batch, not a precursor)."""
    steps = series.steps
    return np.flatnonzero((steps >= step - th.ADAM_LOOKBACK) & (steps < step) & ~np.isin(steps, spikes))


def _layer_max(series: Series, cols: np.ndarray) -> np.ndarray:
    """Each layer's largest measured value over `cols` (NaN where none was measured)."""
    if not len(cols):
        return np.full(series.values.shape[0], np.nan)
    values = np.where(series.measured[:, cols], series.values[:, cols], np.nan)
    with np.errstate(all="ignore"):
        out = np.full(values.shape[0], np.nan)
        has = np.isfinite(values).any(axis=1)
        out[has] = np.nanmax(values[has], axis=1)
    return out


def _precursors(data: RunData, step: int, spikes: np.ndarray) -> tuple[dict[int, float],
                                                                       dict[int, tuple[float, float]]]:
    """Before a loss spike at `step`: the layers whose lag reached ADAM_LAG_RATIO (layer -> lag),
    and those ε dominated (ADAM_EPS_FRACTION) whose update RMS then jumped by ADAM_RMS_JUMP
    (layer -> (ε fraction, jump))."""
    lag, eps, rms = (data.layer.get(m) for m in ("layer_adam_v_lag", "layer_adam_eps_frac", "layer_adam_update_rms"))
    lagging: dict[int, float] = {}
    if lag is not None:
        worst = _layer_max(lag, _before(lag, step, spikes))
        lagging = {int(r): float(worst[r]) for r in np.flatnonzero(np.nan_to_num(worst) >= th.ADAM_LAG_RATIO)}
    dominated: dict[int, tuple[float, float]] = {}
    if eps is not None and rms is not None:
        frac = _layer_max(eps, _before(eps, step, spikes))
        past = _before(rms, step, spikes)
        near = np.flatnonzero((rms.steps >= step - th.ADAM_LOOKBACK) & (rms.steps <= step))
        for r in np.flatnonzero(np.nan_to_num(frac) >= th.ADAM_EPS_FRACTION):
            base = rms.values[r, past][rms.measured[r, past]]
            peak = rms.values[r, near][rms.measured[r, near]]
            if len(base) and len(peak) and np.median(base) > 0:
                jump = float(np.max(peak) / np.median(base))
                if jump >= th.ADAM_RMS_JUMP:
                    dominated[int(r)] = (float(frac[r]), jump)
    return lagging, dominated


def adam_second_moment(data: RunData) -> list[Finding]:
    """Loss spikes preceded by Adam second moments that lagged the squared gradients, or by
    ε-dominated layers whose update RMS then jumped: oversized updates made the spike."""
    spikes = loss_spike_steps(data)
    onsets = [a for a, _ in runs_of(spikes)]  # a run of spiking steps is one spike
    found = [(s, *_precursors(data, s, spikes)) for s in onsets]
    found = [f for f in found if f[1] or f[2]]
    if not found:
        return []
    step, lagging, dominated = max(found, key=lambda f: max(f[1].values(), default=0.0))
    at = f"step {found[0][0]}" if len(found) == 1 else f"steps {ranges_text([(f[0], f[0]) for f in found])}"
    summary = [f"{plural(len(found), 'loss spike')} at {at} came within {th.ADAM_LOOKBACK} steps after Adam's "
               "second moments fell behind"]
    values: dict[str, float] = {"spikes": float(len(found)), "step": float(step)}
    layers: list[int] = []
    causes = []
    if lagging:
        worst = max(lagging, key=lambda r: lagging[r])
        summary.append(f"before the spike at step {step}: mean g²/(sqrt(v̂)+eps)² reached "
                       + listing([f"{data.layers[r].name} {num(v)}" for r, v in
                                  sorted(lagging.items(), key=lambda kv: -kv[1])])
                       + f" (healthy: about 1; threshold {num(th.ADAM_LAG_RATIO)})")
        values.update(value=lagging[worst], threshold=th.ADAM_LAG_RATIO, lag=lagging[worst])
        layers += sorted(lagging, key=lambda r: -lagging[r])
        causes += [LAG, SURGE]
    if dominated:
        summary.append("eps dominated sqrt(v̂) before it in " + listing(
            [f"{data.layers[r].name} ({f:.0%} of elements; update RMS then x{num(j)})" for r, (f, j) in
             dominated.items()]))
        worst = max(dominated, key=lambda r: dominated[r][1])
        values.setdefault("value", dominated[worst][0])
        values.setdefault("threshold", th.ADAM_EPS_FRACTION)
        values.update(eps_frac=dominated[worst][0], rms_jump=dominated[worst][1])
        layers += [r for r in dominated if r not in layers]
        causes.append(EPS)
    remedies = ["lower beta2 (0.999 to 0.95 or 0.98) so that v̂ follows the gradients within a few dozen steps",
                "lower the learning rate, or lengthen its warmup so that v̂ settles before the steps are large",
                "skip the steps whose gradient norm is an outlier before Adam applies them: config "
                "{'guards': {'spike': {'action': 'skip'}}} (no host sync with a fused optimizer)"]
    if dominated:
        remedies.insert(1, "use a smaller eps (1e-8 to 1e-15, Wortsman et al. 2023), so that v̂ rather than eps "
                           "sets the step size of small-gradient layers")
    evidence = Evidence(tuple(summary), values, layers=data.layer_names(layers), steps=tuple(f[0] for f in found[:10]))
    return [Finding("adam_second_moment", "warning", "Adam's second moments behind before a spike", evidence,
                    tuple(causes), tuple(remedies))]


def update_ratio_band(data: RunData) -> list[Finding]:
    """Layers whose median update-to-weight ratio lies more than UPDATE_RATIO_FAR outside the
    reference band of Adam-family training (or a scale-invariant weight's equilibrium): their
    learning rate is too high or too low for them. Normalisation layers are not judged."""
    ratio = data.layer.get("update_to_weight")
    if ratio is None or "layer_adam_update_rms" not in data.layer or ratio.values.size == 0:
        return []
    med = ratio.row_medians(th.WINDOW_FRACTION)
    equilibrium = data.layer.get("update_to_weight_equilibrium")
    eq = equilibrium.row_medians(th.WINDOW_FRACTION) if equilibrium is not None else np.full(len(med), np.nan)
    # A scale-invariant weight under weight decay tends to its equilibrium, whatever the band says (and
    # lags behind it while a schedule moves lr faster than 1/(lr wd) steps): the band is widened to it.
    settled = np.isfinite(eq) & (eq > 0)
    low = np.where(settled, np.minimum(eq, th.UPDATE_RATIO_LOW), th.UPDATE_RATIO_LOW) / th.UPDATE_RATIO_FAR
    high = np.where(settled, np.maximum(eq, th.UPDATE_RATIO_HIGH), th.UPDATE_RATIO_HIGH) * th.UPDATE_RATIO_FAR
    # 0: the layer was not updated at all (no gradient), not a slow LR. Normalisation layers hold gains and
    # shifts, not weight matrices, which is what the band is about.
    valid = np.isfinite(med) & (med > 0) & ~np.array([layer.is_norm for layer in data.layers], bool)
    above = np.flatnonzero(valid & (med > high))
    below = np.flatnonzero(valid & (med < low))
    if not len(above) and not len(below):
        return []
    window = ratio.window(th.WINDOW_FRACTION)

    def line(r: int) -> str:
        extra = f" (its equilibrium sqrt(2 lr wd) {num(float(eq[r]))})" if settled[r] else ""
        return f"{data.layers[r].name} {num(float(med[r]))}{extra}"

    band = f"[{num(th.UPDATE_RATIO_LOW)}, {num(th.UPDATE_RATIO_HIGH)}]"
    summary = [f"median update-to-weight ratio ||dW||/||W|| over {span(int(window.steps[0]), int(window.steps[-1]))} "
               f"against the band {band} of Adam-family training (about 1e-3 per step), widened to the equilibrium "
               "sqrt(2 lr wd) of a weight followed by a normalisation layer under decoupled weight decay"]
    causes, remedies = [], []
    if len(above):
        summary.append(f"more than x{num(th.UPDATE_RATIO_FAR)} above it: " + listing([line(r) for r in above]))
        causes.append("the learning rate is too high for these layers: each step rewrites a large part of their "
                      "weights, so they cannot settle (loss noise, spikes, divergence)")
        remedies.append("lower the learning rate of these layers (a param group of their own), or overall")
    if len(below):
        summary.append(f"more than x{num(th.UPDATE_RATIO_FAR)} below it: " + listing([line(r) for r in below]))
        causes.append("the learning rate is too low for these layers (or its schedule has decayed it): their "
                      "weights barely move, so they learn very slowly")
        remedies.append("raise the learning rate of these layers, or check the schedule and the param groups")
    if settled[np.concatenate([above, below])].any():
        causes.append("for weights followed by a normalisation layer and trained with decoupled weight decay the "
                      "ratio tends to sqrt(2 lr wd) (Kosson et al. 2024); far beyond it, lr itself is too high")
        remedies.append("for those weights lr * weight_decay sets the ratio they settle at")
    worst = max(np.concatenate([above, below]), key=lambda r: max(med[r] / high[r], low[r] / med[r]))
    values = {"value": float(med[worst]), "threshold": float(high[worst] if med[worst] > high[worst] else low[worst]),
              "band_low": th.UPDATE_RATIO_LOW, "band_high": th.UPDATE_RATIO_HIGH,
              "layers_above": float(len(above)), "layers_below": float(len(below))}
    evidence = Evidence(tuple(summary), values, layers=data.layer_names(np.concatenate([above, below])),
                        steps=(int(window.steps[0]), int(window.steps[-1])))
    title = "Update-to-weight ratio far outside its band"
    return [Finding("update_ratio_band", "warning", title, evidence, tuple(causes), tuple(remedies))]


def _skip_events(data: RunData) -> list[dict[str, Any]]:
    return [e for e in data.events if e.get("kind") == "spike" and (e.get("data") or {}).get("skipped")]


def skipped_spikes(data: RunData) -> list[Finding]:
    """Steps the spike guard skipped: how many, when, with their loss and gradient norm; a warning
    when they are more than SKIP_RATE of the steps (the run is unstable, not unlucky)."""
    skipped = _skip_events(data)
    if not skipped:
        return []
    steps = np.array([int(e["step"]) for e in skipped], dtype=np.int64)
    rate_series = data.run.get("skip_rate")
    rate = float(np.nanmax(rate_series.values)) if rate_series is not None and rate_series.values.size else float("nan")
    if not np.isfinite(rate):
        total = data.run.get("skipped")
        rate = float(np.mean(total.values >= 0.5)) if total is not None and total.values.size else 0.0
    lines = [f"the spike guard skipped {plural(len(skipped), 'step')}: {ranges_text(runs_of(steps))} "
             f"(highest skip rate {rate:.1%} of the guard's window)"]
    for e in skipped[:3]:
        d = e.get("data") or {}
        parts = [f"{name} {num(d[key])} (z {num(d[key + '_z'])})" for name, key in
                 (("loss", "loss"), ("total gradient norm", "grad_norm"))
                 if d.get(key) is not None and d.get(key + "_z") is not None]
        lines.append(f"step {e['step']}: " + (", ".join(parts) or "z above the threshold"))
    frequent = rate > th.SKIP_RATE
    causes = (("the run is unstable rather than unlucky: outliers this often point at the learning rate, Adam's "
               "beta2/eps or the data pipeline, and each skip throws away a batch",) if frequent else
              (BATCH + ", skipped so that the weights and the optimizer state stayed as they were",))
    remedies = (("look at the first skipped steps' batches (log sample ids to re-run them)",
                 "lower the learning rate or beta2, or lengthen the warmup (see adam_second_moment)",
                 "raise guards.spike.z_threshold if the skipped steps are ordinary batches") if frequent else
                ("nothing, if they stay rare; look at those batches (log sample ids) if they cluster",))
    values = {"value": rate, "threshold": th.SKIP_RATE, "skipped": float(len(skipped)), "first_step": float(steps[0])}
    evidence = Evidence(tuple(lines), values, steps=tuple(int(s) for s in steps[:10]))
    return [Finding("skipped_spikes", "warning" if frequent else "info", "Spikes skipped by the guard", evidence,
                    causes, remedies)]
