"""Rules about activations: saturated sigmoid/tanh layers and dying ReLU units."""

from __future__ import annotations

import numpy as np

from gradwatch.diagnose import thresholds as th
from gradwatch.diagnose.causes import init_cause, lr_burst
from gradwatch.diagnose.findings import Evidence, Finding
from gradwatch.diagnose.rundata import RunData, Series
from gradwatch.diagnose.text import listing, plural, span

GLOROT_CALL = "nn.init.xavier_normal_(w)  # std = sqrt(2 / (fan_in + fan_out)), for sigmoid/tanh"
HE_CALL = "nn.init.kaiming_normal_(w, nonlinearity='relu')  # std = sqrt(2 / fan_in), for the ReLU family"


def _over(data: RunData, metric: str, limit: float) -> tuple[Series, np.ndarray, np.ndarray] | None:
    """The window of a layer metric, each layer's median over it, and the rows above `limit`."""
    series = data.layer.get(metric)
    if series is None or series.values.size == 0:
        return None
    window = series.window(th.WINDOW_FRACTION)
    med = series.row_medians(th.WINDOW_FRACTION)
    rows = np.flatnonzero(np.nan_to_num(med, nan=0.0) > limit)
    return (window, med, rows) if len(rows) else None


def _by_layer(data: RunData, med: np.ndarray, rows: np.ndarray) -> str:
    return listing([f"{data.layers[r].name} {med[r]:.0%}" for r in rows])


def saturation(data: RunData) -> list[Finding]:
    """Sigmoid/tanh layers whose outputs sit at their asymptotes, where the derivative is ~0."""
    found = _over(data, "saturation_ratio", th.SATURATION_RATIO)
    if found is None:
        return []
    window, med, rows = found
    worst = float(med[rows].max())
    names = data.layer_names(rows)
    causes = ["pre-activations too large: sigmoid and tanh flatten beyond |x| of about 3 to 5, so their "
              "gradient there is ~0 and the layers below stop learning"]
    large = init_cause(data, "large", "so pre-activations start far out on the flat tails")
    if large:
        causes.insert(0, large)
    if not any(ly.is_norm for ly in data.layers):
        causes.append("no normalisation layer keeps the pre-activations near zero")
    causes.append("inputs not standardised, or a learning rate that grows the weights")
    remedies = ("initialise for the activation: " + GLOROT_CALL,
                "add BatchNorm or LayerNorm before the sigmoid/tanh",
                "use a ReLU-family activation (ReLU, LeakyReLU, ELU, GELU) with He init in hidden layers; "
                "keep sigmoid for gates and outputs",
                "standardise the inputs (zero mean, unit variance)")
    steps = (int(window.steps[0]), int(window.steps[-1]))
    evidence = Evidence(
        summary=(f"{plural(len(rows), 'bounded layer')} with a median saturation ratio above "
                 f"{th.SATURATION_RATIO:.0%} over {span(*steps)} (worst {worst:.0%})",
                 "saturated: " + _by_layer(data, med, rows)),
        values={"value": worst, "threshold": th.SATURATION_RATIO, "worst_ratio": worst, "layers": float(len(rows))},
        layers=names, steps=steps)
    severity = "error" if worst > th.SEVERE_SATURATION_RATIO else "warning"
    return [Finding("saturation", severity, "Saturated sigmoid/tanh activations", evidence, tuple(causes), remedies)]


def _onset(series: Series, rows: np.ndarray) -> tuple[int, bool]:
    """The first measured step where one of `rows` was above DEAD_RATIO, and whether that was
    the first measured step of the series (dead from the start of what was given)."""
    dead = series.measured[rows] & (np.nan_to_num(series.values[rows], nan=0.0) > th.DEAD_RATIO)
    cols = np.flatnonzero(dead.any(axis=0))
    first_measured = np.flatnonzero(series.measured[rows].any(axis=0))
    col = int(cols[0]) if len(cols) else 0
    return int(series.steps[col]), bool(len(first_measured)) and col == int(first_measured[0])


def dying_units(data: RunData) -> list[Finding]:
    """ReLU-family layers where most units output zero for the whole batch across the window."""
    found = _over(data, "dead_ratio", th.DEAD_RATIO)
    if found is None:
        return []
    window, med, rows = found
    worst = float(med[rows].max())
    onset, from_start = _onset(data.layer["dead_ratio"], rows)
    causes = []
    burst = lr_burst(data, onset)
    if burst:
        causes.append(burst + f"; most units of {listing(data.layer_names(rows))} were dead from step {onset} on")
    if from_start:
        causes.append(f"dead from the first measured step ({onset}): initialisation or biases that start many units "
                      "in the negative region")
    causes.append("a learning rate too high: one large update can push a unit's bias and weights where its input is "
                  "negative for every sample, and then it gets no gradient to recover")
    init = init_cause(data, "large", "so single updates move pre-activations far")
    if init:
        causes.append(init)
    if not from_start:
        causes.append("initialisation or biases that start many units in the negative region")
    causes.append("no normalisation keeping the pre-activations centred")
    remedies = ("use LeakyReLU, ELU or GELU: they keep a gradient for negative inputs",
                "lower the learning rate (x0.1) or warm it up" + (", and fix the schedule that made it jump" if burst
                                                                   else ""),
                "He (Kaiming) init with zero biases: " + HE_CALL,
                "add BatchNorm or LayerNorm before the activation")
    steps = (int(window.steps[0]), int(window.steps[-1]))
    evidence = Evidence(
        summary=(f"{plural(len(rows), 'ReLU-family layer')} with more than {th.DEAD_RATIO:.0%} dead units (zero for "
                 f"every sample) over {span(*steps)} (worst {worst:.0%}), from step {onset}",
                 "dead: " + _by_layer(data, med, rows)),
        values={"value": worst, "threshold": th.DEAD_RATIO, "worst_ratio": worst, "layers": float(len(rows)),
                "onset_step": float(onset)},
        layers=data.layer_names(rows), steps=steps)
    severity = "error" if worst > th.SEVERE_DEAD_RATIO else "warning"
    return [Finding("dying_units", severity, "Dying ReLU units", evidence, tuple(causes), remedies)]
