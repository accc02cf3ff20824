"""Rules about gradient flow through the network: vanishing and exploding gradients."""

from __future__ import annotations

import numpy as np

from gradwatch.diagnose import thresholds as th
from gradwatch.diagnose.findings import Evidence, Finding
from gradwatch.diagnose.rundata import RunData, Series, nanmedian

_RELU_INIT = "use a ReLU-family activation (ReLU, LeakyReLU, ELU, GELU) in hidden layers with He (Kaiming) init: nn.init.kaiming_normal_(w, nonlinearity='relu')"
_GLOROT = "keeping sigmoid/tanh: Glorot (Xavier) init, std = sqrt(2 / (fan_in + fan_out)): nn.init.xavier_normal_(w)"
_NORM = "add BatchNorm (CNNs, large batches) or LayerNorm (MLPs, transformers, RNNs) before the activations"
_RESIDUAL = "add residual (skip) connections, y = x + f(x), so gradients reach early layers through the identity path"
_GATED = "replace the vanilla RNN with an LSTM or GRU: their gated cell state carries gradients over long sequences"


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def vanishing(data: RunData) -> list[Finding]:
    """Gradient flow at the first layer far below the last (act_grad_norm, else grad_norm)."""
    series = data.layer.get("act_grad_norm") or data.layer.get("grad_norm")
    if series is None or series.values.size == 0:
        return []
    window = series.window(th.WINDOW_FRACTION)
    med = np.asarray(nanmedian(window.values, axis=1))
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
    if bounded:
        causes.append(f"{len(bounded)} sigmoid/tanh layers: their derivative is at most 0.25 (sigmoid) or 1 (tanh), "
                      "so the gradient shrinks at every one of them")
    small = [c["layer"] for c in data.init_check if c.get("verdict") == "too_small"]
    if small:
        causes.append(f"weights initialised too small for their activation in {', '.join(small[:3])}")
    if not any(ly.is_norm for ly in data.layers):
        causes.append(f"{len(rows)} layers deep with no normalisation layer to rescale the signal")
    if recurrent:
        causes.append("backpropagation through time over long sequences multiplies the same Jacobian at every step")
    remedies = [_RELU_INIT, _GLOROT, _NORM, _RESIDUAL] + ([_GATED] if recurrent else [])
    evidence = Evidence(
        summary=(
            f"gradient flow at the first layer ({data.layers[first].name}) is {_fmt(ratio)} x that at the last "
            f"({data.layers[last].name}), median over steps {int(window.steps[0])}-{int(window.steps[-1])}",
            f"it shrinks by x{_fmt(per_layer)} per layer on average over {len(rows)} layers",
            f"{len(weak)} layers get less than {_fmt(th.VANISHING_RATIO)} of the output gradient",
        ),
        values={"flow_ratio": ratio, "per_layer_factor": per_layer, "threshold": th.VANISHING_RATIO,
                "first_layer_norm": float(med[first]), "last_layer_norm": float(med[last])},
        layers=data.layer_names(weak),
        steps=(int(window.steps[0]), int(window.steps[-1])),
    )
    return [Finding("vanishing_gradients", "error", "Vanishing gradients: early layers barely learn",
                    evidence, tuple(causes), tuple(remedies))]


def _total_norms(data: RunData) -> Series | None:
    s = data.run.get("grad_norm_total")
    return s if s is not None and s.values.size else None


