"""Rules about the forward pass of transformers: attention-logit growth and entropy collapse,
output-logit divergence, activation outliers, and a residual stream whose RMS explodes with depth.

They read what the agent records in the forward pass (docs/runlog.md): per attention layer
`attn_logit_max` and `attn_entropy`, on the output layer `logit_logz` and `logit_max`, per
residual block `act_rms` and `act_absmax`. A run without them (a model with no attention layer,
no detected blocks) gets no judgement here. Growth is judged between the first and the last
quarter of the measured steps given (the whole run, or the live engine's window), each
summarised by its median, so one noisy step moves nothing. Thresholds and why: docs/diagnosis.md.
"""

from __future__ import annotations

import numpy as np

from gradwatch.diagnose.causes import init_cause, lr_matrix
from gradwatch.diagnose.findings import Evidence, Finding
from gradwatch.diagnose.rundata import LayerInfo, RunData, Series, nanmedian
from gradwatch.diagnose.text import listing, num, plural, span

#: Growth is judged on at least this many measured steps (a quarter of them is then one step).
MIN_MEASURED = 4
#: Attention-logit growth: the late max logit this many times the early one, and at least this large
#: (softmax is one-hot beyond a logit gap of ~20; heads with QK-norm that learned a sharp lookup
#: stay near 50).
ATTN_GROWTH = 10.0
ATTN_LOGIT_LIMIT = 100.0
#: Entropy collapse: the late mean attention entropy at most this fraction of the early one.
ENTROPY_COLLAPSE = 0.2
#: The loss diverged: non-finite, or above this many times its median over the first quarter.
LOSS_DIVERGED = 2.0
#: Output-logit divergence: |log Z| late at least LOGZ_LIMIT and LOGZ_DRIFT above |log Z| early
#: (log Z starts near log(vocabulary)), and not on its way back.
LOGZ_LIMIT = 20.0
LOGZ_DRIFT = 10.0
#: Activation outliers: a block's max |x| / RMS (about sqrt(2 ln n), 4 to 6, for Gaussian outputs
#: of n elements) grown this many times and at least OUTLIER_LIMIT; MASSIVE_RATIO and above is
#: an error whatever its growth (Sun et al. 2024: values 10^3-10^4 times the typical one).
OUTLIER_GROWTH = 2.5
OUTLIER_LIMIT = 10.0
MASSIVE_RATIO = 100.0
#: Residual explosion: the last block's RMS at least this many times the first's, and more than
#: RESIDUAL_PER_BLOCK x the number of blocks (additive growth, healthy pre-LN, stays below it).
RESIDUAL_RATIO = 10.0
RESIDUAL_PER_BLOCK = 2.0
RESIDUAL_MIN_BLOCKS = 3

QK_NORM = ("QK-layernorm: normalise q and k per head before their dot product (Dehghani et al. 2023; Wortsman et "
           "al. 2023), e.g. self.q_norm = nn.LayerNorm(head_dim) and q, k = self.q_norm(q), self.k_norm(k) "
           "before F.scaled_dot_product_attention")
LOWER_LR = "lower the learning rate (x0.3 to x0.1) or lengthen the warmup"
SIGMA_REPARAM = ("σReparam (Zhai et al. 2023): reparametrise the q and k projections as W * γ / σ(W), σ the "
                 "spectral norm (one power iteration per step), so the logits cannot outgrow γ")
Z_LOSS = ("z-loss (PaLM; Wortsman et al. 2023): add 1e-4 * log Z² to the loss, "
          "loss = loss + 1e-4 * torch.logsumexp(logits, dim=-1).pow(2).mean()")


