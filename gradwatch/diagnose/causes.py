"""Evidence that several rules name as a cause: the init check's mismatches, with their numbers,
and the recorded learning rate (a burst before a problem, or a decay that explains a growing
gradient norm)."""

from __future__ import annotations

from typing import Any

import numpy as np

from gradwatch.diagnose import thresholds as th
from gradwatch.diagnose.rundata import RunData, Series, in_sorted, nanmedian
from gradwatch.diagnose.text import num, plural, ranges_text, step_ranges

SCHEME_NAMES = {"glorot": "Glorot", "he": "He", "lecun": "LeCun"}


def init_label(data: RunData, entry: dict[str, Any]) -> str:
    """The layer an init check entry is about, by name."""
    ref = entry.get("layer")
    if isinstance(ref, int) and 0 <= ref < len(data.layers):
        return data.layers[ref].name
    return str(entry.get("param") if ref is None else ref)


def _number(entry: dict[str, Any], key: str) -> float:
    value = entry.get(key)
    return float(value) if isinstance(value, (int, float)) else float("nan")


def bad_init(data: RunData, direction: str | None = None) -> list[dict[str, Any]]:
    """Init check entries whose verdict is not ok, optionally only those too large / too small.

    A too-small output layer (no activation after it) is left out: a small or zero init of
    the last layer is common practice and harmless.
    """
    bad = [c for c in data.init_check if c.get("verdict") not in (None, "ok")
           and not (c.get("activation") is None and c.get("verdict") == "too_small")]
    if direction == "large":
        return [c for c in bad if _number(c, "ratio") > 1]
    if direction == "small":
        return [c for c in bad if 0 < _number(c, "ratio") < 1]
    return bad


def torch_default(data: RunData, entry: dict[str, Any]) -> bool:
    """Whether a weight's std is PyTorch's default init: 1/sqrt(3 fan_in) for Linear and Conv
    (kaiming_uniform_ with a=sqrt(5)), 1/sqrt(3 hidden) for recurrent layers."""
    std = _number(entry, "std")
    recurrent = any(ly.name == init_label(data, entry) and ly.is_recurrent for ly in data.layers)
    fan = _number(entry, "fan_out" if recurrent else "fan_in")
    if not (fan > 0 and np.isfinite(std)):
        return False
    return abs(std * np.sqrt(3 * fan) - 1) <= th.TORCH_DEFAULT_TOLERANCE


def init_line(data: RunData, entry: dict[str, Any]) -> str:
    """'blocks.0.0.weight: std 0.0713 before ReLU; He expects 0.177 (x0.404, PyTorch's default)'."""
    scheme = str(entry.get("recommended"))
    expected = (entry.get("expected") or {}).get(scheme)
    want = num(float(expected)) if isinstance(expected, (int, float)) else "?"
    note = ", PyTorch's default" if torch_default(data, entry) else ""
    return (f"{entry.get('param') or init_label(data, entry)}: std {num(_number(entry, 'std'))} before "
            f"{entry.get('activation') or 'no activation'}; {SCHEME_NAMES.get(scheme, scheme)} expects {want} "
            f"(x{num(_number(entry, 'ratio'))}{note})")


def _distance(entry: dict[str, Any]) -> float:
    """How far a weight's std is from the recommended one, in orders of magnitude either way."""
    ratio = _number(entry, "ratio")
    return abs(float(np.log10(ratio))) if np.isfinite(ratio) and ratio > 0 else 0.0


def init_cause(data: RunData, direction: str, what: str) -> str | None:
    """A cause naming the weights initialised too `direction` ("large"/"small"), the furthest
    first, with their numbers; None when the init check shows none."""
    bad = bad_init(data, direction)
    if not bad:
        return None
    shown = [init_line(data, c) for c in sorted(bad, key=_distance, reverse=True)[:2]]
    more = f"; and {plural(len(bad) - 2, 'more weight')}" if len(bad) > 2 else ""
    return f"weights initialised too {direction} for the activation that follows, {what}: " + "; ".join(shown) + more


def lr_matrix(data: RunData) -> Series | None:
    """The recorded learning rate per param group (groups x steps), or None."""
    lr = data.group.get("lr")
    return lr if lr is not None and lr.values.size else None


def lr_burst(data: RunData, step: int) -> str | None:
    """A cause naming a learning-rate burst in the LR_BURST_LOOKBACK steps up to `step`: a group's
    LR above LR_BURST_FACTOR x its median over the steps given. None when there was none."""
    lr = lr_matrix(data)
    if lr is None:
        return None
    values = np.where(lr.measured, lr.values, np.nan).reshape(-1, len(lr.steps)).astype(np.float64)
    near = (lr.steps <= step) & (lr.steps > step - th.LR_BURST_LOOKBACK)
    for row in values:
        med = nanmedian(row)
        if not (np.isfinite(med) and med > 0):
            continue
        high = near & (np.nan_to_num(row, nan=0.0) > th.LR_BURST_FACTOR * med)
        if high.any():
            peak = float(np.nanmax(row[high]))
            return (f"a learning-rate burst: the LR reached {num(peak)} (x{num(peak / med)} its median {num(med)}) "
                    f"on {plural(int(high.sum()), 'step')} ({ranges_text(step_ranges(lr.steps, high))}), "
                    f"up to step {step}")
    return None


def lr_explained_growth(data: RunData, first: np.ndarray, last: np.ndarray) -> float:
    """How much growth of the gradient norm between the steps `first` and the steps `last` the
    LR schedule explains: sqrt of the largest decay of a group's median LR between them
    (normalised layers with weight decay settle at |g|/|w| ~ sqrt(2 wd / lr)); 1 without a decay."""
    lr = lr_matrix(data)
    if lr is None or not len(first) or not len(last):
        return 1.0
    values = np.where(lr.measured, lr.values, np.nan).reshape(-1, len(lr.steps)).astype(np.float64)
    early, late = in_sorted(lr.steps, first), in_sorted(lr.steps, last)
    best = 1.0
    for row in values:
        a, b = nanmedian(row[early]), nanmedian(row[late])
        if np.isfinite(a) and np.isfinite(b) and a > 0 and b > 0:
            best = max(best, float(np.sqrt(a / b)))
    return best

