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
                  mad: bool = False) -> tuple[np.ndarray, ...]:
    """At each of `positions`: the median of the finite values among the `lookback` entries
    before it (NaN with none), how many there are and, with `mad`, their median absolute
    deviation from that median. Each position reads only the entries before it, so a window's
    series keeps these as it moves (`Series.rolling`)."""
    past = history(values, lookback, positions)
    med = np.asarray(nanmedian(past, axis=1), dtype=np.float64).reshape(-1)
    count = np.isfinite(past).sum(axis=1)
    if not mad:
        return med, count
    return med, count, np.asarray(nanmedian(np.abs(past - med[:, None]), axis=1), dtype=np.float64).reshape(-1)


def series_stats(series: Series, lookback: int, mad: bool = False) -> tuple[np.ndarray, ...]:
    """`rolling_stats` at every position of a run-level series, kept with it."""
    return series.rolling(("rolling_stats", lookback, mad), lookback,
                          lambda values, positions: rolling_stats(values, lookback, positions, mad))


def local_medians(values: np.ndarray, lookback: int, min_history: int,
                  stats: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
    """Median of the finite values among the `lookback` entries before each one; NaN with fewer
    than `min_history` of them. `stats`: their `rolling_stats`, when already computed."""
    med, count = stats[:2] if stats is not None else rolling_stats(values, lookback, np.arange(len(values)))
    return np.where(count < min_history, np.nan, med)


def find_spikes(norms: np.ndarray, stats: tuple[np.ndarray, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices of finite norms above SPIKE_FACTOR x the median of the preceding SPIKE_LOOKBACK
    finite norms (at least SPIKE_MIN_HISTORY of them), and the factors. `stats`: the norms'
    `rolling_stats` over SPIKE_LOOKBACK, when already computed."""
    norms = np.asarray(norms, dtype=np.float64)
    if not len(norms):
        return np.array([], dtype=np.int64), np.array([], dtype=np.float64)
    local = local_medians(norms, th.SPIKE_LOOKBACK, th.SPIKE_MIN_HISTORY, stats)
    with np.errstate(divide="ignore", invalid="ignore"):
        factors = norms / local
    ok = np.isfinite(norms) & np.isfinite(local) & (local > 0) & (factors > th.SPIKE_FACTOR)
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
    median: float  # median of the logged losses before peak_step
    limit: float  # what the loss had to exceed at peak_step
    z: float  # (loss - median) / (1.4826 MAD) at peak_step
    baseline: float  # the limit at the spike's first step, from the steps before it
    recovered: int | None  # the first later logged step back under `baseline`, None if none
    after: int  # logged steps after the spike


def loss_limits(loss: np.ndarray,
                stats: tuple[np.ndarray, ...] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per logged value: the median of the preceding LOSS_LOOKBACK finite values (at least
    LOSS_MIN_HISTORY), their robust sd (1.4826 MAD) and the limit a spike exceeds. `stats`: the
    losses' `rolling_stats` over LOSS_LOOKBACK with their MAD, when already computed."""
    if stats is None:
        stats = rolling_stats(loss, th.LOSS_LOOKBACK, np.arange(len(loss)), mad=True)
    med, count, mad = stats
    mad = 1.4826 * mad
    med = np.where(count < th.LOSS_MIN_HISTORY, np.nan, med)
    rise = np.maximum(th.LOSS_SPIKE_Z * mad, np.maximum(th.LOSS_SPIKE_RISE * np.abs(med), th.LOSS_SPIKE_MIN_RISE))
    return med, mad, med + rise


def find_loss_spikes(steps: np.ndarray, loss: np.ndarray,
                     stats: tuple[np.ndarray, ...] | None = None) -> list[LossSpike]:
    """Loss spikes: consecutive logged values above their limit, each run one spike (NaN/Inf
    losses are the non-finite rule's, not spikes). `stats` as for `loss_limits`."""
    loss = np.asarray(loss, dtype=np.float64)
    if len(loss) <= th.LOSS_MIN_HISTORY:
        return []
    med, mad, limit = loss_limits(loss, stats)
    above = np.isfinite(loss) & np.isfinite(limit) & (loss > limit)
    out = []
    rows = np.flatnonzero(above)
    if not len(rows):
        return []
    breaks = np.flatnonzero(np.diff(rows) > 1)
    for a, b in zip(np.r_[rows[:1], rows[breaks + 1]], np.r_[rows[breaks], rows[-1:]]):
        seg = np.arange(a, b + 1)
        peak = int(seg[np.argmax((loss[seg] - med[seg]) / (limit[seg] - med[seg]))])
        rest = loss[b + 1:]
        later = np.flatnonzero(np.isfinite(rest) & (rest <= limit[a]))
        out.append(LossSpike(
            first=int(steps[a]), last=int(steps[b]), peak_step=int(steps[peak]), loss=float(loss[peak]),
            median=float(med[peak]), limit=float(limit[peak]),
            z=float((loss[peak] - med[peak]) / mad[peak]) if mad[peak] > 0 else float("inf"),
            baseline=float(limit[a]), recovered=int(steps[b + 1 + later[0]]) if len(later) else None,
            after=len(loss) - b - 1))
    return out


def isolated(spike: LossSpike, steps: np.ndarray) -> bool:
    """Whether a spike lasted one logged step and the next logged step was back under the limit
    from before it."""
    if spike.first != spike.last or spike.recovered is None:
        return False
    nxt = np.flatnonzero(np.asarray(steps) > spike.last)
    return bool(len(nxt)) and int(steps[nxt[0]]) == spike.recovered
