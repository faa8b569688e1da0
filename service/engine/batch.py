"""The running batch: the rows decoding together and their `DecodeState` (KV cache, slots,
next tokens), kept in the same order. Worker thread only.

    batch.merge(rows, state)        # rows prefilled together join after the running ones
    tokens = batch.state.step()     # one decode step (the step loop decides what to do on error)
    batch.keep([0, 2])              # the others left; the state fills holes with its last rows
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adapters.decoding import DecodeState
from adapters.kv_cache import RowCache
from service.engine.rows import Row


class TokenRead:
    """Token ids on their way to the host: the copy starts as soon as the kernels that compute
    them are queued (on CUDA: a non-blocking copy and an event recorded after it), and
    `values` waits for those kernels only, not for whatever was queued after them. On a CPU
    the tensor is already there. `slots[i]` is row i's index in the ids (-1: none for it); a
    batch that reorders its rows reorders the slots with them."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if tokens.device.type == "cuda":
            self._host = tokens.to("cpu", non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tokens
        self.slots = list(range(int(tokens.shape[0])))

    def values(self) -> list[int | None]:
        """Each row's token id (None for a row with none here); the one wait for the device."""
        if self._event is not None:
            self._event.synchronize()
        ids = self._host.tolist()
        return [ids[i] if i >= 0 else None for i in self.slots]


class RunningBatch:
    def __init__(self) -> None:
        self.rows: list[Row] = []  # in the order of the state's rows
        self.state: DecodeState | None = None
        # The KV buffers of the last state, kept when the batch empties: the next rows are
        # copied into them instead of growing a new cache from the first group's size.
        self._buffers: RowCache | None = None
        # Overlap scheduling: the last decode step's tokens, not read yet (their rows follow
        # the batch's reorders; rows that joined since have none in it).
        self.pending: TokenRead | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def merge(self, rows: Sequence[Row], state: DecodeState) -> None:
        if self.state is None:
            if self._buffers is not None:
                state.move_into(self._buffers)
            self.state = state
        else:
            self.state.merge(state)
        self.rows.extend(rows)
        if self.pending is not None:
            self.pending.slots += [-1] * len(rows)

    def take_pending(self) -> TokenRead | None:
        pending, self.pending = self.pending, None
        return pending

    def keep(self, positions: Sequence[int]) -> None:
        """Keep only the rows at `positions` (they may be reordered: the decode state moves
        its last rows into the holes)."""
        if len(positions) == len(self.rows):
            return
        if not positions or self.state is None:
            self.clear()
            return
        order = self.state.keep(positions)
        self.rows = [self.rows[i] for i in order]
        if self.pending is not None:
            self.pending.slots = [self.pending.slots[i] for i in order]

    def clear(self) -> list[Row]:
        """Empty the batch (its state cannot be trusted, or it ended); returns its rows."""
        if self.state is not None:
            self._buffers = self.state.cache
        rows, self.rows, self.state, self.pending = self.rows, [], None, None
        return rows

    def adapters(self) -> int:
        return len({row.key for row in self.rows})
