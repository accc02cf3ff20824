"""The rule about the loss itself: spikes far above its recent median, with and without a
gradient spike at the same step."""

from __future__ import annotations

import numpy as np

from gradwatch.diagnose import thresholds as th
from gradwatch.diagnose.causes import lr_burst
from gradwatch.diagnose.findings import Evidence, Finding
from gradwatch.diagnose.rundata import RunData
from gradwatch.diagnose.spikes import LossSpike, find_loss_spikes, isolated, local_factor, loss_stats
from gradwatch.diagnose.text import num, plural, ranges_text

BAD_BATCH = ("a bad batch: corrupt, unnormalised, mislabelled or out-of-distribution samples; the loss was back "
             "under its limit at the next logged step, so the weights were not what went wrong")
OVERSHOOT = ("the update overshot: a learning rate too high for the curvature of the loss there, so the loss "
             "stayed up after the spike")
DATA_RUN = "a run of bad batches (a corrupt shard, a data pipeline that stopped shuffling)"
ADAM = ("with Adam: a second-moment estimate (beta2) gone stale while gradients were small lets a sudden large "
        "gradient through at full step size")


def loss_spikes(data: RunData) -> tuple[LossSpike, ...]:
    """`find_loss_spikes` of the run's loss, computed once per series and thresholds (this rule and
    exploding_gradients both need them)."""
    s = data.run.get("loss")
    if s is None or not s.values.size:
        return ()
    first = data.judged_from(th.LOSS_LOOKBACK)
    key = ("loss_spikes", th.LOSS_LOOKBACK, th.LOSS_MIN_HISTORY, th.LOSS_SPIKE_Z, th.LOSS_SPIKE_RISE,
           th.LOSS_SPIKE_MIN_RISE, first)
    return s.derived(key, lambda s: tuple(find_loss_spikes(s.steps, s.values, loss_stats(s, first), first)))


def batch_spike_steps(data: RunData) -> np.ndarray:
    """Steps of the loss spikes that a bad batch explains (one logged step, back the next)."""
    s = data.run.get("loss")
    return np.array([sp.first for sp in loss_spikes(data) if s is not None and isolated(sp, s.steps)],
                    dtype=np.int64)


def _gradient_at(data: RunData, step: int) -> tuple[str, float]:
    """A line on the total gradient norm at a step against its own median, and that factor."""
    norms = data.run.get("grad_norm_total")
    if norms is None or not np.any(norms.steps == step):
        return "", float("nan")
    factor = local_factor(norms.values, int(np.flatnonzero(norms.steps == step)[0]))
    if not np.isfinite(factor):
        return "", factor
    kind = "with a gradient spike" if factor > th.SPIKE_FACTOR else "without a gradient spike"
    return f"{kind} at step {step} (total norm x{num(factor)} its median)", factor


def _spike_line(sp: LossSpike) -> str:
    where = f"step {sp.first}" if sp.first == sp.last else f"steps {sp.first}-{sp.last} (peak at step {sp.peak_step})"
    times = f"x{num(sp.loss / sp.median)} " if sp.median > 0 else "above "
    return (f"loss spike at {where}: {num(sp.loss)}, {times}the median {num(sp.median)} of the logged steps before "
            f"it (limit {num(sp.limit)}" + (f", robust z {num(sp.z)})" if np.isfinite(sp.z) else ")"))


def _recovery_line(sp: LossSpike, steps: np.ndarray) -> str:
    before = f"the limit from before the spike ({num(sp.baseline)})"
    if isolated(sp, steps):
        return f"back under {before} at the next logged step, {sp.recovered}"
    if sp.recovered is not None:
        return f"back under {before} at step {sp.recovered}"
    if np.any(steps > sp.first):  # logged steps after the spike began, none back under its limit
        return f"still above {before} at the last logged step {int(steps[-1])}"
    return "at the last logged step: whether it comes back is not known yet"


def loss_spike(data: RunData) -> list[Finding]:
    """Logged losses far above the median of the logged steps before them."""
    s = data.run.get("loss")
    spikes = loss_spikes(data)
    if not spikes:
        return []
    worst = max(spikes, key=lambda sp: (sp.loss - sp.median) / (sp.limit - sp.median))
    grad_line, grad_factor = _gradient_at(data, worst.peak_step)
    summary = [_spike_line(worst) + (f", {grad_line}" if grad_line else ""), _recovery_line(worst, s.steps)]
    if len(spikes) > 1:
        summary.insert(0, f"{plural(len(spikes), 'loss spike')} at steps "
                          f"{ranges_text([(sp.first, sp.last) for sp in spikes])}; the largest:")
    one_step = isolated(worst, s.steps)
    unrecovered = worst.recovered is None and np.count_nonzero(s.steps > worst.first) >= th.LOSS_UNRECOVERED_STEPS
    burst = lr_burst(data, worst.peak_step)
    causes = [burst] if burst else []
    causes += [BAD_BATCH, OVERSHOOT] if one_step else [OVERSHOOT, DATA_RUN]
    causes.append(ADAM)
    batch = (f"look at the batch of step {worst.peak_step}: log each step's sample ids so it can be re-run, and "
             "check it for unnormalised, corrupt or mislabelled samples")
    guard = ("skip or down-weight batches whose loss is far above its running median, and clip the total gradient "
             "norm so that one batch cannot move the weights far: config {'clip': {'mode': 'zscore'}}")
    lower = "lower the learning rate or lengthen its warmup"
    adam = "with Adam: raise eps (1e-8 to 1e-6) or lower beta2 (0.999 to 0.95)"
    if burst:
        remedies = ("fix the learning-rate schedule that made it jump", guard, batch, adam)
    elif one_step:
        remedies = (batch, guard, lower, adam)
    else:
        remedies = (lower, guard, batch, adam)
    values = {"value": worst.loss, "threshold": worst.limit, "spikes": float(len(spikes)),
              "first_step": float(spikes[0].first), "peak_step": float(worst.peak_step), "median": worst.median}
    values.update({k: v for k, v in (("z", worst.z), ("grad_factor", grad_factor)) if np.isfinite(v)})
    evidence = Evidence(tuple(summary), values, steps=tuple(sp.peak_step for sp in spikes[:10]))
    severity = "error" if unrecovered else "warning"
    return [Finding("loss_spike", severity, "Loss spike", evidence, tuple(causes), remedies)]
