"""gradwatch / Overview: every run, its global gradient norm, clipping, loss and learning rate.

Run-level series are per rank (`gradwatch_global_grad_norm{run, run_name, project, rank}`), so
each legend names the run by its name and the rank. Clicking a run (table or norm panel)
opens its layers.
"""

from __future__ import annotations

from gradwatch.dashboards.builder import Dashboard, Link, Query, QueryVariable, Row, Stat, Table, TimeSeries
from gradwatch.dashboards.variables import DATASOURCE_VARIABLE, PROJECT, runs

__all__ = ["overview"]

SEL = 'run=~"$run", rank=~"$rank"'
RANK = QueryVariable("rank", "Rank", 'label_values(gradwatch_step{run=~"$run"}, rank)', multi=True,
                     include_all=True, all_value=".*", sort=3)
LAYERS_URL = "/d/gradwatch-layers/gradwatch-layers?var-datasource=${datasource}&var-run={run}&${__url_time_range}"


def _per_step(counter: str) -> str:
    """Fraction of the steps recorded in each interval that `counter` counted."""
    return (f"increase({counter}{{{SEL}}}[$__rate_interval])\n"
            f"  / (delta(gradwatch_step{{{SEL}}}[$__rate_interval]) > 0)")


def _runs_row() -> Row:
    table = Table(
        "Runs",
        "Every run gradwatch serve exports (running, or ended less than its grace period ago): its name and "
        "project, status, last step, start time and metadata from gradwatch_run_info. Click a name to open its "
        "layers.",
        (Query("group by (run, name, project, host, world_size, device, torch_version, gradwatch_version) "
               '(gradwatch_run_info{run=~"$run"})', table=True),
         Query('max by (run, status) (gradwatch_run_status{run=~"$run"} == 1)', table=True),
         Query('max by (run) (gradwatch_step{run=~"$run"})', table=True),
         Query('max by (run) (gradwatch_run_start_time_seconds{run=~"$run"}) * 1000', table=True)),
        transformations=(
            {"id": "merge", "options": {}},
            {"id": "organize", "options": {
                "excludeByName": {"Time": True, "Value #A": True, "Value #B": True},
                "indexByName": {"name": 0, "project": 1, "status": 2, "Value #C": 3, "Value #D": 4, "run": 5,
                                "host": 6, "world_size": 7, "device": 8, "torch_version": 9, "gradwatch_version": 10},
                "renameByName": {"Value #C": "last step", "Value #D": "started"}}},
        ),
        overrides=(
            {"matcher": {"id": "byName", "options": "started"},
             "properties": [{"id": "unit", "value": "dateTimeAsIso"}]},
            {"matcher": {"id": "byName", "options": "name"}, "properties": [{"id": "links", "value": [
                Link("Layers of ${__value.raw}", LAYERS_URL.replace("{run}", "${__data.fields.run}")).to_json()]}]},
        ),
        width=18, height=7)
    exporter = Stat(
        "Exporter",
        "Runs exported by the scraped gradwatch serve instances, and whether each could read its store "
        "(gradwatch_exporter_store_up).",
        (Query("sum(gradwatch_exporter_runs)", "runs exported"),
         Query("min(gradwatch_exporter_store_up)", "store readable")),
        overrides=({"matcher": {"id": "byFrameRefID", "options": "B"}, "properties": [{"id": "mappings", "value": [
            {"type": "value",
             "options": {"0": {"text": "no", "color": "red"}, "1": {"text": "yes", "color": "green"}}}]}]},),
        width=6, height=7)
    return Row("Runs", (table, exporter))


