"""RowCache: the KV cache of a running batch whose rows join and leave between decode steps.

Each layer keeps its keys and values in preallocated buffers [row capacity, kv heads, column
capacity, head dim], so that nothing is copied that does not change:
  - a decode step writes one column for every row in place (Hugging Face's DynamicCache
    concatenates, copying the whole cache at every step);
  - rows that join are written into the rows after the last one (their prefill's cache is
    copied once); rows that leave are replaced by the last rows (one row copied per hole);
  - every row is right-aligned: the columns [start, end) are in use, row i's real tokens are
    the last lengths[i] of them, the columns before are padding (zeros, masked out of
    attention by the caller). When rows leave, `start` moves right past the columns that are
    padding for every row still there, without a copy; when `end` reaches the capacity the
    used columns are moved back to column 0 in place, the buffers growing first (doubling)
    when fewer than the used width would be free after the move: a move happens at most once
    per `width` steps, so it costs less than a column write per step, amortised, and a batch
    in steady state allocates nothing.
The layers hand attention views of the used region. `DecodeState` (adapters.decoding) drives
it; the cache only stores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class RowLayer(DynamicLayer):
    """One layer of a RowCache. `update` takes the one new column of every row."""

    def __init__(self, owner: RowCache) -> None:
        super().__init__()
        self.owner = owner
        self.k_buf: torch.Tensor | None = None
        self.v_buf: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        owner = self.owner
        if self.k_buf is None or self.v_buf is None or key_states.shape[-2] != 1:
            raise RuntimeError("a RowCache takes one new column per row (a decode step)")
        rows, end = owner.rows, owner.end
        self.k_buf[:rows, :, end] = key_states[:, :, 0]
        self.v_buf[:rows, :, end] = value_states[:, :, 0]
        self.keys = self.k_buf[:rows, :, owner.start : end + 1]
        self.values = self.v_buf[:rows, :, owner.start : end + 1]
        return self.keys, self.values

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.k_buf is not None and self.v_buf is not None, "no rows yet"
        return self.k_buf, self.v_buf

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The used region [rows, heads, start:end, head dim] of the keys and values."""
        k_buf, v_buf = self.buffers()
        o = self.owner
        return k_buf[: o.rows, :, o.start : o.end], v_buf[: o.rows, :, o.start : o.end]


