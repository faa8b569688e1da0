"""Routing: which adapter slot and which context each token uses, passed with the forward.

A `Routing` is built per batch by the caller (engine or trainer) and handed to
`ContextPEFTModel` calls explicitly. The model makes it visible to the wrapped linear layers
only for the duration of that call through a `ContextVar`, which is private to the calling
thread (and asyncio task): two threads running forwards never see each other's routing, and
no module holds routing state between calls.

State lives at two lifetimes:
  batch  (`_Batch`, shared by `step` and narrowed by `select_rows`): the rows' slots on the
         host, the batch's LoRA rank, whether any slot is context-specific, the distinct slots
         ("units") and the grid that groups rows by unit, and each module group's adapter
         weights gathered once per unit (not per row);
  call   (`_Call`, one per forward): the token layout (which columns are image, which text),
         and the shared-input shrink product of the layer being computed.

Host facts. Everything a layer needs to know on the host (rank, context-specific or not,
which tokens are image, which unit each row uses) is computed once per batch or per call,
never per layer, and a caller that already knows it passes it in and pays no host sync at all:
`Routing.prefill(source, slots, image_spans, tokens)` for a prefill (each row's image tokens
form one range, every other token is text; rows may be left-padded), `Routing.decode(source,
slots)` or `routing.step()` for a decode step (every token is text), with `slots` as a host
list. `Routing(source, slots, contexts)` with a contexts tensor stays the general form: it
derives the layout from the tensor with one host sync per call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from adapters.config import CONTEXTS, IMAGE, TEXT

Path = Literal["row", "segment", "token"]
NUM_CONTEXTS = len(CONTEXTS)
MIXED = -1  # a column range whose tokens do not all have one context
# Projections of a Llama-family decoder layer that read the same input: one shrink product
# (x times the members' A matrices side by side) serves every member of a group.
SHARED_INPUT_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("o_proj",),
    ("gate_proj", "up_proj"),
    ("down_proj",),
)
GROUP_OF: dict[str, tuple[str, ...]] = {m: g for g in SHARED_INPUT_GROUPS for m in g}
# A layout split into more column ranges than this is multiplied as leading text, one masked
# range, trailing text: past that, kernel launches cost more than the halved product saves.
MAX_SEGMENTS = 5
# Column ranges of one context and at most this many tokens (decode steps, a prefill's [BOS]
# and short text) group rows by unit and read each unit's weights once; longer ranges gather
# per-row views of the weights for the call, which costs less than gathering their
# activations once a range is longer than about the LoRA rank.
GRID_MAX_TOKENS = 8

Segment = tuple[int, int, int]  # (start, end, context id or MIXED) of a column range


@dataclass(frozen=True)
class StackedWeights:
    """One module's adapter weights for S slots x C contexts. Absent components are None.

    lora_A [S, C, d_in, R]; lora_B [S, C, R, d_out] with the LoRA scaling folded in;
    bias [S, C, d_out] (BitFit); ia3 [S, C, d] (output side, or input side for down_proj).
    Neutral values (zero LoRA, zero bias, unit IA3) make a slot that does not use a component
    leave the output unchanged, so one forward can mix methods and ranks.
    """

    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    ia3: torch.Tensor | None = None
    ia3_on_input: bool = False

    def select(self, index: torch.Tensor) -> StackedWeights:
        """Rows `index` of the leading dimension: gathers per-row weights [B, C, ...] from
        per-slot ones, or keeps some rows of already gathered ones."""

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, index)

        return StackedWeights(
            pick(self.lora_A), pick(self.lora_B), pick(self.bias), pick(self.ia3), self.ia3_on_input
        )

    def trim_rank(self, rank: int) -> StackedWeights:
        """Only the first `rank` LoRA columns: the bank pads every slot to its max_rank, and
        the padding of the slots a batch uses is zero, so a batch of rank-8 sets in a bank of
        max_rank 64 need not multiply 56 zero columns. Rank 0 drops LoRA."""
        if self.lora_A is None or self.lora_B is None or rank >= self.lora_A.shape[-1]:
            return self
        if rank == 0:
            return dataclasses.replace(self, lora_A=None, lora_B=None)
        return dataclasses.replace(
            self, lora_A=self.lora_A[..., :rank], lora_B=self.lora_B[..., :rank, :]
        )


@dataclass(frozen=True)
class Segments:
    """Tokens sorted by key (slot * C + context): `order` [N] indexes the flattened tokens;
    `bounds` lists (key, start, end) of each run of equal keys in sorted order."""

    order: torch.Tensor
    bounds: list[tuple[int, int, int]]


class WeightSource(Protocol):
    """Where adapter weights come from: the serving `AdapterBank` (many slots) or a single
    trainable `AdapterSet` (one slot, differentiable)."""

    def stacked(self, layer: int, module: str) -> StackedWeights | None: ...

    def lora_rank(self, slots: torch.Tensor | Sequence[int]) -> int:
        """The largest LoRA rank among `slots` (0 if none uses LoRA). `slots` may be a host
        list (the routing passes one: no device read)."""
        ...

    def context_specific(self, slots: torch.Tensor | Sequence[int]) -> bool:
        """Whether any of `slots` holds context-specific weights (an agnostic set holds the
        same weights under every context)."""
        ...

    def connect(self, features: torch.Tensor, slots: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Layout:
    """What the caller knows on the host about the contexts of one call's tokens.

    `uniform`: every token of the call has this context (a decode step: TEXT).
    `image_spans`: per row, the column range [start, end) of its image tokens; every other
    token of the row is text (a prefill: [BOS] + image + text, start = left padding + 1;
    (0, 0) for a row without image tokens). Padding columns count as text: their adapter
    output is computed (finite) and masked out by the attention mask.
    """

    uniform: int | None = None
    image_spans: tuple[tuple[int, int], ...] | None = None

    def select(self, rows: Sequence[int]) -> Layout:
        spans = None if self.image_spans is None else tuple(self.image_spans[r] for r in rows)
        return Layout(self.uniform, spans)


def column_segments(spans: Sequence[tuple[int, int]], tokens: int) -> tuple[Segment, ...]:
    """Split columns 0..tokens into ranges where every row has one context: (start, end,
    context), or MIXED where rows disagree (left padding, image prefixes of different
    lengths). Adjacent ranges of one kind are merged; past MAX_SEGMENTS ranges, everything
    between the leading and trailing uniform range becomes one MIXED range."""
    cuts = sorted({0, tokens, *(min(max(p, 0), tokens) for span in spans for p in span)})
    merged: list[list[int]] = []
    for start, end in itertools.pairwise(cuts):
        kinds = {IMAGE if s <= start and end <= e else TEXT for s, e in spans}
        kind = kinds.pop() if len(kinds) == 1 else MIXED
        if merged and merged[-1][2] == kind:
            merged[-1][1] = end
        else:
            merged.append([start, end, kind])
    if len(merged) > MAX_SEGMENTS:
        head, tail = merged[0], merged[-1]
        merged = [head, [head[1], tail[0], MIXED], tail]
    return tuple((s, e, k) for s, e, k in merged)


def _spans_of(contexts: torch.Tensor) -> tuple[int | None, tuple[tuple[int, int], ...] | None]:
    """(uniform context, per-row image spans) of a contexts tensor, with one host read.
    Spans are None when some row's image tokens are not one contiguous range."""
    rows = contexts.tolist()
    tokens = contexts.shape[1]
    spans = []
    for row in rows:
        count = row.count(IMAGE)
        if count == 0:
            spans.append((0, 0))
            continue
        first = row.index(IMAGE)
        if count + row.count(TEXT) != tokens or row[first : first + count].count(IMAGE) != count:
            return None, None
        spans.append((first, first + count))
    if all(e == s for s, e in spans):
        return TEXT, tuple(spans)
    if all(e - s == tokens for s, e in spans):
        return IMAGE, tuple(spans)
    return None, tuple(spans)


