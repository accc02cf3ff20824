"""The forward-pass measurements of modern networks: attention, output logits, activation scale.

On the steps that measure activations (`measure.activation_every`), with grad enabled:

- every measured layer's output: max |x| and Σx² (`measure`, called by the watcher's forward
  hook, so compiled models are measured too, through the `gradwatch::observe` op); on the
  logits layer, also the max logit and Σ logsumexp;
- attention layers: `nn.MultiheadAttention` through a forward pre-hook that recomputes q and k
  for the sample from the module's inputs and in-projection; any other attention module
  (Hugging Face's eager and SDPA paths, nanoGPT, torchtitan) through a `TorchFunctionMode`
  entered around its forward that sees its `F.scaled_dot_product_attention` calls (q, k, mask,
  `is_causal`, scale) and its attention softmax (whose input is the masked logits). Not under
  torch.compile, where Python modes and pre-hooks cannot act at run time: attention statistics
  of a compiled model are not measured (absent, not zero).

Values are staged through the watcher (sums) or written into its buffer row with
`torch.maximum` (maxima): no host synchronisation. The maths is in `attention` and `scale`,
the columns in `forward_layout`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from gradwatch.agent.attention import logit_stats, mha_logits, sdpa_logits, softmax_logits
from gradwatch.agent.forward_layout import ForwardColumns
from gradwatch.agent.scale import absmax, logit_sums
from gradwatch.agent.stats import norm32

if TYPE_CHECKING:
    from gradwatch.agent.config import AgentConfig, ForwardConfig
    from gradwatch.agent.layers import Layer

_SOFTMAX = (F.softmax, torch.softmax, Tensor.softmax)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")


class Host(Protocol):
    """What the forward-pass measurements use of the watcher."""

    step: int
    config: AgentConfig
    _buf: Tensor
    _flush_every: int
    _closed: bool

    def _init_act_row(self) -> None: ...
    def _stage(self, col: int, value: Tensor, kind: str = "sum") -> bool: ...
    def _count_error(self, where: str, exc: BaseException) -> None: ...


def compiling() -> bool:
    """Whether torch.compile is tracing (hooks then do nothing that changes between steps)."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    if is_compiling is None:  # torch < 2.3
        from torch._dynamo import is_compiling
    return bool(is_compiling())


class _Intercept(TorchFunctionMode):
    """Hands an attention module's SDPA and softmax calls to `seen` before running them."""

    def __init__(self, seen: Callable[[Any, tuple[Any, ...], dict[str, Any]], None]) -> None:
        super().__init__()
        self._seen = seen

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention or func in _SOFTMAX:
            self._seen(func, args, kwargs)
        return func(*args, **kwargs)


