"""The live rule set: the diagnosis rules plus the service's own `stalled_run`, with the defaults
each alert starts from (its `for`: how long a finding must hold before it fires).

The diagnosis rules run unchanged (`gradwatch.diagnose.RULES`) on a window of recent steps;
a rule that fails is left out of that evaluation and logged, the others still run. Threshold
overrides are applied for the duration of one evaluation (`thresholds_applied`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType

from gradwatch.diagnose import RULES, Finding, RunData
from gradwatch.diagnose import thresholds as _thresholds

Rule = Callable[[RunData], list[Finding]]

STALLED_RULE = "stalled_run"

#: Steps a finding of each rule must hold before its alert fires. Rules over a median of the
#: window already need a sustained state; the ones about a single bad step fire at once.
DEFAULT_FOR_STEPS: dict[str, int] = {
    "nonfinite_gradients": 0,
    "nonfinite_loss": 0,
    "nonfinite_activations": 0,
    "exploding_gradients": 0,
    "loss_spike": 0,
    "vanishing_gradients": 50,
    "saturation": 50,
    "dying_units": 50,
    "clipping_rate": 50,
    "initialisation": 0,
    "adam_second_moment": 0,
    "update_ratio_band": 50,
    "skipped_spikes": 0,
    STALLED_RULE: 0,
}

#: Every rule id the configuration may name.
RULE_IDS: tuple[str, ...] = tuple(DEFAULT_FOR_STEPS)

_lock = threading.Lock()


def threshold_names(module: ModuleType = _thresholds) -> dict[str, float]:
    """The diagnosis thresholds that can be overridden: the module's numeric upper-case constants."""
    return {name: value for name, value in vars(module).items()
            if name.isupper() and isinstance(value, (int, float)) and not isinstance(value, bool)}


def check_threshold(name: str, value: object, module: ModuleType = _thresholds) -> tuple[str, float]:
    """(constant name, value) for an override given as `name = value`; ValueError naming what is wrong."""
    known = threshold_names(module)
    key = name.upper()
    if key not in known:
        raise ValueError(f"unknown threshold {name!r}; known: {', '.join(sorted(k.lower() for k in known))}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"threshold {name!r} must be a positive number, got {value!r}")
    if isinstance(known[key], int) and not (isinstance(value, int) or float(value).is_integer()):
        raise ValueError(f"threshold {name!r} counts steps and must be a whole number, got {value!r}")
    return key, type(known[key])(value)


@contextmanager
def thresholds_applied(overrides: dict[str, float], module: ModuleType = _thresholds) -> Iterator[None]:
    """Set the diagnosis thresholds in `overrides` (constant name -> value) for the block, then
    restore them. Rules read `thresholds.NAME` when they run, so this is how the service's
    configuration reaches them; the lock keeps two evaluations from interleaving."""
    if not overrides:
        yield
        return
    with _lock:
        saved = {name: getattr(module, name) for name in overrides}
        try:
            for name, value in overrides.items():
                setattr(module, name, value)
            yield
        finally:
            for name, value in saved.items():
                setattr(module, name, value)


def run_rules(data: RunData, rules: tuple[Rule, ...] = RULES,
              on_error: Callable[[Rule, Exception], None] | None = None) -> list[Finding]:
    """Every rule's findings on `data`; a rule that raises is skipped (and reported to `on_error`)."""
    findings = []
    for rule in rules:
        try:
            findings += rule(data)
        except Exception as exc:  # one broken rule must not silence the others
            if on_error is not None:
                on_error(rule, exc)
    return findings