class GroupWeights:
    """The LoRA weights of one shared-input group for one batch, per unit (distinct slot),
    trimmed to the batch's rank, gathered per context on first use (a batch that only
    decodes never copies image weights). `a(c)` [U, d_in, G*r] holds the G members' A side
    by side (member i owns columns i*r..(i+1)*r); `b(name, c)` [U, r, d_out]."""

    def __init__(
        self,
        layer: int,
        rank: int,
        weights: dict[str, StackedWeights],
        units: list[int],
        device: torch.device,
    ) -> None:
        self.layer = layer
        self.rank = rank
        self.members = tuple(weights)
        self._weights = weights  # the source's [S, C, ...] tensors (views), trimmed
        self._units = units
        self._index = torch.tensor(units, dtype=torch.long).to(device, non_blocking=True)
        self._a: dict[int, torch.Tensor] = {}
        self._b: dict[tuple[str, int], torch.Tensor] = {}

    def _pick(self, t: torch.Tensor) -> torch.Tensor:
        """Per-slot [S, ...] -> per-unit [U, ...]: a view when the units are all slots in
        order, else a copy."""
        if self._units == list(range(t.shape[0])):
            return t
        return t.index_select(0, self._index)

    def a(self, context: int) -> torch.Tensor:
        found = self._a.get(context)
        if found is None:
            if context == MIXED:
                # For column ranges whose tokens mix contexts (then masked per token): per
                # member both contexts' columns, [U, d_in, G*C*r]: member i owns columns
                # i*C*r..(i+1)*C*r, context c within it c*r..(c+1)*r.
                per_context = [self.a(c) for c in range(NUM_CONTEXTS)]
                units, d_in, _ = per_context[0].shape
                split = [t.view(units, d_in, len(self.members), self.rank) for t in per_context]
                found = torch.stack(split, dim=3).reshape(units, d_in, -1)
            else:
                parts = [self._pick(_lora_a(w)[:, context]) for w in self._weights.values()]
                found = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
            self._a[context] = found
        return found

    def b(self, name: str, context: int) -> torch.Tensor:
        """[U, r, d_out]; for MIXED [U, C*r, d_out] (both contexts' rows, context-major)."""
        key = (name, context)
        found = self._b.get(key)
        if found is None:
            if context == MIXED:
                per_context = [self.b(name, c) for c in range(NUM_CONTEXTS)]
                found = torch.cat(per_context, dim=1)
            else:
                lora_b = self._weights[name].lora_B
                assert lora_b is not None
                found = self._pick(lora_b[:, context])
            self._b[key] = found
        return found