class ForwardStats:
    """The forward-pass statistics of one watcher: its hooks and their device work."""

    def __init__(self, layers: list[Layer], act_layers: list[int], config: ForwardConfig) -> None:
        self.config = config
        self.columns = ForwardColumns.of(layers, act_layers, config)
        self._attention = [layers[i] for i in (self.columns.attention if self.columns else ())]
        self._host: Host | None = None
        self._max_step = -1
        self._active: dict[int, _Intercept] = {}

    def attach(self, host: Host) -> list[RemovableHandle]:
        """Hook the attention layers; the outputs are measured through the watcher's hooks."""
        self._host = host
        handles = []
        for layer in self._attention:
            if isinstance(layer.module, nn.MultiheadAttention):
                handles.append(layer.module.register_forward_pre_hook(self._mha_hook(layer), with_kwargs=True))
                continue
            mode = _Intercept(self._attention_call(layer))
            handles.append(layer.module.register_forward_pre_hook(self._enter(layer.index, mode)))
            handles.append(layer.module.register_forward_hook(self._exit(layer.index), prepend=True,
                                                              always_call=True))
        return handles

    # ------------------------------------------------------------------ outputs

    @torch.no_grad()
    def measure(self, layer: int, y: Tensor) -> None:
        """A layer's output at a measured step: max |x| and Σx², and on the logits layer the max
        logit and Σ logsumexp. Called by the watcher after it initialised the step's row."""
        cols = self.columns
        if cols is None or y.numel() == 0 or (layer not in cols.absmax_cols and layer != cols.logits):
            return
        try:
            row = self._row()
            d = y.detach()
            col = cols.absmax_cols.get(layer)
            if col is not None:
                torch.maximum(row[col], absmax(d), out=row[col])
                if layer in cols.sumsq_cols:
                    self._stage(cols.sumsq_cols[layer], norm32(d), "norm")
            if layer == cols.logits and d.dim() and (not cols.vocab or d.shape[-1] == cols.vocab):
                cols.vocab = d.shape[-1]
                top, lse = logit_sums(d)
                torch.maximum(row[cols.logit_cols[0]], top, out=row[cols.logit_cols[0]])
                self._stage(cols.logit_cols[1], lse)
        except Exception as exc:
            self._error("forward_scale", exc)

    # ------------------------------------------------------------------ attention

    def _due(self) -> bool:
        """Whether this forward is measured: as the watcher's activation hooks decide, eagerly."""
        host = self._host
        return (host is not None and not host._closed and torch.is_grad_enabled()
                and host.step % host.config.measure.activation_every == 0 and not compiling())

    def _enter(self, index: int, mode: _Intercept) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: Any) -> None:
            if index not in self._active and self._due():
                mode.__enter__()
                self._active[index] = mode
        return pre_hook

    def _exit(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            mode = self._active.pop(index, None)
            if mode is not None:
                mode.__exit__(None, None, None)
        return hook

    def _attention_call(self, layer: Layer) -> Callable[[Any, tuple[Any, ...], dict[str, Any]], None]:
        rows, heads = self.config.attention_rows, self.config.attention_heads

        @torch.no_grad()
        def seen(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            try:
                if func is F.scaled_dot_product_attention:
                    a = {**dict(zip(_SDPA_ARGS, args)), **kwargs}
                    with torch.autocast(a["query"].device.type, enabled=False):
                        got = sdpa_logits(a["query"], a["key"], a.get("attn_mask"), bool(a.get("is_causal", False)),
                                          a.get("scale"), rows, heads)
                else:
                    z = args[0] if args else kwargs["input"]
                    dim = args[1] if len(args) > 1 else kwargs.get("dim")
                    if not (isinstance(z, Tensor) and z.is_floating_point() and z.dim() in (3, 4)
                            and dim in (-1, z.dim() - 1)):
                        return
                    got = softmax_logits(z.detach(), 1, rows, heads)
                if got is not None:
                    self._record(layer.index, *got)
            except Exception as exc:
                self._error("attention", exc)
        return seen

    def _mha_hook(self, layer: Layer) -> Callable[..., None]:
        module = layer.module
        assert isinstance(module, nn.MultiheadAttention)
        rows, heads = self.config.attention_rows, self.config.attention_heads

        def pre_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self._due():  # grad enabled: decided before no_grad
                with torch.no_grad():
                    measure(args, kwargs)

        def measure(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            try:
                a = {**dict(zip(_MHA_ARGS, args)), **kwargs}
                query, key, kpm = a["query"], a["key"], a.get("key_padding_mask")
                if query.dim() == 2:  # unbatched
                    query, key = query.unsqueeze(0), key.unsqueeze(0)
                    kpm = kpm.unsqueeze(0) if kpm is not None else None
                elif not module.batch_first:
                    query, key = query.transpose(0, 1), key.transpose(0, 1)
                e = module.embed_dim
                if module._qkv_same_embed_dim:
                    w_q, w_k = module.in_proj_weight[:e], module.in_proj_weight[e:2 * e]
                else:
                    w_q, w_k = module.q_proj_weight, module.k_proj_weight
                bias = module.in_proj_bias
                with torch.autocast(query.device.type, enabled=False):
                    z, valid = mha_logits(query.detach(), key.detach(), module.num_heads, w_q, w_k,
                                          None if bias is None else bias[:e], None if bias is None else bias[e:2 * e],
                                          module.bias_k, module.add_zero_attn, kpm, a.get("attn_mask"), rows, heads)
                self._record(layer.index, z, valid)
            except Exception as exc:
                self._error("attention", exc)
        return pre_hook

    def _record(self, layer: int, z: Tensor, valid: Tensor | None) -> None:
        """Add one call's sampled logits to the step's row."""
        assert self.columns is not None
        top, entropy, sampled = logit_stats(z, valid)
        col_max, col_entropy, col_rows = self.columns.attention_cols[layer]
        row = self._row()
        torch.maximum(row[col_max], top, out=row[col_max])
        self._stage(col_entropy, entropy)
        self._stage(col_rows, sampled)

    # ------------------------------------------------------------------ internals

    def _row(self) -> Tensor:
        """The buffer row of the step being measured, its activation columns initialised and, at
        the step's first forward-pass measurement, its max columns set to -inf."""
        host = self._host
        assert host is not None and self.columns is not None
        host._init_act_row()
        row = host._buf[host.step % host._flush_every]
        if self._max_step != host.step:
            row[self.columns.max_start:self.columns.max_stop].fill_(float("-inf"))
            self._max_step = host.step
        return row

    def _stage(self, col: int, value: Tensor, kind: str = "sum") -> None:
        assert self._host is not None
        self._host._stage(col, value, kind)

    def _error(self, where: str, exc: BaseException) -> None:
        if self._host is not None:
            self._host._count_error(where, exc)
