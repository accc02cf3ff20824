"""What a diagnosis says: findings with their evidence, likely causes and remedies."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Severity = Literal["error", "warning", "info"]
SEVERITY_ORDER: dict[str, int] = {"error": 0, "warning": 1, "info": 2}


@dataclass(frozen=True)
class Evidence:
    """The measurements a finding rests on.

    `summary` holds readable sentences; `values` the numbers behind them (stable keys for
    `--json`); `layers` and `steps` where the problem shows.
    """

    summary: tuple[str, ...]
    values: dict[str, float] = field(default_factory=dict)
    layers: tuple[str, ...] = ()
    steps: tuple[int, ...] = ()


@dataclass(frozen=True)
class Finding:
    """One problem found in a run, with what shows it, why it happens and what to do."""

    id: str
    severity: Severity
    title: str
    evidence: Evidence
    causes: tuple[str, ...]
    remedies: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """A plain dict with stable keys, for `--json` output."""
        out = asdict(self)
        ev = out["evidence"]
        ev["summary"], ev["layers"], ev["steps"] = list(ev["summary"]), list(ev["layers"]), list(ev["steps"])
        out["causes"], out["remedies"] = list(self.causes), list(self.remedies)
        return out
