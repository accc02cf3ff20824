"""Rules about values that are not finite: gradient elements, norms that overflowed float32, the
loss and activation outputs.

Counts are exact (every measured step that holds such a value), and the first failure of each
kind is named with its step and layers: the earliest `nonfinite` event (gradient elements that
are NaN/Inf) and the earliest `overflow` event (a norm that overflowed float32 while every
element was finite) are told apart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from gradwatch.diagnose.findings import Evidence, Finding
from gradwatch.diagnose.rundata import RunData

#: Step ranges spelled out in a summary line; the rest are counted.
RANGES_SHOWN = 6
#: Layers named in a summary line; the rest are counted.
LAYERS_SHOWN = 5

#: Each kind of non-finite value: its name in prose and the test that finds it.
KINDS: tuple[tuple[str, Callable[[np.ndarray], np.ndarray]], ...] = (
    ("NaN", np.isnan), ("+Inf", np.isposinf), ("-Inf", np.isneginf))

#: `values` key of each kind's step count in the loss finding.
_VALUE_KEYS = {"NaN": "nan_steps", "+Inf": "posinf_steps", "-Inf": "neginf_steps"}
_SKIP_GUARD = "skip the bad steps so the weights stay finite: config {'guards': {'nonfinite': 'skip'}}"


def _consecutive(idx: np.ndarray) -> list[tuple[int, int]]:
    """Sorted integers grouped into (first, last) runs of consecutive numbers."""
    if not len(idx):
        return []
    breaks = np.flatnonzero(np.diff(idx) > 1)
    firsts = np.concatenate([idx[:1], idx[breaks + 1]])
    lasts = np.concatenate([idx[breaks], idx[-1:]])
    return [(int(a), int(b)) for a, b in zip(firsts, lasts)]


def step_ranges(steps: np.ndarray, bad: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) step of each run of consecutive measured rows where `bad` holds (rows, not
    step numbers: a loss logged every 10 steps that is NaN at 50 and 60 is one range, 50-60)."""
    return [(int(steps[a]), int(steps[b])) for a, b in _consecutive(np.flatnonzero(bad))]


def runs_of(steps: np.ndarray) -> list[tuple[int, int]]:
    """Step numbers grouped into (first, last) runs of consecutive steps."""
    return _consecutive(np.unique(np.asarray(steps, dtype=np.int64)))


def ranges_text(ranges: list[tuple[int, int]], shown: int = RANGES_SHOWN) -> str:
    """Step ranges as '53-69, 80, 90-92', the ones past `shown` counted."""
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in ranges[:shown]]
    if len(ranges) > shown:
        parts.append(f"and {len(ranges) - shown} more")
    return ", ".join(parts)


def nonfinite_counts(steps: np.ndarray, values: np.ndarray) -> list[tuple[str, int, list[tuple[int, int]]]]:
    """For each kind of non-finite value in a series: (name, number of steps, step ranges)."""
    v = np.asarray(values, dtype=np.float64)
    out = []
    for name, test in KINDS:
        bad = test(v)
        if bad.any():
            out.append((name, int(np.count_nonzero(bad)), step_ranges(steps, bad)))
    return out


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:LAYERS_SHOWN])
    return shown + (f" and {len(names) - LAYERS_SHOWN} more" if len(names) > LAYERS_SHOWN else "")


def first_event(data: RunData, kind: str) -> dict[str, Any] | None:
    """The earliest event of a kind (the run's first failure of that kind), or None."""
    events = [e for e in data.events if e.get("kind") == kind]
    return min(events, key=lambda e: int(e["step"])) if events else None


def _where(event: dict[str, Any] | None) -> list[str]:
    """The layers an event names (its params when it names no layer)."""
    if event is None:
        return []
    data = event.get("data") or {}
    return [str(x) for x in (data.get("layers") or data.get("params") or [])]


def _count_steps(data: RunData, metric: str) -> np.ndarray:
    """Steps where a run-level count (nonfinite_params, overflow_params) is above zero."""
    s = data.run.get(metric)
    if s is None:
        return np.array([], dtype=np.int64)
    return s.steps[np.nan_to_num(s.values.astype(np.float64), nan=0.0) > 0]


