"""Rules about activations and the initialisation that shapes them: saturation, dying units, init."""

from __future__ import annotations

from typing import Any

import numpy as np

from gradwatch.diagnose import thresholds as th
from gradwatch.diagnose.findings import Evidence, Finding
from gradwatch.diagnose.rundata import RunData, Series, nanmedian

_INIT_CALLS = {
    "glorot": "nn.init.xavier_normal_(w)  # std = sqrt(2 / (fan_in + fan_out)), for sigmoid/tanh",
    "he": "nn.init.kaiming_normal_(w, nonlinearity='relu')  # std = sqrt(2 / fan_in), for the ReLU family",
    "lecun": "nn.init.normal_(w, 0, fan_in ** -0.5)  # LeCun, std = 1 / sqrt(fan_in), for SELU and linear layers",
}


def _over(data: RunData, metric: str, limit: float) -> tuple[Series, np.ndarray, np.ndarray] | None:
    """The window of a layer metric, each layer's median over it, and the rows above `limit`."""
    series = data.layer.get(metric)
    if series is None or series.values.size == 0:
        return None
    window = series.window(th.WINDOW_FRACTION)
    med = np.asarray(nanmedian(window.values, axis=1))
    rows = np.flatnonzero(np.nan_to_num(med, nan=0.0) > limit)
    return (window, med, rows) if len(rows) else None


def _init_label(data: RunData, entry: dict[str, Any]) -> str:
    ref = entry.get("layer")
    if isinstance(ref, int) and 0 <= ref < len(data.layers):
        return data.layers[ref].name
    return str(entry.get("param") if ref is None else ref)


def _bad_init(data: RunData, direction: str | None = None) -> list[dict[str, Any]]:
    """Init check entries whose verdict is not ok, optionally only those too large / too small.

    A too-small output layer (no activation after it) is left out: a small or zero init of
    the last layer is common practice and harmless.
    """
    bad = [c for c in data.init_check if c.get("verdict") not in (None, "ok")
           and not (c.get("activation") is None and c.get("verdict") == "too_small")]
    if direction == "large":
        return [c for c in bad if (c.get("ratio") or 0) > 1]
    if direction == "small":
        return [c for c in bad if 0 < (c.get("ratio") or 0) < 1]
    return bad


def saturation(data: RunData) -> list[Finding]:
    """Sigmoid/tanh layers whose outputs sit at their asymptotes, where the derivative is ~0."""
    found = _over(data, "saturation_ratio", th.SATURATION_RATIO)
    if found is None:
        return []
    window, med, rows = found
    worst = float(med[rows].max())
    names = data.layer_names(rows)
    large = _bad_init(data, "large")
    causes = ["pre-activations too large: sigmoid and tanh flatten beyond |x| of about 3 to 5, so their "
              "gradient there is ~0 and the layers below stop learning"]
    if large:
        worst_init = max(large, key=lambda c: c.get("ratio") or 0)
        causes.append(f"weights initialised too large: {_init_label(data, worst_init)} has std "
                      f"{worst_init.get('std', float('nan')):.3g}, {worst_init.get('ratio', float('nan')):.3g} x the "
                      f"{worst_init.get('recommended', 'recommended')} value for its activation")
    if not any(ly.is_norm for ly in data.layers):
        causes.append("no normalisation layer keeps the pre-activations near zero")
    causes.append("inputs not standardised, or a learning rate that grows the weights")
    remedies = ("initialise for the activation: " + _INIT_CALLS["glorot"],
                "add BatchNorm or LayerNorm before the sigmoid/tanh",
                "use a ReLU-family activation (ReLU, LeakyReLU, ELU, GELU) with He init in hidden layers; "
                "keep sigmoid for gates and outputs",
                "standardise the inputs (zero mean, unit variance)")
    evidence = Evidence(
        summary=(f"{len(rows)} bounded layers have a median saturation ratio above {th.SATURATION_RATIO:.0%} "
                 f"over steps {int(window.steps[0])}-{int(window.steps[-1])} (worst {worst:.0%})",
                 "saturated: " + ", ".join(f"{data.layers[r].name} {med[r]:.0%}" for r in rows[:6])),
        values={"worst_ratio": worst, "threshold": th.SATURATION_RATIO, "layers": float(len(rows))},
        layers=names, steps=(int(window.steps[0]), int(window.steps[-1])))
    severity = "error" if worst > th.SEVERE_SATURATION_RATIO else "warning"
    return [Finding("saturation", severity, "Saturated sigmoid/tanh activations", evidence, tuple(causes), remedies)]


