"""Attention statistics as pure tensor functions: the max attention logit and the attention
entropy of a sample of query rows and heads, from the tensors an attention layer computes.

An attention *logit* is what the softmax of attention sees: q·k·scale (scale 1/√d unless the
layer says otherwise) plus an additive mask, at the key positions the masks leave. A masked
position is not a logit: a boolean mask's excluded positions, those after the query under
`is_causal`, and every position whose additive mask (or, where only the softmax input is seen,
whose logit) is -inf or below half its dtype's lowest value (Hugging Face masks with the lowest
value). NaN and +Inf logits are kept: they are values.

The sample is `Sample`: evenly spaced batch items, heads and query positions, each a strided
slice, so taking it copies nothing and makes no index tensor on the host. `logit_stats` reduces
a sample to three 0-d float32 device tensors; nothing here reads a value back to the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Sample", "logit_stats", "mha_logits", "sample_of", "sdpa_logits", "softmax_logits", "spread"]


def spread(n: int, m: int) -> slice:
    """min(n, m) of the indices 0..n-1, evenly spaced with stride n // m and centred."""
    if m >= n:
        return slice(0, n, 1)
    stride = n // m
    start = (n - stride * (m - 1) - 1) // 2
    return slice(start, start + stride * (m - 1) + 1, stride)


@dataclass(frozen=True)
class Sample:
    """Which batch items, heads and query positions of a (batch, heads, queries, keys) logit
    tensor are measured: `rows` query rows in all (as many positions as fit, spread over as few
    batch items as that leaves: rows // positions of them), and up to `heads` heads."""

    batch: slice
    heads: slice
    queries: slice


