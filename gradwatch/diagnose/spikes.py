"""Spikes against a series' own recent past: of the total gradient norm and of the loss.

Pure functions over arrays, judged at each step against the steps before it only, so they
work the same on a whole run and on a window of its recent steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradwatch.diagnose import thresholds as th
from gradwatch.diagnose.rundata import Series, nanmedian


def history(values: np.ndarray, lookback: int, positions: np.ndarray) -> np.ndarray:
    """(len(positions), lookback): for each position i, the finite values of the `lookback`
    entries before i, NaN elsewhere."""
    v = np.asarray(values, dtype=np.float64)
    padded = np.concatenate([np.full(lookback, np.nan), np.where(np.isfinite(v), v, np.nan)])
    return padded[np.asarray(positions)[:, None] + np.arange(lookback)]


def rolling_stats(values: np.ndarray, lookback: int, positions: np.ndarray,
                  noise: bool = False) -> tuple[np.ndarray, ...]:
    """At each of `positions`: the median of the finite values among the `lookback` entries
    before it (NaN with none), how many there are and, with `noise`, their robust standard
    deviation from one entry to the next: 1.4826 x the median absolute change between
    consecutive finite entries / sqrt(2), which a steady trend (a falling loss) barely moves.
    Each position reads only the entries before it, so a window's series keeps these as it
    moves (`Series.rolling`)."""
    past = history(values, lookback, positions)
    med = np.asarray(nanmedian(past, axis=1), dtype=np.float64).reshape(-1)
    count = np.isfinite(past).sum(axis=1)
    if not noise:
        return med, count
    steps = np.abs(past[:, 1:] - past[:, :-1])
    return med, count, 1.4826 / np.sqrt(2) * np.asarray(nanmedian(steps, axis=1), dtype=np.float64).reshape(-1)


def local_medians(values: np.ndarray, lookback: int, min_history: int,
                  stats: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
    """Median of the finite values among the `lookback` entries before each one; NaN with fewer
    than `min_history` of them. `stats`: their `rolling_stats`, when already computed."""
    med, count = stats[:2] if stats is not None else rolling_stats(values, lookback, np.arange(len(values)))
    return np.where(count < min_history, np.nan, med)


def norm_stats(norms: Series, first: int = 0) -> tuple[np.ndarray, ...]:
    """`rolling_stats` of a total-norm series over SPIKE_LOOKBACK, from position `first` on, kept
    with the series (`Series.rolling`)."""
    lookback = th.SPIKE_LOOKBACK
    return norms.rolling(("norm_stats", lookback, first), lookback,
                         lambda values, positions: rolling_stats(values, lookback, positions), first)


def find_spikes(norms: np.ndarray, stats: tuple[np.ndarray, ...] | None = None,
                first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of finite norms above SPIKE_FACTOR x the median of the preceding SPIKE_LOOKBACK
    finite norms (at least SPIKE_MIN_HISTORY of them), and the factors; none before index
    `first` (`RunData.judged_from`). `stats`: the norms' `rolling_stats` over SPIKE_LOOKBACK,
    when already computed."""
    norms = np.asarray(norms, dtype=np.float64)
    if not len(norms):
        return np.array([], dtype=np.int64), np.array([], dtype=np.float64)
    local = local_medians(norms, th.SPIKE_LOOKBACK, th.SPIKE_MIN_HISTORY, stats)
    with np.errstate(divide="ignore", invalid="ignore"):
        factors = norms / local
    ok = np.isfinite(norms) & np.isfinite(local) & (local > 0) & (factors > th.SPIKE_FACTOR)
    ok[:first] = False
    idx = np.flatnonzero(ok)
    return idx.astype(np.int64), factors[idx]


def local_factor(norms: np.ndarray, i: int) -> float:
    """A norm over the median of the SPIKE_LOOKBACK finite norms before it (NaN without history)."""
    past = np.asarray(norms[max(0, i - th.SPIKE_LOOKBACK):i], dtype=np.float64)
    past = past[np.isfinite(past)]
    if not len(past) or np.median(past) <= 0:
        return float("nan")
    return float(norms[i] / np.median(past))


@dataclass(frozen=True)
class LossSpike:
    """A run of consecutive logged steps where the loss stood above its limit."""

    first: int  # step
    last: int  # step
    peak_step: int
    loss: float  # the loss at peak_step
    median: float  # median of the logged losses before peak_step (of their logs, on the log scale)
    limit: float  # what the loss had to exceed at peak_step
    z: float  # (loss - median) / robust sd at peak_step, on the scale it was judged on
    baseline: float  # the limit at the spike's first step, from the steps before it
    recovered: int | None  # the first later logged step back under `baseline`, None if none