def dying_units(data: RunData) -> list[Finding]:
    """ReLU-family layers where most units output zero for the whole batch across the window."""
    found = _over(data, "dead_ratio", th.DEAD_RATIO)
    if found is None:
        return []
    window, med, rows = found
    worst = float(med[rows].max())
    causes = ("a learning rate too high: one large update can push a unit's bias and weights where its input is "
              "negative for every sample, and then it gets no gradient to recover",
              "initialisation or biases that start many units in the negative region",
              "no normalisation keeping the pre-activations centred")
    remedies = ("use LeakyReLU, ELU or GELU: they keep a gradient for negative inputs",
                "lower the learning rate (x0.1) or warm it up",
                "He (Kaiming) init with zero biases: " + _INIT_CALLS["he"],
                "add BatchNorm or LayerNorm before the activation")
    evidence = Evidence(
        summary=(f"{len(rows)} ReLU-family layers have more than {th.DEAD_RATIO:.0%} dead units (zero for every "
                 f"sample) over steps {int(window.steps[0])}-{int(window.steps[-1])} (worst {worst:.0%})",
                 "dead: " + ", ".join(f"{data.layers[r].name} {med[r]:.0%}" for r in rows[:6])),
        values={"worst_ratio": worst, "threshold": th.DEAD_RATIO, "layers": float(len(rows))},
        layers=data.layer_names(rows), steps=(int(window.steps[0]), int(window.steps[-1])))
    severity = "error" if worst > th.SEVERE_DEAD_RATIO else "warning"
    return [Finding("dying_units", severity, "Dying ReLU units", evidence, causes, remedies)]


def _init_line(data: RunData, c: dict[str, Any]) -> str:
    rec = str(c.get("recommended"))
    expected = (c.get("expected") or {}).get(rec)
    want = f"{expected:.3g}" if isinstance(expected, (int, float)) else "?"
    return (f"{_init_label(data, c)} ({c.get('param')}): std {c.get('std', float('nan')):.3g} before "
            f"{c.get('activation') or 'no activation'}; {rec} expects {want} (x{c.get('ratio', float('nan')):.3g}, "
            f"{c.get('verdict')})")


def initialisation(data: RunData) -> list[Finding]:
    """Weights whose initial std does not suit the activation that follows (the agent's init check)."""
    bad = _bad_init(data)
    if not bad:
        return []
    lines = [_init_line(data, c) for c in bad[:4]]
    if len(bad) > 4:
        lines.append(f"and {len(bad) - 4} more weights")
    schemes = sorted({str(c.get("recommended")) for c in bad if c.get("recommended") in _INIT_CALLS})
    remedies = tuple(f"{s}: {_INIT_CALLS[s]}" for s in schemes) or (
        "initialise each layer for the activation that follows it (Glorot, He or LeCun)",)
    causes = ("the std of a layer's weights sets how much it scales activations forward and gradients backward: "
              "too large saturates bounded activations and explodes, too small vanishes, compounding with depth",)
    ratios = [float(c["ratio"]) for c in bad if isinstance(c.get("ratio"), (int, float)) and c["ratio"] > 0]
    values = {"weights": float(len(bad))}
    if ratios:
        values["worst_ratio"] = max(ratios, key=lambda r: abs(np.log(r)))
    evidence = Evidence(tuple(lines), values, layers=tuple(dict.fromkeys(_init_label(data, c) for c in bad)))
    return [Finding("initialisation", "warning", "Initialisation does not match the activations", evidence,
                    causes, remedies)]