def sample_of(batch: int, heads: int, queries: int, rows: int, max_heads: int) -> Sample:
    """The sample of `rows` query rows and at most `max_heads` heads (see `Sample`)."""
    positions = min(queries, rows)
    items = min(batch, max(1, rows // max(positions, 1)))
    return Sample(spread(batch, items), spread(heads, max_heads), spread(queries, positions))


def _as_4d(t: Tensor) -> Tensor | None:
    """(batch, heads, length, dim): a 3-D tensor gets a heads dim of 1; other ranks are not measured."""
    if t.dim() == 4:
        return t
    return t.unsqueeze(1) if t.dim() == 3 else None


def _indices(s: slice, n: int, device: torch.device) -> Tensor:
    """The indices of slice `s` of range(n) as a device tensor (made on the device: no copy)."""
    start, stop, step = s.indices(n)
    return torch.arange(start, stop, step, device=device)


def _masked(bound: Tensor) -> Tensor:
    """Where an additive mask (or a logit seen only as softmax input) excludes a position: -inf, or
    below half the lowest value of its dtype. NaN is not a mask."""
    return bound < torch.finfo(bound.dtype).min / 2


def sdpa_logits(q: Tensor, k: Tensor, attn_mask: Tensor | None, is_causal: bool, scale: float | None,
                rows: int, heads: int) -> tuple[Tensor, Tensor | None] | None:
    """The sampled logits of `F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=...,
    scale=...)` (float32, (items, heads, positions, keys)) and where they are logits (None: all).

    `attn_mask` is SDPA's: boolean True where a position takes part, or added to the logits.
    Keys with fewer heads than the queries (grouped-query attention) serve heads in groups.
    None for shapes SDPA's callers do not use (not 3-D or 4-D).
    """
    q4, k4 = _as_4d(q), _as_4d(k)
    if q4 is None or k4 is None or q.is_nested or k.is_nested:
        return None
    b, h, n_q, d = q4.shape
    n_k, h_kv = k4.shape[-2], k4.shape[1]
    if h % h_kv:
        return None
    s = sample_of(b, h, n_q, rows, heads)
    qs = q4[s.batch, s.heads, s.queries]
    if h_kv == h:
        ks = k4[s.batch, s.heads]
    else:
        ks = k4[s.batch].index_select(1, torch.div(_indices(s.heads, h, k.device), h // h_kv, rounding_mode="floor"))
    z = torch.matmul(qs.float(), ks.float().transpose(-2, -1)).mul_(1.0 / math.sqrt(d) if scale is None else scale)
    valid = None
    if is_causal:
        valid = torch.arange(n_k, device=q.device) <= _indices(s.queries, n_q, q.device).unsqueeze(-1)
    if attn_mask is not None:
        full = torch.broadcast_to(attn_mask, (*q.shape[:-1], n_k))
        m = (full if q.dim() == 4 else full.unsqueeze(1))[s.batch, s.heads, s.queries]
        if m.dtype == torch.bool:
            valid = m if valid is None else valid & m
        else:
            z.add_(m.float())
            keep = ~_masked(m)
            valid = keep if valid is None else valid & keep
    return z, valid


def softmax_logits(z: Tensor, heads_hint: int, rows: int, heads: int) -> tuple[Tensor, Tensor] | None:
    """The sampled logits of an attention softmax's input `z` over its last dim (eager attention:
    (batch, heads, queries, keys), or (batch·heads, queries, keys) with `heads_hint` heads) and
    where they are logits (`_masked`). None for other shapes."""
    if z.dim() == 3:
        n = z.shape[0]
        z = z.unflatten(0, (n // heads_hint, heads_hint)) if heads_hint > 1 and n % heads_hint == 0 else z.unsqueeze(1)
    if z.dim() != 4:
        return None
    b, h, n_q, _ = z.shape
    s = sample_of(b, h, n_q, rows, heads)
    zs = z[s.batch, s.heads, s.queries]
    return zs.float(), ~_masked(zs)


def mha_logits(query: Tensor, key: Tensor, num_heads: int, w_q: Tensor, w_k: Tensor, b_q: Tensor | None,
               b_k: Tensor | None, bias_k: Tensor | None, add_zero_attn: bool, key_padding_mask: Tensor | None,
               attn_mask: Tensor | None, rows: int, heads: int) -> tuple[Tensor, Tensor | None] | None:
    """The sampled logits of `nn.MultiheadAttention` from its inputs, recomputing q and k from the
    in-projection for the sampled heads, rows and batch items only.

    `query` is (batch, queries, embed) and `key` (batch, keys, kdim) (batch first); `w_q`,
    `w_k` are the q and k projections (embed, embed / kdim); `bias_k` and `add_zero_attn` append
    a key each, as the module does. Masks are the module's: boolean True where a position is
    excluded, or added to the logits; `attn_mask` (queries, keys) or (batch·heads, queries, keys),
    `key_padding_mask` (batch, keys).
    """
    b, n_q, e = query.shape
    n_k = key.shape[1]
    d = e // num_heads
    s = sample_of(b, num_heads, n_q, rows, heads)
    wq = w_q.view(num_heads, d, -1)[s.heads]
    wk = w_k.view(num_heads, d, -1)[s.heads]
    q = torch.einsum("bqe,hde->bhqd", query[s.batch, s.queries].float(), wq.float())
    k = torch.einsum("bke,hde->bhkd", key[s.batch].float(), wk.float())
    if b_q is not None:
        q = q + b_q.view(num_heads, 1, d)[s.heads].float()
    if b_k is not None:
        k = k + b_k.view(num_heads, 1, d)[s.heads].float()
    extra = []
    if bias_k is not None:
        extra.append(bias_k.reshape(num_heads, 1, d)[s.heads].float().expand(k.shape[0], -1, 1, d))
    if add_zero_attn:
        extra.append(k.new_zeros(k.shape[0], k.shape[1], 1, d))
    if extra:
        k = torch.cat([k, *extra], dim=2)
    z = torch.matmul(q, k.transpose(-2, -1)).mul_(1.0 / math.sqrt(d))
    masks = []
    if attn_mask is not None:
        full = attn_mask.unflatten(0, (b, num_heads)) if attn_mask.dim() == 3 else attn_mask.expand(b, num_heads,
                                                                                                    n_q, n_k)
        masks.append(full[s.batch, s.heads, s.queries])
    if key_padding_mask is not None:
        masks.append(key_padding_mask[s.batch].view(-1, 1, 1, n_k))
    valid = None
    for m in masks:
        if extra:  # the appended keys are never masked
            m = torch.cat([m, m.new_zeros(*m.shape[:-1], len(extra))], dim=-1)
        if m.dtype == torch.bool:
            keep = ~m
        else:
            z = z + m.float()
            keep = ~_masked(m)
        valid = keep if valid is None else valid & keep
    return z, valid


def logit_stats(z: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(max logit, sum of the rows' entropies, number of rows) of sampled logits `z` (float32,
    rows along all but the last dim) where `valid` (broadcastable, None: everywhere) holds.

    A row's entropy is -Σ p log p of its softmax over the valid positions. With d = z - max(z)
    over the row (d <= 0), it is logsumexp(d) + Σ p (-d): a sum of non-negative terms, so
    float32 keeps it to its last digits even where the logits are large. A row with no valid
    position is not a row (not counted). NaN or +Inf logits make the max and their rows'
    entropies NaN, as they should.
    """
    zm = z if valid is None else z.masked_fill(~valid, float("-inf"))
    top = zm.amax(dim=-1, keepdim=True)
    d = zm - top
    lse = torch.logsumexp(d, dim=-1)
    p = torch.exp(d - lse.unsqueeze(-1))
    if valid is None:
        entropy = lse - (p * d).sum(dim=-1)
        return top.amax(), entropy.sum(), torch.full((), float(lse.numel()), device=z.device)
    valid = valid.expand(z.shape)
    live = valid.any(dim=-1)
    entropy = (lse - (p * d.masked_fill(~valid, 0.0)).sum(dim=-1)).masked_fill(~live, 0.0)
    return top.amax(), entropy.sum(), live.sum(dtype=torch.float32)