def _lora_a(w: StackedWeights) -> torch.Tensor:
    assert w.lora_A is not None
    return w.lora_A


class _Batch:
    """Per-batch state: shared by every step of a batch, narrowed by `select_rows`."""

    def __init__(
        self,
        source: WeightSource,
        slots: torch.Tensor,
        host_slots: Sequence[int] | None,
        rank: int | None = None,
        units: list[int] | None = None,
        groups: dict[tuple[int, tuple[str, ...]], GroupWeights | None] | None = None,
        rows: dict[tuple[int, str], StackedWeights | None] | None = None,
        vectors: dict[tuple[int, str], StackedWeights | None] | None = None,
    ) -> None:
        self.source = source
        self.slots = slots
        self._host = None if host_slots is None else [int(s) for s in host_slots]
        self._rank = rank
        self._specific: bool | None = None
        self._units = units
        self.groups = {} if groups is None else groups
        self.rows = {} if rows is None else rows
        self.vectors = {} if vectors is None else vectors
        self._grid: _Grid | None = None

    @property
    def host_slots(self) -> list[int]:
        if self._host is None:
            self._host = [int(s) for s in self.slots.tolist()]  # once per batch
        return self._host

    def rank(self) -> int:
        if self._rank is None:
            self._rank = self.source.lora_rank(self.host_slots)
        return self._rank

    def specific(self) -> bool:
        if self._specific is None:
            self._specific = self.source.context_specific(self.host_slots)
        return self._specific

    @property
    def units(self) -> list[int]:
        """The distinct slots of the batch, in order of first appearance."""
        if self._units is None:
            self._units = list(dict.fromkeys(self.host_slots))
        return self._units

    def grid(self) -> _Grid:
        if self._grid is None:
            self._grid = _Grid.build(self.host_slots, self.units, self.slots.device)
        return self._grid

    def select(self, rows: list[int], index: torch.Tensor) -> _Batch:
        """The batch without the rows that left. Per-unit weights stay valid as they are
        (a unit without rows left only pads the grid); per-row tensors follow the rows."""

        def keep(
            cache: dict[tuple[int, str], StackedWeights | None],
        ) -> dict[tuple[int, str], StackedWeights | None]:
            return {k: None if w is None else w.select(index) for k, w in cache.items()}

        host = self.host_slots
        return _Batch(
            self.source,
            self.slots.index_select(0, index),
            [host[r] for r in rows],
            self._rank,  # the kept rows' rank is at most the batch's: gathered weights stay valid
            self._units,
            self.groups,
            keep(self.rows),
            keep(self.vectors),
        )


