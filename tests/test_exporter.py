"""The collector, fed from store-shaped snapshots: values, layer aggregates, grace, promtool.

The label tiers (blocks, ranks, per-layer and per-param series) have their own tests in
tests/test_exporter_tiers.py; here every layer is its own block (a Sequential-like model).
"""

from __future__ import annotations

import math
import re
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

from tests.fixtures.prometheus import require_binary
from gradwatch.service.catalog import METRICS
from gradwatch.service.exporter import GradwatchCollector, RunLatest, visible
from gradwatch.service.tiers import TIER_METRICS, Tiers, exported
from gradwatch.service.tiers import update_ratio as layer_update_ratio
from gradwatch.store.models import LatestValue

DOCS = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


def _run(run_id: str = "r1", status: str = "running", ended_at: float | None = None,
         rank: int = 0) -> RunLatest:
    """A two-layer run (fc: weight+bias, act: tanh) with every kind of series."""
    def v(metric: str, scope: str, entity: str, step: int, value: float) -> LatestValue:
        return LatestValue(run_id, rank, metric, scope, entity, step, value)

    values = [
        v("grad_norm_total", "run", "", 7, 5.0),
        v("grad_norm_total_clipped", "run", "", 7, 1.0),
        v("clip_coef", "run", "", 7, 0.2),
        v("clip_threshold", "run", "", 7, 1.0),
        v("skipped", "run", "", 7, 0.0),
        v("nonfinite_params", "run", "", 7, 0.0),
        v("loss", "run", "", 7, 0.75),
        v("accuracy", "run", "", 6, 0.5),
        v("lr", "group", "0", 7, 0.01),
        v("lr", "group", "1", 7, 0.001),
        v("grad_norm", "param", "fc.weight", 7, 3.0),
        v("grad_norm", "param", "fc.bias", 7, 4.0),
        v("grad_norm", "layer", "fc", 7, 5.0),  # the store's L2 of its params' grad_norm
        v("param_norm", "param", "fc.weight", 5, 6.0),
        v("param_norm", "param", "fc.bias", 5, 8.0),
        v("update_ratio", "param", "fc.weight", 5, 0.01),
        v("update_ratio", "param", "fc.bias", 5, 0.02),
        v("act_grad_norm", "layer", "act", 5, 0.3),
        v("saturation_ratio", "layer", "act", 5, 0.125),
    ]
    return RunLatest(
        id=run_id, name="exp", project="proj", status=status, started_at=1000.0, ended_at=ended_at,
        host="node1", world_size=1, device="cpu", torch_version="2.13", gradwatch_version="0.1.0",
        param_layers={"fc.weight": "fc", "fc.bias": "fc"}, layer_depths={"fc": 0, "act": 1}, values=values,
        counts={(rank, "clipped_steps"): 4.0, (rank, "skipped_steps"): 1.0, (rank, "nonfinite_steps"): 0.0})


def _registry(runs: list[RunLatest], **kwargs: object) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(GradwatchCollector(lambda: runs, **kwargs))  # type: ignore[arg-type]
    return registry


RUN = {"run": "r1", "run_name": "exp", "project": "proj"}


def test_run_level_values_and_counters() -> None:
    reg = _registry([_run()])
    labels = {**RUN, "rank": "0"}
    assert reg.get_sample_value("gradwatch_global_grad_norm", labels) == 5.0
    assert reg.get_sample_value("gradwatch_global_grad_norm_clipped", labels) == 1.0
    assert reg.get_sample_value("gradwatch_clip_coefficient_ratio", labels) == 0.2
    assert reg.get_sample_value("gradwatch_loss", labels) == 0.75
    assert reg.get_sample_value("gradwatch_step", labels) == 7.0
    assert reg.get_sample_value("gradwatch_scalar", {**labels, "scalar": "accuracy"}) == 0.5
    assert reg.get_sample_value("gradwatch_learning_rate", {**labels, "group": "1"}) == 0.001
    assert reg.get_sample_value("gradwatch_clipped_steps_total", labels) == 4.0
    assert reg.get_sample_value("gradwatch_skipped_steps_total", labels) == 1.0
    assert reg.get_sample_value("gradwatch_scalar", {**labels, "scalar": "skipped"}) is None
    assert reg.get_sample_value("gradwatch_run_status", {**RUN, "status": "running"}) == 1.0
    assert reg.get_sample_value("gradwatch_run_status", {**RUN, "status": "finished"}) == 0.0
    assert reg.get_sample_value("gradwatch_run_start_time_seconds", RUN) == 1000.0
    info = {"run": "r1", "name": "exp", "project": "proj", "host": "node1", "world_size": "1",
            "device": "cpu", "torch_version": "2.13", "gradwatch_version": "0.1.0"}
    assert reg.get_sample_value("gradwatch_run_info", info) == 1.0
    assert reg.get_sample_value("gradwatch_exporter_store_up") == 1.0


