"""Greedy decoding state for rows that join and leave between steps (continuous batching).

    state, first = DecodeState.prefill(model, source, features, slots)   # new rows
    state.merge(other)            # rows prefilled later join the running batch
    tokens = state.step()         # one decode step for every row: next token ids [B] (device)
    state.keep([0, 2])            # rows 1, 3, ... left (EOS, limit, cancel): drop them

No method returns host values: the caller reads the token ids (one host synchronisation per
step) and decides which rows stay.

KV-cache layout: every row's cache is right-aligned. With W cache columns, row i's
`lengths[i]` real tokens occupy the last `lengths[i]` columns and the columns before them are
padding: zero keys and values, masked out of attention by an additive mask. Each step appends
one column for every row. Positions are explicit per row, so rotary embeddings see a row's
real positions 0, 1, ... however much padding sits in front of it, and a row computes the same
attention whether it runs alone or beside longer rows (the padding gets exactly zero weight).

Joining: new rows are prefilled on their own (their prefix has no padding), then the shorter
of the two caches is padded on the left and both are concatenated along the batch. Leaving:
the remaining rows are index-selected and every leading column that is padding for all of them
is dropped, so the waste is bounded by the length spread of the rows present (at most the
longest row's length minus the shortest's), and a batch whose rows all joined together has
none. The cost of a join is one copy of the running cache (what DynamicCache's per-step
concatenation costs anyway); docs/ARCHITECTURE.md compares this with a paged cache.

Masks are built here as 4-D additive tensors, so the LM uses them as given: Hugging Face's
mask helpers would inspect them on the host (a synchronisation per call).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer

from adapters.config import TEXT
from adapters.routing import Path, Routing, WeightSource

if TYPE_CHECKING:
    from adapters.model import ContextPEFTModel


class DecodeState:
    """The running rows of a batch: KV cache, per-row lengths and slots, next input tokens."""

    def __init__(
        self,
        model: ContextPEFTModel,
        source: WeightSource,
        slots: torch.Tensor,
        cache: DynamicCache,
        lengths: list[int],
        next_ids: torch.Tensor,
        path: Path = "row",
    ) -> None:
        self.model = model
        self.source = source
        self.slots = slots  # [B] long, on the model's device
        self.cache = cache
        self.lengths = lengths  # real tokens per row (host)
        self._lengths = torch.tensor(lengths, dtype=torch.long, device=slots.device)
        self.next_ids = next_ids  # [B]: the token each row feeds at the next step
        self.path = path
        self._routing: Routing | None = None  # decode routing, built at the first step

    # --- construction ------------------------------------------------------------------
    @classmethod
    def prefill(
        cls,
        model: ContextPEFTModel,
        source: WeightSource,
        features: torch.Tensor,
        slots: torch.Tensor,
        path: Path = "row",
        decode_path: Path | None = None,
    ) -> tuple[DecodeState, torch.Tensor]:
        """Run the prefix ([BOS] + connector(features)) of new rows through the LM; returns
        their state and their first generated token ids [B] (on the device)."""
        device = model.backbone.device
        slots = slots.to(device)
        image_embeds = source.connect(features.to(device), slots)
        embeds, contexts = model.prefix(image_embeds)
        batch, width = contexts.shape
        cache = _new_cache(model.backbone.lm.config)
        positions = torch.arange(width, device=device).expand(batch, width)
        mask = causal_mask(width, embeds.dtype, device)
        logits = model.lm_forward(
            embeds,
            Routing(source, slots, contexts, path),
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            logits_to_keep=1,
        )
        first = logits[:, -1].argmax(dim=-1)
        state = cls(model, source, slots, cache, [width] * batch, first, decode_path or path)
        return state, first

    # --- the step ----------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        """Cache columns (the longest row's length)."""
        return _cache_width(self.cache)

    def step(self) -> torch.Tensor:
        """Feed every row its next token; returns the token ids generated [B] (device)."""
        width = self.width
        embeds = self.model.embed_tokens(self.next_ids.unsqueeze(1))
        if self._routing is None:
            text = torch.full((self.rows, 1), TEXT, dtype=torch.long, device=self.slots.device)
            self._routing = Routing(self.source, self.slots, text, self.path)
        try:
            logits = self.model.lm_forward(
                embeds,
                self._routing,
                attention_mask=padding_mask(self._lengths, width + 1, embeds.dtype),
                position_ids=self._lengths.unsqueeze(1),
                cache=self.cache,
            )
        except BaseException:
            # Layers before the failing one already appended this step's column: take it
            # back, so the state is as before the call and the step can be tried again.
            _map_cache(self.cache, lambda t: t[:, :, :width])
            raise
        self.next_ids = logits[:, -1].argmax(dim=-1)
        self._lengths = self._lengths + 1
        self.lengths = [n + 1 for n in self.lengths]
        return self.next_ids

    # --- rows joining and leaving ----------------------------------------------------------
    def keep(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (positions in this batch, in order); the others leave."""
        if list(rows) == list(range(self.rows)):
            return
        index = torch.tensor(list(rows), dtype=torch.long, device=self.slots.device)
        self.cache.batch_select_indices(index)
        self.slots = self.slots.index_select(0, index)
        self.next_ids = self.next_ids.index_select(0, index)
        self._lengths = self._lengths.index_select(0, index)
        self.lengths = [self.lengths[i] for i in rows]
        if self._routing is not None:
            self._routing = self._routing.select_rows(index)
        if self.lengths:
            trim = self.width - max(self.lengths)
            if trim > 0:
                _map_cache(self.cache, lambda t: t[:, :, trim:])

    def subset(self, rows: Sequence[int]) -> DecodeState:
        """A copy holding only `rows` (this state is left as it is), e.g. to try a step on
        some rows alone when a step of the whole batch failed."""
        copy = DecodeState(
            self.model,
            self.source,
            self.slots,
            _copy_cache(self.cache, self.model.backbone.lm.config),
            list(self.lengths),
            self.next_ids,
            self.path,
        )
        copy.keep(rows)
        return copy

    def merge(self, other: DecodeState) -> None:
        """Append `other`'s rows (same model and weight source) after this batch's rows.
        All or nothing: if it raises (out of memory), this state is unchanged."""
        if other.source is not self.source:
            raise ValueError("rows of different weight sources cannot share a batch")
        width = max(self.width, other.width)
        mine, theirs = _layers(self.cache), _layers(other.cache)
        merged = []
        for a, b in zip(mine, theirs, strict=True):
            (keys_a, values_a), (keys_b, values_b) = _kv(a), _kv(b)
            keys = torch.cat([_pad_left(keys_a, width), _pad_left(keys_b, width)])
            values = torch.cat([_pad_left(values_a, width), _pad_left(values_b, width)])
            merged.append((keys, values))
        for layer, (keys, values) in zip(mine, merged, strict=True):
            layer.keys, layer.values = keys, values
        self.slots = torch.cat([self.slots, other.slots])
        self.next_ids = torch.cat([self.next_ids, other.next_ids])
        self._lengths = torch.cat([self._lengths, other._lengths])
        self.lengths = self.lengths + other.lengths
        self._routing = None  # per-row weights are gathered again for the merged rows


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


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The cache's layers; every one keeps every column (no sliding window)."""
    layers = []
    for layer in cache.layers:
        if not isinstance(layer, DynamicLayer) or layer.is_sliding:
            raise ValueError(f"DecodeState needs full-attention cache layers, not {layer!r}")
        layers.append(layer)
    return layers


def _kv(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    assert layer.keys is not None and layer.values is not None, "cache layer not filled"
    return layer.keys, layer.values


def _cache_width(cache: DynamicCache) -> int:
    return int(_kv(_layers(cache)[0])[0].shape[-2])


def _new_cache(config: PretrainedConfig) -> DynamicCache:
    cache = DynamicCache(config=config)
    _layers(cache)  # padding and merging assume every layer keeps every column
    return cache


def _copy_cache(cache: DynamicCache, config: PretrainedConfig) -> DynamicCache:
    """A cache object of its own over the same tensors (never written in place: every
    update, selection or trim makes new ones)."""
    copy = _new_cache(config)
    for mine, theirs in zip(_layers(copy), _layers(cache), strict=True):
        keys, values = _kv(theirs)
        mine.lazy_initialization(keys, values)
        mine.keys, mine.values = keys, values
    return copy


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """[B, H, L, D] -> [B, H, width, D] with zero columns in front."""
    missing = width - t.shape[-2]
    if missing == 0:
        return t
    return torch.nn.functional.pad(t, (0, 0, missing, 0))


def _map_cache(cache: DynamicCache, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    for layer in _layers(cache):
        keys, values = _kv(layer)
        layer.keys, layer.values = fn(keys), fn(values)
