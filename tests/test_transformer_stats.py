"""Attention, output-logit and activation-scale statistics against plain-torch references on the
same tensors (for the sampled attention statistics, on the same sample), through `gradwatch.watch`
on small transformers: SDPA modules (causal, boolean and additive masks, grouped-query attention,
a custom scale), an eager softmax, `nn.MultiheadAttention` with masks, and Hugging Face GPT-2 and
Llama in their eager and SDPA implementations; two micro-batches per step, measured every other
step. The references compute full logits in float64, mask them with boolean masks and take
`torch.softmax` and `xlogy` entropies; the agent's path is sampled, float32 and sync-free.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from gradwatch.agent import runlog
from gradwatch.agent.attention import logit_stats, sample_of, sdpa_logits, softmax_logits, spread
from gradwatch.agent.config import ConfigError
from gradwatch.agent.layers import last_linear_params

EVERY_OTHER = {"measure": {"activation_every": 2, "flush_every": 4}}
FORWARD_METRICS = ("attn_logit_max", "attn_entropy", "logit_max", "logit_logz", "act_rms", "act_absmax",
                   "act_outlier")


def recorded(watcher: gradwatch.Watcher, metric: str) -> dict[str, dict[int, float]]:
    """layer name -> step -> value of `metric`, where measured, from the run log."""
    records = runlog.read_log(watcher.path)
    header = records[0]
    assert isinstance(header, runlog.Header)
    names = {e["index"]: e["name"] for e in header.info["layers"]}
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for frame in records:
        if not isinstance(frame, runlog.Frame):
            continue
        for block in frame.blocks:
            if block.metric.name != metric:
                continue
            for j, layer in enumerate(block.metric.indices):
                for step, value, present in zip(block.steps, block.values[:, j], block.present[:, j]):
                    if present:
                        out[names[layer]][int(step)] = float(value)
    return dict(out)


def header_metrics(watcher: gradwatch.Watcher) -> set[str]:
    header = runlog.read_log(watcher.path)[0]
    assert isinstance(header, runlog.Header)
    return {m.name for m in header.metrics}


# ---------------------------------------------------------------------------------- references


def reference_logits(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool,
                     mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Full float64 logits (batch, heads, queries, keys) and where they are logits: the plain way."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    z = (q.double() @ k.double().transpose(-1, -2)) * scale
    keep = torch.ones(z.shape, dtype=torch.bool)
    if causal:
        keep &= torch.ones(z.shape[-2:], dtype=torch.bool).tril()
    if mask is not None and mask.dtype == torch.bool:
        keep &= mask
    elif mask is not None:
        z = z + mask.double()
        keep &= mask > float("-inf")
    return z, keep


def reference_stats(z: torch.Tensor, keep: torch.Tensor, rows: int, heads: int) -> tuple[float, float, int]:
    """(max logit, sum of row entropies, rows) over the sample, from softmax probabilities."""
    s = sample_of(z.shape[0], z.shape[1], z.shape[2], rows, heads)
    z, keep = z[s.batch, s.heads, s.queries], keep[s.batch, s.heads, s.queries]
    live = keep.any(dim=-1)
    p = torch.softmax(z.masked_fill(~keep, float("-inf")), dim=-1)[live]
    return float(z[keep].max()), float(-torch.special.xlogy(p, p).sum()), int(live.sum())


def per_step(calls: list[tuple[float, float, int]]) -> tuple[float, float]:
    """A step's max logit and mean entropy over its calls (micro-batches)."""
    return max(c[0] for c in calls), sum(c[1] for c in calls) / sum(c[2] for c in calls)


# ---------------------------------------------------------------------------------- the sample


