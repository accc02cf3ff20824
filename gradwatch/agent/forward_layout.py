"""Where the forward-pass statistics (attention, output logits, activation scale) live in the
statistics buffer, and how a window of them becomes run log blocks on the host.

The columns come after the activation columns, so a measured forward zeroes them with those;
the maxima sit together at the start of the range, and the first forward-pass measurement of a
step sets them to -inf (`ForwardStats`). Per layer, on the device:

| layer | max columns | sum columns |
|---|---|---|
| attention | max logit | entropy of the sampled rows, number of sampled rows |
| logits | max logit | Σ logsumexp over the positions |
| every measured layer | max \\|x\\| | Σx² (an activation layer's comes from its activation columns) |

The host divides by the counts it knows (output elements per layer, `HostRows.act_elems`).
Pure numpy on the host: the writer thread runs `add_blocks`, tests call it directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from gradwatch.agent.config import ForwardConfig
    from gradwatch.agent.layers import Layer

#: The metrics, by the layers they are recorded for (docs/runlog.md defines each).
ATTENTION_METRICS = ("attn_logit_max", "attn_entropy")
LOGIT_METRICS = ("logit_max", "logit_logz")
BLOCK_METRICS = ("act_rms", "act_absmax")
OUTLIER_METRIC = "act_outlier"

Add = Callable[[str, np.ndarray, np.ndarray, np.ndarray], None]


@dataclass
class ForwardColumns:
    """The layers each forward-pass statistic is recorded for, and (after `place`) their columns."""

    attention: tuple[int, ...]
    logits: int | None
    blocks: tuple[int, ...]
    scale: tuple[int, ...]  # layers whose outputs' scale is measured: act_outlier (and, for blocks, rms and max)
    derived: frozenset[int]  # of those, activation layers: their sum of squares is in the activation columns
    max_start: int = 0  # [max_start, max_stop): the max columns, set to -inf at a step's first measurement
    max_stop: int = 0
    attention_cols: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # max, entropy sum, rows
    logit_cols: tuple[int, int] = (0, 0)  # max, Σ logsumexp
    absmax_cols: dict[int, int] = field(default_factory=dict)
    sumsq_cols: dict[int, int] = field(default_factory=dict)
    vocab: int = 0  # the logits' last dim, known from the first measured call (0: none yet)

    @classmethod
    def of(cls, layers: Sequence[Layer], act_layers: Sequence[int], config: ForwardConfig) -> ForwardColumns | None:
        """The columns of a run's measured layers (`act_layers`), or None when it has none."""
        measured = [layers[i] for i in act_layers]
        columns = cls(tuple(ly.index for ly in measured if ly.role == "attention"),
                      next((ly.index for ly in measured if ly.role == "logits"), None),
                      tuple(ly.index for ly in measured if ly.role == "block"),
                      tuple(ly.index for ly in measured) if config.scale else (),
                      frozenset(ly.index for ly in measured if ly.family is not None))
        empty = not (columns.attention or columns.scale) and columns.logits is None
        return None if empty else columns

    def place(self, col: int) -> int:
        """Give every statistic its column from `col` on; returns the first column after them."""
        self.max_start = col
        for layer in self.attention:
            self.attention_cols[layer] = (col, 0, 0)
            col += 1
        if self.logits is not None:
            self.logit_cols = (col, 0)
            col += 1
        for layer in self.scale:
            self.absmax_cols[layer] = col
            col += 1
        self.max_stop = col
        for layer in self.attention:
            self.attention_cols[layer] = (self.attention_cols[layer][0], col, col + 1)
            col += 2
        if self.logits is not None:
            self.logit_cols = (self.logit_cols[0], col)
            col += 1
        for layer in self.scale:
            if layer not in self.derived:
                self.sumsq_cols[layer] = col
                col += 1
        return col

    def metrics(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, scope, layers) of every metric, in a fixed order."""
        defs = [(name, "layer", self.attention) for name in ATTENTION_METRICS if self.attention]
        defs += [(name, "layer", (self.logits,)) for name in LOGIT_METRICS if self.logits is not None]
        defs += [(name, "layer", self.blocks) for name in BLOCK_METRICS if self.blocks and self.scale]
        defs += [(OUTLIER_METRIC, "layer", self.scale)] if self.scale else []
        return defs

    def add_blocks(self, act_cols: dict[int, int], v: np.ndarray, counts: np.ndarray, elems: np.ndarray,
                   slot: dict[int, int], rows: np.ndarray, add: Add) -> None:
        """Blocks of the window's measured rows `rows`: `v` their values, `counts` / `elems` the
        calls and output elements per activation slot, `act_cols` the activation columns."""
        v = v.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if self.attention:
                cols = np.array([self.attention_cols[la] for la in self.attention])
                sampled = v[:, cols[:, 2]]
                add("attn_logit_max", rows, v[:, cols[:, 0]], sampled > 0)
                add("attn_entropy", rows, v[:, cols[:, 1]] / sampled, sampled > 0)
            if self.logits is not None and self.vocab:
                j = slot[self.logits]
                seen = (counts[:, j] > 0)[:, None]
                positions = elems[:, j] / self.vocab
                add("logit_max", rows, v[:, [self.logit_cols[0]]], seen)
                add("logit_logz", rows, (v[:, self.logit_cols[1]] / positions)[:, None], seen)
            if self.scale:
                self._scale_blocks(act_cols, v, counts, elems, slot, rows, add)

    def _scale_blocks(self, act_cols: dict[int, int], v: np.ndarray, counts: np.ndarray, elems: np.ndarray,
                      slot: dict[int, int], rows: np.ndarray, add: Add) -> None:
        idx = [slot[la] for la in self.scale]
        n = elems[:, idx].astype(np.float64)
        sumsq = np.stack([self._sumsq(la, act_cols, v, n[:, k]) for k, la in enumerate(self.scale)], axis=1)
        rms = np.sqrt(np.maximum(sumsq, 0.0) / n)
        top = v[:, [self.absmax_cols[la] for la in self.scale]]
        seen = counts[:, idx] > 0
        add(OUTLIER_METRIC, rows, np.where(top == 0, 0.0, top / rms), seen)
        if self.blocks:
            pick = [self.scale.index(la) for la in self.blocks]
            add("act_rms", rows, rms[:, pick], seen[:, pick])
            add("act_absmax", rows, top[:, pick], seen[:, pick])

    def _sumsq(self, layer: int, act_cols: dict[int, int], v: np.ndarray, n: np.ndarray) -> np.ndarray:
        """Σx² of a layer's outputs over `n` elements: its own column or, for an activation layer,
        from the shifted sums of its activation columns: S2 + 2 c S1 + n c² (c the shift, S1 =
        Σ(x - c), S2 = Σ(x - c)²)."""
        if layer in self.sumsq_cols:
            return v[:, self.sumsq_cols[layer]]
        c, s1, s2 = (v[:, act_cols[layer] + k] for k in range(3))
        return s2 + 2 * c * s1 + n * c * c
