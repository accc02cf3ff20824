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

from gradwatch.diagnose import thresholds as th
from gradwatch.diagnose.findings import Evidence, Finding
from gradwatch.diagnose.rundata import RunData, in_sorted
from gradwatch.diagnose.text import listing, num, plural, ranges_text, runs_of, step_ranges

__all__ = ["KINDS", "first_event", "nonfinite_activations", "nonfinite_counts", "nonfinite_gradients",
           "nonfinite_loss", "ranges_text", "runs_of", "step_ranges"]

#: Each kind of non-finite value: its name in prose and the test that finds it.
KINDS: tuple[tuple[str, Callable[[np.ndarray], np.ndarray]], ...] = (
    ("NaN", np.isnan), ("+Inf", np.isposinf), ("-Inf", np.isneginf))

#: `values` key of each kind's step count in the loss finding.
_VALUE_KEYS = {"NaN": "nan_steps", "+Inf": "posinf_steps", "-Inf": "neginf_steps"}
_SKIP_GUARD = "skip the bad steps so the weights stay finite: config {'guards': {'nonfinite': 'skip'}}"


def nonfinite_counts(steps: np.ndarray, values: np.ndarray) -> list[tuple[str, int, list[tuple[int, int]]]]:
    """For each kind of non-finite value in a series: (name, number of steps, step ranges)."""
    v = np.asarray(values, dtype=np.float64)
    out = []
    for name, test in KINDS:
        bad = test(v)
        if bad.any():
            out.append((name, int(np.count_nonzero(bad)), step_ranges(steps, bad)))
    return out


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
            finite_elements = in_sorted(norms.steps, counted.steps[np.nan_to_num(counted.values, nan=1.0) == 0])
            overflow = np.union1d(overflow, norms.steps[np.isposinf(v) & finite_elements])
        kinds = nonfinite_counts(norms.steps, v)
        if kinds:
            lines.append("total gradient norm " + ", ".join(f"{name} on {plural(n, 'step')}" for name, n, _ in kinds))
    return elements.astype(np.int64), overflow.astype(np.int64), lines


def _first_gradient_failure(data: RunData) -> int | None:
    """The first step with NaN/Inf gradient elements, an overflowed norm or a non-finite total."""
    elements, overflow, _ = _gradient_kinds(data)
    firsts = [int(x[0]) for x in (elements, overflow) if len(x)]
    norms = data.run.get("grad_norm_total")
    if norms is not None and norms.values.size:
        bad = norms.steps[~np.isfinite(norms.values.astype(np.float64))]
        firsts += [int(bad[0])] if len(bad) else []
    return min(firsts) if firsts else None


def _first_loss_failure(data: RunData) -> int | None:
    s = data.run.get("loss")
    if s is None or not s.values.size:
        return None
    bad = s.steps[~np.isfinite(s.values.astype(np.float64))]
    return int(bad[0]) if len(bad) else None


def _activations_at(data: RunData, step: int) -> tuple[bool | None, str]:
    """Whether activation outputs were non-finite at `step` (None: not measured then), and the
    first layer that held them."""
    s = data.layer.get("act_nonfinite")
    if s is None or not np.any(s.steps == step):
        return None, ""
    col = int(np.flatnonzero(s.steps == step)[0])
    measured = s.measured[:, col]
    if not measured.any():
        return None, ""
    bad = measured & ~(s.values[:, col] <= 0)
    return bool(bad.any()), (data.layers[int(np.argmax(bad))].name if bad.any() else "")