@pytest.mark.parametrize("n, m", [(10, 3), (10, 4), (10, 10), (10, 64), (7, 1), (128, 64), (3, 2)])
def test_the_sample_is_evenly_spaced_and_centred(n, m):
    picked = list(range(n))[spread(n, m)]
    assert len(picked) == min(n, m)
    gaps = set(np.diff(picked))
    assert len(gaps) <= 1  # evenly spaced
    assert abs(picked[0] - (n - 1 - picked[-1])) <= 1  # centred


def test_a_sample_spreads_its_rows_over_positions_first():
    s = sample_of(batch=16, heads=12, queries=128, rows=64, max_heads=16)
    assert len(range(16)[s.batch]) == 1 and len(range(128)[s.queries]) == 64 and len(range(12)[s.heads]) == 12
    s = sample_of(batch=16, heads=32, queries=10, rows=64, max_heads=16)
    assert len(range(16)[s.batch]) == 6 and len(range(10)[s.queries]) == 10 and len(range(32)[s.heads]) == 16


# ---------------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("case", ["plain", "causal", "bool", "float", "gqa", "scale", "three-d"])
def test_sdpa_logit_statistics_match_the_reference(case):
    g = torch.Generator().manual_seed(0)
    b, h, n, d = 3, 4, 9, 8
    q = torch.randn(b, h, n, d, generator=g) * 3
    k = torch.randn(b, 2 if case == "gqa" else h, n, d, generator=g) * 3
    mask, causal, scale = None, case in ("causal", "gqa", "three-d"), None
    if case == "bool":
        mask = torch.rand(b, 1, n, n, generator=g) > 0.3
        mask[0, 0, 2] = False  # a query that sees nothing: not a row
    elif case == "float":
        mask = torch.randn(1, h, n, n, generator=g).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    elif case == "scale":
        scale = 0.3
    if case == "three-d":
        q, k = q[:, 0], k[:, 0]
    for rows, heads in ((64, 16), (4, 2)):
        got = sdpa_logits(q, k, mask, causal, scale, rows, heads)
        assert got is not None
        top, entropy, count = logit_stats(*got)
        q4, k4 = (q[:, None], k[:, None]) if q.dim() == 3 else (q, k)
        z, keep = reference_logits(q4, k4, 1 / math.sqrt(d) if scale is None else scale, causal, mask)
        ref = reference_stats(z, keep, rows, heads)
        assert (float(top), float(entropy), int(count)) == pytest.approx(ref, rel=1e-5)


