"""The running batch: the rows decoding together and their `DecodeState` (KV cache, slots,
next tokens), kept in the same order. Worker thread only.

    batch.merge(rows, state)        # rows prefilled together join after the running ones
    tokens = batch.state.step()     # one decode step (the step loop decides what to do on error)
    batch.keep([0, 2])              # the others left; the state fills holes with its last rows
"""

from __future__ import annotations

from collections.abc import Sequence

from adapters.decoding import DecodeState
from adapters.kv_cache import RowCache
from service.engine.rows import Row


class RunningBatch:
    def __init__(self) -> None:
        self.rows: list[Row] = []  # in the order of the state's rows
        self.state: DecodeState | None = None
        # The KV buffers of the last state, kept when the batch empties: the next rows are
        # copied into them instead of growing a new cache from the first group's size.
        self._buffers: RowCache | None = None

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

    def keep(self, positions: Sequence[int]) -> None:
        """Keep only the rows at `positions` (they may be reordered: the decode state moves
        its last rows into the holes)."""
        if len(positions) == len(self.rows):
            return
        if not positions or self.state is None:
            self.clear()
            return
        self.rows = [self.rows[i] for i in self.state.keep(positions)]

    def clear(self) -> list[Row]:
        """Empty the batch (its state cannot be trusted, or it ended); returns its rows."""
        if self.state is not None:
            self._buffers = self.state.cache
        rows, self.rows, self.state = self.rows, [], None
        return rows

    def adapters(self) -> int:
        return len({row.key for row in self.rows})
