"""Every metric `gradwatch serve` exports: name, type, labels and help, in one table.

`METRICS` is the single list the collector emits in and the documentation test checks
docs/metrics.md against. Names follow DESIGN.md: prefix `gradwatch_`, base units, `_total`
for counters, `_ratio` for fractions in 0..1.
"""

from __future__ import annotations

from dataclasses import dataclass

RUN_LABELS = ("run", "rank")
LAYER_LABELS = ("run", "rank", "layer")
PARAM_LABELS = ("run", "rank", "layer", "param")
STATUSES = ("running", "finished", "crashed")


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric: name, Prometheus type, labels, help text."""

    name: str
    type: str  # "gauge" | "counter" | "info"
    labels: tuple[str, ...]
    help: str


def _g(name: str, labels: tuple[str, ...], help: str) -> MetricSpec:
    return MetricSpec(name, "gauge", labels, help)


def _c(name: str, labels: tuple[str, ...], help: str) -> MetricSpec:
    return MetricSpec(name, "counter", labels, help)


# Run-level run-log metric -> exported gauge.
RUN_GAUGES: dict[str, MetricSpec] = {
    "grad_norm_total": _g("gradwatch_global_grad_norm", RUN_LABELS,
                          "L2 norm over all gradients at the last step, before clipping, unscaled"),
    "grad_norm_total_clipped": _g("gradwatch_global_grad_norm_clipped", RUN_LABELS,
                                  "L2 norm over all gradients at the last step, after clipping"),
    "clip_coef": _g("gradwatch_clip_coefficient_ratio", RUN_LABELS,
                    "Factor applied to the gradients by clipping at the last step (1 = not clipped)"),
    "clip_threshold": _g("gradwatch_clip_threshold", RUN_LABELS,
                         "Norm threshold clipping used at the last step (fixed or adaptive)"),
    "nonfinite_params": _g("gradwatch_nonfinite_params", RUN_LABELS,
                           "Number of params whose gradient held NaN/Inf at the last step"),
    "overflow_params": _g("gradwatch_overflow_params", RUN_LABELS,
                          "Number of params whose gradient norm overflowed float32 at the last step while "
                          "every element was finite"),
    "loss": _g("gradwatch_loss", RUN_LABELS, "Last loss given to watcher.log()"),
    "loss_z": _g("gradwatch_loss_zscore", RUN_LABELS,
                 "Robust z-score of the loss against its recent window (spike guard), at the last step"),
    "grad_norm_z": _g("gradwatch_global_grad_norm_zscore", RUN_LABELS,
                      "Robust z-score of the global gradient norm against its recent window (spike guard), at the "
                      "last step"),
    "skip_rate": _g("gradwatch_skipped_steps_ratio", RUN_LABELS,
                    "Fraction of the spike guard's window of optimizer steps whose update a guard skipped"),
}
# Run-level run-log metrics the agent already keeps as running counts -> exported counter.
RUN_AGENT_COUNTERS: dict[str, MetricSpec] = {
    "spike_count": _c("gradwatch_spike_steps_total", RUN_LABELS,
                      "Optimizer steps the spike guard flagged as a loss or gradient-norm spike"),
}
# Run-level counters: metric name of the count in the snapshot -> exported counter.
RUN_COUNTERS: dict[str, MetricSpec] = {
    "clipped_steps": _c("gradwatch_clipped_steps_total", RUN_LABELS,
                        "Optimizer steps whose gradients were clipped (clip coefficient < 1)"),
    "skipped_steps": _c("gradwatch_skipped_steps_total", RUN_LABELS,
                        "Optimizer steps not applied (guard skip or AMP scaler skip)"),
    "nonfinite_steps": _c("gradwatch_nonfinite_steps_total", RUN_LABELS,
                          "Optimizer steps with at least one NaN/Inf gradient"),
    "overflow_steps": _c("gradwatch_overflow_steps_total", RUN_LABELS,
                         "Optimizer steps where a gradient norm overflowed float32 with every element finite"),
    "nonfinite_loss_steps": _c("gradwatch_nonfinite_loss_steps_total", RUN_LABELS,
                               "Steps whose logged loss was NaN or +-Inf"),
}
STEP = _g("gradwatch_step", RUN_LABELS, "Last optimizer step recorded for the run and rank")
SCALAR = _g("gradwatch_scalar", RUN_LABELS + ("scalar",),
            "Last value of a user scalar given to watcher.log() (other than loss)")
LEARNING_RATE = _g("gradwatch_learning_rate", RUN_LABELS + ("group",),
                   "Learning rate of an optimizer param group at the last step")
# Layer-scope run-log metric -> exported gauge.
LAYER_GAUGES: dict[str, MetricSpec] = {
    "act_grad_norm": _g("gradwatch_layer_act_grad_norm", LAYER_LABELS,
                        "L2 norm of the gradient w.r.t. the layer's output (gradient flow through depth)"),
    "act_mean": _g("gradwatch_layer_activation_mean", LAYER_LABELS, "Mean of the layer's output"),
    "act_std": _g("gradwatch_layer_activation_std", LAYER_LABELS,
                  "Standard deviation of the layer's output"),
    "saturation_ratio": _g("gradwatch_layer_saturation_ratio", LAYER_LABELS,
                           "Fraction of a bounded activation's outputs within eps of its asymptotes"),
    "dead_ratio": _g("gradwatch_layer_dead_ratio", LAYER_LABELS,
                     "Fraction of a ReLU-family layer's units that output zero for the whole batch"),
    "zero_ratio": _g("gradwatch_layer_zero_ratio", LAYER_LABELS,
                     "Fraction of a ReLU-family layer's outputs equal to zero"),
    "act_nonfinite": _g("gradwatch_layer_activation_nonfinite", LAYER_LABELS,
                        "Number of NaN/Inf outputs of an activation layer at its last measured step"),
    "layer_adam_update_rms": _g("gradwatch_layer_adam_update_rms", LAYER_LABELS,
                                "RMS of Adam's update m_hat/(sqrt(v_hat)+eps) over the layer's elements "
                                "(about 1 when healthy)"),
    "layer_adam_eps_frac": _g("gradwatch_layer_adam_epsilon_ratio", LAYER_LABELS,
                              "Fraction of the layer's elements where Adam's eps exceeds sqrt(v_hat)"),
    "layer_adam_v_lag": _g("gradwatch_layer_adam_second_moment_lag", LAYER_LABELS,
                           "Mean of g^2/(sqrt(v_hat)+eps)^2 over the layer's elements: how far Adam's second "
                           "moment lags the squared gradient"),
    "update_to_weight": _g("gradwatch_layer_update_to_weight", LAYER_LABELS,
                           "||delta W||/||W|| of the layer's params in the optimizer at the last measured update"),
    "update_to_weight_equilibrium": _g("gradwatch_layer_update_to_weight_equilibrium", LAYER_LABELS,
                                       "Equilibrium update-to-weight ratio sqrt(2*lr*wd) of a scale-invariant "
                                       "layer under weight decay"),
    "grad_to_weight": _g("gradwatch_layer_grad_to_weight", LAYER_LABELS,
                         "||g||/||W|| of a scale-invariant layer's weights at the last measured step"),
    "grad_to_weight_equilibrium": _g("gradwatch_layer_grad_to_weight_equilibrium", LAYER_LABELS,
                                     "Equilibrium grad-to-weight ratio sqrt(2*wd/lr) of a scale-invariant layer "
                                     "under plain SGD with weight decay"),
    "attn_logit_max": _g("gradwatch_layer_attention_logit_max", LAYER_LABELS,
                         "Max attention logit (q.k*scale + additive mask) over the sampled query rows and heads: "
                         "a lower bound of the layer's"),
    "attn_entropy": _g("gradwatch_layer_attention_entropy", LAYER_LABELS,
                       "Mean attention entropy over the sampled query rows, in nats"),
    "logit_max": _g("gradwatch_layer_logit_max", LAYER_LABELS, "Max logit of the output layer"),
    "logit_logz": _g("gradwatch_layer_logit_log_partition", LAYER_LABELS,
                     "Mean log Z (logsumexp over the vocabulary) of the output layer: what z-loss keeps near 0"),
    "act_rms": _g("gradwatch_layer_activation_rms", LAYER_LABELS,
                  "RMS of a residual block's output (the residual stream at its depth)"),
    "act_absmax": _g("gradwatch_layer_activation_absmax", LAYER_LABELS, "Max |x| of a residual block's output"),
    "act_outlier": _g("gradwatch_layer_activation_outlier", LAYER_LABELS,
                      "Max |x| / RMS of a layer's output (about 4 to 6 for Gaussian outputs)"),
}
# Per-layer aggregates of per-param metrics.
LAYER_GRAD_NORM = _g("gradwatch_layer_grad_norm", LAYER_LABELS,
                     "L2 norm of the layer's parameter gradients at the last step, before clipping")
LAYER_PARAM_NORM = _g("gradwatch_layer_param_norm", LAYER_LABELS, "L2 norm of the layer's parameters")
LAYER_UPDATE_RATIO = _g("gradwatch_layer_update_ratio", LAYER_LABELS,
                        "||delta theta|| / ||theta|| of the layer's parameters at the last update")
# Per-param metrics (exported when per-param export is on).
PARAM_GAUGES: dict[str, MetricSpec] = {
    "grad_norm": _g("gradwatch_param_grad_norm", PARAM_LABELS,
                    "L2 norm of a parameter's gradient at the last step, before clipping"),
    "param_norm": _g("gradwatch_param_norm", PARAM_LABELS, "L2 norm of a parameter"),
    "update_ratio": _g("gradwatch_param_update_ratio", PARAM_LABELS,
                       "||delta theta|| / ||theta|| of a parameter at the last update"),
    "adam_update_rms": _g("gradwatch_param_adam_update_rms", PARAM_LABELS,
                          "RMS of Adam's update m_hat/(sqrt(v_hat)+eps) over a parameter's elements"),
    "adam_eps_frac": _g("gradwatch_param_adam_epsilon_ratio", PARAM_LABELS,
                        "Fraction of a parameter's elements where Adam's eps exceeds sqrt(v_hat)"),
    "adam_v_lag": _g("gradwatch_param_adam_second_moment_lag", PARAM_LABELS,
                     "Mean of g^2/(sqrt(v_hat)+eps)^2 over a parameter's elements (Adam's second-moment lag)"),
}
RUN_INFO = MetricSpec("gradwatch_run_info", "info",
                      ("run", "name", "project", "host", "world_size", "device", "torch_version",
                       "gradwatch_version"), "Run metadata; the value is always 1")
RUN_STATUS = _g("gradwatch_run_status", ("run", "status"),
                "1 for the run's current status (running, finished, crashed), 0 for the others")
RUN_START = _g("gradwatch_run_start_time_seconds", ("run",), "Unix time the run started")
RUN_END = _g("gradwatch_run_end_time_seconds", ("run",), "Unix time the run finished or crashed")
RUNS_EXPORTED = _g("gradwatch_exporter_runs", (), "Runs whose series this scrape exports")
STORE_UP = _g("gradwatch_exporter_store_up", (), "1 when this scrape could read the store, else 0")

# The rules engine's alerts (gradwatch/alerts/), exported by their own collector.
ALERT_ACTIVE = _g("gradwatch_alert_active", ("run", "run_name", "rule", "severity", "layer"),
                  "1 for every alert of the rules engine that is firing (docs/alerts.md)")
ALERTS_TOTAL = _c("gradwatch_alerts_total", ("rule", "severity"),
                  "Alerts the rules engine fired since the service started, by rule and severity")
ALERT_METRICS: tuple[MetricSpec, ...] = (ALERT_ACTIVE, ALERTS_TOTAL)

METRICS: tuple[MetricSpec, ...] = (
    *RUN_GAUGES.values(), *RUN_COUNTERS.values(), *RUN_AGENT_COUNTERS.values(), STEP, SCALAR, LEARNING_RATE,
    LAYER_GRAD_NORM, LAYER_PARAM_NORM, LAYER_UPDATE_RATIO, *LAYER_GAUGES.values(),
    *PARAM_GAUGES.values(), RUN_INFO, RUN_STATUS, RUN_START, RUN_END, RUNS_EXPORTED, STORE_UP,
)
