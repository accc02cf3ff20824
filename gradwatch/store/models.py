"""What the query API returns: plain frozen dataclasses and numpy arrays."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np


@dataclass(frozen=True)
class RunInfo:
    """One run, as listed by `Store.list_runs`. Times are unix seconds."""

    id: str
    name: str
    project: str
    status: str  # running | finished | crashed
    status_at: float
    started_at: float | None
    ended_at: float | None
    last_step: int | None
    host: str | None
    pid: int | None
    world_size: int


@dataclass(frozen=True)
class ParamInfo:
    index: int
    name: str
    layer: int | None
    shape: tuple[int, ...]
    numel: int
    requires_grad: bool
    group: int | None


@dataclass(frozen=True)
class LayerInfo:
    index: int  # depth: layers are in model order
    name: str
    type: str
    kind: str  # param | activation
    family: str | None  # bounded | relu | smooth | None
    params: tuple[int, ...]


@dataclass(frozen=True)
class LogInfo:
    """Ingest state of one run log (one rank of a run)."""

    name: str
    path: str
    run_id: str | None
    rank: int | None
    offset: int
    state: str  # running | finished | crashed | broken | deleted
    state_at: float
    last_step: int | None
    close_stats: dict[str, Any] | None


@dataclass(frozen=True)
class RunSummary:
    """Everything `gradwatch show` prints about a run."""

    run: RunInfo
    torch_version: str | None
    gradwatch_version: str | None
    python_version: str | None
    device: str | None
    config: dict[str, Any]
    model: dict[str, Any]
    optimizer: dict[str, Any]  # {"class": "SGD", "wrappers": [outermost first]}; {} for runs without one
    groups: list[dict[str, Any]]
    init_check: list[dict[str, Any]]
    num_params: int
    num_layers: int
    metrics: dict[str, str]  # metric name -> scope
    latest: dict[str, tuple[int, float]]  # run-level metric -> (step, value), rank 0; NaN / ±Inf are values
    event_counts: dict[str, int]
    active_alerts: int
    logs: list[LogInfo]


class Series(NamedTuple):
    """A history: `steps` (int64) and `values` (float64) of the same length, by step."""

    steps: np.ndarray
    values: np.ndarray


@dataclass(frozen=True)
class LayerTable:
    """All layers at one step: `values[metric][i]` belongs to `layers[i]`; `measured[metric][i]`
    is False where that layer was not measured at the step (its value is then NaN), True for
    every measured value, NaN and ±Inf included."""

    step: int | None
    layers: list[LayerInfo]
    values: dict[str, np.ndarray] = field(default_factory=dict)
    measured: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class EventInfo:
    id: int
    run_id: str
    rank: int
    step: int
    time: float
    kind: str
    data: dict[str, Any]


@dataclass(frozen=True)
class AlertInfo:
    """An alert of the rules engine: `message` is its title; `layer`, `value` (NaN and ±Inf are
    values), `threshold`, `cause` and `remedy` are what it found (None when it gave none)."""

    id: int
    run_id: str | None
    rule: str
    severity: str
    step: int | None
    message: str
    labels: dict[str, str]
    started_at: float
    ended_at: float | None
    layer: str | None = None
    value: float | None = None
    threshold: float | None = None
    cause: str | None = None
    remedy: str | None = None

    @property
    def active(self) -> bool:
        return self.ended_at is None


@dataclass(frozen=True)
class LatestValue:
    """The latest stored value of one series (NaN and ±Inf are values: a series exists only
    once it has one); `entity` is the param / layer name, or the group index as a string for
    `group` scope, or "" for run-level metrics."""

    run_id: str
    rank: int
    metric: str
    scope: str
    entity: str
    step: int
    value: float


@dataclass(frozen=True)
class IngestErrorInfo:
    id: int
    log: str
    path: str
    offset: int
    reason: str
    at: float
