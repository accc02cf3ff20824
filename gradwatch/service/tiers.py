"""Label tiers: which layer and param series the exporter emits, and how it reduces them.

By default a run's layer metrics are exported per *block* (a group of layers: by default a
transformer block or a Sequential's numbered child, see `block_of`) and without a `rank`
label: the value is the largest over the ranks the service sees, and for the activation
statistics `gradwatch_layer_max_rank` names the rank that has it. Per-layer, per-param and
per-rank series are opt-in (`Tiers`). Every series of a run carries `run_name` and
`project`, which add no series (one name and one project per run). docs/metrics.md
documents the label sets and the series each tier costs.

The maths are pure functions over plain values, so tests call them directly:
`aggregate` folds a block's layers into one value, `rank_max` reduces over ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TypeVar

from gradwatch.service.catalog import RUN_INFO, MetricSpec

__all__ = ["ATTRIBUTED", "LAYER_MAX_RANK", "TIER_METRICS", "Placement", "Tiers", "aggregate", "block_of",
           "exported", "l2", "largest", "param_aggregates", "placements", "rank_max", "smallest", "update_ratio"]

K = TypeVar("K")


@dataclass(frozen=True)
class Tiers:
    """Which series are exported: blocks (default) or layers, params or not, reduced over
    ranks (default) or per rank. `block_levels`: None groups layers automatically
    (`block_of`), N keeps the first N components of a layer's name."""

    per_layer: bool = False
    per_param: bool = False
    per_rank: bool = False
    block_levels: int | None = None


LAYER_MAX_RANK = MetricSpec(
    "gradwatch_layer_max_rank", "gauge", ("run", "layer", "depth", "stat"),
    "Rank whose value of the activation statistic named by `stat` is the largest (lowest such rank; NaN counts "
    "as largest); exported when layer series are reduced across ranks")
TIER_METRICS: tuple[MetricSpec, ...] = (LAYER_MAX_RANK,)

# Run-log metrics whose rank of the largest value is exported: the activation statistics, which
# differ between data-parallel ranks (each sees its own batch), the attention, output-logit and
# activation-scale ones included. Gradient and parameter norms and update ratios are those of the
# synchronised gradients and weights, equal on every rank, and so is the optimizer state the
# optimizer-health statistics read.
ATTRIBUTED = frozenset({"act_grad_norm", "act_mean", "act_std", "saturation_ratio", "dead_ratio", "zero_ratio",
                        "act_nonfinite", "attn_logit_max", "attn_entropy", "logit_max", "logit_logz", "act_rms",
                        "act_absmax", "act_outlier"})

RUN_IDENTITY = ("run_name", "project")


def exported(spec: MetricSpec, tiers: Tiers) -> MetricSpec:
    """The catalog's `spec` with the labels it has at these tiers.

    Every series with a `run` label also gets `run_name` and `project` (gradwatch_run_info
    already has them as `name` and `project`); layer series get `depth`; layer and param series
    lose `rank` unless `tiers.per_rank` (`LAYER_MAX_RANK` exists only without it).
    """
    labels = list(spec.labels)
    if "run" in labels and spec is not RUN_INFO:
        at = labels.index("run") + 1
        labels[at:at] = RUN_IDENTITY
    if "layer" in labels:
        if "rank" in labels:
            labels.remove("rank")
        if "param" not in labels and "depth" not in labels:
            labels.insert(labels.index("layer") + 1, "depth")
        if tiers.per_rank and spec is not LAYER_MAX_RANK:
            labels.append("rank")
    return replace(spec, labels=tuple(labels))


def block_of(layer: str, levels: int | None = None) -> str:
    """The block a layer belongs to.

    Automatic (`levels` None): the name up to and including its first numeric component, the
    index of a ModuleList or Sequential: ``model.layers.7.mlp.up_proj`` is in
    ``model.layers.7``, ``transformer.h.0.attn.c_attn`` in ``transformer.h.0``, ``layer1.0.conv1``
    in ``layer1.0``; a Sequential's child ``3`` is its own block, and so is a layer whose name
    has no number (``lm_head``, ``model.norm``). With `levels` N: the first N components.
    """
    parts = layer.split(".")
    if levels is not None:
        return ".".join(parts[:levels])
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return layer


@dataclass(frozen=True)
class Placement:
    """Where a layer's values go: the unit (its block, or itself per layer) they are exported
    as, that unit's `depth` label, and the layer's own position in model order."""

    unit: str
    depth: str
    order: int


def placements(layer_depths: Mapping[str, int], seen: Iterable[str], tiers: Tiers) -> dict[str, Placement]:
    """Each layer's `Placement`, for the layers of the run's table and any other `seen` in its
    values.

    Units are numbered in model order (a block by its first layer), zero-padded to one width so
    that sorting the `depth` label sorts by depth. A layer missing from the table (a damaged
    store) comes after the known ones, by name.
    """
    known = sorted(layer_depths, key=lambda name: (layer_depths[name], name))
    layers = known + sorted(set(seen) - set(layer_depths))
    name_of = {layer: layer if tiers.per_layer else block_of(layer, tiers.block_levels) for layer in layers}
    order: dict[str, int] = {}
    for layer in layers:
        order.setdefault(name_of[layer], len(order))
    width = len(str(max(len(order) - 1, 0)))
    return {layer: Placement(name_of[layer], str(order[name_of[layer]]).zfill(width), i)
            for i, layer in enumerate(layers)}