def test_softmax_inputs_masked_with_the_lowest_value_are_not_logits():
    """Hugging Face's eager attention masks with finfo.min, added to the scores or in their place."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 6, 6, generator=g) * 4
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    masked = z.masked_fill(~causal, torch.finfo(z.dtype).min)
    for source in (masked, z + (~causal) * torch.finfo(z.dtype).min):
        got = softmax_logits(source, 1, 64, 16)
        assert got is not None
        ref = reference_stats(z.double(), causal.expand(z.shape), 64, 16)
        assert tuple(float(x) for x in logit_stats(*got)) == pytest.approx(ref, rel=1e-5)


def test_nan_and_inf_logits_are_values_and_masked_ones_are_not():
    z = torch.zeros(1, 1, 3, 4)
    keep = torch.ones(1, 1, 3, 4, dtype=torch.bool)
    z[0, 0, 0, 3], keep[0, 0, 0, 3] = math.nan, False  # masked: ignored
    top, entropy, rows = logit_stats(z, keep)
    assert float(top) == 0.0 and float(entropy) == pytest.approx(math.log(4) * 2 + math.log(3)) and int(rows) == 3
    z[0, 0, 1, 1] = math.nan
    top, entropy, _ = logit_stats(z, keep)
    assert math.isnan(float(top)) and math.isnan(float(entropy))
    z[0, 0, 1, 1] = math.inf
    top, _, _ = logit_stats(z, keep)
    assert float(top) == math.inf


# ---------------------------------------------------------------------------------- models


class Attention(nn.Module):
    """Self-attention through F.scaled_dot_product_attention (or an eager softmax) that keeps the
    q, k and mask of every call, for the reference."""

    def __init__(self, d: int, heads: int, kind: str) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.kind = heads, 2 if kind == "gqa" else heads, kind
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d // heads * self.kv_heads)
        self.proj = nn.Linear(d, d)
        self.seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        dh = d // self.heads
        q = self.q(x).view(b, n, self.heads, dh).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.kv_heads, dh).permute(2, 0, 3, 1, 4)
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        mask: torch.Tensor | None = None
        if self.kind == "bool":
            mask = causal & (torch.arange(n, device=x.device) % 4 != 1)  # every fourth key padded
        elif self.kind == "float":
            slopes = torch.arange(1, self.heads + 1, device=x.device).view(-1, 1, 1) * 0.1
            distance = (torch.arange(n, device=x.device).view(-1, 1) - torch.arange(n, device=x.device)).float()
            mask = (-slopes * distance).masked_fill(~causal, -math.inf)  # ALiBi
        self.seen.append((q.detach().clone(), k.detach().clone(), mask))
        if self.kind == "eager":
            z = (q @ k.transpose(-1, -2)) / math.sqrt(dh)
            y = F.softmax(z.masked_fill(~causal, torch.finfo(z.dtype).min), dim=-1) @ v
        elif self.kind == "gqa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif self.kind == "scale":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, kind: str) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads, kind)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Embedding, two pre-LN blocks, a final LayerNorm and a head: a decoder-only transformer."""

    def __init__(self, kind: str = "causal", d: int = 16, heads: int = 4, vocab: int = 50) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d, heads, kind) for _ in range(2)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def capture(modules: dict[str, nn.Module]) -> dict[str, list[torch.Tensor]]:
    """Every output of the given modules (cleared by the caller at each step)."""
    out: dict[str, list[torch.Tensor]] = defaultdict(list)
    for name, module in modules.items():
        module.register_forward_hook(lambda m, i, o, name=name: out[name].append(o.detach().clone()))
    return out