def _norm_row() -> Row:
    legend = "{{run_name}} rank {{rank}}"
    return Row("Gradient norm and clipping", (
        TimeSeries(
            "Global gradient norm before / after clipping",
            "L2 norm over all gradients at each step before clipping (unscaled under AMP), after clipping, and the "
            "clipping threshold (fixed or adaptive). Log scale. Click a series to open the run's layers.",
            (Query(f"gradwatch_global_grad_norm{{{SEL}}}", f"{legend} before"),
             Query(f"gradwatch_global_grad_norm_clipped{{{SEL}}}", f"{legend} after"),
             Query(f"gradwatch_clip_threshold{{{SEL}}}", f"{legend} threshold")),
            log=True, thresholds=((1000, "red"),), dashed=("C",),
            links=(Link("Layers of ${__field.labels.run_name}",
                        LAYERS_URL.replace("{run}", "${__field.labels.run}")),)),
        TimeSeries(
            "Clip coefficient",
            "Factor clipping applied to the gradients at the last step: 1 = not clipped, 0.1 = scaled down 10 times.",
            (Query(f"gradwatch_clip_coefficient_ratio{{{SEL}}}", legend),), unit="percentunit", min=0, max=1),
        TimeSeries(
            "Clipped, skipped and non-finite steps",
            "Fraction of the optimizer steps recorded in each interval that were clipped (clip coefficient < 1), "
            "skipped (guard skip, AMP scaler), had NaN/Inf gradient elements, a gradient norm that overflowed "
            "float32, or a NaN/Inf loss.",
            (Query(_per_step("gradwatch_clipped_steps_total"), f"{legend} clipped"),
             Query(_per_step("gradwatch_skipped_steps_total"), f"{legend} skipped"),
             Query(_per_step("gradwatch_nonfinite_steps_total"), f"{legend} non-finite"),
             Query(_per_step("gradwatch_overflow_steps_total"), f"{legend} overflowed"),
             Query(_per_step("gradwatch_nonfinite_loss_steps_total"), f"{legend} non-finite loss")),
            unit="percentunit", min=0, thresholds=((0.5, "orange"), (0.9, "red")), height=8),
        TimeSeries(
            "Non-finite and overflowed params",
            "Parameters whose gradient held NaN/Inf elements at the last step, and those whose gradient norm "
            "overflowed float32 while every element was finite.",
            (Query(f"gradwatch_nonfinite_params{{{SEL}}}", f"{legend} NaN/Inf elements"),
             Query(f"gradwatch_overflow_params{{{SEL}}}", f"{legend} overflowed norm")),
            min=0, thresholds=((1, "red"),), height=8),
    ))


def _training_row() -> Row:
    legend = "{{run_name}} rank {{rank}}"
    return Row("Training", (
        TimeSeries("Loss", "Last loss given to watcher.log().", (Query(f"gradwatch_loss{{{SEL}}}", legend),)),
        TimeSeries("Learning rate", "Learning rate of each optimizer param group at the last step.",
                   (Query(f"gradwatch_learning_rate{{{SEL}}}", f"{legend} group {{{{group}}}}"),), log=True),
        TimeSeries("Optimizer steps per second", "How fast each run records optimizer steps (0: the run stalls or "
                   "has ended).", (Query(f"deriv(gradwatch_step{{{SEL}}}[$__rate_interval])", legend),), min=0,
                   height=8),
        TimeSeries("Other scalars", "Every other scalar given to watcher.log(name=value).",
                   (Query(f"gradwatch_scalar{{{SEL}}}", f"{legend} {{{{scalar}}}}"),), height=8),
        TimeSeries("Spike z-scores",
                   "Robust z-scores of the loss and of the global gradient norm against the spike guard's window of "
                   "recent steps; above the guard's threshold (red: the default, 6) a step is a spike. The run's "
                   "layers show its Adam state and update-to-weight ratios beside them.",
                   (Query(f"gradwatch_loss_zscore{{{SEL}}}", f"{legend} loss"),
                    Query(f"gradwatch_global_grad_norm_zscore{{{SEL}}}", f"{legend} grad norm")),
                   thresholds=((6, "red"),), height=8),
        TimeSeries("Skip rate",
                   "Fraction of the spike guard's window of optimizer steps whose update a guard (spike or "
                   "non-finite) skipped. Above 5% for 5 minutes fires GradwatchSpikeSkipRate.",
                   (Query(f"gradwatch_skipped_steps_ratio{{{SEL}}}", legend),), unit="percentunit", min=0,
                   thresholds=((0.05, "red"),), height=8),
    ))


def overview() -> Dashboard:
    """The overview dashboard."""
    return Dashboard(
        uid="gradwatch-overview", title="gradwatch / Overview",
        description="Runs watched by gradwatch: gradient norm before and after clipping, clipping, loss, learning "
                    "rate, skipped and non-finite steps, loss and gradient spikes.",
        variables=(DATASOURCE_VARIABLE, PROJECT, runs(multi=True), RANK),
        rows=(_runs_row(), _norm_row(), _training_row()))