@dataclass(frozen=True)
class _Grid:
    """Rows grouped by unit: cell u*m + k holds the k-th row of unit u (m = the largest
    count; cells beyond a unit's count are padding and their results are never read).
    `identity`: the rows already are the grid (each unit's rows adjacent, equal counts, in
    unit order), so no gather is needed."""

    units: int
    per_unit: int
    unit_of_row: torch.Tensor  # [B]
    row_of_cell: torch.Tensor  # [U * m]
    cell_of_row: torch.Tensor  # [B]
    identity: bool  # cell_of_row == arange(B)
    rows_are_units: bool  # unit_of_row == arange(B): per-row weights are per-unit weights

    @classmethod
    def build(cls, host_slots: list[int], units: list[int], device: torch.device) -> _Grid:
        index = {slot: u for u, slot in enumerate(units)}
        unit_of_row = [index[s] for s in host_slots]
        counts = [0] * len(units)
        cell_of_row = []
        per_unit = max(unit_of_row.count(u) for u in range(len(units))) if units else 0
        for u in unit_of_row:
            cell_of_row.append(u * per_unit + counts[u])
            counts[u] += 1
        row_of_cell = [0] * (len(units) * per_unit)
        for row, cell in enumerate(cell_of_row):
            row_of_cell[cell] = row
        rows = list(range(len(host_slots)))

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)

        return cls(
            len(units),
            per_unit,
            tensor(unit_of_row),
            tensor(row_of_cell),
            tensor(cell_of_row),
            cell_of_row == rows and len(row_of_cell) == len(rows),
            unit_of_row == rows,
        )