def _nan_last(value: float) -> tuple[int, float]:
    """Sort key where NaN is larger than everything, +Inf included (NaN is a value)."""
    return (1, 0.0) if math.isnan(value) else (0, value)


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def largest(values: Iterable[float]) -> float:
    """The largest value, NaN counting as larger than +Inf."""
    return max(values, key=_nan_last)


def smallest(values: Iterable[float]) -> float:
    """The smallest value, NaN counting as smaller than -Inf (a NaN is never hidden by a fold)."""
    seen = list(values)
    return math.nan if any(math.isnan(v) for v in seen) else min(seen)


def rank_max(by_rank: Mapping[int, float]) -> tuple[float, int]:
    """The largest value over the ranks (NaN counts as largest) and the lowest rank that has it."""
    best = largest(by_rank.values())
    return best, min(rank for rank, value in by_rank.items() if _same(value, best))


def l2(values: Iterable[float]) -> float:
    """L2 norm of norms: the norm of the concatenation of the vectors they measure."""
    return math.sqrt(sum(x * x for x in values))


def update_ratio(ratios: list[float], param_norms: list[float]) -> float | None:
    """||delta theta|| / ||theta|| of a group of params from their ratios and norms.

    ||delta theta_p|| = ratio_p * ||theta_p||, so the group's ratio is
    sqrt(sum (ratio_p * norm_p)^2) / sqrt(sum norm_p^2). None when no norm is known or they are
    all zero; NaN when a norm or ratio is NaN (a measured value, not a gap to skip).
    """
    if not param_norms:
        return None
    denominator = l2(param_norms)
    if denominator == 0:
        return None
    return l2(r * n for r, n in zip(ratios, param_norms)) / denominator


def at_latest_step(values: Mapping[K, tuple[int, float]]) -> tuple[int | None, dict[K, float]]:
    """The latest step any entity has, and the entities' values at it (statistics measured
    together share steps; an older value is not this step's)."""
    if not values:
        return None, {}
    last = max(step for step, _ in values.values())
    return last, {e: value for e, (step, value) in values.items() if step == last}


def param_aggregates(norms: Mapping[str, tuple[int, float]],
                     ratios: Mapping[str, tuple[int, float]]) -> tuple[float | None, float | None]:
    """A block's (or layer's) parameter norm and update ratio from its params' {name: (step,
    value)}: the norm over the params at their latest step, the ratio over those whose ratio and
    norm were measured at the latest step of the ratios."""
    _, latest_norms = at_latest_step(norms)
    norm = l2(latest_norms.values()) if latest_norms else None
    step, latest_ratios = at_latest_step(ratios)
    paired = [(r, norms[p][1]) for p, r in latest_ratios.items() if p in norms and norms[p][0] == step]
    return norm, update_ratio([r for r, _ in paired], [n for _, n in paired])


# How a block's layers fold into one value, per layer-scope metric of the run log:
# "l2": norms, the norm of the concatenation; "max": fractions, the block's worst layer;
# "sum": counts; "last": the block's deepest layer (its output); "min": the block's smallest
# (NaN counting as smallest). The optimizer-health ratios fold to the block's largest: the layer
# furthest above 1 (update RMS), above its band or its equilibrium, or with the most lagging or
# ε-dominated second moment. Attention folds to its worst layer: the largest max logit, the
# smallest entropy (a collapse is low); the output logits to their one layer's; the residual
# stream's RMS to the block's output, its max |x| and every layer's max/RMS to the largest.
FOLDS: dict[str, str] = {
    "grad_norm": "l2", "act_grad_norm": "l2", "saturation_ratio": "max", "dead_ratio": "max",
    "zero_ratio": "max", "act_nonfinite": "sum", "act_mean": "last", "act_std": "last",
    "layer_adam_update_rms": "max", "layer_adam_eps_frac": "max", "layer_adam_v_lag": "max",
    "update_to_weight": "max", "update_to_weight_equilibrium": "max", "grad_to_weight": "max",
    "grad_to_weight_equilibrium": "max", "attn_logit_max": "max", "attn_entropy": "min", "logit_max": "max",
    "logit_logz": "last", "act_rms": "last", "act_absmax": "max", "act_outlier": "max",
}


def aggregate(metric: str, values: Mapping[int, tuple[int, float]]) -> float | None:
    """A block's value of a layer-scope `metric` from its layers' {order: (step, value)}, at
    the latest step any of them has (`at_latest_step`). None without values."""
    _, current = at_latest_step(values)
    if not current:
        return None
    fold = FOLDS[metric]
    if fold == "l2":
        return l2(current.values())
    if fold == "max":
        return largest(current.values())
    if fold == "sum":
        return sum(current.values())
    if fold == "min":
        return smallest(current.values())
    return current[max(current)]
