"""gradwatch / Layers: one run block by block (or layer by layer), in depth order.

Layer series carry `layer` (a block by default, a layer with `per_layer`) and `depth`, its
position in model order zero-padded to one width. Every query keeps exactly those two labels
(`max by (depth, layer)`: the largest over ranks and over the hosts whose services export the
run, as the exporter reduces ranks), so Prometheus returns the rows sorted by depth and every
legend starts with it: heatmap rows and legends go 00, 01, ..., 10, 11 as the model does,
never by name. `$rank` narrows to one rank when the service exports per-rank series
(`per_rank`); by default layer series have no rank and "All" keeps them.
"""

from __future__ import annotations

from gradwatch.dashboards.builder import Dashboard, Heatmap, Query, QueryVariable, Row, Table, TimeSeries
from gradwatch.dashboards.variables import DATASOURCE_VARIABLE, PROJECT, runs

__all__ = ["layers"]

RANK = QueryVariable("rank", "Rank", 'label_values(gradwatch_layer_grad_norm{run="$run"}, rank)', multi=True,
                     include_all=True, all_value=".*", sort=3)
LAYER = QueryVariable("layer", "Layer", 'label_values(gradwatch_layer_grad_norm{run="$run"}, layer)', multi=True,
                      include_all=True, all_value=".*", sort=7)
LEGEND = "{{depth}} {{layer}}"


def _layer(metric: str, filtered: bool = True) -> str:
    """The metric's series of the run, one per block or layer, in depth order."""
    layer = ', layer=~"$layer"' if filtered else ""
    return f'max by (depth, layer) ({metric}{{run="$run", rank=~"$rank"{layer}}})'


def _param(metric: str) -> str:
    return f'max by (param) ({metric}{{run="$run", rank=~"$rank", layer=~"$layer"}})'


def _flow_row() -> Row:
    return Row("Gradient flow through depth: ${run:text}", (
        Heatmap("Gradient flow: log10 ‖∂loss/∂output‖ by depth",
                "L2 norm of the gradient of the loss with respect to each block's (or layer's) outputs, on a log10 "
                "scale, one row per block, the first at the bottom. Rows that fade towards the first blocks: "
                "vanishing gradients; rows that glow: exploding.",
                (Query(f"log10({_layer('gradwatch_layer_act_grad_norm', filtered=False)})", LEGEND),)),
        Heatmap("Parameter gradients: log10 ‖∇θ‖ by depth",
                "L2 norm of each block's (or layer's) parameter gradients at the last step, before clipping, on a "
                "log10 scale, one row per block, the first at the bottom.",
                (Query(f"log10({_layer('gradwatch_layer_grad_norm', filtered=False)})", LEGEND),)),
        TimeSeries("Gradient flow relative to the largest block",
                   "Each block's ‖∂loss/∂output‖ divided by the largest block's at the same time. Below 1e-4 for "
                   "10 minutes fires GradwatchGradientFlowVanishing.",
                   (Query(f"{_layer('gradwatch_layer_act_grad_norm', filtered=False)}\n  / on() group_left()\n"
                          f"    max({_layer('gradwatch_layer_act_grad_norm', filtered=False)})", LEGEND),),
                   log=True),
        TimeSeries("Gradient norm", "L2 norm of the block's parameter gradients at the last step, before clipping.",
                   (Query(_layer("gradwatch_layer_grad_norm"), LEGEND),), log=True),
    ))


def _updates_row() -> Row:
    return Row("Updates: ${run:text}", (
        TimeSeries("Update ratio ‖Δθ‖/‖θ‖",
                   "Relative size of the last measured update of each block's parameters. Around 1e-3 is usual; "
                   "far below: the block barely trains, far above: unstable.",
                   (Query(_layer("gradwatch_layer_update_ratio"), LEGEND),), log=True),
        TimeSeries("Parameter norm", "L2 norm of each block's parameters.",
                   (Query(_layer("gradwatch_layer_param_norm"), LEGEND),)),
    ))


