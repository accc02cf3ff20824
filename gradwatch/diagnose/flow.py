"""The rule about gradient flow through depth: vanishing gradients."""

from __future__ import annotations

import numpy as np

from gradwatch.diagnose import thresholds as th
from gradwatch.diagnose.causes import init_cause
from gradwatch.diagnose.findings import Evidence, Finding
from gradwatch.diagnose.rundata import RunData
from gradwatch.diagnose.text import listing, num, plural, span

RELU_INIT = ("use a ReLU-family activation (ReLU, LeakyReLU, ELU, GELU) in hidden layers with He (Kaiming) init: "
             "nn.init.kaiming_normal_(w, nonlinearity='relu')")
GLOROT = "keeping sigmoid/tanh: Glorot (Xavier) init, std = sqrt(2 / (fan_in + fan_out)): nn.init.xavier_normal_(w)"
NORM = "add BatchNorm (CNNs, large batches) or LayerNorm (MLPs, transformers, RNNs) before the activations"
RESIDUAL = "add residual (skip) connections, y = x + f(x), so gradients reach early layers through the identity path"
GATED = "replace the vanilla RNN with an LSTM or GRU: their gated cell state carries gradients over long sequences"


def vanishing(data: RunData) -> list[Finding]:
    """Gradient flow at the first layer far below the last (act_grad_norm, else grad_norm)."""
    series = data.layer.get("act_grad_norm") or data.layer.get("grad_norm")
    if series is None or series.values.size == 0:
        return []
    window = series.window(th.WINDOW_FRACTION)
    med = series.row_medians(th.WINDOW_FRACTION)
    rows = np.flatnonzero(np.isfinite(med))
    if len(rows) < th.VANISHING_MIN_LAYERS or med[rows[-1]] <= 0:
        return []
    first, last = rows[0], rows[-1]
    ratio = float(med[first] / med[last])
    if ratio >= th.VANISHING_RATIO:
        return []
    weak = rows[med[rows] / med[last] < th.VANISHING_RATIO]
    per_layer = ratio ** (1.0 / (len(rows) - 1)) if ratio > 0 else 0.0
    bounded = [ly.name for ly in data.layers if ly.family == "bounded"]
    recurrent = any(ly.is_recurrent for ly in data.layers)
    causes = []
    small = init_cause(data, "small", "so each layer passes back less gradient than it receives")
    if small:
        causes.append(small)
    if bounded:
        causes.append(f"{plural(len(bounded), 'sigmoid/tanh layer')} ({listing(bounded)}): their derivative is at "
                      "most 0.25 (sigmoid) or 1 (tanh), so the gradient shrinks at every one of them")
    if not any(ly.is_norm for ly in data.layers):
        causes.append(f"{plural(len(rows), 'layer')} deep with no normalisation layer to rescale the signal")
    if recurrent:
        causes.append("backpropagation through time over long sequences multiplies the same Jacobian at every step")
    remedies = [RELU_INIT, GLOROT, NORM, RESIDUAL] + ([GATED] if recurrent else [])
    steps = (int(window.steps[0]), int(window.steps[-1]))
    evidence = Evidence(
        summary=(
            f"gradient flow at the first layer ({data.layers[first].name}) is {num(ratio)} x that at the last "
            f"({data.layers[last].name}), median over {span(*steps)}",
            f"it shrinks by x{num(per_layer)} per layer on average over {plural(len(rows), 'layer')}",
            f"{plural(len(weak), 'layer')} get{'s' if len(weak) == 1 else ''} less than {num(th.VANISHING_RATIO)} "
            f"of the output gradient: {listing(data.layer_names(weak))}",
        ),
        values={"value": ratio, "threshold": th.VANISHING_RATIO, "flow_ratio": ratio, "per_layer_factor": per_layer,
                "first_layer_norm": float(med[first]), "last_layer_norm": float(med[last])},
        layers=data.layer_names(weak),
        steps=steps,
    )
    return [Finding("vanishing_gradients", "error", "Vanishing gradients: early layers barely learn",
                    evidence, tuple(causes), tuple(remedies))]