def test_layer_aggregates_match_a_direct_computation() -> None:
    reg = _registry([_run()])
    fc = {**RUN, "layer": "fc", "depth": "0"}
    assert reg.get_sample_value("gradwatch_layer_grad_norm", fc) == pytest.approx(5.0)
    assert reg.get_sample_value("gradwatch_layer_param_norm", fc) == pytest.approx(10.0)
    # ||Δθ|| = sqrt((0.01*6)² + (0.02*8)²), ||θ|| = 10
    expected = math.hypot(0.06, 0.16) / 10.0
    assert reg.get_sample_value("gradwatch_layer_update_ratio", fc) == pytest.approx(expected)
    act = {**RUN, "layer": "act", "depth": "1"}
    assert reg.get_sample_value("gradwatch_layer_saturation_ratio", act) == 0.125
    assert reg.get_sample_value("gradwatch_layer_act_grad_norm", act) == pytest.approx(0.3)
    assert reg.get_sample_value("gradwatch_layer_max_rank", {**act, "stat": "saturation_ratio"}) == 0.0
    assert reg.get_sample_value("gradwatch_param_grad_norm", {**RUN, "layer": "fc", "param": "fc.weight"}) is None


def test_per_param_series_when_enabled() -> None:
    reg = _registry([_run()], per_param=True)
    labels = {**RUN, "layer": "fc", "param": "fc.bias"}
    assert reg.get_sample_value("gradwatch_param_grad_norm", labels) == 4.0
    assert reg.get_sample_value("gradwatch_param_update_ratio", labels) == 0.02


@pytest.mark.parametrize(("status", "ended_at", "now", "shown"), [
    pytest.param("running", None, 10_000.0, True, id="running-always"),
    pytest.param("finished", 1000.0, 1000.0 + 299, True, id="finished-within-grace"),
    pytest.param("finished", 1000.0, 1000.0 + 301, False, id="finished-after-grace"),
    pytest.param("crashed", 1000.0, 1000.0 + 301, False, id="crashed-after-grace"),
])
def test_grace_period(status: str, ended_at: float | None, now: float, shown: bool) -> None:
    run = _run(status=status, ended_at=ended_at)
    assert visible(run.status, run.ended_at, now, grace=300.0) is shown
    reg = _registry([run], grace=300.0, clock=lambda: now)
    value = reg.get_sample_value("gradwatch_global_grad_norm", {**RUN, "rank": "0"})
    assert (value is not None) is shown
    assert reg.get_sample_value("gradwatch_exporter_runs") == (1.0 if shown else 0.0)


def test_finished_run_reports_end_time() -> None:
    reg = _registry([_run(status="finished", ended_at=1234.5)], clock=lambda: 1300.0)
    assert reg.get_sample_value("gradwatch_run_end_time_seconds", RUN) == 1234.5
    assert reg.get_sample_value("gradwatch_run_status", {**RUN, "status": "finished"}) == 1.0


def test_failing_store_reports_down_instead_of_failing_the_scrape() -> None:
    class Broken(Exception):
        pass

    def source() -> list[RunLatest]:
        raise Broken("database is locked")

    registry = CollectorRegistry()
    registry.register(GradwatchCollector(source, errors=(Broken,)))
    assert registry.get_sample_value("gradwatch_exporter_store_up") == 0.0
    assert registry.get_sample_value("gradwatch_exporter_runs") is None


def test_layer_update_ratio_uses_params_measured_at_the_same_step() -> None:
    run = _run()
    run.values.append(LatestValue("r1", 0, "update_ratio", "param", "fc.weight", 9, 0.5))
    run.values.append(LatestValue("r1", 0, "param_norm", "param", "fc.weight", 9, 2.0))
    reg = _registry([run])
    fc = {**RUN, "layer": "fc", "depth": "0"}
    # step 9 holds only fc.weight: the layer's values are fc.weight's alone
    assert reg.get_sample_value("gradwatch_layer_update_ratio", fc) == pytest.approx(0.5)
    assert reg.get_sample_value("gradwatch_layer_param_norm", fc) == pytest.approx(2.0)


