"""Context adapter layers: wrap an LM's existing `nn.Linear` and add the adapter of each
token's (slot, context).

    y_t = W (x_t * l_in) + b                       base projection, once for the whole batch
        + ((x_t A_{s,c}) B_{s,c})                  Context-LoRA   (d_in x d_out never formed)
        + b'_{s,c}                                 Context-BitFit
    y_t = y_t * l_{s,c}                            Context-IA3    (k, v outputs; for down_proj
                                                   the input x_t is scaled instead: l_in)
    where s = slot of the token's row, c = context of the token.

Two implementations of the gathered product, one per mode:
  inference  the fast path (below);
  autograd   (training) the masked per-row product: both contexts' columns for every token,
             masked per token (differentiable).
Tests hold both to the reference products of `adapters.reference` (per-token gather,
per-segment products; not imported by serving or training) and to a float64 per-token
reference.

The fast path:
- each token is multiplied by its own context's A and B only: the call's columns are split
  into ranges where every row has one context (a prefill row is [BOS] + image + text, so
  its contexts are contiguous ranges), and only ranges whose rows disagree (left padding,
  image prefixes of different lengths) fall back to both contexts' columns, masked;
- one shrink product per shared-input group (q/k/v, gate/up): the members' A matrices sit
  side by side per unit, gathered once per batch, and the product is computed by the
  group's first member and reused by the others (`Routing.shrink_cache`);
- the expand product is written straight into the layer's output and the frozen base
  product is accumulated onto it (`addmm_`), so the output is written once, not added to;
- weights are gathered per unit (distinct slot), not per row. Decode steps (one context, a
  few tokens per row) group rows by unit, so each unit's weights are read once per step;
  longer calls gather per-row views of them for the call only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from adapters.routing import CallPlan, Routing, current_routing
from adapters.weights import GROUP_OF, MIXED, NUM_CONTEXTS, GroupWeights, StackedWeights


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
        if torch.is_grad_enabled():
            rows = routing.weights.rows(self.layer, self.name)
            return self.base(x) if rows is None else _masked_forward(self.base, x, rows, routing)
        return _fast_forward(self, x, routing)


def _drop_base_prefix(module: nn.Module, state: dict[str, Any], prefix: str, metadata: Any) -> None:
    for key in [k for k in state if k.startswith(prefix + "base.")]:
        state[prefix + key[len(prefix) + 5 :]] = state.pop(key)


def _add_base_prefix(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
    for name in ("weight", "bias"):
        if prefix + name in state:
            state[prefix + "base." + name] = state.pop(prefix + name)


# --- the fast path -------------------------------------------------------------------------
@dataclass
class _Shrunk:
    """A group's shrink product for one call: per column segment (or for the grid) the
    product x A, plus the per-row B views gathered for it (reused by the group's members
    and by segments of the same context). `layer`, `x` and `version` say which input it was
    computed from: the other members reuse it only for that very tensor, unmodified."""

    layer: int
    x: torch.Tensor
    version: int
    products: list[torch.Tensor]
    rows_B: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)


def _fast_forward(module: ContextLinear, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    batch, tokens, d_in = x.shape
    plan = routing.plan(tokens)
    vectors = routing.weights.vectors(module.layer, module.name)
    group = routing.weights.group(module.layer, module.name)
    if vectors is not None and vectors.ia3 is not None and vectors.ia3_on_input:
        x = _scale_input(x, vectors.ia3, plan, routing)
    base = module.base
    if group is None or module.name not in group.members:
        out = base(x)
    else:
        out = x.new_empty(batch, tokens, base.out_features)
        _write_lora(module, x, group, plan, routing, out)
        # The base product accumulates onto the delta: one pass over the output, not two.
        out.view(-1, base.out_features).addmm_(x.reshape(-1, d_in), base.weight.t())
        if base.bias is not None:
            out.add_(base.bias)
    if vectors is not None:
        if vectors.bias is not None:
            _per_token_(out, vectors.bias, plan, routing, torch.Tensor.add_)
        if vectors.ia3 is not None and not vectors.ia3_on_input:
            _per_token_(out, vectors.ia3, plan, routing, torch.Tensor.mul_)
    return out


def _shrink(x: torch.Tensor, group: GroupWeights, plan: CallPlan, routing: Routing) -> _Shrunk:
    """x A for every member of the group at once, per column segment: grid segments as
    [U, m * width, G*r] (rows grouped by unit), the others as [B, width, G*r (or G*C*r)]."""
    tokens = x.shape[1]
    products = []
    rows_A: dict[int, torch.Tensor] = {}
    for (start, end, context), grid in zip(plan.segments, plan.grid, strict=True):
        columns = x if len(plan.segments) == 1 else x[:, start:end]
        if grid:
            products.append(torch.bmm(_to_grid(columns, routing), group.a(context)))
            continue
        if context not in rows_A:
            rows_A[context] = routing.weights.rows_view(group.a(context))
        product = torch.bmm(columns, rows_A[context])
        if context == MIXED:
            members = len(group.members)
            product.mul_(routing.segment_mask(start, end, tokens, members, group.rank, x.dtype))
        products.append(product)
    return _Shrunk(group.layer, x, x._version, products)


def _to_grid(columns: torch.Tensor, routing: Routing) -> torch.Tensor:
    """[B, n, d] -> [U, m * n, d]: each unit's rows side by side (padding cells repeat a row;
    their results are never read)."""
    batch, _, d_in = columns.shape
    grid = routing.weights.grid()
    if grid.identity:
        return columns.reshape(grid.units, -1, d_in)
    cells = columns.reshape(batch, -1).index_select(0, grid.row_of_cell)
    return cells.view(grid.units, -1, d_in)


def _write_lora(
    module: ContextLinear,
    x: torch.Tensor,
    group: GroupWeights,
    plan: CallPlan,
    routing: Routing,
    out: torch.Tensor,
) -> None:
    """(x A) B of this module into every column of `out`."""
    # The group's first member computes the shrink product, the others find it here. Only
    # the latest layer's is kept per group, so a call holds one layer's products at a time.
    shared = GROUP_OF.get(module.name, (module.name,))
    shrunk = routing.shrink_cache.get(shared)
    if not (
        isinstance(shrunk, _Shrunk)
        and shrunk.layer == module.layer
        and shrunk.x is x
        and shrunk.version == x._version
    ):
        shrunk = _shrink(x, group, plan, routing)
        routing.shrink_cache[shared] = shrunk
    rank, member = group.rank, group.members.index(module.name)
    whole = len(plan.segments) == 1
    segments = zip(plan.segments, plan.grid, shrunk.products, strict=True)
    for (start, end, context), grid, product in segments:
        target = out if whole else out[:, start:end]
        width = rank if context != MIXED else NUM_CONTEXTS * rank
        h = product[..., member * width : (member + 1) * width]
        if grid:
            _expand_grid(h, group.b(module.name, context), routing, out, start, end, whole)
            continue
        key = (module.name, context)
        if key not in shrunk.rows_B:
            shrunk.rows_B[key] = routing.weights.rows_view(group.b(module.name, context))
        torch.bmm(h, shrunk.rows_B[key], out=target)


def _expand_grid(
    h: torch.Tensor,
    b: torch.Tensor,
    routing: Routing,
    out: torch.Tensor,
    start: int,
    end: int,
    whole: bool,
) -> None:
    """h [U, m * n, r] (rows grouped by unit) times b [U, r, d_out] into columns start..end
    of `out` [B, T, d_out], back in row order."""
    grid = routing.weights.grid()
    batch, _, d_out = out.shape
    if grid.identity and whole:
        torch.bmm(h, b, out=out.view(grid.units, -1, d_out))
        return
    delta = torch.bmm(h, b)
    if grid.identity:
        rows = delta.view(batch, end - start, d_out)
    else:
        flat = delta.view(grid.units * grid.per_unit, -1)
        if whole:
            torch.index_select(flat, 0, grid.cell_of_row, out=out.view(batch, -1))
            return
        rows = flat.index_select(0, grid.cell_of_row).view(batch, end - start, d_out)
    out[:, start:end].copy_(rows)


def _vectors(
    values: torch.Tensor,
    start: int,
    end: int,
    context: int,
    routing: Routing,
    tokens: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Per-row vectors [B, C, d] -> the vectors of columns start..end: [B, 1, d] for one
    context, [B, end - start, d] for a mixed range."""
    if context != MIXED:
        return values[:, context].unsqueeze(1)
    return torch.bmm(routing.segment_mask(start, end, tokens, 1, 1, dtype), values)