def _gradient_kinds(data: RunData) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Steps with NaN/Inf gradient elements, steps where a norm overflowed with finite elements,
    and lines about the total norm's own non-finite values."""
    elements = np.union1d(_count_steps(data, "nonfinite_params"),
                          [int(e["step"]) for e in data.events if e.get("kind") == "nonfinite"])
    overflow = np.union1d(_count_steps(data, "overflow_params"),
                          [int(e["step"]) for e in data.events if e.get("kind") == "overflow"])
    norms = data.run.get("grad_norm_total")
    lines = []
    if norms is not None and norms.values.size:
        v = norms.values.astype(np.float64)
        if "nonfinite_params" in data.run:  # an infinite total where no element is: the total overflowed
            counted = data.run["nonfinite_params"]
            finite_elements = np.isin(norms.steps, counted.steps[np.nan_to_num(counted.values, nan=1.0) == 0])
            overflow = np.union1d(overflow, norms.steps[np.isposinf(v) & finite_elements])
        kinds = nonfinite_counts(norms.steps, v)
        if kinds:
            lines.append("total gradient norm " + ", ".join(f"{name} on {_plural(n, 'step')}" for name, n, _ in kinds))
    return elements.astype(np.int64), overflow.astype(np.int64), lines


def nonfinite_gradients(data: RunData) -> list[Finding]:
    """Gradient elements that are NaN/Inf, and norms that overflowed float32 with every element
    finite: the first step and layers of each, and on how many steps."""
    elements, overflow, norm_lines = _gradient_kinds(data)
    if not (len(elements) or len(overflow) or norm_lines):
        return []
    first_elem, first_over = first_event(data, "nonfinite"), first_event(data, "overflow")
    summary: list[str] = []
    values: dict[str, float] = {}
    firsts: list[int] = []
    if len(overflow):
        step = int(overflow[0])
        where = _where(first_over) if first_over is not None and int(first_over["step"]) == step else []
        summary.append(f"norm overflowed float32 at step {step}" + (f" in layers {_names(where)}" if where else "")
                       + f" (elements still finite), on {_plural(len(overflow), 'step')}: "
                       + ranges_text(runs_of(overflow)))
        values.update(first_overflow_step=float(step), overflow_steps=float(len(overflow)))
        firsts.append(step)
    if len(elements):
        step = int(elements[0])
        where = _where(first_elem) if first_elem is not None and int(first_elem["step"]) == step else []
        summary.append(f"NaN/Inf gradient elements from step {step}" + (f" in layers {_names(where)}" if where else "")
                       + f", on {_plural(len(elements), 'step')}: " + ranges_text(runs_of(elements)))
        values.update(first_nonfinite_step=float(step), nonfinite_steps=float(len(elements)))
        firsts.append(step)
    summary += norm_lines
    norms = data.run.get("grad_norm_total")
    if norms is not None and not firsts:
        firsts.append(int(norms.steps[~np.isfinite(norms.values.astype(np.float64))][0]))
    first = min(firsts)
    summary.insert(0, f"first failure at step {first}")
    values["first_step"] = float(first)
    values["events"] = float(sum(e.get("kind") in ("nonfinite", "overflow") for e in data.events))
    layers = tuple(dict.fromkeys(_where(first_over) + _where(first_elem)))
    causes = []
    if len(overflow) and (not len(elements) or overflow[0] <= elements[0]):
        causes.append("gradients exploded: a norm passed float32's range (3.4e38) while its elements were still "
                      "finite, and the update that followed made the next step's values overflow")
    causes += ["a learning rate so high that weights, then gradients, overflow",
               "an operation undefined at its input in the forward pass or the loss: log(0), x/0, sqrt of a negative",
               "float16 overflow without loss scaling"]
    remedies = ("lower the learning rate and clip the total gradient norm", _SKIP_GUARD,
                "guard the loss: clamp probabilities before log, add eps to divisions; use bf16 or a GradScaler")
    title = "Non-finite gradients (NaN/Inf)" if len(elements) or not len(overflow) else \
        "Gradient norm overflowed float32 (elements finite)"
    evidence = Evidence(tuple(summary), values, layers=layers, steps=tuple(sorted(set(firsts))))
    return [Finding("nonfinite_gradients", "error", title, evidence, tuple(causes), remedies)]