def test_layer_update_ratio_without_norms() -> None:
    assert layer_update_ratio([], []) is None
    assert layer_update_ratio([0.1], [0.0]) is None
    assert layer_update_ratio([0.5], [2.0]) == pytest.approx(0.5)
    assert math.isnan(layer_update_ratio([0.1, 0.2], [math.nan, 2.0]))  # a NaN norm is a value, not a gap


def _nonfinite_run() -> RunLatest:
    """`_run()` at a step where the loss is NaN, the total norm overflowed and a layer output NaN/Inf."""
    run = _run()
    changed = {("loss", ""): math.nan, ("grad_norm_total", ""): math.inf, ("grad_norm", "fc.weight"): math.inf,
               ("grad_norm", "fc"): math.inf, ("param_norm", "fc.bias"): math.nan, ("clip_coef", ""): -math.inf}
    run.values = [LatestValue(v.run_id, v.rank, v.metric, v.scope, v.entity, v.step,
                              changed.get((v.metric, v.entity), v.value)) for v in run.values]
    run.values += [LatestValue("r1", 0, "overflow_params", "run", "", 7, 1.0),
                   LatestValue("r1", 0, "act_nonfinite", "layer", "act", 5, 16.0)]
    run.counts.update({(0, "overflow_steps"): 1.0, (0, "nonfinite_loss_steps"): 17.0})
    return run


def test_nonfinite_values_are_exported_as_nan_and_inf() -> None:
    reg = _registry([_nonfinite_run()], per_param=True)
    labels = {**RUN, "rank": "0"}
    assert math.isnan(reg.get_sample_value("gradwatch_loss", labels))  # not the last finite loss
    assert reg.get_sample_value("gradwatch_global_grad_norm", labels) == math.inf
    assert reg.get_sample_value("gradwatch_clip_coefficient_ratio", labels) == -math.inf
    assert reg.get_sample_value("gradwatch_overflow_params", labels) == 1.0
    assert reg.get_sample_value("gradwatch_overflow_steps_total", labels) == 1.0
    assert reg.get_sample_value("gradwatch_nonfinite_loss_steps_total", labels) == 17.0
    assert reg.get_sample_value("gradwatch_scalar", {**labels, "scalar": "overflow_params"}) is None
    fc, act = {**RUN, "layer": "fc", "depth": "0"}, {**RUN, "layer": "act", "depth": "1"}
    assert reg.get_sample_value("gradwatch_layer_grad_norm", fc) == math.inf
    assert reg.get_sample_value("gradwatch_param_grad_norm", {**RUN, "layer": "fc", "param": "fc.weight"}) == math.inf
    assert math.isnan(reg.get_sample_value("gradwatch_layer_param_norm", fc))
    assert math.isnan(reg.get_sample_value("gradwatch_layer_update_ratio", fc))
    assert reg.get_sample_value("gradwatch_layer_activation_nonfinite", act) == 16.0
    text = generate_latest(reg).decode()
    ident = 'project="proj",rank="0",run="r1",run_name="exp"'
    assert f'gradwatch_loss{{{ident}}} NaN' in text.splitlines()
    assert f'gradwatch_global_grad_norm{{{ident}}} +Inf' in text.splitlines()
    assert f'gradwatch_clip_coefficient_ratio{{{ident}}} -Inf' in text.splitlines()


def test_nonfinite_exposition_passes_promtool_and_openmetrics() -> None:
    promtool = require_binary("promtool")
    reg = _registry([_nonfinite_run()], per_param=True)
    proc = subprocess.run([promtool, "check", "metrics"], input=generate_latest(reg), capture_output=True)
    assert proc.returncode == 0 and proc.stdout.strip() == b"" and proc.stderr.strip() == b"", proc
    families = {f.name: f for f in parse_openmetrics(openmetrics_latest(reg).decode())}
    (loss,) = families["gradwatch_loss"].samples
    assert math.isnan(loss.value)


