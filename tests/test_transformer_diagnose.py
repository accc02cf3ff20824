"""The transformer rules on small real training jobs that have their problem, and silent on the
same model with the remedy or a sane learning rate.

A two-block decoder-only transformer (width 32, 4 heads) learns a successor task (each token is
the previous one plus 1) with Adam on the CPU under `gradwatch.watch`; the store reads the runs
through the same loader as `gradwatch diagnose`. At a learning rate of 0.3 without QK-norm its
max attention logit grows from 1.4 to about 10^6 and its attention entropy collapses to 0 while
the loss stalls near 2.4; with
QK-norm the same model learns the task, but its log Z drifts past 50, which z-loss prevents; at
3e-3 it learns with nothing to report. An eight-block stack without normalisation and with He
init multiplies the residual stream's RMS by about 4 per block (pre-LN: silent), and four blocks
trained at 3e-2 with a fixed first token grow activation outliers (at 2e-3: silent). Each job
trains in 2 to 8 s on one core.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradwatch.diagnose import Finding, LayerInfo, RunData, Series, diagnose
from gradwatch.diagnose import transformer as tr
from gradwatch.diagnose.load import load_run_data
from tests.fixtures import training
from tests.fixtures.findings_text import check_text
from tests.fixtures.training import Job, cross_entropy

RULE_IDS = {"attention_logit_growth", "attention_entropy_collapse", "output_logit_divergence", "residual_growth",
            "activation_outliers"}
VOCAB, SEQ = 32, 32


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.q_norm = nn.LayerNorm(d // heads) if qk_norm else None
        self.k_norm = nn.LayerNorm(d // heads) if qk_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, qk_norm: bool, norm: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d) if norm else nn.Identity()
        self.ln2 = nn.LayerNorm(d) if norm else nn.Identity()
        self.attn = Attention(d, heads, qk_norm)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class LM(nn.Module):
    """Token and position embeddings, pre-LN blocks (or none), a final norm and a head."""

    def __init__(self, blocks: int = 2, qk_norm: bool = False, norm: bool = True, he: bool = False) -> None:
        super().__init__()
        d = 32
        self.tok, self.pos = nn.Embedding(VOCAB, d), nn.Embedding(SEQ, d)
        self.blocks = nn.ModuleList([Block(d, 4, qk_norm, norm) for _ in range(blocks)])
        self.ln_f = nn.LayerNorm(d) if norm else nn.Identity()
        self.head = nn.Linear(d, VOCAB)
        if he:  # He init everywhere: without normalisation each block multiplies the stream
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.kaiming_normal_(m.weight)
                    nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def successor(step: int, first_fixed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """16 sequences where each token is the previous one plus 1 (mod the vocabulary); with
    `first_fixed` the first token is always 0, a fixed start the model can park attention on."""
    g = torch.Generator().manual_seed(step)
    x = (torch.randint(0, VOCAB, (16, 1), generator=g) + torch.arange(SEQ + 1)) % VOCAB
    if first_fixed:
        x[:, 0] = 0
    return x[:, :-1], x[:, 1:]


def z_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return cross_entropy(out, y) + 1e-4 * torch.logsumexp(out, dim=-1).pow(2).mean()


def adam(lr: float):
    return lambda model: torch.optim.Adam(model.parameters(), lr=lr)


JOBS = {job.name: job for job in (
    Job("lm-lr0.3", lambda: LM(), successor, cross_entropy, adam(0.3), 200),
    Job("lm-lr0.3-qknorm", lambda: LM(qk_norm=True), successor, cross_entropy, adam(0.3), 200),
    Job("lm-lr0.3-qknorm-zloss", lambda: LM(qk_norm=True), successor, z_loss, adam(0.3), 200),
    Job("lm-lr3e-3", lambda: LM(), successor, cross_entropy, adam(3e-3), 200),
    Job("deep-no-norm", lambda: LM(blocks=8, norm=False, he=True), successor, cross_entropy, adam(3e-3), 10),
    Job("deep-pre-ln", lambda: LM(blocks=8, he=True), successor, cross_entropy, adam(3e-3), 10),
    Job("sink-lr3e-2", lambda: LM(blocks=4), lambda s: successor(s, True), cross_entropy, adam(3e-2), 300),
    Job("sink-lr2e-3", lambda: LM(blocks=4), lambda s: successor(s, True), cross_entropy, adam(2e-3), 300),
)}


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("transformer") / "home"


@pytest.fixture(scope="module")
def runs(home):
    """Trains each job the first time a test asks for it; returns (store, run id)."""
    yield from training.trained_runs(JOBS, home)


def findings(runs, name: str) -> dict[str, Finding]:
    store, run_id = runs(name)
    found = diagnose(load_run_data(store, run_id))
    for f in found:
        check_text(f)
    return {f.id: f for f in found if f.id in RULE_IDS}


def test_attention_logits_grow_and_entropy_collapses_without_qk_norm(runs):
    found = findings(runs, "lm-lr0.3")
    f = found["attention_logit_growth"]
    assert f.severity == "error" and f.evidence.values["value"] >= 100
    assert f.evidence.values["entropy_late"] < 0.1 * f.evidence.values["entropy_early"]
    assert "blocks.0.attn" in f.evidence.layers
    assert f.causes[0].startswith("no QK normalisation") and "peak 0.3" in f.causes[1]
    assert f.remedies[0].startswith("QK-layernorm") and any("σReparam" in r for r in f.remedies)
    assert any("warmup" in r for r in f.remedies)


def test_qk_norm_keeps_attention_quiet_but_log_z_drifts(runs):
    found = findings(runs, "lm-lr0.3-qknorm")
    assert "attention_logit_growth" not in found and "attention_entropy_collapse" not in found
    f = found["output_logit_divergence"]
    assert f.severity == "warning" and f.evidence.values["logz_late"] >= tr.LOGZ_LIMIT
    assert f.evidence.layers == ("head",)
    assert f.remedies[0].startswith("z-loss") and "1e-4" in f.remedies[0]
    assert any("weight decay on the output layer" in r for r in f.remedies)


def test_z_loss_keeps_log_z_near_zero(runs):
    assert "output_logit_divergence" not in findings(runs, "lm-lr0.3-qknorm-zloss")


def test_a_sane_learning_rate_has_nothing_to_report(runs):
    store, run_id = runs("lm-lr3e-3")
    loss = store.run_series(run_id, "loss").values
    assert loss[-10:].mean() < 0.1 < loss[:10].mean()  # it learns the task
    assert findings(runs, "lm-lr3e-3") == {}


def test_a_residual_stream_without_normalisation_explodes_with_depth(runs):
    found = findings(runs, "deep-no-norm")
    f = found["residual_growth"]
    assert f.severity == "error" and f.evidence.values["per_block_factor"] > 2
    assert f.evidence.values["onset_step"] == 0 and len(f.evidence.layers) == 8
    assert f.causes[0].startswith("no normalisation in the blocks")
    assert f.remedies[0].startswith("pre-LayerNorm")
    assert "residual_growth" not in findings(runs, "deep-pre-ln")


@pytest.mark.slow  # two jobs of about 8 s each on one core
def test_outliers_grow_at_a_high_learning_rate(runs):
    f = findings(runs, "sink-lr3e-2")["activation_outliers"]
    assert f.severity == "warning" and f.evidence.values["value"] >= tr.OUTLIER_LIMIT
    assert f.evidence.values["outlier_late"] >= tr.OUTLIER_GROWTH * f.evidence.values["outlier_early"]
    assert "activation_outliers" not in findings(runs, "sink-lr2e-3")


# ---------------------------------------------------------------------------------- on arrays


LAYERS = (LayerInfo(0, "blocks.0", "Block", "block"), LayerInfo(1, "blocks.0.attn", "Attention", "attention"),
          LayerInfo(2, "blocks.1", "Block", "block"), LayerInfo(3, "blocks.1.attn", "Attention", "attention"),
          LayerInfo(4, "blocks.2", "Block", "block"), LayerInfo(5, "head", "Linear", "param"))


def _matrix(steps: np.ndarray, rows: dict[int, np.ndarray]) -> Series:
    values = np.full((len(LAYERS), len(steps)), np.nan)
    present = np.zeros(values.shape, dtype=bool)
    for row, v in rows.items():
        values[row], present[row] = v, True
    return Series(steps, values, present)


def test_a_window_that_does_not_start_at_zero_and_nan_logits():
    """A live window (steps 1000-1190): a max logit that turns NaN counts as past every limit."""
    steps = np.arange(1000, 1200, 10)
    grows = np.concatenate([np.full(10, 2.0), np.full(9, 500.0), [np.nan]])
    data = RunData("r", "lm", LAYERS, layer={
        "attn_logit_max": _matrix(steps, {1: grows, 3: np.full(20, 3.0)}),
        "attn_entropy": _matrix(steps, {1: np.linspace(2.0, 0.01, 20), 3: np.full(20, 2.0)})})
    f = {x.id: x for x in tr.attention_logit_growth(data)}["attention_logit_growth"]
    assert f.severity == "error" and f.evidence.layers == ("blocks.0.attn",)
    assert f.evidence.values["value"] == pytest.approx(250.0) and f.evidence.values["onset_step"] == 1100
    assert f.evidence.steps == (1000, 1190)
    steady = RunData("r", "lm", LAYERS, layer={"attn_logit_max": _matrix(steps, {1: np.full(20, 20.0)})})
    assert tr.attention_logit_growth(steady) == []


def test_entropy_collapse_alone_and_too_few_steps():
    steps = np.arange(0, 80, 10)
    data = RunData("r", "lm", LAYERS, layer={"attn_logit_max": _matrix(steps, {1: np.full(8, 8.0)}),
                                             "attn_entropy": _matrix(steps, {1: np.linspace(2.0, 0.1, 8)})})
    (f,) = tr.attention_logit_growth(data)
    assert (f.id, f.severity) == ("attention_entropy_collapse", "warning") and f.evidence.values["threshold"] == 0.2
    short = RunData("r", "lm", LAYERS, layer={"attn_entropy": _matrix(steps[:3], {1: np.array([2.0, 1.0, 0.0])}),
                                              "attn_logit_max": _matrix(steps[:3], {1: np.array([1.0, 50.0, 500.0])})})
    assert tr.attention_logit_growth(short) == []  # fewer than MIN_MEASURED steps: no judgement


def test_residual_growth_needs_three_blocks_and_outliers_need_growth():
    steps = np.array([0, 10])
    rms = _matrix(steps, {0: np.array([1.0, 1.0]), 2: np.array([4.0, 2.0]), 4: np.array([40.0, 3.0])})
    top = _matrix(steps, {0: np.array([5.0, 5.0]), 2: np.array([20.0, 10.0]), 4: np.array([200.0, 15.0])})
    (f,) = tr.residual_growth(RunData("r", "lm", LAYERS, layer={"act_rms": rms, "act_absmax": top}))
    assert f.evidence.values["onset_step"] == 0 and f.evidence.values["per_block_factor"] == pytest.approx(40 ** 0.5)
    assert tr.activation_outliers(RunData("r", "lm", LAYERS, layer={"act_rms": rms, "act_absmax": top})) == []
    two = _matrix(steps, {0: np.array([1.0, 1.0]), 2: np.array([400.0, 400.0])})
    assert tr.residual_growth(RunData("r", "lm", LAYERS, layer={"act_rms": two, "act_absmax": two})) == []
