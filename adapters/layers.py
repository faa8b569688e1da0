"""Context adapter layers: wrap an LM's existing `nn.Linear` and add the adapter of each
token's (slot, context).

    y_t = W (x_t * l_in) + b                       base projection, once for the whole batch
        + ((x_t A_{s,c}) B_{s,c})                  Context-LoRA   (d_in x d_out never formed)
        + b'_{s,c}                                 Context-BitFit
    y_t = y_t * l_{s,c}                            Context-IA3    (k, v outputs; for down_proj
                                                   the input x_t is scaled instead: l_in)
    where s = slot of the token's row, c = context of the token.

Three implementations of the gathered product, chosen by `Routing.path`:
  row      per-row batched matmul: a row's weights are gathered once per batch (B copies,
           not B x T) and the delta is added in place (baddbmm). Fast path.
  segment  tokens sorted by (slot, context) once per call, one dense matmul per group on a
           contiguous slice, deltas scattered back with one index_add.
  token    per-token gather (B x T copies of A and B): the general reference.
All three agree to float tolerance; tests hold the fast paths to the reference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adapters.routing import NUM_CONTEXTS, Routing, StackedWeights, current_routing


class ContextLinear(nn.Module):
    """A frozen `nn.Linear` plus the routed adapter delta of layer `layer`, module `name`."""

    def __init__(self, base: nn.Linear, layer: int, name: str) -> None:
        super().__init__()
        self.base = base
        self.layer = layer
        self.name = name
        # Keep the wrapped LM's state dict in the Hugging Face layout ("q_proj.weight", not
        # "q_proj.base.weight"): the backbone's fingerprint and `Backbone.save` read it, and
        # they must not depend on whether context layers were injected.
        self.register_state_dict_post_hook(_drop_base_prefix)
        self.register_load_state_dict_pre_hook(_add_base_prefix)

    @property
    def in_features(self) -> int:
        return int(self.base.in_features)

    @property
    def out_features(self) -> int:
        return int(self.base.out_features)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = current_routing()
        if routing is None:
            return self.base(x)
        if routing.path == "row":
            rows = routing.row_weights(self.layer, self.name)
            return self.base(x) if rows is None else _row_forward(self.base, x, rows, routing)
        stacked = routing.weights(self.layer, self.name)
        if stacked is None:
            return self.base(x)
        return _gathered_forward(
            self.base, x, stacked, routing, segmented=routing.path == "segment"
        )


def _drop_base_prefix(module: nn.Module, state: dict[str, Any], prefix: str, metadata: Any) -> None:
    for key in [k for k in state if k.startswith(prefix + "base.")]:
        state[prefix + key[len(prefix) + 5 :]] = state.pop(key)


def _add_base_prefix(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
    for name in ("weight", "bias"):
        if prefix + name in state:
            state[prefix + "base." + name] = state.pop(prefix + name)


def _per_token(values: torch.Tensor, mask: torch.Tensor, uniform: int | None) -> torch.Tensor:
    """Per-row, per-context vectors [B, C, d] -> per-token vectors [B, T or 1, d]."""
    if uniform is not None:
        return values[:, uniform].unsqueeze(1)
    return torch.bmm(mask, values)


def _row_forward(
    base: nn.Linear, x: torch.Tensor, w: StackedWeights, routing: Routing
) -> torch.Tensor:
    uniform = routing.uniform_context()
    mask = routing.context_mask(x.dtype)
    if w.ia3 is not None and w.ia3_on_input:
        x = x * _per_token(w.ia3, mask, uniform)
    out = base(x)
    if w.lora_A is not None and w.lora_B is not None:
        grad = torch.is_grad_enabled()
        if uniform is not None:
            h = torch.bmm(x, w.lora_A[:, uniform])
            b = w.lora_B[:, uniform]
        else:
            # All contexts side by side: [B, d_in, C*R]; zero the columns of the other
            # contexts per token, then one matmul with the stacked B [B, C*R, d_out].
            batch, _, d_in, rank = w.lora_A.shape
            a = w.lora_A.permute(0, 2, 1, 3).reshape(batch, d_in, NUM_CONTEXTS * rank)
            h = torch.bmm(x, a) * routing.context_mask(x.dtype, repeat=rank)
            b = w.lora_B.reshape(batch, NUM_CONTEXTS * rank, -1)
        out = torch.baddbmm(out, h, b) if grad else out.baddbmm_(h, b)
    if w.bias is not None:
        out = out + _per_token(w.bias, mask, uniform)
    if w.ia3 is not None and not w.ia3_on_input:
        out = out * _per_token(w.ia3, mask, uniform)
    return out


def _flatten_sc(t: torch.Tensor) -> torch.Tensor:
    """[S, C, ...] -> [S * C, ...]"""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _token_lora(
    flat: torch.Tensor, w: StackedWeights, routing: Routing, tokens: int
) -> torch.Tensor:
    """Per-token gather: every token gets its own copy of A and B (B x T copies)."""
    assert w.lora_A is not None and w.lora_B is not None
    keys = routing.token_keys(tokens)
    a = _flatten_sc(w.lora_A)[keys]  # [N, d_in, R]
    b = _flatten_sc(w.lora_B)[keys]  # [N, R, d_out]
    return torch.bmm(torch.bmm(flat.unsqueeze(1), a), b).squeeze(1)


def _segment_lora(
    flat: torch.Tensor, w: StackedWeights, routing: Routing, tokens: int
) -> torch.Tensor:
    """Tokens sorted by key once per call; each run of one (slot, context) is a contiguous
    slice, multiplied by its own A and B; the deltas go back in one scatter-add."""
    assert w.lora_A is not None and w.lora_B is not None
    segments = routing.segments(tokens)
    ordered = flat.index_select(0, segments.order)
    lora_a, lora_b = _flatten_sc(w.lora_A), _flatten_sc(w.lora_B)
    delta = torch.cat([(ordered[s:e] @ lora_a[key]) @ lora_b[key] for key, s, e in segments.bounds])
    return torch.zeros(
        flat.shape[0], delta.shape[1], dtype=delta.dtype, device=delta.device
    ).index_add(0, segments.order, delta)


def _gathered_forward(
    base: nn.Linear, x: torch.Tensor, w: StackedWeights, routing: Routing, segmented: bool
) -> torch.Tensor:
    """The token and segment paths: per-token vectors (IA3, BitFit) cost one [N, d] gather
    either way; they differ only in how the LoRA product is grouped."""
    batch, tokens, d_in = x.shape
    keys = routing.token_keys(tokens)
    flat = x.reshape(-1, d_in)
    if w.ia3 is not None and w.ia3_on_input:
        flat = flat * _flatten_sc(w.ia3)[keys]
    out = base(flat)
    if w.lora_A is not None and w.lora_B is not None:
        out = out + (_segment_lora if segmented else _token_lora)(flat, w, routing, tokens)
    if w.bias is not None:
        out = out + _flatten_sc(w.bias)[keys]
    if w.ia3 is not None and not w.ia3_on_input:
        out = out * _flatten_sc(w.ia3)[keys]
    return out.reshape(batch, tokens, -1)