def find_spikes(norms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of finite norms above SPIKE_FACTOR x the median of the preceding steps, and the factors."""
    idx, factors = [], []
    for i in range(th.SPIKE_MIN_HISTORY, len(norms)):
        if not np.isfinite(norms[i]):
            continue
        local = nanmedian(norms[max(0, i - th.SPIKE_LOOKBACK) : i])
        if np.isfinite(local) and local > 0 and norms[i] > th.SPIKE_FACTOR * local:
            idx.append(i)
            factors.append(norms[i] / local)
    return np.asarray(idx, dtype=np.int64), np.asarray(factors, dtype=np.float64)


def suggest_clip_threshold(norms: np.ndarray) -> float | None:
    """A clipping threshold from a run's own pre-clip total norms.

    The CLIP_PERCENTILE-th percentile of the ordinary norms: those before the first spike or
    non-finite value when there are enough of them, else every finite norm within
    SPIKE_FACTOR x the median. None when fewer than SPIKE_MIN_HISTORY norms are usable.
    """
    norms = np.asarray(norms, dtype=np.float64)
    spikes, _ = find_spikes(norms)
    bad = np.flatnonzero(~np.isfinite(norms))
    stops = [int(spikes[0])] if len(spikes) else []
    stops += [int(bad[0])] if len(bad) else []
    before = norms[: min(stops)] if stops else norms
    if len(before) < th.SPIKE_MIN_HISTORY:
        before = norms
    finite = before[np.isfinite(before) & (before > 0)]
    if len(finite) < th.SPIKE_MIN_HISTORY:
        return None
    ordinary = finite[finite <= th.SPIKE_FACTOR * np.median(finite)]
    return float(np.percentile(ordinary, th.CLIP_PERCENTILE))


def _growth(norms: np.ndarray) -> float:
    finite = norms[np.isfinite(norms) & (norms > 0)]
    if len(finite) < 8:
        return 1.0
    q = len(finite) // 4
    return float(np.median(finite[-q:]) / np.median(finite[:q]))


def _clipped_all(data: RunData, spike_steps: np.ndarray) -> bool:
    """Whether norm clipping was on and brought every spike down to its threshold."""
    post = data.run.get("grad_norm_total_clipped")
    thr = data.clip_config.get("max_norm")
    if post is None or thr is None or data.clip_config["mode"] == "none" or not len(spike_steps):
        return False
    return bool(np.all(post.at(spike_steps) <= thr * 1.01))


def exploding(data: RunData) -> list[Finding]:
    """Total gradient norm growing by orders of magnitude, or spiking far above its recent median."""
    series = _total_norms(data)
    if series is None:
        return []
    norms = series.values.astype(np.float64)
    spikes, factors = find_spikes(norms)
    growth = _growth(norms)
    nonfinite = int(np.count_nonzero(~np.isfinite(norms)))
    if growth <= th.GROWTH_FACTOR and not len(spikes):
        return []
    worst = float(factors.max()) if len(factors) else 1.0
    contained = _clipped_all(data, series.steps[spikes])
    if growth > th.GROWTH_FACTOR or worst >= th.SEVERE_SPIKE_FACTOR or nonfinite:
        severity = "error"
    else:
        severity = "info" if contained else "warning"
    finite = norms[np.isfinite(norms)]
    suggested = suggest_clip_threshold(norms)
    steps = tuple(int(s) for s in series.steps[spikes][:10])
    summary = [f"total gradient norm: median {_fmt(float(np.median(finite)))}, max {_fmt(float(finite.max()))}"
               + (f", non-finite on {nonfinite} steps" if nonfinite else "")]
    if growth > th.GROWTH_FACTOR:
        summary.append(f"it grew x{_fmt(growth)} from the first to the last quarter of the finite steps")
    if len(spikes):
        summary.append(f"{len(spikes)} spikes above {_fmt(th.SPIKE_FACTOR)} x the median of the previous "
                       f"{th.SPIKE_LOOKBACK} steps (worst x{_fmt(worst)}), first at step {steps[0]}")
    if contained:
        summary.append(f"clipping at {_fmt(data.clip_config['max_norm'])} bounded every spike")
    causes = ["learning rate too high for the loss curvature: each update lands where gradients are larger"]
    if any(ly.is_recurrent for ly in data.layers):
        causes.append("a recurrent layer over long sequences: the recurrent weight's Jacobian is multiplied at "
                      "every time step, so a spectral radius above 1 grows gradients exponentially")
    large = [c["layer"] for c in data.init_check if c.get("verdict") == "too_large"]
    if large:
        causes.append(f"weights initialised too large in {', '.join(large[:3])}")
    remedies = []
    if suggested is not None and not contained:
        remedies.append(f"clip the total gradient norm at {_fmt(suggested)} (the {th.CLIP_PERCENTILE:.0f}th "
                        "percentile of this run's ordinary pre-clip norms): config {'clip': {'mode': 'norm', "
                        f"'max_norm': {suggested:.3g}}}}}")
    remedies += ["lower the learning rate (x0.1), or warm it up over the first steps",
                 "add weight decay to keep weights, and so gradients, from growing"]
    if any(ly.is_recurrent for ly in data.layers):
        remedies.append(_GATED)
    evidence = Evidence(
        summary=tuple(summary),
        values={"median_norm": float(np.median(finite)) if len(finite) else float("nan"),
                "max_norm": float(finite.max()) if len(finite) else float("nan"), "growth": growth,
                "spikes": float(len(spikes)), "worst_spike_factor": worst, "nonfinite_steps": float(nonfinite),
                **({"suggested_clip": suggested} if suggested is not None else {})},
        steps=steps,
    )
    title = "Gradient spikes, bounded by clipping" if severity == "info" else "Exploding gradients"
    return [Finding("exploding_gradients", severity, title, evidence, tuple(causes), tuple(remedies))]
