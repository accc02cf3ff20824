"""The rule about steps that clipping changed."""

from __future__ import annotations

import numpy as np

from gradwatch.diagnose import thresholds as th
from gradwatch.diagnose.exploding import clip_thresholds, suggest_clip_threshold
from gradwatch.diagnose.findings import Evidence, Finding
from gradwatch.diagnose.rundata import RunData
from gradwatch.diagnose.text import num, plural

#: Clipping modes with a fixed threshold; adaptive ones (auto_percentile, zscore) clip often by design.
FIXED_MODES = ("norm", "param_norm", "value")


def clipping_rate(data: RunData) -> list[Finding]:
    """Clipping with a fixed threshold that acts on most steps, by less than the factor that makes
    it an explosion (exploding_gradients reports that): the threshold is below the typical norm."""
    coef = data.run.get("clip_coef")
    clip = data.clip_config
    if coef is None or clip["mode"] not in FIXED_MODES or coef.values.size == 0:
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
    thr = clip_thresholds(data, pre.steps) if pre is not None else None
    if thr is not None:
        ok = np.isfinite(norms) & np.isfinite(thr) & (thr > 0)
        if ok.any() and np.median(norms[ok] / thr[ok]) >= th.CLIP_EXPLOSION_FACTOR:
            return []
    finite = norms[np.isfinite(norms)]
    suggested = suggest_clip_threshold(norms) if len(norms) else None
    summary = [f"clipping ({clip['mode']}) changed the gradients on {rate:.0%} of {plural(len(measured), 'step')}"]
    values = {"value": rate, "threshold": th.CLIP_RATE, "clip_rate": rate, "threshold_rate": th.CLIP_RATE}
    if clip.get("max_norm") is not None and len(finite):
        summary.append(f"threshold {num(clip['max_norm'])}, median pre-clip norm {num(float(np.median(finite)))}")
        values.update(max_norm=float(clip["max_norm"]), median_norm=float(np.median(finite)))
    remedies = []
    if suggested is not None:
        values["suggested_clip"] = suggested
        remedies.append(f"raise the threshold to about {num(suggested)} (the {th.CLIP_PERCENTILE:.0f}th percentile "
                        "of this run's ordinary pre-clip norms), so clipping only catches spikes")
    remedies.append("if the norms keep growing, lower the learning rate instead of clipping harder")
    causes = ("the threshold is below the typical gradient norm, so clipping rescales almost every step: "
              "it acts like a smaller, varying learning rate and hides how large the gradients are",
              "the gradients themselves are too large (learning rate, initialisation; see other findings)")
    return [Finding("clipping_rate", "warning", "Clipping on most steps", Evidence(tuple(summary), values),
                    causes, tuple(remedies))]