def _growth_before(data: RunData, step: int) -> float:
    """How much the finite total norm grew from the first quarter of the steps before `step`
    to the last one before it (1 when there are too few)."""
    norms = data.run.get("grad_norm_total")
    if norms is None:
        return 1.0
    v = norms.values.astype(np.float64)[norms.steps < step]
    v = v[np.isfinite(v) & (v > 0)]
    if len(v) < th.GROWTH_MIN_STEPS:
        return 1.0
    return float(np.max(v[-3:]) / np.median(v[: len(v) // 4]))


def _diverged(data: RunData, step: int) -> str | None:
    """A cause when the gradients blew up before `step` (first failure there or a large growth)."""
    grad = _first_gradient_failure(data)
    if grad is not None and grad < step:
        return f"the run diverged: gradients went non-finite at step {grad}, before step {step}"
    growth = _growth_before(data, step)
    if growth > th.GROWTH_FACTOR:
        return f"the run diverged: the total gradient norm grew x{num(growth)} over the steps before step {step}"
    return None


_INPUTS = "NaN/Inf in a batch of inputs or targets"
_LOSS_OP = "an operation undefined at its input in the loss or the forward pass: log(0) or of a negative, x/0, sqrt " \
           "of a negative"
_FP16 = "float16 overflow without loss scaling"


def _in_layers(names: list[str]) -> str:
    return f" in layer{'s' if len(names) > 1 else ''} {listing(names)}" if names else ""


def _gradient_causes(data: RunData, elements: np.ndarray, overflow: np.ndarray, first: int) -> list[str]:
    """Causes of non-finite gradients, the one the run's own evidence points at first."""
    causes = []
    if len(overflow) and (not len(elements) or overflow[0] <= elements[0]):
        causes.append("gradients exploded: a norm passed float32's range (3.4e38) while its elements were still "
                      "finite, and the update that followed made the next step's values overflow")
    loss_first = _first_loss_failure(data)
    diverged = _diverged(data, first)
    if diverged:
        causes.append(diverged)
    if loss_first is not None and loss_first <= first and not causes:
        causes.append(f"the loss was non-finite at step {loss_first}: backpropagating a NaN/Inf loss makes the "
                      "gradients NaN (the loss finding says where it came from)")
    causes += ["a learning rate so high that weights, then gradients, overflow", _LOSS_OP, _FP16]
    return causes


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
    kinds = (("overflow", overflow, first_over,
              "norm overflowed float32 at step {step}{where} (elements still finite)"),
             ("nonfinite", elements, first_elem, "NaN/Inf gradient elements from step {step}{where}"))
    for key, steps, first, text in kinds:
        if not len(steps):
            continue
        step = int(steps[0])
        where = _where(first) if first is not None and int(first["step"]) == step else []
        summary.append(text.format(step=step, where=_in_layers(where)) + f", on {plural(len(steps), 'step')}: "
                       + ranges_text(runs_of(steps)))
        values.update({f"first_{key}_step": float(step), f"{key}_steps": float(len(steps))})
        firsts.append(step)
    summary += norm_lines
    norms = data.run.get("grad_norm_total")
    bad_norms = np.array([], dtype=np.int64)
    if norms is not None and norms.values.size:
        bad_norms = norms.steps[~np.isfinite(norms.values.astype(np.float64))]
    if not firsts:
        firsts.append(int(bad_norms[0]))
    first = min(firsts)
    summary.insert(0, f"first failure at step {first}")
    values["value"] = float(len(np.union1d(np.union1d(elements, overflow), bad_norms)))
    values["first_step"] = float(first)
    values["events"] = float(sum(e.get("kind") in ("nonfinite", "overflow") for e in data.events))
    layers = tuple(dict.fromkeys(_where(first_over) + _where(first_elem)))
    remedies = ("lower the learning rate and clip the total gradient norm", _SKIP_GUARD,
                "guard the loss: clamp probabilities before log, add eps to divisions; use bf16 or a GradScaler")
    title = "Non-finite gradients (NaN/Inf)" if len(elements) or not len(overflow) else \
        "Gradient norm overflowed float32 (elements finite)"
    evidence = Evidence(tuple(summary), values, layers=layers, steps=tuple(sorted(set(firsts))))
    return [Finding("nonfinite_gradients", "error", title, evidence,
                    tuple(_gradient_causes(data, elements, overflow, first)), remedies)]


def _loss_causes(data: RunData, first: int, recovered: bool) -> list[str]:
    """Causes of a non-finite loss, the one the run's own evidence points at first."""
    acts, layer = _activations_at(data, first)
    grad = _first_gradient_failure(data)
    poisoned = None
    if not recovered and grad is not None and grad <= first:
        poisoned = (f"weights that went non-finite after the non-finite update of step {grad} (nothing skipped it), "
                    "so the loss stayed non-finite")
    diverged = _diverged(data, first)
    if diverged:
        ordered = [diverged, poisoned, _LOSS_OP, _INPUTS, _FP16]
    elif acts:
        ordered = [f"{_INPUTS}: activation outputs were non-finite at step {first} too, from layer {layer}",
                   _LOSS_OP, poisoned, _FP16]
    elif acts is False:
        ordered = [f"{_LOSS_OP}: the activations at step {first} were finite and the gradient norm before it "
                   "ordinary, so the NaN/Inf was born in the loss", poisoned, _INPUTS, _FP16]
    elif recovered:
        ordered = [f"{_INPUTS} (the loss was finite again afterwards, which points at the batches)", _LOSS_OP,
                   _FP16]
    else:
        ordered = [_LOSS_OP, _INPUTS, poisoned, _FP16]
    return [c for c in ordered if c]


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
    summary += [f"loss {name} on {plural(n, 'step')}: {ranges_text(ranges)}" for name, n, ranges in kinds]
    later = np.flatnonzero(~bad & (s.steps > last_bad))
    summary.append(f"finite again from step {int(s.steps[later[0]])}" if len(later)
                   else f"still non-finite at the last logged step {int(s.steps[-1])}")
    values = {"value": float(np.count_nonzero(bad)), "first_step": float(first),
              "nonfinite_steps": float(np.count_nonzero(bad)), "logged_steps": float(len(v))}
    values.update({_VALUE_KEYS[name]: float(n) for name, n, _ in kinds})
    remedies = ("check the batches of those steps: torch.isfinite(x).all() on inputs and targets",
                "guard the loss: clamp probabilities before log, add eps to divisions; use bf16 or a GradScaler",
                _SKIP_GUARD)
    evidence = Evidence(tuple(summary), values, steps=(first,))
    return [Finding("nonfinite_loss", "error", "Non-finite loss (NaN/Inf)", evidence,
                    tuple(_loss_causes(data, first, bool(len(later)))), remedies)]


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
               + listing([f"{data.layers[r].name} ({data.layers[r].type}, {plural(int(s.values[r, col]), 'output')})"
                          for r in first_rows]),
               f"{plural(len(rows), 'layer')} with NaN/Inf outputs on "
               f"{plural(int(bad_steps.sum()), 'measured step')}: " + ranges_text(step_ranges(s.steps, bad_steps)),
               "by layer: " + listing([f"{data.layers[r].name} from step {int(s.steps[np.argmax(bad[r])])}"
                                       for r in rows])]
    values = {"value": float(bad_steps.sum()), "first_step": float(first), "nonfinite_steps": float(bad_steps.sum()),
              "layers": float(len(rows)), "max_outputs": float(np.nanmax(counts))}
    grad = _first_gradient_failure(data)
    poisoned = "weights that went non-finite after a non-finite update"
    inputs = "NaN/Inf inputs reaching the layer (a bad batch: the gradients of that step go non-finite too)"
    if grad is not None and grad < first:
        causes = (f"{poisoned}: gradients were non-finite from step {grad}, before the activations", inputs)
    else:
        causes = (inputs, poisoned)
    causes += ("overflow in the forward pass: float16 ranges, exp of large values, unnormalised attention logits",)
    remedies = ("check the batches of those steps: torch.isfinite(x).all() on the inputs",
                _SKIP_GUARD, "lower the learning rate and clip the total gradient norm; use bf16 or float32")
    evidence = Evidence(tuple(summary), values, layers=data.layer_names(rows), steps=(first,))
    return [Finding("nonfinite_activations", "error", "Non-finite activations (NaN/Inf outputs)", evidence,
                    causes, remedies)]
