"""Label tiers: blocks, the reduction across ranks, per-layer, per-param and per-rank series.

A transformer-shaped run (an embedding, 12 blocks of attention, activation and MLP layers,
a head) on two ranks is fed to the real collector; every exported value is compared with a
direct computation from the same numbers written here (numpy), not with the exporter's own
helpers.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gradwatch.service.catalog import METRICS
from gradwatch.service.exporter import GradwatchCollector, RunLatest
from gradwatch.service.tiers import Tiers, block_of, exported, placements, rank_max
from gradwatch.store.models import LatestValue

BLOCKS = 12
RUN = {"run": "t1", "run_name": "tiny-llama", "project": "nlp"}
STEP = 20


def _layers() -> list[tuple[str, str]]:
    """(name, kind) in model order: kind "param" (weight + bias) or "act" (a ReLU)."""
    out = [("model.embed_tokens", "param")]
    for b in range(BLOCKS):
        out += [(f"model.layers.{b}.attn.q_proj", "param"), (f"model.layers.{b}.mlp.act", "act"),
                (f"model.layers.{b}.mlp.down_proj", "param")]
    return out + [("lm_head", "param")]


LAYERS = _layers()


def _value(rank: int, i: int, salt: int) -> float:
    """A deterministic positive value per rank, layer and statistic."""
    return float(np.random.default_rng(1000 * rank + 17 * i + salt).uniform(0.05, 2.0))


def _snapshot(ranks: tuple[int, ...] = (0, 1), nan_at: tuple[int, str] | None = None) -> RunLatest:
    values: list[LatestValue] = []
    param_layers: dict[str, str] = {}
    for rank in ranks:
        def add(metric: str, scope: str, entity: str, value: float, step: int = STEP) -> None:
            values.append(LatestValue("t1", rank, metric, scope, entity, step, value))

        add("grad_norm_total", "run", "", 3.0 + rank)
        for i, (name, kind) in enumerate(LAYERS):
            if kind == "param":
                for j, suffix in enumerate(("weight", "bias")):
                    param = f"{name}.{suffix}"
                    param_layers[param] = name
                    add("grad_norm", "param", param, _value(rank, i, j))
                    add("param_norm", "param", param, _value(rank, i, 10 + j) * 10)
                    add("update_ratio", "param", param, _value(rank, i, 20 + j) / 100)
                grad = math.hypot(_value(rank, i, 0), _value(rank, i, 1))
                add("grad_norm", "layer", name, grad)  # the store's L2 of its params' grad_norm
            else:
                add("dead_ratio", "layer", name, _value(rank, i, 30) / 2)
                add("act_nonfinite", "layer", name, float(rank + i % 3))
            add("act_grad_norm", "layer", name, _value(rank, i, 40))
            add("act_mean", "layer", name, _value(rank, i, 50) - 1)
    if nan_at is not None:
        rank, layer = nan_at
        values = [v if (v.rank, v.entity, v.metric) != (rank, layer, "act_grad_norm")
                  else LatestValue(v.run_id, v.rank, v.metric, v.scope, v.entity, v.step, math.nan) for v in values]
    return RunLatest(id="t1", name="tiny-llama", project="nlp", status="running", world_size=len(ranks),
                     param_layers=param_layers, layer_depths={name: i for i, (name, _) in enumerate(LAYERS)},
                     values=values)


def _samples(run: RunLatest, **tiers: object) -> dict[str, list[tuple[dict[str, str], float]]]:
    registry = CollectorRegistry()
    registry.register(GradwatchCollector(lambda: [run], **tiers))  # type: ignore[arg-type]
    out: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[s.name].append((s.labels, s.value))
    return out


def _by_layer(samples: list[tuple[dict[str, str], float]]) -> dict[str, float]:
    return {labels["layer"]: value for labels, value in samples}


def _block(name: str) -> str:
    return "model.layers." + name.split(".")[2] if name.startswith("model.layers.") else name


def _expected(metric: str, ranks: tuple[int, ...] = (0, 1)) -> dict[str, tuple[float, int]]:
    """Per block: (largest over the ranks, the rank with it), computed directly."""
    per_rank: dict[str, dict[int, float]] = defaultdict(dict)
    for rank in ranks:
        members: dict[str, list[int]] = defaultdict(list)
        for i, (name, _) in enumerate(LAYERS):
            members[_block(name)].append(i)
        for block, idx in members.items():
            params = [i for i in idx if LAYERS[i][1] == "param"]
            acts = [i for i in idx if LAYERS[i][1] == "act"]
            if metric == "grad_norm":
                v = np.sqrt(sum(_value(rank, i, 0) ** 2 + _value(rank, i, 1) ** 2 for i in params))
            elif metric == "param_norm":
                v = np.sqrt(sum((_value(rank, i, 10 + j) * 10) ** 2 for i in params for j in (0, 1)))
            elif metric == "update_ratio":
                moved = np.sqrt(sum((_value(rank, i, 20 + j) / 100 * _value(rank, i, 10 + j) * 10) ** 2
                                    for i in params for j in (0, 1)))
                v = moved / np.sqrt(sum((_value(rank, i, 10 + j) * 10) ** 2 for i in params for j in (0, 1)))
            elif metric == "act_grad_norm":
                v = np.sqrt(sum(_value(rank, i, 40) ** 2 for i in idx))
            elif metric == "dead_ratio":
                if not acts:
                    continue
                v = max(_value(rank, i, 30) / 2 for i in acts)
            elif metric == "activation_nonfinite":
                if not acts:
                    continue
                v = sum(float(rank + i % 3) for i in acts)
            else:  # activation_mean: the block's deepest layer
                v = _value(rank, max(idx), 50) - 1
            per_rank[block][rank] = float(v)
    return {block: (max(by_rank.values()), max(by_rank, key=lambda r: (by_rank[r], -r)))
            for block, by_rank in per_rank.items()}


# --------------------------------------------------------------------------- blocks
@pytest.mark.parametrize(("layer", "levels", "block"), [
    pytest.param("model.layers.7.mlp.up_proj", None, "model.layers.7", id="llama"),
    pytest.param("transformer.h.0.attn.c_attn", None, "transformer.h.0", id="gpt2"),
    pytest.param("layer1.0.conv1", None, "layer1.0", id="resnet"),
    pytest.param("3", None, "3", id="sequential-child"),
    pytest.param("lm_head", None, "lm_head", id="no-number"),
    pytest.param("model.norm", None, "model.norm", id="no-number-nested"),
    pytest.param("model.layers.7.mlp.up_proj", 2, "model.layers", id="two-levels"),
    pytest.param("model.layers.7.mlp.up_proj", 4, "model.layers.7.mlp", id="four-levels"),
    pytest.param("lm_head", 3, "lm_head", id="levels-beyond-the-name"),
])
def test_block_of(layer: str, levels: int | None, block: str) -> None:
    assert block_of(layer, levels) == block


def test_depth_labels_sort_in_model_order_not_label_order() -> None:
    place = placements({name: i for i, (name, _) in enumerate(LAYERS)}, [], Tiers())
    units = sorted({(p.depth, p.unit) for p in place.values()})
    assert [u for _, u in units] == ["model.embed_tokens", *(f"model.layers.{b}" for b in range(BLOCKS)), "lm_head"]
    assert units[2] == ("02", "model.layers.1") and units[11] == ("11", "model.layers.10")


# --------------------------------------------------------------------------- default tier
@pytest.mark.parametrize(("metric", "fold"), [
    pytest.param("grad_norm", "l2", id="grad-norm-l2"),
    pytest.param("param_norm", "l2", id="param-norm-l2"),
    pytest.param("update_ratio", "ratio-of-norms", id="update-ratio"),
    pytest.param("act_grad_norm", "l2", id="act-grad-norm-l2"),
    pytest.param("dead_ratio", "worst-layer", id="dead-ratio-max"),
    pytest.param("activation_nonfinite", "count", id="nonfinite-sum"),
    pytest.param("activation_mean", "deepest-layer", id="mean-of-the-output"),
])
def test_blocks_reduced_across_ranks_match_a_direct_computation(metric: str, fold: str) -> None:
    samples = _samples(_snapshot())
    got = _by_layer(samples[f"gradwatch_layer_{metric}"])
    expected = _expected(metric)
    assert got == pytest.approx({block: value for block, (value, _) in expected.items()}, rel=1e-12), fold
    ranks = {labels["layer"]: value for labels, value in samples["gradwatch_layer_max_rank"]
             if labels["stat"] == metric}
    if metric in ("grad_norm", "param_norm", "update_ratio"):  # synchronised across data-parallel ranks
        assert ranks == {}
        return
    assert ranks == {block: float(rank) for block, (_, rank) in expected.items()}
    if metric != "activation_nonfinite":  # the counts written here grow with the rank
        assert set(ranks.values()) == {0.0, 1.0}, "each rank holds the maximum of some block"


def test_default_labels_have_no_rank_and_name_the_run() -> None:
    samples = _samples(_snapshot())
    units = BLOCKS + 2
    for name in ("gradwatch_layer_grad_norm", "gradwatch_layer_act_grad_norm"):
        assert len(samples[name]) == units  # one series per block, not per layer and rank
        for labels, _ in samples[name]:
            assert set(labels) == {"run", "run_name", "project", "layer", "depth"}
            assert {k: labels[k] for k in RUN} == RUN
    (loss_like,) = [labels for labels, _ in samples["gradwatch_global_grad_norm"] if labels["rank"] == "1"]
    assert loss_like == {**RUN, "rank": "1"}  # run-level series stay per rank
    assert "gradwatch_param_grad_norm" not in samples


def test_nan_on_one_rank_is_the_reduced_value_and_names_that_rank() -> None:
    layer = "model.layers.3.mlp.act"
    samples = _samples(_snapshot(nan_at=(1, layer)))
    value = _by_layer(samples["gradwatch_layer_act_grad_norm"])["model.layers.3"]
    assert math.isnan(value)
    (rank,) = [v for labels, v in samples["gradwatch_layer_max_rank"]
               if labels["layer"] == "model.layers.3" and labels["stat"] == "act_grad_norm"]
    assert rank == 1.0


def test_rank_max_prefers_nan_then_inf_then_the_lowest_rank_on_ties() -> None:
    assert rank_max({0: 1.0, 1: math.inf, 2: 5.0}) == (math.inf, 1)
    value, rank = rank_max({0: math.inf, 3: math.nan, 2: math.nan})
    assert math.isnan(value) and rank == 2
    assert rank_max({4: 2.0, 1: 2.0, 7: -1.0}) == (2.0, 1)


def test_a_layer_not_measured_at_the_latest_step_is_left_out_of_its_block() -> None:
    run = _snapshot(ranks=(0,))
    stale = "model.layers.0.mlp.down_proj"
    run.values = [LatestValue(v.run_id, v.rank, v.metric, v.scope, v.entity, STEP - 5 if v.entity == stale else v.step,
                              v.value) for v in run.values]
    got = _by_layer(_samples(run)["gradwatch_layer_act_grad_norm"])["model.layers.0"]
    assert got == pytest.approx(math.hypot(_value(0, 1, 40), _value(0, 2, 40)))


# --------------------------------------------------------------------------- opt-in tiers
def test_per_rank_keeps_a_rank_label_and_no_max_rank() -> None:
    samples = _samples(_snapshot(), per_rank=True)
    got = {(labels["layer"], labels["rank"]): v for labels, v in samples["gradwatch_layer_grad_norm"]}
    assert len(got) == 2 * (BLOCKS + 2)
    for rank in (0, 1):
        expected = _expected("grad_norm", ranks=(rank,))
        assert {b: v for (b, r), v in got.items() if r == str(rank)} == pytest.approx(
            {b: v for b, (v, _) in expected.items()}, rel=1e-12)
    assert "gradwatch_layer_max_rank" not in samples


def test_per_layer_exports_every_layer_at_its_own_depth() -> None:
    samples = _samples(_snapshot(), per_layer=True)
    depths = {labels["layer"]: labels["depth"] for labels, _ in samples["gradwatch_layer_act_grad_norm"]}
    assert depths == {name: str(i).zfill(2) for i, (name, _) in enumerate(LAYERS)}
    got = _by_layer(samples["gradwatch_layer_act_grad_norm"])
    assert got["model.layers.4.mlp.act"] == max(_value(0, 14, 40), _value(1, 14, 40))


def test_block_levels_choose_the_grouping() -> None:
    samples = _samples(_snapshot(), block_levels=2)
    assert {labels["layer"]: labels["depth"] for labels, _ in samples["gradwatch_layer_grad_norm"]} == {
        "model.embed_tokens": "0", "model.layers": "1", "lm_head": "2"}


def test_per_param_series_are_reduced_across_ranks_and_labelled_with_their_block() -> None:
    samples = _samples(_snapshot(), per_param=True)
    got = {labels["param"]: (labels["layer"], v) for labels, v in samples["gradwatch_param_grad_norm"]}
    assert got["model.layers.2.attn.q_proj.bias"] == ("model.layers.2", max(_value(0, 7, 1), _value(1, 7, 1)))
    assert all(set(labels) == {"run", "run_name", "project", "layer", "param"}
               for labels, _ in samples["gradwatch_param_norm"])
    per_rank = _samples(_snapshot(), per_param=True, per_rank=True)["gradwatch_param_norm"]
    assert len(per_rank) == 2 * len(samples["gradwatch_param_norm"])


@pytest.mark.parametrize("tiers", [
    pytest.param(Tiers(), id="default"),
    pytest.param(Tiers(per_layer=True, per_param=True, per_rank=True), id="everything"),
])
def test_exported_label_sets(tiers: Tiers) -> None:
    specs = {spec.name: exported(spec, tiers).labels for spec in METRICS}
    rank = ("rank",) if tiers.per_rank else ()
    assert specs["gradwatch_layer_grad_norm"] == ("run", "run_name", "project", "layer", "depth", *rank)
    assert specs["gradwatch_param_norm"] == ("run", "run_name", "project", "layer", "param", *rank)
    assert specs["gradwatch_loss"] == ("run", "run_name", "project", "rank")
    assert specs["gradwatch_run_status"] == ("run", "run_name", "project", "status")
    assert specs["gradwatch_run_info"][:3] == ("run", "name", "project")
    assert specs["gradwatch_exporter_runs"] == ()


def test_every_layer_metric_says_how_a_block_folds_it() -> None:
    """A layer-scope metric added to the catalog needs a fold in tiers.FOLDS (and, if it differs
    between data-parallel ranks, a place in tiers.ATTRIBUTED): else blocks could not export it."""
    from gradwatch.service.catalog import LAYER_GAUGES
    from gradwatch.service.exporter import LAYER_SCOPE
    from gradwatch.service.tiers import ATTRIBUTED, FOLDS

    assert set(LAYER_SCOPE) == set(FOLDS), "add the new metric to tiers.FOLDS"
    assert ATTRIBUTED <= set(LAYER_GAUGES)