def train_lm(model: nn.Module, config: dict[str, Any], steps: int = 6, micro: int = 2,
             before_step=None) -> gradwatch.Watcher:
    """`steps` AdamW steps of `micro` micro-batches of 3 sequences of 10 tokens; `before_step(step)`
    runs before each step's forward passes."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    with gradwatch.watch(model, opt, config=config) as watcher:
        for step in range(steps):
            if before_step is not None:
                before_step(step)
            for _ in range(micro):
                tokens = torch.randint(0, 50, (3, 11), generator=g)
                logits = model(tokens[:, :-1])
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).backward()
            opt.step()
            opt.zero_grad()
    assert watcher.errors == {}, watcher.errors
    return watcher


# ---------------------------------------------------------------------------------- through watch()


@pytest.mark.parametrize("kind", ["causal", "bool", "float", "gqa", "scale", "eager"])
@pytest.mark.parametrize("rows, heads", [(64, 16), (4, 2)], ids=["whole", "sampled"])
def test_attention_statistics_equal_the_reference_on_the_same_sample(kind, rows, heads):
    torch.manual_seed(0)
    model = TinyLM(kind)
    attention = {f"blocks.{i}.attn": block.attn for i, block in enumerate(model.blocks)}
    expected: dict[str, dict[int, tuple[float, float]]] = defaultdict(dict)

    def before_step(step: int) -> None:
        for name, module in attention.items():
            if step > 0 and (step - 1) % 2 == 0:  # the previous step was measured: its reference
                calls = []
                for q, k, mask in module.seen:
                    scale = 0.3 if kind == "scale" else 1 / math.sqrt(q.shape[-1])
                    z, keep = reference_logits(q, k, scale, mask is None or kind == "eager", mask)
                    calls.append(reference_stats(z, keep, rows, heads))
                expected[name][step - 1] = per_step(calls)
            module.seen.clear()

    config = {**EVERY_OTHER, "forward": {"attention_rows": rows, "attention_heads": heads}}
    watcher = train_lm(model, config, steps=6, before_step=before_step)
    before_step(6)
    top, entropy = recorded(watcher, "attn_logit_max"), recorded(watcher, "attn_entropy")
    assert set(top) == set(attention) and all(sorted(top[n]) == [0, 2, 4] for n in attention)
    for name in attention:
        for step, (ref_top, ref_entropy) in expected[name].items():
            assert top[name][step] == pytest.approx(ref_top, rel=1e-5), (name, step)
            assert entropy[name][step] == pytest.approx(ref_entropy, rel=1e-5), (name, step)


def test_logits_and_activation_scale_equal_the_reference():
    torch.manual_seed(0)
    model = TinyLM("causal")
    watched = {"head": model.head, "blocks.0": model.blocks[0], "blocks.1": model.blocks[1],
               "blocks.0.mlp.1": model.blocks[0].mlp[1], "blocks.1.mlp.2": model.blocks[1].mlp[2]}
    outputs = capture(watched)
    expected: dict[str, dict[int, dict[str, float]]] = defaultdict(dict)

    def before_step(step: int) -> None:
        if step > 0 and (step - 1) % 2 == 0:
            for name, ys in outputs.items():
                x = torch.cat([y.reshape(-1, y.shape[-1]) for y in ys]).double()
                rms, top = float(x.square().mean().sqrt()), float(x.abs().max())
                expected[name][step - 1] = {"act_rms": rms, "act_absmax": top, "act_outlier": top / rms,
                                            "logit_max": float(x.max()),
                                            "logit_logz": float(torch.logsumexp(x, dim=-1).mean())}
        outputs.clear()

    watcher = train_lm(model, EVERY_OTHER, before_step=before_step)
    before_step(6)
    wanted = {"head": ("logit_max", "logit_logz", "act_outlier"), "blocks.0": ("act_rms", "act_absmax", "act_outlier"),
              "blocks.1": ("act_rms", "act_absmax", "act_outlier"), "blocks.0.mlp.1": ("act_outlier",),
              "blocks.1.mlp.2": ("act_outlier",)}
    for name, metrics in wanted.items():
        for metric in metrics:
            got = recorded(watcher, metric)[name]
            assert sorted(got) == [0, 2, 4], (name, metric)
            for step, ref in expected[name].items():
                assert got[step] == pytest.approx(ref[metric], rel=1e-5), (name, metric, step)
    assert set(recorded(watcher, "act_rms")) == {"blocks.0", "blocks.1"}  # blocks only
    assert set(recorded(watcher, "logit_max")) == {"head"}
    assert "head" in recorded(watcher, "act_outlier") and "embed" in recorded(watcher, "act_outlier")


def test_multihead_attention_statistics_equal_its_own_weights():
    """nn.MultiheadAttention (sequence first, a key padding mask and a float attention mask): the
    agent recomputes q and k from the in-projection; the reference entropy comes from the
    probabilities the module itself returns, the reference max from plain q·k."""
    torch.manual_seed(0)
    d, heads, n, b = 16, 4, 7, 3
    layer = nn.MultiheadAttention(d, heads)
    model = nn.Sequential()
    model.attn = layer
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    padding = torch.zeros(b, n)
    padding[1, -2:] = -math.inf
    bias = torch.randn(n, n, generator=g).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    expected = {}
    with gradwatch.watch(model, opt, config={"measure": {"activation_every": 1}}) as watcher:
        for step in range(3):
            x = torch.randn(n, b, d, generator=g) * 2
            out, weights = layer(x, x, x, key_padding_mask=padding, attn_mask=bias, average_attn_weights=False)
            with torch.no_grad():  # before the update, as the measured forward saw the weights
                q, k, _ = F.linear(x, layer.in_proj_weight, layer.in_proj_bias).chunk(3, dim=-1)
                q, k = (t.permute(1, 0, 2).reshape(b, n, heads, d // heads).transpose(1, 2) for t in (q, k))
                z = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(d // heads) + bias.double()
                z = z + padding.double()[:, None, None, :]
                keep = (bias > -math.inf) & (padding[:, None, None, :] == 0)
                p = weights.double()
            expected[step] = (float(z[keep.expand(z.shape)].max()), float(-torch.special.xlogy(p, p).sum(-1).mean()))
            out.sum().backward()
            opt.step()
            opt.zero_grad()
    assert watcher.errors == {}
    top, entropy = recorded(watcher, "attn_logit_max")["attn"], recorded(watcher, "attn_entropy")["attn"]
    for step, (ref_top, ref_entropy) in expected.items():
        assert top[step] == pytest.approx(ref_top, rel=1e-5)
        assert entropy[step] == pytest.approx(ref_entropy, rel=1e-5)


def test_a_transformer_encoder_layer_is_measured():
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True),
                          nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, config={"measure": {"activation_every": 1}}) as watcher:
        model(torch.randn(2, 5, 16)).sum().backward()
        opt.step()
        snap = watcher.snapshot()
    assert snap["errors"] == {}
    layers = snap["layers"]
    for i in ("0", "1"):
        assert layers[f"{i}.self_attn"]["attn_entropy"] is not None and layers[i]["act_rms"] is not None


# ---------------------------------------------------------------------------------- Hugging Face


def _hf_model(family: str, impl: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16,
                                         bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                         attn_pdrop=0.0, attn_implementation=impl)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=32,
                                      attn_implementation=impl)
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hugging_face_attention_is_measured_the_same_in_eager_and_sdpa(family):
    """The eager path is read at its softmax, the SDPA path at F.scaled_dot_product_attention;
    both give the reference entropy of the probabilities the model returns (output_attentions)."""
    results = {}
    for impl in ("eager", "sdpa"):
        model = _hf_model(family, impl)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        tokens = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(0))
        with gradwatch.watch(model, opt, config={"measure": {"activation_every": 1}}) as watcher:
            model(tokens, labels=tokens).loss.backward()
            opt.step()
        assert watcher.errors == {}
        results[impl] = {m: recorded(watcher, m) for m in FORWARD_METRICS}
    eager, sdpa = results["eager"], results["sdpa"]
    assert set(eager["attn_entropy"]) == set(sdpa["attn_entropy"]) and len(eager["attn_entropy"]) == 2
    for metric in FORWARD_METRICS:
        for layer, values in eager[metric].items():
            assert sdpa[metric][layer][0] == pytest.approx(values[0], rel=1e-5), (metric, layer)
    assert set(eager["logit_logz"]) == {"lm_head"}
    reference = _hf_model(family, "eager")
    tokens = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = reference(tokens, output_attentions=True)
    for i, p in enumerate(out.attentions):
        layer = next(name for name in eager["attn_entropy"] if f".{i}." in name)
        ref = float(-torch.special.xlogy(p.double(), p.double()).sum(-1).mean())
        assert eager["attn_entropy"][layer][0] == pytest.approx(ref, rel=1e-5)
    logits = out.logits.double()
    assert eager["logit_logz"]["lm_head"][0] == pytest.approx(float(torch.logsumexp(logits, -1).mean()), rel=1e-5)
    assert eager["logit_max"]["lm_head"][0] == pytest.approx(float(logits.max()), rel=1e-5)


# ---------------------------------------------------------------------------------- detection, config


def test_a_model_without_attention_gets_only_the_outlier_measure():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, config={"measure": {"activation_every": 1}}) as watcher:
        model(torch.randn(5, 8)).sum().backward()
        opt.step()
    names = header_metrics(watcher)
    assert "act_outlier" in names and not names & {"attn_logit_max", "attn_entropy", "logit_max", "logit_logz",
                                                   "act_rms", "act_absmax"}
    header = runlog.read_log(watcher.path)[0]
    assert isinstance(header, runlog.Header)
    assert [e["role"] for e in header.info["layers"]] == [None, None, None]
    off = {"measure": {"activation_every": 1}, "forward": {"scale": False}}
    with gradwatch.watch(model, opt, config=off) as watcher:
        model(torch.randn(5, 8)).sum().backward()
        opt.step()
    assert not header_metrics(watcher) & set(FORWARD_METRICS)


def test_roles_are_detected_and_can_be_named():
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt) as watcher:
        roles = {ly.name: (ly.role, ly.kind) for ly in watcher.layers if ly.role}
    assert roles == {"blocks.0": ("block", "block"), "blocks.0.attn": ("attention", "attention"),
                     "blocks.1": ("block", "block"), "blocks.1.attn": ("attention", "attention"),
                     "head": ("logits", "param")}
    config = {"forward": {"attention_layers": ["blocks.1.attn"], "blocks": ["blocks"], "logits_layer": "head"}}
    with gradwatch.watch(model, opt, config=config) as watcher:
        assert [ly.name for ly in watcher.layers if ly.role == "attention"] == ["blocks.1.attn"]
    mlp = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    named = {"forward": {"logits_layer": "2"}}
    with gradwatch.watch(mlp, torch.optim.SGD(mlp.parameters(), lr=0.1), config=named) as w:
        assert [ly.name for ly in w.layers if ly.role == "logits"] == ["2"]


@pytest.mark.parametrize("key, value", [("logits_layer", "lm_hed"), ("blocks", ["layers"]),
                                        ("attention_layers", ["*.attention"])])
def test_a_name_that_matches_no_module_is_refused(key, value):
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=f"forward.{key} .* names no module"):
        gradwatch.watch(model, opt, config={"forward": {key: value}})


@pytest.mark.parametrize("forward", [{"attention_rows": 0}, {"attention_heads": 0}, {"logits_layer": ""}])
def test_bad_forward_settings_are_refused(forward):
    model = TinyLM()
    with pytest.raises(ConfigError, match="forward"):
        gradwatch.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), config={"forward": forward})


def test_a_tied_output_layer_is_measured_and_agc_still_excludes_the_last_linear():
    """A head tied to the embedding owns no parameter: it is a layer for its role only, and AGC
    keeps excluding the last Linear that has parameters, as before the head was a layer."""
    torch.manual_seed(0)
    model = TinyLM()
    model.head.weight = model.embed.weight
    model.head.register_parameter("bias", None)
    watcher = train_lm(model, {**EVERY_OTHER, "clip": {"mode": "agc"}}, steps=2, micro=1)
    head = next(ly for ly in watcher.layers if ly.name == "head")
    assert (head.kind, head.role, head.params) == ("logits", "logits", [])
    excluded = last_linear_params(watcher.layers, watcher.params)
    assert [t is p for t, p in zip(excluded, model.blocks[1].mlp[2].parameters())] == [True, True]
    assert recorded(watcher, "logit_logz")["head"][0] > 0


# ---------------------------------------------------------------------------------- cost


SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


def _sync_calls(model_fn, watched: bool, monkeypatch) -> int:
    """Calls of syncing Tensor methods during 3 measured training steps (forward, backward, step)."""
    calls = {"n": 0}
    originals = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def counting(name):
        def method(self, *args, **kwargs):
            calls["n"] += 1
            return originals[name](self, *args, **kwargs)
        return method

    model = model_fn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tokens = torch.randint(0, 50, (3, 11), generator=torch.Generator().manual_seed(0))
    watcher = gradwatch.watch(model, opt, config={"measure": {"activation_every": 1, "flush_every": 100}}) \
        if watched else None
    with monkeypatch.context() as patch:
        for name in SYNCING:
            patch.setattr(torch.Tensor, name, counting(name))
        for _ in range(3):
            logits = model(tokens[:, :-1])
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).backward()
            opt.step()
            opt.zero_grad()
    if watcher is not None:
        watcher.close()
        assert watcher.errors == {}
    return calls["n"]


@pytest.mark.parametrize("kind", ["causal", "bool", "eager", "mha"])
def test_measured_steps_add_no_host_sync(kind, monkeypatch):
    def make() -> nn.Module:
        torch.manual_seed(0)
        if kind != "mha":
            return TinyLM(kind)
        model = TinyLM()
        for block in model.blocks:
            mha = nn.MultiheadAttention(16, 4, batch_first=True)
            block.attn = _MHASelf(mha)
        return model

    assert _sync_calls(make, True, monkeypatch) == _sync_calls(make, False, monkeypatch)


class _MHASelf(nn.Module):
    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.mha = mha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        mask = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
        return self.mha(x, x, x, attn_mask=mask, need_weights=False)[0]


# ---------------------------------------------------------------------------------- torch.compile


@pytest.mark.slow  # about 20 s on one core: two dynamo traces of the model
def test_a_compiled_transformer_gets_the_output_statistics_but_no_attention_ones():
    """Under torch.compile (aot_eager) the output statistics go through the gradwatch::observe op
    and equal eager mode's; attention statistics are not measured (absent, not zero)."""
    from torch._dynamo.utils import counters

    def run(compiled: bool) -> tuple[gradwatch.Watcher, int]:
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = TinyLM()
        target = torch.compile(model, backend="aot_eager") if compiled else model
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(0)
        with gradwatch.watch(target, opt, config={"measure": {"activation_every": 2}}) as watcher:
            for _ in range(4):
                tokens = torch.randint(0, 50, (3, 11), generator=g)
                logits = target(tokens[:, :-1])
                F.cross_entropy(logits.reshape(-1, 50), tokens[:, 1:].reshape(-1)).backward()
                opt.step()
                opt.zero_grad()
        assert watcher.errors == {}
        return watcher, sum(counters["graph_break"].values())

    eager, _ = run(False)
    compiled, breaks = run(True)
    assert breaks == 0
    assert recorded(compiled, "attn_entropy") == {} and recorded(eager, "attn_entropy") != {}
    for metric in ("logit_max", "logit_logz", "act_rms", "act_absmax", "act_outlier"):
        want, got = recorded(eager, metric), recorded(compiled, metric)
        assert set(got) == set(want), metric
        for layer, values in want.items():
            assert sorted(got[layer]) == sorted(values) == [0, 2]
            for step, value in values.items():
                assert got[layer][step] == pytest.approx(value, rel=1e-4, abs=1e-6), (metric, layer, step)


# ---------------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["causal", "bool", "float", "gqa", "eager"])
def test_cuda_steps_make_no_host_sync_and_match_cpu(kind):
    def run(device: str) -> dict[str, dict[str, dict[int, float]]]:
        torch.manual_seed(0)
        model = TinyLM(kind).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, 50, (3, 11), generator=g).to(device) for _ in range(6)]
        with gradwatch.watch(model, opt, config={"measure": {"activation_every": 1}}) as watcher:
            for step, tokens in enumerate(batches):
                if device == "cuda" and step > 0:
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    logits = model(tokens[:, :-1])
                    F.cross_entropy(logits.reshape(-1, 50), tokens[:, 1:].reshape(-1)).backward()
                    opt.step()
                    opt.zero_grad()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
        assert watcher.errors == {}, watcher.errors
        return {m: recorded(watcher, m) for m in FORWARD_METRICS}

    gpu, cpu = run("cuda"), run("cpu")
    for metric, layers in cpu.items():
        for layer, values in layers.items():
            for step, value in values.items():
                assert gpu[metric][layer][step] == pytest.approx(value, rel=1e-3, abs=1e-5), (metric, layer, step)