@pytest.mark.parametrize("tiers", [
    pytest.param({}, id="default"),
    pytest.param({"per_param": True}, id="per-param"),
    pytest.param({"per_param": True, "per_layer": True, "per_rank": True}, id="everything"),
])
def test_exposition_passes_promtool(tiers: dict[str, bool]) -> None:
    promtool = require_binary("promtool")
    runs = [_run("r1"), _run("r2", status="finished", ended_at=1000.0), _run("r3", rank=1)]
    text = generate_latest(_registry(runs, clock=lambda: 1001.0, **tiers))
    assert b"gradwatch_layer_update_ratio" in text and (b"gradwatch_param_norm" in text) == bool(tiers)
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()
    assert proc.stdout.strip() == b"" and proc.stderr.strip() == b""


def test_exposition_is_valid_openmetrics() -> None:
    runs = [_run("r1"), _run("r2", status="finished", ended_at=1000.0)]
    text = openmetrics_latest(_registry(runs, per_param=True, clock=lambda: 1001.0)).decode()
    families = {f.name: f for f in parse_openmetrics(text)}  # the strict parser raises on bad output
    assert families["gradwatch_run"].type == "info"
    assert families["gradwatch_clipped_steps"].type == "counter"
    info = [s for s in families["gradwatch_run"].samples if s.labels["run"] == "r2"]
    assert len(info) == 1 and info[0].name == "gradwatch_run_info" and info[0].labels["host"] == "node1"


def test_every_metric_is_documented() -> None:
    doc = DOCS.read_text()
    documented = set(re.findall(r"^\| `(gradwatch_[a-z_]+)` \|", doc, flags=re.MULTILINE))
    specs = (*METRICS, *TIER_METRICS)
    assert {spec.name for spec in specs} == documented, "docs/metrics.md and the exporter disagree"
    everything = Tiers(per_layer=True, per_param=True, per_rank=True)
    for spec in specs:
        row = next(line for line in doc.splitlines() if line.startswith(f"| `{spec.name}` |"))
        assert spec.type in row, f"{spec.name}: type {spec.type} not in its docs row"
        for label in exported(spec, Tiers()).labels + exported(spec, everything).labels:
            assert f"`{label}`" in row, f"{spec.name}: label {label} not in its docs row"


def test_optimizer_health_and_spike_metrics_have_their_own_names() -> None:
    """Issue 16's run metrics are named series, not user scalars; its layer metrics are served
    per layer (a block: its largest), its per-param Adam statistics with per-param export."""
    run = _run()
    rows = [("loss_z", "run", "", 1.5), ("grad_norm_z", "run", "", math.inf), ("spike_count", "run", "", 3.0),
            ("skip_rate", "run", "", 0.125), ("layer_adam_update_rms", "layer", "fc", 0.9),
            ("layer_adam_eps_frac", "layer", "fc", 0.25), ("layer_adam_v_lag", "layer", "fc", math.nan),
            ("update_to_weight", "layer", "fc", 1e-3), ("update_to_weight_equilibrium", "layer", "fc", 2e-3),
            ("grad_to_weight", "layer", "fc", 0.1), ("grad_to_weight_equilibrium", "layer", "fc", 0.2),
            ("adam_update_rms", "param", "fc.weight", 0.8), ("adam_eps_frac", "param", "fc.weight", 0.5),
            ("adam_v_lag", "param", "fc.weight", 4.0)]
    run.values += [LatestValue("r1", 0, metric, scope, entity, 7, value) for metric, scope, entity, value in rows]
    reg = _registry([run], per_param=True)
    labels, fc = {**RUN, "rank": "0"}, {**RUN, "layer": "fc", "depth": "0"}
    assert reg.get_sample_value("gradwatch_loss_zscore", labels) == 1.5
    assert reg.get_sample_value("gradwatch_global_grad_norm_zscore", labels) == math.inf
    assert reg.get_sample_value("gradwatch_spike_steps_total", labels) == 3.0
    assert reg.get_sample_value("gradwatch_skipped_steps_ratio", labels) == 0.125
    for scalar in ("loss_z", "grad_norm_z", "spike_count", "skip_rate"):
        assert reg.get_sample_value("gradwatch_scalar", {**labels, "scalar": scalar}) is None
    assert reg.get_sample_value("gradwatch_layer_adam_update_rms", fc) == 0.9
    assert reg.get_sample_value("gradwatch_layer_adam_epsilon_ratio", fc) == 0.25
    assert math.isnan(reg.get_sample_value("gradwatch_layer_adam_second_moment_lag", fc))
    assert reg.get_sample_value("gradwatch_layer_update_to_weight", fc) == 1e-3
    assert reg.get_sample_value("gradwatch_layer_update_to_weight_equilibrium", fc) == 2e-3
    assert reg.get_sample_value("gradwatch_layer_grad_to_weight", fc) == 0.1
    assert reg.get_sample_value("gradwatch_layer_grad_to_weight_equilibrium", fc) == 0.2
    weight = {**RUN, "layer": "fc", "param": "fc.weight"}
    assert reg.get_sample_value("gradwatch_param_adam_update_rms", weight) == 0.8
    assert reg.get_sample_value("gradwatch_param_adam_epsilon_ratio", weight) == 0.5
    assert reg.get_sample_value("gradwatch_param_adam_second_moment_lag", weight) == 4.0
    assert reg.get_sample_value("gradwatch_layer_max_rank", {**fc, "stat": "adam_update_rms"}) is None


