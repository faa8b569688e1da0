"""Routing: which adapter slot and which context each token uses, passed with the forward.

A `Routing` is built per batch by the caller (engine or trainer) and handed to
`ContextPEFTModel` calls explicitly. The model makes it visible to the wrapped linear layers
only for the duration of that call through a `ContextVar`, which is private to the calling
thread (and asyncio task): two threads running forwards never see each other's routing, and
no module holds routing state between calls.

Per batch, the per-row adapter weights of each module are gathered once (on first use) and
reused by every decode step: a batch's rows keep their adapter for the whole generation.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from adapters.config import CONTEXTS

Path = Literal["row", "segment", "token"]
NUM_CONTEXTS = len(CONTEXTS)


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

    def lora_rank(self, slots: torch.Tensor) -> int:
        """The largest LoRA rank among `slots` (0 if none uses LoRA)."""
        ...

    def context_specific(self, slots: torch.Tensor) -> bool:
        """Whether any of `slots` holds context-specific weights (an agnostic set holds the
        same weights under every context)."""
        ...

    def connect(self, features: torch.Tensor, slots: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Routing:
    """Per-row slot ids and per-token context ids for one forward call.

    `slots` [B] (long): the adapter slot of each row. `contexts` [B, T] (long): the context id
    of each token of this call (0 = image, 1 = text). `path` picks the gathered-product
    implementation: "row" (per-row batched matmul with weights gathered once per batch),
    "segment" (tokens grouped by (slot, context), one matmul per group) or "token"
    (per-token gather: the general reference).
    """

    source: WeightSource
    slots: torch.Tensor
    contexts: torch.Tensor
    path: Path = "row"
    _rows: dict[tuple[int, str], StackedWeights | None] = field(default_factory=dict, repr=False)
    _mask: dict[tuple[torch.dtype, int], torch.Tensor] = field(default_factory=dict, repr=False)
    _uniform: int | None = field(default=None, repr=False)
    _segments: dict[int, Segments] = field(default_factory=dict, repr=False)
    _rank: int | None = field(default=None, repr=False)

    def step(self, contexts: torch.Tensor, path: Path | None = None) -> Routing:
        """The routing of the next call of the same batch: new contexts, same gathered weights."""
        return Routing(
            self.source, self.slots, contexts, path or self.path, self._rows, _rank=self._rank
        )

    def select_rows(self, rows: torch.Tensor) -> Routing:
        """Keep only `rows` (finished rows leave the batch); gathered weights follow."""
        kept: dict[tuple[int, str], StackedWeights | None] = {}
        for key, w in self._rows.items():
            kept[key] = None if w is None else w.select(rows)
        contexts = self.contexts.index_select(0, rows)
        slots = self.slots.index_select(0, rows)
        # The kept rows' rank is at most the batch's: the gathered weights stay valid.
        return Routing(self.source, slots, contexts, self.path, kept, _rank=self._rank)

    def uniform_context(self) -> int | None:
        """The one context whose weights serve every token of this call, if there is one:
        every token has the same context (decode: text), or no slot of the batch is
        context-specific (then context 0 stands for all; a batch of agnostic sets needs no
        per-token selection). Computed once per call, not once per layer: it costs a sync."""
        if self._uniform is None:
            first = int(self.contexts.view(-1)[0])
            if bool((self.contexts == first).all()):
                self._uniform = first
            else:
                self._uniform = 0 if not self.source.context_specific(self.slots) else -1
        return None if self._uniform < 0 else self._uniform

    def token_keys(self, tokens: int) -> torch.Tensor:
        """slot * C + context of every token, flattened to [B * tokens]."""
        keys = self.slots.unsqueeze(1) * NUM_CONTEXTS + self.contexts
        return keys.expand(-1, tokens).reshape(-1) if keys.shape[1] != tokens else keys.reshape(-1)

    def segments(self, tokens: int) -> Segments:
        """The tokens grouped by (slot, context) for the segment path. Computed once per call,
        not once per layer: it sorts and costs a device sync."""
        if tokens not in self._segments:
            keys = self.token_keys(tokens)
            order = torch.argsort(keys, stable=True)
            uniq, counts = torch.unique_consecutive(keys[order], return_counts=True)
            bounds, start = [], 0
            for key, count in zip(uniq.tolist(), counts.tolist(), strict=True):
                bounds.append((key, start, start + count))
                start += count
            self._segments[tokens] = Segments(order, bounds)
        return self._segments[tokens]

    def context_mask(self, dtype: torch.dtype, repeat: int = 1) -> torch.Tensor:
        """One-hot contexts [B, T, C * repeat] in `dtype`, each context's entry repeated
        `repeat` times (a mask for LoRA's C x rank columns)."""
        key = (dtype, repeat)
        if key not in self._mask:
            mask = torch.nn.functional.one_hot(self.contexts, NUM_CONTEXTS).to(dtype)
            self._mask[key] = mask.repeat_interleave(repeat, dim=2) if repeat > 1 else mask
        return self._mask[key]

    def lora_rank(self) -> int:
        """The largest LoRA rank of this batch's slots. Once per batch: it costs a sync."""
        if self._rank is None:
            self._rank = self.source.lora_rank(self.slots)
        return self._rank

    def weights(self, layer: int, module: str) -> StackedWeights | None:
        """The source's weights of every slot, LoRA trimmed to this batch's largest rank."""
        w = self.source.stacked(layer, module)
        return None if w is None else w.trim_rank(self.lora_rank())

    def row_weights(self, layer: int, module: str) -> StackedWeights | None:
        """Per-row weights [B, C, ...], gathered on first use and kept for the batch."""
        key = (layer, module)
        if key not in self._rows:
            w = self.weights(layer, module)
            self._rows[key] = None if w is None else w.select(self.slots)
        return self._rows[key]


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
