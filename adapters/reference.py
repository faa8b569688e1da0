"""Reference products of the adapter delta, for tests and benchmarks: serving and training
never import this module.

    with grouped(model, "token"):                          # every context layer of `model`
        logits = model.lm_forward(x, routing)
    with grouped(model, prefill="segment", decode="row"):  # decode steps: one token per row
        tokens = generate(model, features, bank, slots, limits)

A `Grouping` says how the gathered product groups a call's tokens:
  row      the production layer as it is (`adapters.layers`: the fast path at inference, the
           masked per-row product under autograd);
  segment  tokens sorted by (slot, context) once per call, one dense matmul per group on a
           contiguous slice, deltas scattered back with one index_add;
  token    per-token gather (B x T copies of A and B): the general reference.
The segment and token products read each module's weights straight from the routing's
`WeightSource`, not the fast path's per-unit gathers, and look up every token's (slot,
context) from the routing's contexts, not from its column plan: what they share with the fast
path is the routing's slots and contexts (`Routing.contexts_for`) and the rank trim
(`BatchWeights.rank`, `StackedWeights.trim_rank`). Per-token vectors (IA3, BitFit) cost one
[N, d] gather in both; they differ only in how the LoRA product is grouped.

`grouped` sets the forward of the model's `ContextLinear` modules for the duration of the
block (an instance attribute, removed on exit): for one thread, a test or a benchmark.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from adapters.layers import ContextLinear
from adapters.routing import Routing, current_routing
from adapters.weights import NUM_CONTEXTS, StackedWeights

Grouping = Literal["row", "segment", "token"]
GROUPINGS: tuple[Grouping, ...] = ("row", "segment", "token")


@contextlib.contextmanager
def grouped(model: nn.Module, prefill: Grouping, decode: Grouping | None = None) -> Iterator[None]:
    """Within the block, the context layers of `model` compute the adapter product grouped
    by `prefill`, and by `decode` (default: the same) for calls of one token per row (decode
    steps)."""
    decode = prefill if decode is None else decode
    if prefill == decode == "row":
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, ContextLinear)]
    if not layers:
        raise ValueError("the model has no context layers (ContextLinear)")
    previous = [vars(m).get("forward") for m in layers]
    for module in layers:
        vars(module)["forward"] = functools.partial(_forward, module, prefill, decode)
    try:
        yield
    finally:
        for module, forward in zip(layers, previous, strict=True):
            if forward is None:
                del vars(module)["forward"]
            else:
                vars(module)["forward"] = forward


def _forward(
    module: ContextLinear, prefill: Grouping, decode: Grouping, x: torch.Tensor
) -> torch.Tensor:
    grouping = decode if x.shape[1] == 1 else prefill
    routing = current_routing()
    if grouping == "row" or routing is None:
        return ContextLinear.forward(module, x)
    w = _weights(routing, module.layer, module.name)
    if w is None:
        return module.base(x)
    return gathered_forward(module.base, x, w, routing, segmented=grouping == "segment")


def _weights(routing: Routing, layer: int, module: str) -> StackedWeights | None:
    """The source's weights of every slot, LoRA trimmed to the batch's largest rank."""
    w = routing.source.stacked(layer, module)
    return None if w is None else w.trim_rank(routing.weights.rank())


def token_keys(routing: Routing, tokens: int) -> torch.Tensor:
    """slot * C + context of every token, flattened to [B * tokens]."""
    keys = routing.slots.unsqueeze(1) * NUM_CONTEXTS + routing.contexts_for(tokens)
    return keys.expand(-1, tokens).reshape(-1) if keys.shape[1] != tokens else keys.reshape(-1)


@dataclass(frozen=True)
class Segments:
    """Tokens sorted by key (slot * C + context): `order` [N] indexes the flattened tokens;
    `bounds` lists (key, start, end) of each run of equal keys in sorted order."""

    order: torch.Tensor
    bounds: list[tuple[int, int, int]]


# Per routing (one call) and token count: sorted once, shared by every layer of the call.
_SEGMENTS: weakref.WeakKeyDictionary[Routing, dict[int, Segments]] = weakref.WeakKeyDictionary()


def segments(routing: Routing, tokens: int) -> Segments:
    """The tokens of a call grouped by (slot, context). Once per call, not once per layer:
    it sorts and costs a device sync."""
    per_call = _SEGMENTS.setdefault(routing, {})
    found = per_call.get(tokens)
    if found is not None:
        return found
    keys = token_keys(routing, tokens)
    order = torch.argsort(keys, stable=True)
    uniq, counts = torch.unique_consecutive(keys[order], return_counts=True)
    bounds, start = [], 0
    for k, count in zip(uniq.tolist(), counts.tolist(), strict=True):
        bounds.append((k, start, start + count))
        start += count
    found = Segments(order, bounds)
    per_call[tokens] = found
    return found


def _flatten_sc(t: torch.Tensor) -> torch.Tensor:
    """[S, C, ...] -> [S * C, ...]"""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _token_lora(
    flat: torch.Tensor, w: StackedWeights, routing: Routing, tokens: int
) -> torch.Tensor:
    """Per-token gather: every token gets its own copy of A and B (B x T copies)."""
    assert w.lora_A is not None and w.lora_B is not None
    keys = token_keys(routing, tokens)
    a = _flatten_sc(w.lora_A)[keys]  # [N, d_in, R]
    b = _flatten_sc(w.lora_B)[keys]  # [N, R, d_out]
    return torch.bmm(torch.bmm(flat.unsqueeze(1), a), b).squeeze(1)


def _segment_lora(
    flat: torch.Tensor, w: StackedWeights, routing: Routing, tokens: int
) -> torch.Tensor:
    """Tokens sorted by key once per call; each run of one (slot, context) is a contiguous
    slice, multiplied by its own A and B; the deltas go back in one scatter-add."""
    assert w.lora_A is not None and w.lora_B is not None
    found = segments(routing, tokens)
    ordered = flat.index_select(0, found.order)
    lora_a, lora_b = _flatten_sc(w.lora_A), _flatten_sc(w.lora_B)
    delta = torch.cat([(ordered[s:e] @ lora_a[key]) @ lora_b[key] for key, s, e in found.bounds])
    return torch.zeros(
        flat.shape[0], delta.shape[1], dtype=delta.dtype, device=delta.device
    ).index_add(0, found.order, delta)


def gathered_forward(
    base: nn.Linear, x: torch.Tensor, w: StackedWeights, routing: Routing, segmented: bool
) -> torch.Tensor:
    """One context layer's output by the token or (`segmented`) the segment product."""
    batch, tokens, d_in = x.shape
    keys = token_keys(routing, tokens)
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