def _activations_row() -> Row:
    def ratio(title: str, metric: str, description: str, alert: bool) -> TimeSeries:
        return TimeSeries(title, description, (Query(_layer(metric), LEGEND),), unit="percentunit", min=0, max=1,
                          thresholds=((0.5, "red"),) if alert else (), width=8)

    return Row("Activations: ${run:text}", (
        ratio("Saturation ratio", "gradwatch_layer_saturation_ratio",
              "Fraction of a bounded activation's (sigmoid, tanh) outputs within ε of its asymptotes; a block shows "
              "its most saturated layer. Above 0.5 for 10 minutes fires GradwatchActivationSaturation.", True),
        ratio("Dead units ratio", "gradwatch_layer_dead_ratio",
              "Fraction of a ReLU-family layer's units that output zero for every sample of the batch; a block "
              "shows its worst layer. Above 0.5 for 10 minutes fires GradwatchDyingReLU.", True),
        ratio("Zero outputs ratio", "gradwatch_layer_zero_ratio",
              "Fraction of a ReLU-family layer's outputs equal to zero; a block shows its largest.", False),
        TimeSeries("Activation mean", "Mean of each block's output (its deepest measured layer's).",
                   (Query(_layer("gradwatch_layer_activation_mean"), LEGEND),), width=8, height=8),
        TimeSeries("Activation standard deviation",
                   "Standard deviation of each block's output (its deepest measured layer's).",
                   (Query(_layer("gradwatch_layer_activation_std"), LEGEND),), width=8, height=8),
        TimeSeries("Non-finite activation outputs",
                   "NaN/Inf outputs of the block's activation layers at their last measured step (they never count "
                   "as dead or zero). Above 0 fires GradwatchActivationsNotFinite.",
                   (Query(_layer("gradwatch_layer_activation_nonfinite"), LEGEND),), min=0,
                   thresholds=((1, "red"),), width=8, height=8),
    ))


#: reference values of the forward-pass diagnoses (gradwatch/diagnose/transformer.py): a max attention
#: logit of ATTN_LOGIT_LIMIT, a max/RMS of MASSIVE_RATIO (massive activations) and OUTLIER_LIMIT
ATTN_LOGIT_LIMIT = 100.0
MASSIVE_RATIO = 100.0
OUTLIER_LIMIT = 10.0


def _transformer_row() -> Row:
    return Row("Transformer health: ${run:text}", (
        TimeSeries("Attention max logit",
                   "Max attention logit q·k/√d (plus an additive mask) of each block's attention layers (its "
                   "largest), over a fixed sample of query rows and heads: a lower bound of the layer's. Logits "
                   f"that grow by 10× or more, past {ATTN_LOGIT_LIMIT:g} (red), collapse attention and precede a "
                   "loss divergence (no QK normalisation, a learning rate too high for the width): QK-layernorm, a "
                   "lower learning rate or a longer warmup help. Absent for blocks without attention.",
                   (Query(_layer("gradwatch_layer_attention_logit_max"), LEGEND),), log=True,
                   thresholds=((ATTN_LOGIT_LIMIT, "red"),)),
        TimeSeries("Attention entropy",
                   "Mean entropy of the attention rows of each block's attention layers (its smallest), in nats: "
                   "log n when a query attends uniformly to n keys, 0 when one key takes it all. A fall to a "
                   "fraction of its early value is an entropy collapse, which follows the max logit's growth.",
                   (Query(_layer("gradwatch_layer_attention_entropy"), LEGEND),), min=0),
        TimeSeries("Output log Z",
                   "Mean log-partition log Z (logsumexp over the vocabulary) of the output layer's logits: what "
                   "z-loss keeps near 0 (green line). A log Z drifting far from 0 (the diagnosis: |log Z| above "
                   "20) is output-logit divergence: z-loss (coefficient 1e-4), weight decay on the head or a "
                   "lower learning rate help.",
                   (Query(_layer("gradwatch_layer_logit_log_partition"), LEGEND),), thresholds=((0, "green"),),
                   threshold_lines=True),
        TimeSeries("Output max logit", "Max logit of the output layer.",
                   (Query(_layer("gradwatch_layer_logit_max"), LEGEND),)),
        TimeSeries("Residual stream RMS",
                   "RMS of each residual block's output: the residual stream at that depth. Additive growth "
                   "through depth is healthy; the last block's RMS many times the first's, growing with every "
                   "block, is a residual stream that explodes.",
                   (Query(_layer("gradwatch_layer_activation_rms"), LEGEND),), log=True, width=8),
        TimeSeries("Residual stream max |x|",
                   "Max |x| of each residual block's output (a block's largest).",
                   (Query(_layer("gradwatch_layer_activation_absmax"), LEGEND),), log=True, width=8),
        TimeSeries("Outliers max |x| / RMS",
                   "Max |x| over RMS of each measured layer's output (a block's largest layer): about 4 to 6 for "
                   f"Gaussian outputs. Growing past {OUTLIER_LIMIT:g} (orange): activation outliers; from "
                   f"{MASSIVE_RATIO:g} (red): massive activations.",
                   (Query(_layer("gradwatch_layer_activation_outlier"), LEGEND),), log=True,
                   thresholds=((OUTLIER_LIMIT, "orange"), (MASSIVE_RATIO, "red")), width=8),
    ))


