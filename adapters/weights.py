"""Adapter weights for a batch: where they come from, and how they are gathered per batch.

A `WeightSource` (the serving `AdapterBank`, or one trainable `AdapterSet`) hands out each
module's weights stacked `[slots, contexts, ...]` (`StackedWeights`). A `BatchWeights` holds
what one batch gathers from it, once per batch, not once per step or per layer:
  - the rows' slots (a tensor, and a host list read at most once), the batch's LoRA rank,
    whether any slot is context-specific;
  - the distinct slots ("units") and the grid that groups rows by unit (`UnitGrid`);
  - per shared-input group (q/k/v, gate/up) the members' LoRA weights per unit
    (`GroupWeights`, the inference fast path), and per-row weights and vectors (the masked,
    differentiable path training runs).
`adapters.routing.Routing` carries a `BatchWeights` from step to step of a batch;
`select_rows` narrows it when rows leave.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from adapters.config import CONTEXTS

NUM_CONTEXTS = len(CONTEXTS)
# A column range whose tokens do not all have one context: its weights are both contexts'
# side by side, masked per token (see `GroupWeights.a`).
MIXED = -1
# Projections of a Llama-family decoder layer that read the same input: one shrink product
# (x times the members' A matrices side by side) serves every member of a group.
SHARED_INPUT_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("o_proj",),
    ("gate_proj", "up_proj"),
    ("down_proj",),
)
GROUP_OF: dict[str, tuple[str, ...]] = {m: g for g in SHARED_INPUT_GROUPS for m in g}


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


@dataclass(frozen=True)
class UnitGrid:
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
    def build(cls, host_slots: list[int], units: list[int], device: torch.device) -> UnitGrid:
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


Cache = dict[tuple[int, str], StackedWeights | None]


class BatchWeights:
    """One batch's rows' slots and the adapter weights gathered for them: shared by every
    step of the batch, narrowed by `select` when rows leave."""

    def __init__(
        self,
        source: WeightSource,
        slots: torch.Tensor,
        host_slots: Sequence[int] | None,
        rank: int | None = None,
        units: list[int] | None = None,
        groups: dict[tuple[int, tuple[str, ...]], GroupWeights | None] | None = None,
        rows: Cache | None = None,
        vectors: Cache | None = None,
    ) -> None:
        self.source = source
        self.slots = slots
        self._host = None if host_slots is None else [int(s) for s in host_slots]
        self._rank = rank
        self._specific: bool | None = None
        self._units = units
        self._groups = {} if groups is None else groups
        self._rows = {} if rows is None else rows
        self._vectors = {} if vectors is None else vectors
        self._grid: UnitGrid | None = None

    # --- host facts, once per batch ------------------------------------------------------
    @property
    def host_slots(self) -> list[int]:
        if self._host is None:
            self._host = [int(s) for s in self.slots.tolist()]  # once per batch
        return self._host

    def rank(self) -> int:
        """The largest LoRA rank of the batch's slots."""
        if self._rank is None:
            self._rank = self.source.lora_rank(self.host_slots)
        return self._rank

    def context_specific(self) -> bool:
        """Whether any slot of the batch holds context-specific weights."""
        if self._specific is None:
            self._specific = self.source.context_specific(self.host_slots)
        return self._specific

    @property
    def units(self) -> list[int]:
        """The distinct slots of the batch, in order of first appearance."""
        if self._units is None:
            self._units = list(dict.fromkeys(self.host_slots))
        return self._units

    def grid(self) -> UnitGrid:
        if self._grid is None:
            self._grid = UnitGrid.build(self.host_slots, self.units, self.slots.device)
        return self._grid

    # --- gathered weights --------------------------------------------------------------------
    def group(self, layer: int, module: str) -> GroupWeights | None:
        """The LoRA weights of `module`'s shared-input group, per unit (the fast path)."""
        group = GROUP_OF.get(module, (module,))
        key = (layer, group)
        if key not in self._groups:
            self._groups[key] = self._gather_group(layer, group)
        return self._groups[key]

    def _gather_group(self, layer: int, group: tuple[str, ...]) -> GroupWeights | None:
        rank = self.rank()
        if rank == 0:
            return None
        weights = {}
        for name in group:
            w = self.source.stacked(layer, name)
            if w is not None and w.lora_A is not None and w.lora_B is not None:
                weights[name] = w.trim_rank(rank)
        if not weights:
            return None
        return GroupWeights(layer, rank, weights, self.units, self.slots.device)

    def rows(self, layer: int, module: str) -> StackedWeights | None:
        """Per-row weights [B, C, ...], LoRA trimmed to the batch's rank (the masked path)."""
        key = (layer, module)
        if key not in self._rows:
            w = self.source.stacked(layer, module)
            self._rows[key] = None if w is None else w.trim_rank(self.rank()).select(self.slots)
        return self._rows[key]

    def vectors(self, layer: int, module: str) -> StackedWeights | None:
        """Per-row BitFit bias and IA3 vectors [B, C, d] (no LoRA)."""
        key = (layer, module)
        if key not in self._vectors:
            w = self.source.stacked(layer, module)
            if w is None or (w.bias is None and w.ia3 is None):
                self._vectors[key] = None
            else:
                w = StackedWeights(bias=w.bias, ia3=w.ia3, ia3_on_input=w.ia3_on_input)
                self._vectors[key] = w.select(self.slots)
        return self._vectors[key]

    def rows_view(self, per_unit: torch.Tensor) -> torch.Tensor:
        """Per-unit tensor [U, ...] -> per-row [B, ...]: a view when every row is its own
        unit or all rows share one (stride 0), else a gather."""
        grid = self.grid()
        if grid.rows_are_units:
            return per_unit
        if grid.units == 1:
            return per_unit.expand(len(grid.unit_of_row), *per_unit.shape[1:])
        return per_unit.index_select(0, grid.unit_of_row)

    def select(self, rows: list[int], index: torch.Tensor) -> BatchWeights:
        """The batch without the rows that left. Per-unit weights stay valid as they are
        (a unit without rows left only pads the grid); per-row tensors follow the rows."""

        def keep(cache: Cache) -> Cache:
            return {k: None if w is None else w.select(index) for k, w in cache.items()}

        host = self.host_slots
        return BatchWeights(
            self.source,
            self.slots.index_select(0, index),
            [host[r] for r in rows],
            self._rank,  # the kept rows' rank is at most the batch's: gathered weights stay valid
            self._units,
            self._groups,
            keep(self._rows),
            keep(self._vectors),
        )