def _per_token_(
    out: torch.Tensor, values: torch.Tensor, plan: CallPlan, routing: Routing, op: Any
) -> None:
    """out[b, t] op= values[b, context(b, t)], in place, per column segment."""
    tokens = out.shape[1]
    for start, end, context in plan.segments:
        target = out if len(plan.segments) == 1 else out[:, start:end]
        op(target, _vectors(values, start, end, context, routing, tokens, out.dtype))


def _scale_input(
    x: torch.Tensor, values: torch.Tensor, plan: CallPlan, routing: Routing
) -> torch.Tensor:
    """x[b, t] * values[b, context(b, t)] (IA3 on the input side), as a new tensor."""
    tokens = x.shape[1]
    if len(plan.segments) == 1:
        start, end, context = plan.segments[0]
        return x * _vectors(values, start, end, context, routing, tokens, x.dtype)
    scaled = torch.empty_like(x)
    for start, end, context in plan.segments:
        v = _vectors(values, start, end, context, routing, tokens, x.dtype)
        torch.mul(x[:, start:end], v, out=scaled[:, start:end])
    return scaled


# --- the masked per-row path (autograd) ------------------------------------------------------
def _per_token(values: torch.Tensor, mask: torch.Tensor, uniform: int | None) -> torch.Tensor:
    """Per-row, per-context vectors [B, C, d] -> per-token vectors [B, T or 1, d]."""
    if uniform is not None:
        return values[:, uniform].unsqueeze(1)
    return torch.bmm(mask, values)


def _masked_forward(
    base: nn.Linear, x: torch.Tensor, w: StackedWeights, routing: Routing
) -> torch.Tensor:
    """Differentiable: per-row weights gathered once per batch, all contexts' LoRA columns
    side by side for every token, the other contexts' columns masked to zero."""
    uniform = routing.uniform_context()
    mask = routing.context_mask(x.dtype)
    if w.ia3 is not None and w.ia3_on_input:
        x = x * _per_token(w.ia3, mask, uniform)
    out = base(x)
    if w.lora_A is not None and w.lora_B is not None:
        if uniform is not None:
            h = torch.bmm(x, w.lora_A[:, uniform])
            b = w.lora_B[:, uniform]
        else:
            batch, _, d_in, rank = w.lora_A.shape
            a = w.lora_A.permute(0, 2, 1, 3).reshape(batch, d_in, NUM_CONTEXTS * rank)
            h = torch.bmm(x, a) * routing.context_mask(x.dtype, repeat=rank)
            b = w.lora_B.reshape(batch, NUM_CONTEXTS * rank, -1)
        out = torch.baddbmm(out, h, b)
    if w.bias is not None:
        out = out + _per_token(w.bias, mask, uniform)
    if w.ia3 is not None and not w.ia3_on_input:
        out = out * _per_token(w.ia3, mask, uniform)
    return out