def on_log_scale(loss: np.ndarray) -> bool:
    """Whether losses are judged on the log scale: when every finite one is positive (cross-
    entropy, MSE), where batch-to-batch noise is a factor, whatever the loss's level."""
    finite = loss[np.isfinite(loss)]
    return bool(len(finite)) and bool(np.all(finite > 0))


def loss_scale(loss: np.ndarray, log: bool) -> np.ndarray:
    """The losses as judged: their logs (NaN for a value that is not positive) or themselves."""
    loss = np.asarray(loss, dtype=np.float64)
    return np.log(np.where(loss > 0, loss, np.nan)) if log else loss


def loss_limits(x: np.ndarray, log: bool,
                stats: tuple[np.ndarray, ...] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per logged loss, on the scale it is judged on (`loss_scale`): the median of the preceding
    LOSS_LOOKBACK finite values (at least LOSS_MIN_HISTORY), their robust sd from one logged step
    to the next (`rolling_stats`) and the limit a spike exceeds: LOSS_SPIKE_Z robust sd above the
    median, and at least (1 + LOSS_SPIKE_RISE) x the median (LOSS_SPIKE_MIN_RISE above it, on
    the raw scale). `stats`: the values' `rolling_stats` over LOSS_LOOKBACK with their noise,
    when already computed."""
    if stats is None:
        stats = rolling_stats(x, th.LOSS_LOOKBACK, np.arange(len(x)), noise=True)
    med, count, sd = stats
    med = np.where(count < th.LOSS_MIN_HISTORY, np.nan, med)
    if log:
        rise = np.log1p(th.LOSS_SPIKE_RISE)
    else:
        rise = np.maximum(th.LOSS_SPIKE_RISE * np.abs(med), th.LOSS_SPIKE_MIN_RISE)
    return med, sd, med + np.maximum(th.LOSS_SPIKE_Z * sd, rise)


def loss_stats(loss: Series, first: int = 0) -> tuple[np.ndarray, ...]:
    """`rolling_stats` (with the noise) of a loss series on the scale it is judged on, over
    LOSS_LOOKBACK, from position `first` on, kept with the series (`Series.rolling`)."""
    lookback, log = th.LOSS_LOOKBACK, on_log_scale(np.asarray(loss.values, dtype=np.float64))
    return loss.rolling(("loss_stats", lookback, log, first), lookback,
                        lambda values, positions: rolling_stats(loss_scale(values, log), lookback, positions, True),
                        first)


def find_loss_spikes(steps: np.ndarray, loss: np.ndarray, stats: tuple[np.ndarray, ...] | None = None,
                     first: int = 0) -> list[LossSpike]:
    """Loss spikes: consecutive logged values above their limit, each run one spike, none before
    index `first` (`RunData.judged_from`; NaN/Inf losses are the non-finite rule's, not spikes).
    `stats` as for `loss_limits`."""
    loss = np.asarray(loss, dtype=np.float64)
    if len(loss) <= th.LOSS_MIN_HISTORY:
        return []
    log = on_log_scale(loss)
    x = loss_scale(loss, log)
    med, sd, limit = loss_limits(x, log, stats)
    above = np.isfinite(x) & np.isfinite(limit) & (x > limit)
    above[:first] = False
    rows = np.flatnonzero(above)
    if not len(rows):
        return []
    unit = np.exp if log else np.asarray  # the median and limits in the loss's own units
    out = []
    breaks = np.flatnonzero(np.diff(rows) > 1)
    for a, b in zip(np.r_[rows[:1], rows[breaks + 1]], np.r_[rows[breaks], rows[-1:]]):
        seg = np.arange(a, b + 1)
        peak = int(seg[np.argmax((x[seg] - med[seg]) / (limit[seg] - med[seg]))])
        rest = x[b + 1:]
        later = np.flatnonzero(np.isfinite(rest) & (rest <= limit[a]))
        out.append(LossSpike(
            first=int(steps[a]), last=int(steps[b]), peak_step=int(steps[peak]), loss=float(loss[peak]),
            median=float(unit(med[peak])), limit=float(unit(limit[peak])),
            z=float((x[peak] - med[peak]) / sd[peak]) if sd[peak] > 0 else float("inf"),
            baseline=float(unit(limit[a])), recovered=int(steps[b + 1 + later[0]]) if len(later) else None))
    return out


def isolated(spike: LossSpike, steps: np.ndarray) -> bool:
    """Whether a spike lasted one logged step and the next logged step was back under the limit
    from before it."""
    if spike.first != spike.last or spike.recovered is None:
        return False
    nxt = np.flatnonzero(np.asarray(steps) > spike.last)
    return bool(len(nxt)) and int(steps[nxt[0]]) == spike.recovered