def nonfinite_loss(data: RunData) -> list[Finding]:
    """A loss that is NaN or ±Inf: on how many steps of each kind, and which ranges of steps."""
    s = data.run.get("loss")
    if s is None or not s.values.size:
        return []
    v = s.values.astype(np.float64)
    bad = ~np.isfinite(v)
    if not bad.any():
        return []
    kinds = nonfinite_counts(s.steps, v)
    first, last_bad = int(s.steps[bad][0]), int(s.steps[bad][-1])
    summary = [f"first non-finite loss at step {first}"]
    summary += [f"loss {name} on {_plural(n, 'step')}: {ranges_text(ranges)}" for name, n, ranges in kinds]
    later = np.flatnonzero(~bad & (s.steps > last_bad))
    summary.append(f"finite again from step {int(s.steps[later[0]])}" if len(later)
                   else f"still non-finite at the last logged step {int(s.steps[-1])}")
    values = {"first_step": float(first), "nonfinite_steps": float(np.count_nonzero(bad)),
              "logged_steps": float(len(v))}
    values.update({_VALUE_KEYS[name]: float(n) for name, n, _ in kinds})
    causes = ("NaN/Inf in a batch of inputs or targets (a loss that is finite again afterwards points there)",
              "an operation undefined at its input in the forward pass or the loss: log(0), x/0, sqrt of a negative",
              "weights that went non-finite after a non-finite update (see the gradient findings)",
              "float16 overflow without loss scaling")
    remedies = ("check the batches of those steps: torch.isfinite(x).all() on inputs and targets",
                "guard the loss: clamp probabilities before log, add eps to divisions; use bf16 or a GradScaler",
                _SKIP_GUARD)
    evidence = Evidence(tuple(summary), values, steps=(first,))
    return [Finding("nonfinite_loss", "error", "Non-finite loss (NaN/Inf)", evidence, causes, remedies)]


def nonfinite_activations(data: RunData) -> list[Finding]:
    """Activation layers whose outputs hold NaN/Inf (`act_nonfinite` > 0): the first step and
    layer, every layer affected with its own first step, and the measured steps they span."""
    s = data.layer.get("act_nonfinite")
    if s is None or not s.values.size:
        return []
    bad = s.measured & ~(s.values <= 0)  # a NaN count is not a clean one either
    bad_steps = bad.any(axis=0)
    if not bad_steps.any():
        return []
    col = int(np.argmax(bad_steps))
    first = int(s.steps[col])
    first_rows = np.flatnonzero(bad[:, col])
    rows = sorted(np.flatnonzero(bad.any(axis=1)), key=lambda r: (int(np.argmax(bad[r])), r))
    counts = np.where(bad, s.values, 0.0)
    summary = [f"NaN/Inf activation outputs from step {first}, first in layer{'s' * (len(first_rows) > 1)} "
               + ", ".join(f"{data.layers[r].name} ({data.layers[r].type}, {s.values[r, col]:.0f} outputs)"
                           for r in first_rows[:LAYERS_SHOWN]),
               f"{_plural(len(rows), 'layer')} with NaN/Inf outputs on "
               f"{_plural(int(bad_steps.sum()), 'measured step')}: " + ranges_text(step_ranges(s.steps, bad_steps)),
               "by layer: " + ", ".join(f"{data.layers[r].name} from step {int(s.steps[np.argmax(bad[r])])}"
                                        for r in rows[:LAYERS_SHOWN])
               + (f" and {len(rows) - LAYERS_SHOWN} more" if len(rows) > LAYERS_SHOWN else "")]
    values = {"first_step": float(first), "nonfinite_steps": float(bad_steps.sum()), "layers": float(len(rows)),
              "max_outputs": float(np.nanmax(counts))}
    causes = ("NaN/Inf inputs reaching the layer (a bad batch: the gradients of that step go non-finite too)",
              "weights that went non-finite after a non-finite update",
              "overflow in the forward pass: float16 ranges, exp of large values, unnormalised attention logits")
    remedies = ("check the batches of those steps: torch.isfinite(x).all() on the inputs",
                _SKIP_GUARD, "lower the learning rate and clip the total gradient norm; use bf16 or float32")
    evidence = Evidence(tuple(summary), values, layers=data.layer_names(rows), steps=(first,))
    return [Finding("nonfinite_activations", "error", "Non-finite activations (NaN/Inf outputs)", evidence,
                    causes, remedies)]