def _run(metric: str) -> str:
    """A run-level series of the run, one per rank."""
    return f'{metric}{{run="$run", rank=~"$rank"}}'


#: the spike guard's default z-score threshold (guards.spike.z_threshold; a run may set its own)
SPIKE_Z = 6.0
RUN_LEGEND = "{{run_name}} rank {{rank}}"


def _optimizer_row() -> Row:
    return Row("Optimizer health: ${run:text}", (
        TimeSeries("Adam update RMS",
                   "RMS of Adam's update m̂/(√v̂+ε) over each block's elements (its largest layer). About 1 when "
                   "healthy; far below 1, ε dominates (see the ε share); a jump above 1 follows a second moment "
                   "that lags the squared gradients, and often precedes a loss spike.",
                   (Query(_layer("gradwatch_layer_adam_update_rms"), LEGEND),), log=True, width=8),
        TimeSeries("Adam second-moment lag g²/v̂",
                   "Mean of g²/(√v̂+ε)² over each block's elements (its largest layer): how far Adam's second "
                   "moment lags the squared gradient. Well above 1: v̂ has not caught up with a gradient surge, "
                   "the step a loss spike follows (lower β₂, a longer warmup or a lower learning rate help).",
                   (Query(_layer("gradwatch_layer_adam_second_moment_lag"), LEGEND),), log=True,
                   thresholds=((10, "red"),), width=8),
        TimeSeries("Adam ε-dominated elements",
                   "Fraction of each block's elements where Adam's ε exceeds √v̂ (its largest layer): those "
                   "elements take SGD-like steps of lr·m̂/ε instead of Adam's normalised ones.",
                   (Query(_layer("gradwatch_layer_adam_epsilon_ratio"), LEGEND),), unit="percentunit", min=0,
                   max=1, width=8),
        TimeSeries("Update-to-weight ‖ΔW‖/‖W‖ against its band",
                   "Each block's update-to-weight ratio at its last measured update (its largest layer), on the "
                   "reference band of 1e-4 to 1e-2 per step (green; about 1e-3 for Adam-family training): "
                   "below it (blue) the block barely trains, above it (red) its learning rate is too high. "
                   "Dashed: the equilibrium √(2·lr·wd) that weight decay drives a scale-invariant layer (one "
                   "followed by a normalisation layer) to.",
                   (Query(_layer("gradwatch_layer_update_to_weight"), LEGEND),
                    Query(_layer("gradwatch_layer_update_to_weight_equilibrium"), f"{LEGEND} equilibrium")),
                   log=True, thresholds=((1e-4, "green"), (1e-2, "red")), base="blue", dashed=("B",)),
        TimeSeries("Loss and gradient-norm z-scores",
                   f"Robust z-scores of the loss and of the global gradient norm against the spike guard's window "
                   f"of recent steps. Above the guard's threshold (red: the default, {SPIKE_Z:g}; a run may set "
                   f"guards.spike.z_threshold) a step is a spike: warned about, skipped or raised on as the guard "
                   f"says.",
                   (Query(_run("gradwatch_loss_zscore"), f"{RUN_LEGEND} loss"),
                    Query(_run("gradwatch_global_grad_norm_zscore"), f"{RUN_LEGEND} grad norm")),
                   thresholds=((SPIKE_Z, "red"),)),
        TimeSeries("Skip rate",
                   "Fraction of the spike guard's window of optimizer steps whose update a guard (spike or "
                   "non-finite) skipped. Above 5% for 5 minutes fires GradwatchSpikeSkipRate.",
                   (Query(_run("gradwatch_skipped_steps_ratio"), RUN_LEGEND),), unit="percentunit", min=0,
                   thresholds=((0.05, "red"),), height=8),
        TimeSeries("Spike steps",
                   "Optimizer steps the spike guard flagged as a loss or gradient-norm spike since the run started.",
                   (Query(_run("gradwatch_spike_steps_total"), RUN_LEGEND),), min=0, height=8),
    ))


