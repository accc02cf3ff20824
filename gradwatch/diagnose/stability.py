"""Rules about steps that clipping changed."""

from __future__ import annotations

import numpy as np

from gradwatch.diagnose import thresholds as th
from gradwatch.diagnose.findings import Evidence, Finding
from gradwatch.diagnose.flow import suggest_clip_threshold
from gradwatch.diagnose.rundata import RunData


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