@dataclass
class _Call:
    """Per-call caches: the column segments per token count, and the latest shared shrink."""

    plans: dict[int, CallPlan] = field(default_factory=dict)
    segments: dict[int, Segments] = field(default_factory=dict)
    shrink: dict[tuple[str, ...], tuple[int, torch.Tensor, int, object]] = field(
        default_factory=dict
    )
    masks: dict[tuple[object, ...], torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class CallPlan:
    """How the fast path lays out one call: `segments` partition the columns; `grid[i]`:
    segment i groups rows by unit (one context, at most GRID_MAX_TOKENS columns: a decode
    step, a prefill's [BOS] or short caption text), else it multiplies per-row views of the
    weights (long ranges: a prefill's image prefix; mixed ranges)."""

    segments: tuple[Segment, ...]
    grid: tuple[bool, ...]

    @property
    def uniform(self) -> int | None:
        kind = self.segments[0][2] if len(self.segments) == 1 else MIXED
        return None if kind == MIXED else kind


class Routing:
    """Per-row slot ids and per-token context ids for one forward call.

    `slots` [B] (long tensor, or a host list): the adapter slot of each row. `contexts`
    [B, T] (long): the context id of each token of this call (0 = image, 1 = text); it may be
    left out when `layout` says it all. `path` picks the gathered-product implementation:
    "row" (the fast path: per-unit weights gathered once per batch, column ranges of one
    context multiplied by that context's weights only, shared-input products fused),
    "segment" (tokens grouped by (slot, context), one matmul per group) or "token"
    (per-token gather: the general reference). `layout` passes host-known facts (see
    `Layout`); `Routing.prefill` and `Routing.decode` build both for the common cases.
    """

    def __init__(
        self,
        source: WeightSource,
        slots: torch.Tensor | Sequence[int],
        contexts: torch.Tensor | None = None,
        path: Path = "row",
        *,
        layout: Layout | None = None,
        device: torch.device | str | None = None,
        _batch: _Batch | None = None,
    ) -> None:
        if contexts is None and layout is None:
            raise ValueError("Routing needs contexts or a layout")
        if isinstance(slots, torch.Tensor):
            host = None
            tensor = slots
        else:
            host = [int(s) for s in slots]
            where = (
                device
                if device is not None
                else (contexts.device if contexts is not None else "cpu")
            )
            tensor = torch.tensor(host, dtype=torch.long).to(where, non_blocking=True)
        self.source = source
        self.path: Path = path
        self.layout = layout
        self._contexts = contexts
        self._width = 1 if contexts is None else int(contexts.shape[1])
        self._batch = _batch if _batch is not None else _Batch(source, tensor, host)
        self._call = _Call()

    # --- construction for the common cases (no host sync) ---------------------------------
    @classmethod
    def prefill(
        cls,
        source: WeightSource,
        slots: Sequence[int],
        image_spans: Sequence[tuple[int, int]],
        tokens: int,
        path: Path = "row",
        device: torch.device | str = "cpu",
    ) -> Routing:
        """A prefill of `tokens` columns where row b's image tokens are columns
        image_spans[b] = (start, end) and every other column is text ([BOS] + image + text,
        shifted right by any left padding)."""
        spans = tuple((int(s), int(e)) for s, e in image_spans)
        if len(spans) != len(slots):
            raise ValueError(f"{len(spans)} image spans for {len(slots)} rows")
        for s, e in spans:
            if not 0 <= s <= e <= tokens:
                raise ValueError(f"image span ({s}, {e}) outside 0..{tokens}")
        routing = cls(source, slots, None, path, layout=Layout(None, spans), device=device)
        routing._width = tokens
        return routing

    @classmethod
    def decode(
        cls,
        source: WeightSource,
        slots: Sequence[int] | torch.Tensor,
        path: Path = "row",
        device: torch.device | str = "cpu",
    ) -> Routing:
        """A decode step: every token of every row is text."""
        return cls(source, slots, None, path, layout=Layout(TEXT), device=device)

    def step(self, contexts: torch.Tensor | None = None, path: Path | None = None) -> Routing:
        """The routing of the next call of the same batch: new contexts, same gathered weights.
        Without `contexts`, every token of the call is text (a decode step: no host sync)."""
        layout = Layout(TEXT) if contexts is None else None
        return Routing(
            self.source, self.slots, contexts, path or self.path, layout=layout, _batch=self._batch
        )

    def select_rows(self, rows: torch.Tensor | Sequence[int]) -> Routing:
        """Keep only `rows` (finished rows leave the batch); gathered weights follow. Pass a
        host list to avoid a sync when the batch lives on an accelerator."""
        host = rows.tolist() if isinstance(rows, torch.Tensor) else [int(r) for r in rows]
        index = (
            rows.to(self.slots.device)
            if isinstance(rows, torch.Tensor)
            else torch.tensor(host, dtype=torch.long).to(self.slots.device, non_blocking=True)
        )
        contexts = None if self._contexts is None else self._contexts.index_select(0, index)
        layout = None if self.layout is None else self.layout.select(host)
        return Routing(
            self.source,
            self.slots,
            contexts,
            self.path,
            layout=layout,
            _batch=self._batch.select(host, index),
        )

    # --- per-row and per-call facts ----------------------------------------------------------
    @property
    def slots(self) -> torch.Tensor:
        return self._batch.slots

    @property
    def contexts(self) -> torch.Tensor:
        """[B, T] context ids ([B, 1] for a uniform layout; a prefill layout gives the width
        it was built with)."""
        return self.contexts_for(self._width)

    def contexts_for(self, tokens: int) -> torch.Tensor:
        """[B, tokens] context ids, or [B, 1] when every token has one context (built from
        the layout, once per call, when the caller did not give them)."""
        if self._contexts is None:
            assert self.layout is not None
            device = self.slots.device
            if self.layout.uniform is not None:
                self._contexts = torch.full(
                    (len(self.slots), 1), self.layout.uniform, dtype=torch.long, device=device
                )
            else:
                assert self.layout.image_spans is not None
                spans = torch.tensor(self.layout.image_spans, dtype=torch.long)
                bounds = spans.reshape(-1, 2).to(device, non_blocking=True)
                positions = torch.arange(tokens, device=device)
                image = (positions >= bounds[:, :1]) & (positions < bounds[:, 1:])
                self._contexts = torch.where(image, IMAGE, TEXT)
        return self._contexts

    def uniform_context(self) -> int | None:
        """The one context whose weights serve every token of this call, if there is one:
        every token has the same context (decode: text), or no slot of the batch is
        context-specific (then context 0 stands for all; a batch of agnostic sets needs no
        per-token selection). Once per call, not once per layer: it may cost a sync."""
        if not self._batch.specific():
            return 0
        return self._layout().uniform

    def _layout(self) -> Layout:
        if self.layout is None:
            uniform, spans = _spans_of(self.contexts)
            self.layout = Layout(uniform, spans)
        return self.layout

    def plan(self, tokens: int) -> CallPlan:
        """The fast path's layout of this call (once per call and token count)."""
        plan = self._call.plans.get(tokens)
        if plan is None:
            uniform = self.uniform_context()
            if uniform is not None:
                segments: tuple[Segment, ...] = ((0, tokens, uniform),)
            else:
                spans = self._layout().image_spans
                segments = (
                    ((0, tokens, MIXED),) if spans is None else column_segments(spans, tokens)
                )
            grid = tuple(k != MIXED and e - s <= GRID_MAX_TOKENS for s, e, k in segments)
            plan = CallPlan(segments, grid)
            self._call.plans[tokens] = plan
        return plan

    def token_keys(self, tokens: int) -> torch.Tensor:
        """slot * C + context of every token, flattened to [B * tokens]."""
        keys = self.slots.unsqueeze(1) * NUM_CONTEXTS + self.contexts_for(tokens)
        return keys.expand(-1, tokens).reshape(-1) if keys.shape[1] != tokens else keys.reshape(-1)

    def segments(self, tokens: int) -> Segments:
        """The tokens grouped by (slot, context) for the segment path. Computed once per call,
        not once per layer: it sorts and costs a device sync."""
        found = self._call.segments.get(tokens)
        if found is not None:
            return found
        keys = self.token_keys(tokens)
        order = torch.argsort(keys, stable=True)
        uniq, counts = torch.unique_consecutive(keys[order], return_counts=True)
        bounds, start = [], 0
        for k, count in zip(uniq.tolist(), counts.tolist(), strict=True):
            bounds.append((k, start, start + count))
            start += count
        segments = Segments(order, bounds)
        self._call.segments[tokens] = segments
        return segments

    def context_mask(self, dtype: torch.dtype, repeat: int = 1) -> torch.Tensor:
        """One-hot contexts [B, T, C * repeat] in `dtype`, each context's entry repeated
        `repeat` times (a mask for LoRA's C x rank columns)."""
        key: tuple[object, ...] = (-1, repeat, dtype)
        found = self._call.masks.get(key)
        if found is None:
            mask = torch.nn.functional.one_hot(self.contexts, NUM_CONTEXTS).to(dtype)
            found = mask.repeat_interleave(repeat, dim=2) if repeat > 1 else mask
            self._call.masks[key] = found
        return found

    def segment_mask(
        self, start: int, end: int, tokens: int, groups: int, repeat: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """One-hot contexts of columns start..end, [B, end - start, groups * C * repeat]:
        for each of `groups` members, each context's entry repeated `repeat` times."""
        key: tuple[object, ...] = (start, end, groups, repeat, dtype)
        found = self._call.masks.get(key)
        if found is None:
            contexts = self.contexts_for(tokens)
            if contexts.shape[1] != tokens:
                contexts = contexts.expand(-1, tokens)
            onehot = torch.nn.functional.one_hot(contexts[:, start:end], NUM_CONTEXTS).to(dtype)
            found = onehot.repeat_interleave(repeat, dim=2).repeat(1, 1, groups)
            self._call.masks[key] = found
        return found

    # --- weights -----------------------------------------------------------------------------
    def lora_rank(self) -> int:
        """The largest LoRA rank of this batch's slots. Once per batch."""
        return self._batch.rank()

    def weights(self, layer: int, module: str) -> StackedWeights | None:
        """The source's weights of every slot, LoRA trimmed to this batch's largest rank."""
        w = self.source.stacked(layer, module)
        return None if w is None else w.trim_rank(self.lora_rank())

    def row_weights(self, layer: int, module: str) -> StackedWeights | None:
        """Per-row weights [B, C, ...], gathered on first use and kept for the batch."""
        key = (layer, module)
        rows = self._batch.rows
        if key not in rows:
            w = self.weights(layer, module)
            rows[key] = None if w is None else w.select(self.slots)
        return rows[key]

    def row_vectors(self, layer: int, module: str) -> StackedWeights | None:
        """Per-row BitFit bias and IA3 vectors [B, C, d] (no LoRA), kept for the batch."""
        key = (layer, module)
        vectors = self._batch.vectors
        if key not in vectors:
            w = self.source.stacked(layer, module)
            if w is None or (w.bias is None and w.ia3 is None):
                vectors[key] = None
            else:
                w = StackedWeights(bias=w.bias, ia3=w.ia3, ia3_on_input=w.ia3_on_input)
                vectors[key] = w.select(self.slots)
        return vectors[key]

    def group_weights(self, layer: int, module: str) -> GroupWeights | None:
        """The LoRA weights of `module`'s shared-input group, per unit, for this batch."""
        group = GROUP_OF.get(module, (module,))
        key = (layer, group)
        groups = self._batch.groups
        if key not in groups:
            groups[key] = self._gather_group(layer, group)
        return groups[key]

    def _gather_group(self, layer: int, group: tuple[str, ...]) -> GroupWeights | None:
        rank = self.lora_rank()
        if rank == 0:
            return None
        weights = {}
        for name in group:
            w = self.source.stacked(layer, name)
            if w is not None and w.lora_A is not None and w.lora_B is not None:
                weights[name] = w.trim_rank(rank)
        if not weights:
            return None
        return GroupWeights(layer, rank, weights, self._batch.units, self.slots.device)

    def grid(self) -> _Grid:
        return self._batch.grid()

    def rows_view(self, per_unit: torch.Tensor) -> torch.Tensor:
        """Per-unit tensor [U, ...] -> per-row [B, ...] for this call: a view when every row
        is its own unit or all rows share one (stride 0), else a gather."""
        grid = self._batch.grid()
        if grid.rows_are_units:
            return per_unit
        if grid.units == 1:
            return per_unit.expand(len(grid.unit_of_row), *per_unit.shape[1:])
        return per_unit.index_select(0, grid.unit_of_row)

    def shared_shrink(self, layer: int, module: str, x: torch.Tensor) -> object | None:
        """The shrink result that the first member of `module`'s group computed from this
        very input (the same tensor, not modified since) in this call; None if none did."""
        found = self._call.shrink.get(GROUP_OF.get(module, (module,)))
        if found is not None and found[0] == layer and found[1] is x and found[2] == x._version:
            return found[3]
        return None

    def keep_shrink(self, layer: int, module: str, x: torch.Tensor, result: object) -> None:
        """Remember a group's shrink result for the other members (only the latest layer's
        is kept, so the call holds one layer's products at a time)."""
        self._call.shrink[GROUP_OF.get(module, (module,))] = (layer, x, x._version, result)


_current: ContextVar[Routing | None] = ContextVar("ctxpeft_routing", default=None)


@contextlib.contextmanager
def use_routing(routing: Routing | None) -> Iterator[None]:
    """Make `routing` visible to the context layers for the duration of one model call."""
    token = _current.set(routing)
    try:
        yield
    finally:
        _current.reset(token)


def current_routing() -> Routing | None:
    return _current.get()