def test_transformer_health_metrics_are_served_per_block_with_their_folds() -> None:
    """Issue 15's layer metrics are named series; a block folds them as docs/metrics.md says
    (attention: largest max logit, smallest entropy; the residual block's own RMS; the largest
    max |x| and max/RMS), and each names the rank with the largest value."""
    layers = ["h.0", "h.0.attn", "h.0.mlp.act", "h.0.attn2", "lm_head"]
    rows = [("attn_logit_max", "h.0.attn", 3.0, 3.0), ("attn_logit_max", "h.0.attn2", 7.0, 2.0),
            ("attn_entropy", "h.0.attn", 1.2, 1.5), ("attn_entropy", "h.0.attn2", 0.4, math.nan),
            ("act_rms", "h.0", 2.0, 2.5), ("act_absmax", "h.0", 11.0, 10.0),
            ("act_outlier", "h.0.mlp.act", 5.0, 4.0), ("act_outlier", "h.0", 9.0, 8.0),
            ("logit_max", "lm_head", 15.0, 16.0), ("logit_logz", "lm_head", 0.5, -0.25)]
    values = [LatestValue("r1", rank, metric, "layer", layer, 7, by_rank[rank])
              for metric, layer, *by_rank in rows for rank in (0, 1)]
    run = RunLatest(id="r1", name="exp", project="proj", status="running",
                    layer_depths={name: i for i, name in enumerate(layers)}, values=values)
    reg = _registry([run])
    block, head = {**RUN, "layer": "h.0", "depth": "0"}, {**RUN, "layer": "lm_head", "depth": "1"}
    assert reg.get_sample_value("gradwatch_layer_attention_logit_max", block) == 7.0
    assert math.isnan(reg.get_sample_value("gradwatch_layer_attention_entropy", block))  # rank 1's NaN
    assert reg.get_sample_value("gradwatch_layer_activation_rms", block) == 2.5
    assert reg.get_sample_value("gradwatch_layer_activation_absmax", block) == 11.0
    assert reg.get_sample_value("gradwatch_layer_activation_outlier", block) == 9.0
    assert reg.get_sample_value("gradwatch_layer_logit_max", head) == 16.0
    assert reg.get_sample_value("gradwatch_layer_logit_log_partition", head) == 0.5
    max_rank = {("h.0", "attention_logit_max"): 0.0, ("h.0", "attention_entropy"): 1.0,
                ("h.0", "activation_rms"): 1.0, ("h.0", "activation_absmax"): 0.0,
                ("h.0", "activation_outlier"): 0.0, ("lm_head", "logit_max"): 1.0,
                ("lm_head", "logit_log_partition"): 0.0}
    for (layer, stat), rank in max_rank.items():
        labels = block if layer == "h.0" else head
        assert reg.get_sample_value("gradwatch_layer_max_rank", {**labels, "stat": stat}) == rank, stat
    per_rank = _registry([run], per_rank=True)
    assert per_rank.get_sample_value("gradwatch_layer_attention_entropy", {**block, "rank": "0"}) == 0.4


def test_smallest_counts_nan_as_smallest() -> None:
    from gradwatch.service.tiers import smallest

    assert smallest([1.0, -math.inf, 0.5]) == -math.inf
    assert math.isnan(smallest([1.0, math.nan, -math.inf]))
