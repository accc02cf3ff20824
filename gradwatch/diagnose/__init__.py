"""Diagnosis: pure rules over a run's measurements, each giving findings with evidence,
likely causes and remedies. Thresholds and their reasons are in docs/diagnosis.md."""

from __future__ import annotations

from collections.abc import Callable

from gradwatch.diagnose.activations import dying_units, initialisation, saturation
from gradwatch.diagnose.findings import SEVERITY_ORDER, Evidence, Finding
from gradwatch.diagnose.flow import exploding, find_spikes, suggest_clip_threshold, vanishing
from gradwatch.diagnose.rundata import LayerInfo, RunData, Series
from gradwatch.diagnose.nonfinite import nonfinite_activations, nonfinite_gradients, nonfinite_loss
from gradwatch.diagnose.stability import clipping_rate

__all__ = ["RULES", "Evidence", "Finding", "LayerInfo", "RunData", "Series", "diagnose", "find_spikes",
           "suggest_clip_threshold"]

Rule = Callable[[RunData], list[Finding]]

#: Every rule, in the order findings of equal severity are reported.
RULES: tuple[Rule, ...] = (nonfinite_gradients, nonfinite_loss, nonfinite_activations, exploding, vanishing,
                          saturation, dying_units, initialisation, clipping_rate)


def diagnose(data: RunData, rules: tuple[Rule, ...] = RULES) -> list[Finding]:
    """Run every rule over a run's data; findings sorted by severity (errors first). Empty = healthy."""
    findings = [f for rule in rules for f in rule(data)]
    return sorted(findings, key=lambda f: SEVERITY_ORDER[f.severity])
