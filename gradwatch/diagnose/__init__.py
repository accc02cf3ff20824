"""Diagnosis: pure rules over a run's measurements, each giving findings with evidence,
likely causes and remedies. Thresholds and their reasons are in docs/diagnosis.md.

Every rule is a `Rule`: a function of a `RunData` that may hold a whole run or only a window
of its recent steps (the live rules engine), returning findings whose `evidence.values` hold
the main number under "value" and, when the rule has one, its threshold under "threshold".
"""

from __future__ import annotations

from collections.abc import Callable

from gradwatch.diagnose.activations import dying_units, saturation
from gradwatch.diagnose.exploding import exploding, suggest_clip_threshold
from gradwatch.diagnose.findings import SEVERITY_ORDER, Evidence, Finding
from gradwatch.diagnose.flow import vanishing
from gradwatch.diagnose.init import initialisation
from gradwatch.diagnose.loss import loss_spike
from gradwatch.diagnose.nonfinite import nonfinite_activations, nonfinite_gradients, nonfinite_loss
from gradwatch.diagnose.optimizer import adam_second_moment, skipped_spikes, update_ratio_band
from gradwatch.diagnose.rundata import LayerInfo, RunData, Series
from gradwatch.diagnose.spikes import find_loss_spikes, find_spikes
from gradwatch.diagnose.stability import clipping_rate
from gradwatch.diagnose.transformer import TRANSFORMER_RULES

__all__ = ["RULES", "Evidence", "Finding", "LayerInfo", "Rule", "RunData", "Series", "diagnose", "find_loss_spikes",
           "find_spikes", "suggest_clip_threshold"]

Rule = Callable[[RunData], list[Finding]]

#: Every rule, in the order findings of equal severity are reported.
RULES: tuple[Rule, ...] = (nonfinite_gradients, nonfinite_loss, nonfinite_activations, exploding, loss_spike,
                          vanishing, saturation, dying_units, clipping_rate, initialisation, adam_second_moment,
                          update_ratio_band, skipped_spikes) + TRANSFORMER_RULES


def diagnose(data: RunData, rules: tuple[Rule, ...] = RULES) -> list[Finding]:
    """Run every rule over a run's data; findings sorted by severity (errors first). No finding
    above `info` = nothing to act on."""
    findings = [f for rule in rules for f in rule(data)]
    return sorted(findings, key=lambda f: SEVERITY_ORDER[f.severity])