def _ranks_row() -> Row:
    return Row("Ranks: ${run:text}", (
        Table("Rank with the largest value",
              "With layer series reduced across ranks (the default), the rank whose value is the largest, per "
              "block (rows, in depth order) and activation statistic (columns): where to look first on a "
              "multi-GPU run (gradwatch_layer_max_rank). Each service reduces the ranks it sees, so a run "
              "spread over several hosts has a row per block and host. Empty with per_rank, where every rank "
              "has its own series.",
              (Query('label_join(max by (depth, layer, instance, stat) (gradwatch_layer_max_rank{run="$run", '
                     'layer=~"$layer"}), "block", " ", "depth", "layer", "instance")', table=True),),
              transformations=(
                  {"id": "groupingToMatrix", "options": {"columnField": "stat", "rowField": "block",
                                                         "valueField": "Value"}},
                  {"id": "sortBy", "options": {"fields": {}, "sort": [{"field": "block\\stat"}]}},
              )),
    ))


def _per_param_row() -> Row:
    return Row("Per parameter (gradwatch serve --per-param): ${run:text}", (
        TimeSeries("Parameter gradient norm",
                   "L2 norm of each parameter's gradient at the last step, before clipping. Exported only with "
                   "per-param series (gradwatch serve --per-param).",
                   (Query(_param("gradwatch_param_grad_norm"), "{{param}}"),), log=True, width=8),
        TimeSeries("Parameter update ratio", "‖Δθ‖/‖θ‖ of each parameter's last measured update (--per-param).",
                   (Query(_param("gradwatch_param_update_ratio"), "{{param}}"),), log=True, width=8),
        TimeSeries("Parameter norm (per param)", "L2 norm of each parameter (--per-param).",
                   (Query(_param("gradwatch_param_norm"), "{{param}}"),), width=8),
    ), collapsed=True)


def layers() -> Dashboard:
    """The layers dashboard, its rows in the order a run is read: gradient flow, updates,
    activations, the transformer's forward pass, optimizer health, ranks, params."""
    return Dashboard(
        uid="gradwatch-layers", title="gradwatch / Layers",
        description="One run block by block, in depth order: gradient flow through depth, parameter gradients, "
                    "update ratios, saturation and dead units, attention, output logits and the residual stream, "
                    "optimizer health and spikes, and the rank with the largest value.",
        variables=(DATASOURCE_VARIABLE, PROJECT, runs(multi=False), RANK, LAYER),
        rows=(_flow_row(), _updates_row(), _activations_row(), _transformer_row(), _optimizer_row(), _ranks_row(),
              _per_param_row()))
