"""The rule about gradients that are too large: judged on absolute size (against the parameter
norm and against the clipping threshold, from the first step), on spikes against the recent
past, and on sustained growth that the learning-rate schedule does not explain."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradwatch.diagnose import thresholds as th
from gradwatch.diagnose.causes import init_cause, lr_burst, lr_explained_growth, lr_matrix
from gradwatch.diagnose.findings import Evidence, Finding
from gradwatch.diagnose.flow import GATED, NORM
from gradwatch.diagnose.loss import batch_spike_steps
from gradwatch.diagnose.rundata import RunData, Series, in_sorted, nanmedian
from gradwatch.diagnose.spikes import find_spikes, norm_stats
from gradwatch.diagnose.text import num, plural, ranges_text, runs_of

_INIT_RNN = ("initialise the recurrent weights with spectral radius near 1: nn.init.orthogonal_(w) (or Glorot), "
             "so the hidden state neither blows up nor dies over time")


def suggest_clip_threshold(norms: np.ndarray) -> float | None:
    """A clipping threshold from a run's own pre-clip total norms.

    The CLIP_PERCENTILE-th percentile of the ordinary norms: those before the first spike or
    non-finite value when there are enough of them, else every finite norm within
    SPIKE_FACTOR x the median. None when fewer than GROWTH_MIN_STEPS norms are usable.
    """
    norms = np.asarray(norms, dtype=np.float64)
    spikes, _ = find_spikes(norms)
    bad = np.flatnonzero(~np.isfinite(norms))
    stops = [int(spikes[0])] if len(spikes) else []
    stops += [int(bad[0])] if len(bad) else []
    before = norms[: min(stops)] if stops else norms
    if len(before) < th.GROWTH_MIN_STEPS:
        before = norms
    finite = before[np.isfinite(before) & (before > 0)]
    if len(finite) < th.GROWTH_MIN_STEPS:
        return None
    ordinary = finite[finite <= th.SPIKE_FACTOR * np.median(finite)]
    return float(np.percentile(ordinary, th.CLIP_PERCENTILE))


@dataclass
class _Size:
    """What the norms show, each measure NaN (or empty) where it could not be judged."""

    clip_factor: float = float("nan")  # median pre-clip norm over the clipping threshold
    clip_threshold: float = float("nan")
    clipped_share: float = float("nan")
    ratio_max: float = float("nan")  # largest total norm over the total parameter norm
    ratio_steps: tuple[int, ...] = ()  # steps above GRAD_PARAM_RATIO
    param_norm: float = float("nan")
    growth: float = 1.0
    explained: float = 1.0
    spike_steps: tuple[int, ...] = ()
    worst_spike: float = 1.0

    @property
    def clipped_explosion(self) -> bool:
        return bool(self.clip_factor >= th.CLIP_EXPLOSION_FACTOR)

    @property
    def too_large(self) -> bool:
        return bool(self.ratio_steps)

    @property
    def grows(self) -> bool:
        return self.growth / self.explained > th.GROWTH_FACTOR


def clip_thresholds(data: RunData, steps: np.ndarray) -> np.ndarray | None:
    """The total-norm clipping threshold in force at each step, or None when not clipping by norm."""
    recorded = data.run.get("clip_threshold")
    if recorded is not None and recorded.values.size:
        return recorded.at(steps)
    clip = data.clip_config
    if clip["mode"] == "norm" and clip.get("max_norm"):
        return np.full(len(steps), float(clip["max_norm"]))
    return None


def initial_weight_norm(data: RunData) -> float:
    """The norm of the weights as initialised, from the init check (std x sqrt(fan_in x fan_out)
    per weight matrix; biases and embeddings left out): NaN without an init check."""
    parts = [float(c["std"]) ** 2 * float(c["fan_in"]) * float(c["fan_out"]) for c in data.init_check
             if all(isinstance(c.get(k), (int, float)) for k in ("std", "fan_in", "fan_out"))]
    total = float(np.sqrt(np.sum(parts))) if parts else float("nan")
    return total if np.isfinite(total) and total > 0 else float("nan")


def param_reference(data: RunData, steps: np.ndarray) -> np.ndarray:
    """The parameter norm each step's gradient was computed on: the total measured at the last
    step before it (param norms are measured after the update); before any measurement, the
    weights as initialised when the steps start the run, else the first measurement. NaN where
    there is none."""
    pn = data.run.get("param_norm_total")
    ref = np.full(len(steps), np.nan)
    if pn is None or not pn.values.size:
        return ref
    idx = np.searchsorted(pn.steps, steps, side="left") - 1
    ok = idx >= 0
    ref[ok] = pn.values[idx[ok]]
    start = initial_weight_norm(data) if len(steps) and int(steps[0]) == 0 else float("nan")
    ref[~ok] = start if np.isfinite(start) else float(pn.values[0])
    return ref


def _measure(data: RunData, series: Series, norms: np.ndarray, use: np.ndarray) -> _Size:
    """Every measure of size over the steps of the total norm `series` in `use` (the others are a
    bad batch's)."""
    steps = series.steps
    size = _Size()
    finite = use & np.isfinite(norms)
    thr = clip_thresholds(data, steps)
    if thr is not None:
        ok = finite & np.isfinite(thr) & (thr > 0)
        if ok.any():
            size.clip_factor = float(np.median(norms[ok] / thr[ok]))
            size.clip_threshold = float(np.median(thr[ok]))
            size.clipped_share = float(np.mean(norms[ok] > thr[ok]))
    ref = param_reference(data, steps)
    ok = finite & np.isfinite(ref) & (ref > 0)
    if ok.any():
        ratio = np.where(ok, norms / np.where(ok, ref, 1.0), np.nan)
        size.ratio_max = float(np.nanmax(ratio))
        size.ratio_steps = tuple(int(s) for s in steps[ok & (ratio > th.GRAD_PARAM_RATIO)])
        size.param_norm = float(np.median(ref[ok]))
    first = data.judged_from(th.SPIKE_LOOKBACK)
    stats = norm_stats(series, first) if use.all() else None  # else not the series' own
    idx, factors = find_spikes(np.where(use, norms, np.nan), stats, first)
    size.spike_steps = tuple(int(s) for s in steps[idx])
    size.worst_spike = float(factors.max()) if len(factors) else 1.0
    grow = finite & (norms > 0)
    if np.count_nonzero(grow) >= th.GROWTH_MIN_STEPS:
        q = np.count_nonzero(grow) // 4
        first, last = steps[grow][:q], steps[grow][-q:]
        size.growth = float(np.median(norms[grow][-q:]) / np.median(norms[grow][:q]))
        size.explained = lr_explained_growth(data, first, last)
    return size


def _contained(data: RunData, spike_steps: tuple[int, ...]) -> bool:
    """Whether norm clipping was on and brought every spike down to its threshold."""
    post = data.run.get("grad_norm_total_clipped")
    thr = data.clip_config.get("max_norm")
    if post is None or thr is None or data.clip_config["mode"] == "none" or not spike_steps:
        return False
    return bool(np.all(post.at(np.asarray(spike_steps)) <= thr * 1.01))


def _summary(size: _Size, norms: np.ndarray, nonfinite: int, contained: bool, data: RunData) -> list[str]:
    finite = norms[np.isfinite(norms)]
    lines = [f"total gradient norm: median {num(float(np.median(finite)))}, max {num(float(finite.max()))}"
             + (f", non-finite on {plural(nonfinite, 'step')}" if nonfinite else "")]
    if size.clipped_explosion:
        lines.append(f"clipped on {size.clipped_share:.0%} of the steps: the pre-clip norm sits a median "
                     f"{num(size.clip_factor)} times above the threshold {num(size.clip_threshold)}")
    if size.too_large:
        lines.append(f"the total gradient norm is above {num(th.GRAD_PARAM_RATIO)} x the parameter norm "
                     f"({num(size.param_norm)}) on {plural(len(size.ratio_steps), 'step')}: "
                     f"{ranges_text(runs_of(np.asarray(size.ratio_steps)))} (up to x{num(size.ratio_max)})")
    if size.grows:
        lines.append(f"it grew x{num(size.growth)} from the first to the last quarter of the finite steps"
                     + (f", x{num(size.growth / size.explained)} beyond the x{num(size.explained)} that the "
                        "learning-rate decay explains" if size.explained > 1 else ""))
    elif size.explained > 1 and size.growth > th.GROWTH_FACTOR:
        lines.append(f"it grew x{num(size.growth)}, which the learning-rate decay explains (up to "
                     f"x{num(size.explained)}): not counted as an explosion")
    if size.spike_steps:
        lines.append(f"{plural(len(size.spike_steps), 'spike')} above {num(th.SPIKE_FACTOR)} x the median of the "
                     f"previous {th.SPIKE_LOOKBACK} steps (worst x{num(size.worst_spike)}), at "
                     f"{'step' if len(size.spike_steps) == 1 else 'steps'} "
                     f"{ranges_text(runs_of(np.asarray(size.spike_steps)))}")
    if contained:
        lines.append(f"clipping at {num(data.clip_config['max_norm'])} bounded every spike")
    return lines


def _causes(data: RunData, size: _Size, first_step: int) -> list[str]:
    recurrent = any(ly.is_recurrent for ly in data.layers)
    lr = lr_matrix(data)
    lr_text = ""
    if lr is not None:
        med = nanmedian(np.where(lr.measured, lr.values, np.nan))
        lr_text = f" ({num(float(med))})" if np.isfinite(med) else ""
    lr_cause = (f"a learning rate{lr_text} too high for the loss curvature: each update lands where gradients are "
                "larger")
    rnn = ("a recurrent layer over long sequences: the recurrent weight's Jacobian is multiplied at every time step, "
           "so a spectral radius above 1 grows gradients exponentially")
    init = init_cause(data, "large", "so activations and gradients grow layer after layer")
    burst = lr_burst(data, first_step)
    absolute = size.clipped_explosion or size.too_large
    ordered = [burst] + ([init, rnn if recurrent else None, lr_cause] if absolute
                         else [lr_cause, rnn if recurrent else None, init])
    return [c for c in ordered if c]


def _remedies(data: RunData, size: _Size, suggested: float | None) -> list[str]:
    """Remedies, clipping first; never one that raises or removes a clipping that holds an explosion."""
    recurrent = any(ly.is_recurrent for ly in data.layers)
    remedies = []
    if size.clipped_explosion:
        remedies.append(f"keep the clipping at {num(size.clip_threshold)}: it holds every update of this run to a "
                        "bounded size, and raising or removing it would let the run blow up; cure the cause with the "
                        "remedies below")
    elif size.too_large:
        remedies.append("clip the total gradient norm, e.g. config {'clip': {'mode': 'norm', 'max_norm': 1.0}} (this "
                        "run's own norms are all too large to suggest a threshold from)")
    elif suggested is not None:
        remedies.append(f"clip the total gradient norm at {num(suggested)} (the {th.CLIP_PERCENTILE:.0f}th "
                        "percentile of this run's ordinary pre-clip norms): config {'clip': {'mode': 'norm', "
                        f"'max_norm': {suggested:.3g}}}}}")
    if recurrent:
        remedies += [_INIT_RNN, GATED]
    elif init_cause(data, "large", ""):
        remedies.append("initialise each layer for the activation that follows it: nn.init.kaiming_normal_ "
                        "(ReLU family) or nn.init.xavier_normal_ (sigmoid/tanh, no activation)")
    remedies += ["lower the learning rate (x0.1), or warm it up over the first steps", NORM]
    if size.grows:
        remedies.append("add weight decay to keep weights, and so gradients, from growing")
    return remedies


def exploding(data: RunData) -> list[Finding]:
    """Total gradient norm too large: far above the parameter norm or the clipping threshold,
    spiking far above its recent median, or growing by orders of magnitude unexplained."""
    series = data.run.get("grad_norm_total")
    if series is None or not series.values.size:
        return []
    steps, norms = series.steps, series.values.astype(np.float64)
    use = ~in_sorted(steps, batch_spike_steps(data))  # a bad batch explains those: the loss-spike finding's
    size = _measure(data, series, norms, use)
    if not (size.clipped_explosion or size.too_large or size.grows or size.spike_steps):
        return []
    nonfinite = int(np.count_nonzero(~np.isfinite(norms)))
    contained = _contained(data, size.spike_steps)
    absolute = size.clipped_explosion or size.too_large
    if absolute or size.grows or nonfinite or size.worst_spike >= th.SEVERE_SPIKE_FACTOR:
        severity = "error"
    else:
        severity = "info" if contained else "warning"
    if size.clipped_explosion:
        value, threshold = size.clip_factor, th.CLIP_EXPLOSION_FACTOR
    elif size.too_large:
        value, threshold = size.ratio_max, th.GRAD_PARAM_RATIO
    elif size.grows:
        value, threshold = size.growth / size.explained, th.GROWTH_FACTOR
    else:
        value, threshold = size.worst_spike, th.SPIKE_FACTOR
    problem_steps = sorted(set(size.spike_steps) | set(size.ratio_steps))
    first_step = problem_steps[0] if problem_steps else int(steps[0])
    finite = norms[np.isfinite(norms)]  # every trigger rests on finite norms
    suggested = None if absolute else suggest_clip_threshold(norms)  # exploded norms suggest nothing
    values = {"value": float(value), "threshold": float(threshold), "median_norm": float(np.median(finite)),
              "max_norm": float(finite.max()), "growth": size.growth, "lr_explained_growth": size.explained,
              "spikes": float(len(size.spike_steps)), "worst_spike_factor": size.worst_spike,
              "nonfinite_steps": float(nonfinite)}
    if np.isfinite(size.clip_factor):
        values["clip_factor"] = size.clip_factor
    if np.isfinite(size.ratio_max):
        values["grad_param_ratio"] = size.ratio_max
    if suggested is not None:
        values["suggested_clip"] = suggested
    evidence = Evidence(tuple(_summary(size, norms, nonfinite, contained, data)), values,
                        steps=tuple(problem_steps[:10]) or (int(steps[0]), int(steps[-1])))
    if severity == "info":
        title = "Gradient spikes, bounded by clipping"
    elif size.clipped_explosion:
        title = "Exploding gradients, held down by clipping"
    else:
        title = "Exploding gradients"
    return [Finding("exploding_gradients", severity, title, evidence, tuple(_causes(data, size, first_step)),
                    tuple(_remedies(data, size, None if contained else suggested)))]
