"""Summary statistics the commands share, so `history`, `layers` and `compare` agree on a median."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradwatch.cli._format import typed


def median(values: Any) -> float | None:
    """Median with NaN values left out and ±Inf kept (they order with the rest); NaN when every
    value is NaN, None when there is none (nothing was measured)."""
    v = np.asarray(values, dtype=np.float64)
    if not len(v):
        return None
    ordered = v[~np.isnan(v)]
    return float(np.median(ordered)) if len(ordered) else math.nan


def summary(metric: str, values: Any) -> dict[str, Any]:
    """A series in numbers, as `history` prints them: how many values; min, median and max with NaN
    left out (NaN when every value is NaN, None when there is none); the last value; how many
    values were NaN, +Inf and -Inf. Counts stay integers (`typed`)."""
    v = np.asarray(values, dtype=np.float64)
    ordered = v[~np.isnan(v)]

    def ends(pick: Any) -> Any:
        return None if not len(v) else typed(metric, float(pick(ordered))) if len(ordered) else math.nan

    return {"values": int(len(v)), "min": ends(np.min), "median": median(v), "max": ends(np.max),
            "last": typed(metric, float(v[-1])) if len(v) else None,
            "nan": int(np.isnan(v).sum()), "inf": int(np.isposinf(v).sum()), "-inf": int(np.isneginf(v).sum())}
