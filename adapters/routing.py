"""Routing: which adapter slot and which context each token uses, passed with the forward.

A `Routing` is built per batch by the caller (engine or trainer) and handed to
`ContextPEFTModel` calls explicitly. The model makes it visible to the wrapped linear layers
only for the duration of that call through a `ContextVar`, which is private to the calling
thread (and asyncio task): two threads running forwards never see each other's routing, and
no module holds routing state between calls.

State lives at two lifetimes:
  batch  (`adapters.weights.BatchWeights`, shared by `step` and narrowed by `select_rows`):
         the rows' slots, the batch's LoRA rank, the distinct slots ("units") and the
         weights gathered for them once per batch;
  call   (the `Routing` itself): the token layout (which columns are image, which text) and
         what the fast path derives from it once per call: its column plan (`CallPlan`), the
         context masks, and the shrink product one member of a shared-input group computes
         for the others (`shrink_cache`, kept by `adapters.layers`).

Host facts. Everything a layer needs to know on the host (rank, context-specific or not,
which tokens are image, which unit each row uses) is computed once per batch or per call,
never per layer, and a caller that already knows it passes it in and pays no host sync at all:
`Routing.prefill(source, slots, image_spans, tokens)` for a prefill (each row's image tokens
form one range, every other token is text; rows may be left-padded), `Routing.decode(source,
slots)` or `routing.step()` for a decode step (every token is text), with `slots` as a host
list. `Routing(source, slots, contexts)` with a contexts tensor stays the general form: it
derives the layout with one host sync per call.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from adapters.config import IMAGE, TEXT
from adapters.weights import MIXED, NUM_CONTEXTS, BatchWeights, WeightSource

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


@dataclass(frozen=True)
class CallPlan:
    """How the fast path lays out one call: `segments` partition the columns; `grid[i]`:
    segment i groups rows by unit (one context, at most GRID_MAX_TOKENS columns: a decode
    step, a prefill's [BOS] or short caption text), else it multiplies per-row views of the
    weights (long ranges: a prefill's image prefix; mixed ranges)."""

    segments: tuple[Segment, ...]
    grid: tuple[bool, ...]


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


class Routing:
    """Per-row slot ids and per-token context ids for one forward call.

    `slots` [B] (long tensor, or a host list): the adapter slot of each row. `contexts`
    [B, T] (long): the context id of each token of this call (0 = image, 1 = text); it may be
    left out when `layout` says it all. `layout` passes host-known facts (see `Layout`);
    `Routing.prefill` and `Routing.decode` build both for the common cases. `weights` holds
    the batch's gathered adapter weights (`adapters.weights.BatchWeights`).
    """

    def __init__(
        self,
        source: WeightSource,
        slots: torch.Tensor | Sequence[int],
        contexts: torch.Tensor | None = None,
        *,
        layout: Layout | None = None,
        device: torch.device | str | None = None,
        _weights: BatchWeights | None = None,
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
        self.layout = layout
        self.weights = _weights if _weights is not None else BatchWeights(source, tensor, host)
        self._contexts = contexts
        self._width = 1 if contexts is None else int(contexts.shape[1])
        # Per-call caches: the column plan per token count, the context masks, and the fast
        # path's shared shrink products (per shared-input group; adapters.layers).
        self._plans: dict[int, CallPlan] = {}
        self._masks: dict[tuple[object, ...], torch.Tensor] = {}
        self.shrink_cache: dict[tuple[str, ...], object] = {}

    # --- construction for the common cases (no host sync) ---------------------------------
    @classmethod
    def prefill(
        cls,
        source: WeightSource,
        slots: Sequence[int],
        image_spans: Sequence[tuple[int, int]],
        tokens: int,
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
        routing = cls(source, slots, None, layout=Layout(None, spans), device=device)
        routing._width = tokens
        return routing

    @classmethod
    def decode(
        cls,
        source: WeightSource,
        slots: Sequence[int] | torch.Tensor,
        device: torch.device | str = "cpu",
    ) -> Routing:
        """A decode step: every token of every row is text."""
        return cls(source, slots, None, layout=Layout(TEXT), device=device)

    def step(self, contexts: torch.Tensor | None = None) -> Routing:
        """The routing of the next call of the same batch: new contexts, same gathered weights.
        Without `contexts`, every token of the call is text (a decode step: no host sync)."""
        layout = Layout(TEXT) if contexts is None else None
        return Routing(self.source, self.slots, contexts, layout=layout, _weights=self.weights)

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
            layout=layout,
            _weights=self.weights.select(host, index),
        )

    # --- per-row and per-call facts ----------------------------------------------------------
    @property
    def slots(self) -> torch.Tensor:
        return self.weights.slots

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
        if not self.weights.context_specific():
            return 0
        return self._layout().uniform

    def _layout(self) -> Layout:
        if self.layout is None:
            uniform, spans = _spans_of(self.contexts)
            self.layout = Layout(uniform, spans)
        return self.layout

    def plan(self, tokens: int) -> CallPlan:
        """The fast path's layout of this call (once per call and token count)."""
        plan = self._plans.get(tokens)
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
            self._plans[tokens] = plan
        return plan

    # --- context masks, once per call ---------------------------------------------------------
    def context_mask(self, dtype: torch.dtype, repeat: int = 1) -> torch.Tensor:
        """One-hot contexts [B, T, C * repeat] in `dtype`, each context's entry repeated
        `repeat` times (a mask for LoRA's C x rank columns)."""
        key: tuple[object, ...] = (-1, repeat, dtype)
        found = self._masks.get(key)
        if found is None:
            mask = torch.nn.functional.one_hot(self.contexts, NUM_CONTEXTS).to(dtype)
            found = mask.repeat_interleave(repeat, dim=2) if repeat > 1 else mask
            self._masks[key] = found
        return found

    def segment_mask(
        self, start: int, end: int, tokens: int, groups: int, repeat: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """One-hot contexts of columns start..end, [B, end - start, groups * C * repeat]:
        for each of `groups` members, each context's entry repeated `repeat` times."""
        key: tuple[object, ...] = (start, end, groups, repeat, dtype)
        found = self._masks.get(key)
        if found is None:
            contexts = self.contexts_for(tokens)
            if contexts.shape[1] != tokens:
                contexts = contexts.expand(-1, tokens)
            onehot = torch.nn.functional.one_hot(contexts[:, start:end], NUM_CONTEXTS).to(dtype)
            found = onehot.repeat_interleave(repeat, dim=2).repeat(1, 1, groups)
            self._masks[key] = found
        return found


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