class RowCache(Cache):
    """The running batch's keys and values; see the module docstring for the layout."""

    def __init__(self, num_layers: int) -> None:
        self.row_layers = [RowLayer(self) for _ in range(num_layers)]
        super().__init__(layers=list(self.row_layers))
        self.rows = 0
        self.start = 0  # first column in use
        self.end = 0  # one past the last column in use (the next step writes it)

    @property
    def width(self) -> int:
        return self.end - self.start

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def adopt(cls, prefill: DynamicCache) -> RowCache:
        """A RowCache holding the rows of a prefill's cache (all of one length), in the
        prefill's own tensors: nothing is copied. They are full (no column to spare), so the
        first step of these rows alone moves them into grown buffers, and a merge into a
        running batch copies them once, into its buffers."""
        cache = cls(len(prefill.layers))
        for layer, source in zip(cache.row_layers, prefill.layers, strict=True):
            layer.k_buf, layer.v_buf = _kv(source)
        keys = cache.row_layers[0].buffers()[0]
        cache.rows, cache.start, cache.end = int(keys.shape[0]), 0, int(keys.shape[2])
        cache._views()
        return cache

    def append(self, other: RowCache, headroom: int = 32) -> None:
        """Add `other`'s rows after this cache's rows, right-aligned at `end`."""
        self.append_tensors([layer.view() for layer in other.row_layers], headroom)

    def append_tensors(
        self, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], headroom: int = 32
    ) -> None:
        """Add rows given as (keys, values) [new rows, heads, width, head dim] per layer."""
        template = layers[0][0]
        new, width = int(template.shape[0]), int(template.shape[-2])
        if self.rows == 0:  # an empty cache starts over: nothing to move, the new rows
            self.start, self.end = 0, width  # take the first columns of the buffers it has
        elif width > self.end:  # longer than every column so far: make room on the left
            self._ensure(template, self.rows, self.end + headroom, shift=width - self.end)
        # Column room for the steps is made by `reserve_column`, when a step needs it.
        self._ensure(template, self.rows + new, self.end)
        lo = self.end - width
        start = min(self.start, lo) if self.rows else lo
        for layer, (keys, values) in zip(self.row_layers, layers, strict=True):
            k_buf, v_buf = layer.buffers()
            k_buf[self.rows : self.rows + new, :, lo : self.end] = keys
            v_buf[self.rows : self.rows + new, :, lo : self.end] = values
            if start < lo:  # the new rows' padding: never what an earlier occupant wrote
                k_buf[self.rows : self.rows + new, :, start:lo] = 0
                v_buf[self.rows : self.rows + new, :, start:lo] = 0
        self.start = start
        self.rows += new
        self._views()

    # --- steps, rows leaving ---------------------------------------------------------------
    def reserve_column(self, headroom: int = 32) -> None:
        """Make room for the column the next step writes (call before the forward): the used
        columns move back to column 0, into buffers with at least `width + headroom` columns
        free after them (grown first when they have fewer)."""
        k_buf, _ = self.row_layers[0].buffers()
        capacity = k_buf.shape[2]
        if self.end < capacity:
            return
        width = self.width
        if capacity - width >= width + headroom:  # the move fits beside the used columns
            self._shift_to_start()
        else:
            self._ensure(k_buf, self.rows, 2 * width + headroom, shift=-self.start)

    def advance(self) -> None:
        """The step's column is written in every layer: it is in use now (each layer's
        `update` already handed out views that include it)."""
        self.end += 1

    def remove(self, positions: Sequence[int]) -> list[int]:
        """Drop the rows at `positions`; the last rows move into the holes. Returns, for each
        row now in the cache, its position before the call."""
        gone = set(positions)
        order = list(range(self.rows))
        kept = [p for p in order if p not in gone]
        holes = [p for p in sorted(gone) if p < len(kept)]
        movers = [p for p in kept if p >= len(kept)]
        if holes:  # one gather and one scatter per buffer, whatever the number of holes
            k_buf, _ = self.row_layers[0].buffers()
            to = torch.tensor(holes, dtype=torch.long).to(k_buf.device, non_blocking=True)
            src = torch.tensor(movers, dtype=torch.long).to(k_buf.device, non_blocking=True)
            for layer in self.row_layers:
                for buf in layer.buffers():
                    used = buf[:, :, self.start : self.end]
                    used.index_copy_(0, to, used.index_select(0, src))
            for hole, mover in zip(holes, movers, strict=True):
                order[hole] = mover
        if self.rows > len(kept):  # the freed rows keep nothing of the rows that left
            for layer in self.row_layers:
                for buf in layer.buffers():
                    buf[len(kept) : self.rows, :, self.start : self.end] = 0
        self.rows = len(kept)
        self._views()
        return order[: self.rows]

    def clear(self) -> None:
        """No rows any more; the buffers stay for the rows that come next (a batch that
        empties and fills again allocates nothing). What they hold is never visible: a row
        that joins is written in every column it shows (`append_tensors`)."""
        self.rows = 0
        self.start = self.end = 0
        self._views()

    def trim(self, width: int) -> None:
        """Only the last `width` columns are in use any more (the rows left are shorter)."""
        self.start = max(self.start, self.end - width)
        self._views()

    # --- buffers -------------------------------------------------------------------------------
    def _ensure(self, template: torch.Tensor, rows: int, columns: int, shift: int = 0) -> None:
        """Buffers with at least `rows` rows and `columns` columns (doubling what grows), the
        used columns moved by `shift` (right if positive). New buffers are zeros: padding
        columns must hold finite values."""
        for layer in self.row_layers:
            old_k, old_v = layer.k_buf, layer.v_buf
            fits = old_k is not None and rows <= old_k.shape[0] and columns <= old_k.shape[2]
            if fits and shift == 0:
                continue
            cap_rows = old_k.shape[0] if old_k is not None else 0
            cap_cols = old_k.shape[2] if old_k is not None else 0
            rows_ = max(rows, 2 * cap_rows if rows > cap_rows else cap_rows)
            cols = max(columns, self.end + shift, 2 * cap_cols if columns > cap_cols else cap_cols)
            keys_like = old_k if old_k is not None else template
            shape = (rows_, keys_like.shape[1], cols, keys_like.shape[-1])
            k = torch.zeros(shape, dtype=keys_like.dtype, device=keys_like.device)
            v = torch.zeros(shape, dtype=keys_like.dtype, device=keys_like.device)
            if old_k is not None and old_v is not None and self.rows:
                s, e = self.start, self.end
                k[: self.rows, :, s + shift : e + shift] = old_k[: self.rows, :, s:e]
                v[: self.rows, :, s + shift : e + shift] = old_v[: self.rows, :, s:e]
            layer.k_buf, layer.v_buf = k, v
        self.start += shift
        self.end += shift

    def _shift_to_start(self) -> None:
        """Move the used columns [start, end) to [0, width) in the same buffers (they do not
        overlap: start >= width) and zero the columns they left, so nothing a row wrote stays
        outside the columns it uses."""
        s, e, w = self.start, self.end, self.width
        assert s >= w, "the used columns would overlap their new place"
        for layer in self.row_layers:
            for buf in layer.buffers():
                buf[: self.rows, :, :w] = buf[: self.rows, :, s:e]
                buf[: self.rows, :, s:e] = 0
        self.start, self.end = 0, w
        self._views()

    def _views(self) -> None:
        for layer in self.row_layers:
            if layer.k_buf is not None:
                layer.keys, layer.values = layer.view()


def _kv(layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    keys, values = layer.keys, layer.values
    assert isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor), "empty layer"
    return keys, values
