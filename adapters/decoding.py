"""Greedy decoding state for rows that join and leave between steps (continuous batching).

    tokens = generate(model, features, source, slots, max_new_tokens)   # a static batch
    state, first = DecodeState.prefill(model, source, features, slots)   # new rows
    state.merge(other)            # rows prefilled later join the running batch
    tokens = state.step()         # one decode step for every row: next token ids [B] (device)
    order = state.keep([0, 2])    # rows 1, 3, ... left (EOS, limit, cancel); `order` gives
                                  # each remaining row's old position (the last rows move
                                  # into the holes)

No method returns device values to the host: the caller reads the token ids (one host
synchronisation per step) and decides which rows stay.

Numeric containment: a row whose logits hold a NaN or an infinity gets the token id
`NON_FINITE` (-1) instead of a token, in the same tensor, so the caller learns it from the one
read it makes anyway. Rows never mix in a forward (every product is per row and each row's
attention reads only its own cache columns, kv_cache's hygiene), so only that row is affected;
the caller ends it. The row keeps feeding its argmax internally, so a step never sees an
invalid id.

KV-cache layout: every row's cache is right-aligned. With W cache columns, row i's
`lengths[i]` real tokens occupy the last `lengths[i]` columns and the columns before them are
padding: zero keys and values, masked out of attention by an additive mask. Each step appends
one column for every row. Positions are explicit per row, so rotary embeddings see a row's
real positions 0, 1, ... however much padding sits in front of it, and a row computes the same
attention whether it runs alone or beside longer rows (the padding gets exactly zero weight).

Joining: new rows are prefilled on their own (their prefix has no padding) into a plain
DynamicCache, whose tensors are then copied once into the running batch's `RowCache`
(adapters.kv_cache: preallocated buffers, right-aligned rows), after its last row. Leaving: the
last rows move into the holes (one row copied per hole), and the leading columns that are
padding for every remaining row are dropped from the view without a copy. So the waste is
bounded by the length spread of the rows present, a step writes one column in place instead
of copying the cache, and a join or a leave copies only the rows that change.

Masks are built here as 4-D additive tensors, so the LM uses them as given: Hugging Face's
mask helpers would inspect them on the host (a synchronisation per call).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer

from adapters.kv_cache import RowCache
from adapters.model import ContextPEFTModel
from adapters.routing import Routing
from adapters.weights import WeightSource

NON_FINITE = -1  # the token id of a row whose logits were not all finite
# Why a row ends: EOS, its token limit, or logits that were not finite.
Ending = Literal["stop", "length", "non_finite"]


def accept(
    tokens: Sequence[int], generated: int, limit: int, eos: int
) -> tuple[list[int], Ending | None]:
    """The stop rule, the same for `generate` and the serving engine: of a row's new `tokens`
    (in order; it has `generated` already, at most `limit` in all), the ones it keeps, and
    why it ends if it does. EOS and NON_FINITE are never kept."""
    kept: list[int] = []
    for token in tokens:
        if token == NON_FINITE:
            return kept, "non_finite"
        if token == eos:
            return kept, "stop"
        if generated + len(kept) >= limit:
            return kept, "length"
        kept.append(token)
    return kept, ("length" if generated + len(kept) >= limit else None)


@torch.no_grad()
def generate(
    model: ContextPEFTModel,
    features: torch.Tensor,
    source: WeightSource,
    slots: torch.Tensor | Sequence[int],
    max_new_tokens: int | Sequence[int],
) -> list[list[int]]:
    """Greedy decoding of one static batch with a KV cache. Each row stops at EOS, its own
    token limit or non-finite logits, and leaves the batch; returns the generated ids per row
    (EOS excluded). The serving engine drives `DecodeState` itself, so that rows can also join
    between steps; both decode the same way, token for token (`accept`)."""
    batch = features.shape[0]
    limits = [max_new_tokens] * batch if isinstance(max_new_tokens, int) else list(max_new_tokens)
    state, tokens = DecodeState.prefill(model, source, features, slots)
    eos = model.backbone.tokenizer.eos_token_id
    outputs: list[list[int]] = [[] for _ in range(batch)]
    active = list(range(batch))  # original row index of each row still in the batch
    while True:
        keep = []
        for pos, (row, token) in enumerate(zip(active, tokens.tolist(), strict=True)):
            # A row whose limit is 0 still takes part in the prefill but emits nothing.
            kept, ending = accept([token], len(outputs[row]), limits[row], eos)
            outputs[row] += kept
            if ending is None:
                keep.append(pos)
        if not keep:
            return outputs
        if len(keep) < len(active):
            active = [active[k] for k in state.keep(keep)]
        tokens = state.step()


class DecodeState:
    """The running rows of a batch: KV cache, per-row lengths and slots, next input tokens."""

    def __init__(
        self,
        model: ContextPEFTModel,
        source: WeightSource,
        slots: list[int],
        cache: RowCache,
        lengths: list[int],
        next_ids: torch.Tensor,
    ) -> None:
        self.model = model
        self.source = source
        self.slots = slots  # each row's adapter slot (host: the routing reads no device value)
        self.device = next_ids.device
        self.cache = cache
        self.lengths = lengths  # real tokens per row (host)
        self._lengths = torch.tensor(lengths, dtype=torch.long, device=self.device)
        self.next_ids = next_ids  # [B]: the token each row feeds at the next step
        self._routing: Routing | None = None  # decode routing, built at the first step

    # --- construction ------------------------------------------------------------------
    @classmethod
    def prefill(
        cls,
        model: ContextPEFTModel,
        source: WeightSource,
        features: torch.Tensor,
        slots: torch.Tensor | Sequence[int],
    ) -> tuple[DecodeState, torch.Tensor]:
        """Run the prefix ([BOS] + connector(features)) of new rows through the LM; returns
        their state and their first generated token ids [B] (on the device; NON_FINITE for a
        row whose logits were not finite). Pass `slots` as a host list (the engine does): a
        tensor is read back once."""
        device = model.backbone.device
        host = slots.tolist() if isinstance(slots, torch.Tensor) else [int(s) for s in slots]
        index = torch.tensor(host, dtype=torch.long).to(device, non_blocking=True)
        image_embeds = source.connect(features.to(device), index)
        embeds, _ = model.prefix(image_embeds)
        batch, width = embeds.shape[:2]
        n_img = image_embeds.shape[1]
        prefill = _new_cache(model.backbone.lm.config)
        positions = torch.arange(width, device=device).expand(batch, width)
        mask = causal_mask(width, embeds.dtype, device)
        logits = model.lm_forward(
            embeds,
            Routing.prefill(source, host, [(1, 1 + n_img)] * batch, width, device),
            attention_mask=mask,
            position_ids=positions,
            cache=prefill,
            logits_to_keep=1,
        )
        first = logits[:, -1].argmax(dim=-1)
        cache = RowCache.adopt(prefill)
        state = cls(model, source, host, cache, [width] * batch, first)
        return state, checked(logits[:, -1], first)

    # --- the step ----------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        """Cache columns in use (the longest row's length)."""
        return self.cache.width

    def step(self) -> torch.Tensor:
        """Feed every row its next token; returns the token ids generated [B] (device),
        NON_FINITE for a row whose logits were not finite."""
        width = self.width
        embeds = self.model.embed_tokens(self.next_ids.unsqueeze(1))
        if self._routing is None:  # every token of a decode step is text: no host read
            self._routing = Routing.decode(self.source, self.slots, self.device)
        # If the forward raises, the layers before the failing one wrote a column that `end`
        # does not cover yet: the state is as before the call, and the step can be retried.
        self.cache.reserve_column()
        logits = self.model.lm_forward(
            embeds,
            self._routing,
            attention_mask=padding_mask(self._lengths, width + 1, embeds.dtype),
            position_ids=self._lengths.unsqueeze(1),
            cache=self.cache,
        )
        self.cache.advance()
        self.next_ids = logits[:, -1].argmax(dim=-1)
        self._lengths = self._lengths + 1
        self.lengths = [n + 1 for n in self.lengths]
        return checked(logits[:, -1], self.next_ids)

    # --- rows joining and leaving ----------------------------------------------------------
    def keep(self, rows: Sequence[int]) -> list[int]:
        """Keep the rows at positions `rows`; the others leave. Rows after a hole may move
        into it: returns each remaining row's old position, in the new order."""
        gone = sorted(set(range(self.rows)) - set(rows))
        if not gone:
            return list(range(self.rows))
        order = self.cache.remove(gone)
        index = torch.tensor(order, dtype=torch.long).to(self.device, non_blocking=True)
        self.slots = [self.slots[i] for i in order]
        self.next_ids = self.next_ids.index_select(0, index)
        self._lengths = self._lengths.index_select(0, index)
        self.lengths = [self.lengths[i] for i in order]
        if self._routing is not None:
            self._routing = self._routing.select_rows(order) if order else None
        if self.lengths:
            self.cache.trim(max(self.lengths))
        return order

    def subset(self, rows: Sequence[int]) -> DecodeState:
        """A copy holding only `rows`, in that order (this state is left as it is), e.g. to
        try a step on some rows alone when a step of the whole batch failed."""
        index = torch.tensor(list(rows), dtype=torch.long).to(self.device, non_blocking=True)
        cache = RowCache(len(self.cache.row_layers))
        views = [layer.view() for layer in self.cache.row_layers]
        cache.append_tensors(
            [(k.index_select(0, index), v.index_select(0, index)) for k, v in views]
        )
        copy = DecodeState(
            self.model,
            self.source,
            [self.slots[i] for i in rows],
            cache,
            [self.lengths[i] for i in rows],
            self.next_ids.index_select(0, index),
        )
        copy.cache.trim(max(copy.lengths))
        return copy

    def move_into(self, cache: RowCache) -> None:
        """Keep this state's rows in `cache`'s buffers (emptied first) instead of its own:
        a running batch reuses its buffers when it empties and fills again."""
        cache.clear()
        cache.append(self.cache)
        self.cache = cache

    def merge(self, other: DecodeState) -> None:
        """Append `other`'s rows (same model and weight source) after this batch's rows."""
        if other.source is not self.source:
            raise ValueError("rows of different weight sources cannot share a batch")
        self.cache.append(other.cache)
        self.slots = self.slots + other.slots
        self.next_ids = torch.cat([self.next_ids, other.next_ids])
        self._lengths = torch.cat([self._lengths, other._lengths])
        self.lengths = self.lengths + other.lengths
        self._routing = None  # per-row weights are gathered again for the merged rows


def checked(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`ids` with NON_FINITE where a row's logits [B, V] hold a NaN or an infinity (on the
    device: no host read). Exact and cheap: 0 * x is 0 for every finite x and NaN for a NaN
    or an infinity, so a row's sum of them is exactly 0 (it cannot overflow, whatever the
    dtype) or NaN. Two vectorised passes cost less than one reduction that keeps two values
    or a mask per row: on a CPU core at 32 x 2048, 13 us against 155 (`isfinite().all()`)
    and 148 (`aminmax`)."""
    zero = logits.mul(0).sum(dim=-1)
    return torch.where(zero == 0, ids, NON_FINITE)


def causal_mask(width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive causal mask [1, 1, width, width] for a prefill without padding."""
    allowed = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    return _additive(allowed, dtype).view(1, 1, width, width)


def padding_mask(lengths: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, 1, width] for one new token per row: row i sees its last
    `lengths[i] + 1` columns (its real tokens and the new one), not the padding before them."""
    columns = torch.arange(width, device=lengths.device)
    allowed = columns.unsqueeze(0) >= (width - 1 - lengths).unsqueeze(1)
    return _additive(allowed, dtype).view(lengths.shape[0], 1, 1, width)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The dtype's lowest finite value, not -inf: a row that sees nothing gets uniform weights
    # instead of NaN, and exp() of it is exactly zero next to any real score.
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def _new_cache(config: PretrainedConfig) -> DynamicCache:
    """The prefill's cache; every layer must keep every column (no sliding window)."""
    cache = DynamicCache(config=config)
    for layer in cache.layers:
        if not isinstance(layer, DynamicLayer) or layer.is_sliding:
            raise ValueError(f"DecodeState needs full-attention cache layers, not {layer!r}")
    return cache
