"""How findings spell counts, step ranges and lists: one place, so no finding says "1 spikes",
"steps 10-10" or "7 layers" while listing 6."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Step ranges spelled out in a summary line; the rest are counted.
RANGES_SHOWN = 6
#: Layers (or other names) listed in a summary line; the rest are counted.
NAMES_SHOWN = 5


def num(x: float) -> str:
    """A measured number in three significant digits (1.23e+05, 0.0123, nan, inf)."""
    return f"{x:.3g}"


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 step', '2 steps', '0 steps'; `many` for irregular plurals."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def span(first: int, last: int, word: str = "step") -> str:
    """'step 10' for a single step, 'steps 10-20' for a range."""
    return f"{word} {first}" if first == last else f"{word}s {first}-{last}"


def listing(names: Sequence[str], shown: int = NAMES_SHOWN) -> str:
    """'a, b, c', or 'a, b, c and 4 more' past `shown`: every name counted once."""
    names = list(names)
    head = ", ".join(names[:shown])
    return head + (f" and {len(names) - shown} more" if len(names) > shown else "")


def consecutive(idx: np.ndarray) -> list[tuple[int, int]]:
    """Sorted integers grouped into (first, last) runs of consecutive numbers."""
    idx = np.asarray(idx, dtype=np.int64)
    if not len(idx):
        return []
    breaks = np.flatnonzero(np.diff(idx) > 1)
    firsts = np.concatenate([idx[:1], idx[breaks + 1]])
    lasts = np.concatenate([idx[breaks], idx[-1:]])
    return [(int(a), int(b)) for a, b in zip(firsts, lasts)]


def step_ranges(steps: np.ndarray, bad: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) step of each run of consecutive measured rows where `bad` holds (rows, not
    step numbers: a loss logged every 10 steps that is NaN at 50 and 60 is one range, 50-60)."""
    return [(int(steps[a]), int(steps[b])) for a, b in consecutive(np.flatnonzero(bad))]


def runs_of(steps: np.ndarray) -> list[tuple[int, int]]:
    """Step numbers grouped into (first, last) runs of consecutive steps."""
    return consecutive(np.unique(np.asarray(steps, dtype=np.int64)))


def ranges_text(ranges: list[tuple[int, int]], shown: int = RANGES_SHOWN) -> str:
    """Step ranges as '53-69, 80, 90-92', the ones past `shown` counted."""
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in ranges[:shown]]
    if len(ranges) > shown:
        parts.append(f"and {len(ranges) - shown} more")
    return ", ".join(parts)