def _quarters(series: Series, largest: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row: (median of its first quarter of measured values, of its last quarter, of its third
    quarter, number measured), NaN where a row has fewer than MIN_MEASURED. With `largest`, NaN
    values count as +Inf (a max that is NaN went past every limit)."""
    def compute(s: Series) -> tuple[np.ndarray, ...]:
        rows = s.values.shape[0]
        out = np.full((3, rows), np.nan)
        counts = s.measured.sum(axis=1)
        for r in np.flatnonzero(counts >= MIN_MEASURED):
            v = s.values[r][s.measured[r]].astype(np.float64)
            if largest:
                v = np.where(np.isnan(v), np.inf, v)
            k = max(1, len(v) // 4)
            out[:, r] = [nanmedian(v[:k]), nanmedian(v[-k:]), nanmedian(v[-2 * k:-k] if len(v) >= 2 * k else v)]
        return out[0], out[1], out[2], counts
    return series.derived(("quarters", largest, MIN_MEASURED), compute)


def _names(data: RunData, rows: np.ndarray) -> tuple[str, ...]:
    return data.layer_names(rows)


def _inside(data: RunData, parents: list[LayerInfo]) -> list[LayerInfo]:
    """Layers nested in any of `parents` (by name)."""
    prefixes = tuple(p.name + "." for p in parents)
    return [ly for ly in data.layers if ly.name.startswith(prefixes)]


def _peak_lr(data: RunData) -> float | None:
    lr = lr_matrix(data)
    if lr is None:
        return None
    values = np.where(lr.measured, lr.values, np.nan)
    finite = values[np.isfinite(values)]
    return float(finite.max()) if finite.size else None


def _lr_cause(data: RunData, what: str) -> str:
    peak = _peak_lr(data)
    at = f" (peak {num(peak)})" if peak is not None else ""
    return f"a learning rate{at} too high for the model's width: {what}"


def _loss_divergence(data: RunData, after: int) -> int | None:
    """The first logged step from `after` on where the loss is non-finite or above LOSS_DIVERGED x
    its median over the first quarter of the steps given; None when it has not diverged."""
    loss = data.run.get("loss")
    if loss is None or len(loss.steps) < MIN_MEASURED:
        return None
    values = loss.values.astype(np.float64)
    base = nanmedian(values[:max(1, len(values) // 4)])
    bad = (~np.isfinite(values)) | (values > LOSS_DIVERGED * base if np.isfinite(base) and base > 0 else False)
    hits = np.flatnonzero(bad & (loss.steps >= after))
    return int(loss.steps[hits[0]]) if len(hits) else None


# ---------------------------------------------------------------------------------- attention


def attention_logit_growth(data: RunData) -> list[Finding]:
    """Attention layers whose max logit grew ATTN_GROWTH-fold past ATTN_LOGIT_LIMIT (an error when
    their attention entropy collapsed with it), or whose entropy collapsed on its own."""
    top = data.layer.get("attn_logit_max")
    if top is None or top.values.size == 0:
        return []
    early, late, _, _ = _quarters(top, largest=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        growth = np.where(early > 0, late / early, np.nan)
    grown = np.flatnonzero((growth >= ATTN_GROWTH) & (late >= ATTN_LOGIT_LIMIT))
    entropy = data.layer.get("attn_entropy")
    collapsed = np.array([], dtype=np.intp)
    e_early = e_late = np.full(top.values.shape[0], np.nan)
    if entropy is not None and entropy.values.size:
        e_early, e_late, _, _ = _quarters(entropy)
        collapsed = np.flatnonzero((e_early > 0) & (e_late <= ENTROPY_COLLAPSE * e_early))
    if not len(grown) and not len(collapsed):
        return []
    steps = (int(top.steps[0]), int(top.steps[-1]))
    attention = [data.layers[int(r)] for r in np.flatnonzero(top.measured.any(axis=1))]
    qk_norm = any(ly.is_norm for ly in _inside(data, attention))
    summary, values = [], {}
    if len(grown):
        worst = int(grown[np.nanargmax(np.where(np.isfinite(growth[grown]), growth[grown], np.inf))])
        onset = _onset(top, grown, early)
        summary.append(f"the max attention logit grew x{num(float(growth[worst]))} in {data.layers[worst].name}, "
                       f"from {num(float(early[worst]))} to {num(float(late[worst]))} (medians of the first and last "
                       f"quarter of {span(*steps)}; {_first(top, worst)}); past x{num(ATTN_GROWTH)} from step "
                       f"{onset} on")
        summary.append("logit growth by layer: " + listing([f"{data.layers[int(r)].name} {num(float(early[r]))} -> "
                                                            f"{num(float(late[r]))}" for r in grown]))
        values.update(value=float(growth[worst]), threshold=ATTN_GROWTH, early_logit=float(early[worst]),
                      late_logit=float(late[worst]), onset_step=float(onset), layers=float(len(grown)))
        diverged = _loss_divergence(data, onset)
        if diverged is not None:
            summary.append(f"the loss diverged at step {diverged}, {plural(diverged - onset, 'step')} after the logits "
                           "passed that growth")
            values["loss_diverged_step"] = float(diverged)
    if len(collapsed):
        summary.append(f"attention entropy collapsed (late at most {ENTROPY_COLLAPSE:.0%} of early): "
                       + listing([f"{data.layers[int(r)].name} {num(float(e_early[r]))} -> {num(float(e_late[r]))} "
                                  f"nats ({_first(entropy, int(r))})" for r in collapsed]))  # type: ignore[arg-type]
        values.update(entropy_early=float(np.nanmin(e_early[collapsed])),
                      entropy_late=float(np.nanmin(e_late[collapsed])), collapsed_layers=float(len(collapsed)))
        if not len(grown):
            values.update(value=float(np.nanmin(e_late[collapsed] / e_early[collapsed])), threshold=ENTROPY_COLLAPSE)
    causes = []
    if not qk_norm:
        causes.append("no QK normalisation: no attention layer has a norm layer inside, so the logits grow with the "
                      "product of the q and k weights' scales, quadratically as they grow")
    causes.append(_lr_cause(data, "attention logits grow with the square of the q and k weights, which a high "
                                  "learning rate inflates (Wortsman et al. 2023: the learning rate where this sets in "
                                  "falls with width)"))
    if len(collapsed):
        causes.append("with logits this large the softmax is nearly one-hot: each query attends to one key, the "
                      "softmax's gradient vanishes and the attention stops learning (Zhai et al. 2023)")
    remedies = (QK_NORM, LOWER_LR, SIGMA_REPARAM) if not qk_norm else (LOWER_LR, SIGMA_REPARAM, QK_NORM)
    layers = _names(data, np.union1d(grown, collapsed))
    if len(grown):
        severity = "error" if len(collapsed) else "warning"
        return [Finding("attention_logit_growth", severity, "Attention logits growing"
                        + (" and attention entropy collapsing" if len(collapsed) else ""),
                        Evidence(tuple(summary), values, layers, steps), tuple(causes), remedies)]
    return [Finding("attention_entropy_collapse", "warning", "Attention entropy collapsing",
                    Evidence(tuple(summary), values, layers, steps), tuple(causes), remedies)]


def _first(series: Series, row: int) -> str:
    """'1.41 at step 0': a row's first measured value, where the growth started from."""
    col = int(np.flatnonzero(series.measured[row])[0])
    return f"{num(float(series.values[row, col]))} at step {int(series.steps[col])}"


def _onset(series: Series, rows: np.ndarray, early: np.ndarray) -> int:
    """The first measured step where one of `rows` is ATTN_GROWTH x its early median (NaN counts)."""
    v = np.where(np.isnan(series.values[rows]), np.inf, series.values[rows])
    past = series.measured[rows] & (v >= ATTN_GROWTH * early[rows][:, None])
    cols = np.flatnonzero(past.any(axis=0))
    return int(series.steps[cols[0]]) if len(cols) else int(series.steps[-1])


# ---------------------------------------------------------------------------------- output logits


def output_logit_divergence(data: RunData) -> list[Finding]:
    """The output layer's mean log-partition log Z drifting far from 0 and still moving away."""
    logz = data.layer.get("logit_logz")
    if logz is None or logz.values.size == 0:
        return []
    early, late, third, _ = _quarters(logz, largest=True)
    hits = [int(r) for r in np.flatnonzero(np.isfinite(early))
            if not np.isfinite(late[r])  # the logits overflowed
            or (abs(late[r]) >= max(LOGZ_LIMIT, abs(early[r]) + LOGZ_DRIFT) and abs(late[r]) >= abs(third[r]))]
    if not hits:
        return []
    r = hits[0]
    steps = (int(logz.steps[0]), int(logz.steps[-1]))
    summary = [f"log Z (the mean logsumexp of {data.layers[r].name}'s logits) went from {num(float(early[r]))} to "
               f"{num(float(late[r]))} (medians of the first and last quarter of {span(*steps)}), and is not "
               "coming back"]
    values = {"value": float(late[r]), "threshold": LOGZ_LIMIT, "logz_early": float(early[r]),
              "logz_late": float(late[r])}
    top = data.layer.get("logit_max")
    if top is not None and top.values.size:
        _, top_late, _, _ = _quarters(top, largest=True)
        if not np.isnan(top_late[r]):
            summary.append(f"the max logit reached {num(float(top_late[r]))}")
            values["logit_max_late"] = float(top_late[r])
    causes = ("nothing anchors the logits' level: cross-entropy does not change when every logit moves together, "
              "so as the model grows confident its logits, and log Z with them, drift without bound (in 16-bit "
              "precision large logits lose their differences)",
              _lr_cause(data, "each step moves the logits further"),
              "the output layer excluded from weight decay, or no weight decay at all")
    remedies = (Z_LOSS, "weight decay on the output layer (for example 0.1 with AdamW; do not exclude the head "
                "from it)", LOWER_LR)
    severity = "error" if not np.isfinite(late[r]) else "warning"
    return [Finding("output_logit_divergence", severity, "Output logits diverging (log Z drifting from 0)",
                    Evidence(tuple(summary), values, (data.layers[r].name,), steps), causes, remedies)]


# ---------------------------------------------------------------------------------- activation scale


def _blocks(data: RunData) -> tuple[np.ndarray, Series, Series] | None:
    rms, top = data.layer.get("act_rms"), data.layer.get("act_absmax")
    if rms is None or top is None or rms.values.size == 0 or rms.values.shape != top.values.shape:
        return None
    rows = np.flatnonzero(rms.measured.any(axis=1))
    return (rows, rms, top) if len(rows) else None


def activation_outliers(data: RunData) -> list[Finding]:
    """Residual blocks whose max |x| / RMS grew OUTLIER_GROWTH-fold past OUTLIER_LIMIT, or reached
    MASSIVE_RATIO: a few activations far above all the others."""
    found = _blocks(data)
    if found is None:
        return []
    rows, rms, top = found
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = Series(rms.steps, np.where(top.values == 0, 0.0, top.values / rms.values), rms.present)
    early, late, _, _ = _quarters(ratio)
    with np.errstate(divide="ignore", invalid="ignore"):
        growth = late / early
    massive = [int(r) for r in rows if late[r] >= MASSIVE_RATIO]
    grown = [int(r) for r in rows if growth[r] >= OUTLIER_GROWTH and late[r] >= OUTLIER_LIMIT]
    hits = sorted(set(massive) | set(grown))
    if not hits:
        return []
    worst = max(hits, key=lambda r: late[r])
    _, top_late, _, _ = _quarters(top, largest=True)
    _, rms_late, _, _ = _quarters(rms)
    steps = (int(rms.steps[0]), int(rms.steps[-1]))
    summary = (f"max |x| / RMS of {data.layers[worst].name}'s output went from {num(float(early[worst]))} to "
               f"{num(float(late[worst]))} (max |x| {num(float(top_late[worst]))}, RMS {num(float(rms_late[worst]))}; "
               f"medians of the first and last quarter of {span(*steps)}); Gaussian outputs stay near 4 to 6",
               "by layer: " + listing([f"{data.layers[r].name} {num(float(early[r]))} -> {num(float(late[r]))}"
                                       for r in hits]))
    values = {"value": float(late[worst]), "threshold": OUTLIER_LIMIT, "outlier_early": float(early[worst]),
              "outlier_late": float(late[worst]), "absmax_late": float(top_late[worst]), "layers": float(len(hits))}
    causes = ("a few residual-stream channels (or tokens: the first token, delimiters) take values far above the rest: "
              "massive activations (Sun et al. 2024), which the model uses as attention sinks and fixed biases; they "
              "grow over training with Adam at a high learning rate",
              _lr_cause(data, "outlier features grow faster with it (He et al. 2024)"))
    remedies = (LOWER_LR,
                "give attention an explicit place to put its weight: a learnable key/value bias per head (Sun et al. "
                "2024), or softmax with an extra zero logit (softmax-plus-one)",
                "weight decay on every weight matrix, and keep 16-bit or 8-bit formats off these activations (they "
                "break low-precision training and quantisation)")
    severity = "error" if massive else "warning"
    return [Finding("activation_outliers", severity, "Massive activations: outliers growing in the residual stream",
                    Evidence(summary, values, tuple(data.layers[r].name for r in hits), steps), causes, remedies)]


def residual_growth(data: RunData) -> list[Finding]:
    """The residual stream's RMS multiplying with depth: the last block's at least RESIDUAL_RATIO
    and RESIDUAL_PER_BLOCK x (number of blocks) times the first's, at some measured step."""
    found = _blocks(data)
    if found is None or len(found[0]) < RESIDUAL_MIN_BLOCKS:
        return []
    rows, rms, _ = found
    first, last = rms.values[rows[0]].astype(np.float64), rms.values[rows[-1]].astype(np.float64)
    both = rms.measured[rows[0]] & rms.measured[rows[-1]] & np.isfinite(first) & (first > 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = np.where(np.isnan(last), np.inf, last) / first
    limit = max(RESIDUAL_RATIO, RESIDUAL_PER_BLOCK * len(rows))
    cols = np.flatnonzero(both & (ratio >= limit))
    if not len(cols):
        return []
    c, n = cols[0], len(rows)
    factor = float(ratio[c] ** (1.0 / (n - 1))) if np.isfinite(ratio[c]) else float("inf")
    column = rms.values[rows, c]
    steps = (int(rms.steps[cols[0]]), int(rms.steps[cols[-1]]))
    summary = (f"at step {int(rms.steps[c])} the residual stream's RMS grew x{num(float(ratio[c]))} over "
               f"{plural(n, 'block')}, from {num(float(first[c]))} ({data.layers[rows[0]].name}) to "
               f"{num(float(last[c]))} ({data.layers[rows[-1]].name}): x{num(factor)} per block",
               "RMS by layer: " + listing([f"{data.layers[r].name} {num(float(v))}" for r, v in zip(rows, column)]))
    if both.sum() > 1:
        summary += (f"as much on {plural(len(cols), 'measured step')} of {plural(int(both.sum()), 'measured step')}",)
    values = {"value": float(ratio[c]), "threshold": limit, "per_block_factor": factor, "blocks": float(n),
              "first_rms": float(first[c]), "last_rms": float(last[c]), "onset_step": float(rms.steps[c])}
    blocks = [data.layers[r] for r in rows]
    normed = any(ly.is_norm for ly in _inside(data, blocks))
    causes = []
    if not normed:
        causes.append(f"no normalisation in the blocks: none of the {plural(n, 'block')} has a norm layer, so each "
                      "adds a branch as large as the stream itself and the stream multiplies instead of adding up")
    large = init_cause(data, "large", "so each block's branch comes out larger than its input")
    causes.append(large or "residual branches initialised too large: their output projections are not scaled down "
                           "with depth (GPT-2 scales them by 1/sqrt(2 x blocks))")
    causes.append(_lr_cause(data, "updates inflate every branch at once"))
    remedies = ("pre-LayerNorm blocks: x = x + f(LayerNorm(x)), and a final LayerNorm before the head",
                "scale each residual branch's output projection by 1/sqrt(2 x blocks) at init (GPT-2), or give each "
                "branch a learnable scale that starts small (ReZero, LayerScale)",
                LOWER_LR)
    return [Finding("residual_growth", "error", "Residual stream RMS exploding with depth",
                    Evidence(summary, values, tuple(ly.name for ly in blocks), steps), tuple(causes), remedies)]


#: This module's rules, in the order their findings of equal severity are reported.
TRANSFORMER_RULES = (attention_logit_growth, output_logit_divergence, residual_growth, activation_outliers)
