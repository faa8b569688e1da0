"""Rows joining the running batch (worker thread): chosen from the queue within the step's
budgets, bound to device slots, encoded (vision features, cache first) and prefilled.

    groups = joiner.join(running=len(batch), step=loop.steps)   # [(rows, DecodeState, first)]

An exception is contained to the rows it concerns (`service.engine.isolation`): an encoder
failure is retried image by image, a prefill failure adapter by adapter then row by row, and
only the rows that fail alone end (503 engine_fault); a version that cannot be bound fails its
rows only; a row whose CPU copy was evicted since the readiness check goes back in line.
Every row taken out of the queue here either joins, goes back in line, or is finished through
the ledger.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Hashable, Sequence

import torch

from adapters.bank import AdapterBank
from adapters.decoding import DecodeState
from adapters.model import ContextPEFTModel
from service.adapter_cache import AdapterCache
from service.engine.encoder_cache import EncoderCache
from service.engine.isolation import grouped_by, incident, isolate, singles
from service.engine.ledger import RowLedger
from service.engine.rows import PreparedImage, Row
from service.events import EngineEvents
from service.exceptions import EngineFault
from service.registry import AdapterVersion
from service.scheduler import SlotBudget
from service.settings import EngineConfig

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.05  # how long an idle worker waits for rows before checking for shutdown
Group = tuple[list[Row], DecodeState, torch.Tensor]


class Joiner:
    def __init__(
        self,
        model: ContextPEFTModel,
        bank: AdapterBank,
        cache: AdapterCache[AdapterVersion],
        ledger: RowLedger,
        encoder_cache: EncoderCache,
        events: EngineEvents,
        config: EngineConfig,
    ) -> None:
        self.model = model
        self.bank = bank
        self.cache = cache
        self.ledger = ledger
        self.encoder_cache = encoder_cache
        self.events = events
        self.config = config
        self._held_since: int | None = None  # step since which ready rows wait to join

    def choose(self, batch: Sequence[Row], step: int) -> list[tuple[int, Row]]:
        """The rows to join this step (out of the queue), within the budgets; `batch` is
        the running rows (each tenant's share is weighed against them)."""
        cfg = self.config
        static = cfg.scheduling == "static"
        running = len(batch)
        if static and running:
            return []
        room = cfg.max_batch_size - running
        if running and not static:
            # A bounded prefill beside running rows; an empty batch has nothing to stall.
            room = min(room, cfg.max_prefill_rows)
            if not self._prefill_due(room, step):
                return []
        pinned, free = self.cache.placement()
        budget = SlotBudget(free, cfg.max_adapters_per_batch, pinned)
        timeout = 0.0 if running else IDLE_WAIT_S
        tenants = Counter(row.tenant for row in batch)
        keys: Counter[Hashable] = Counter(row.key for row in batch)
        chosen = self.ledger.next_rows(
            self.cache.is_ready, budget, room, timeout, static, step, tenants, keys
        )
        now = time.monotonic()
        for _, row in chosen:
            row.joined = now
        return chosen

    def join(self, chosen: list[tuple[int, Row]]) -> list[Group]:
        """Bind, encode and prefill `chosen`: the groups that prefilled, with their states
        and first tokens (on the device)."""
        rows = self._bind(chosen)
        rows = self._encode(rows)
        if not rows:
            return []
        started = time.monotonic()
        groups = self._prefill(rows)
        joined = [row for group, _, _ in groups for row in group]
        if joined:
            self.events.joined(
                len(joined), len({r.key for r in joined}), [started - r.arrival for r in joined]
            )
        return groups

    def _prefill_due(self, room: int, step: int) -> bool:
        """While rows run, ready rows join in groups. A prefill costs a fixed part per call
        (about a decode step of the whole batch on a CPU, a kernel launch train on a GPU):
        fewer, larger ones keep the running rows' steps cheaper. A group is due once
        `prefill_min_rows` ready rows have room; when fewer rows are ready than that and all
        of them fit (arrivals are the bottleneck), once the first has waited
        `prefill_max_wait_steps` steps. When more rows are ready than there is room for (the
        batch is the bottleneck), they wait for a group's worth of room: the running rows
        free it within a row's lifetime, and a one-row prefill per freed row would cost a
        forward pass each."""
        cfg = self.config
        group = min(cfg.prefill_min_rows, cfg.max_prefill_rows, cfg.max_batch_size)
        # Counted only as far as the rule needs: whether more are ready than there is room.
        limit = max(group, room + 1)
        ready = self.ledger.scheduler.ready_rows(self.cache.is_ready, limit) if room > 0 else 0
        if ready == 0:
            self._held_since = None
            return False
        if self._held_since is None:
            self._held_since = step
        waited = step - self._held_since >= cfg.prefill_max_wait_steps
        if min(ready, room) >= group or (ready <= room and waited):
            self._held_since = None
            return True
        return False

    def _bind(self, chosen: list[tuple[int, Row]]) -> list[Row]:
        """Pin a bank slot for each row's adapter version. Rows answered meanwhile end here;
        a version that cannot be bound fails its rows only; rows whose CPU copy was evicted
        since the readiness check go back in line."""
        live = []
        for seq, row in chosen:
            if row.settled():
                self.ledger.finish(row)
            else:
                live.append((seq, row))
        if not live:
            return []
        slots, failed, missing = self.cache.bind(row.key for _, row in live)
        self.ledger.requeue((seq, row) for seq, row in live if row.key in missing)
        bound = []
        for _, row in live:
            if row.key in failed:
                self.events.fault("bind")
                self.ledger.finish(row, failed[row.key])
            elif row.key in slots:
                self.ledger.bound(row, slots[row.key])
                bound.append(row)
        return bound

    def _encode(self, rows: list[Row]) -> list[Row]:
        """Vision features for each row's image (an image shared by rows is encoded once, a
        cached one not at all); the rows of an image that fails alone end."""
        images = list({id(r.image): r.image for r in rows if r.image.features is None}.values())
        for row in rows:  # features already there (a sibling row's batch) or in the cache
            row.image_cached = row.image.features is not None or row.image.key in self.encoder_cache
        started = time.monotonic()
        if images:
            found = isolate([images], self._encode_images, [singles])
            if found.raised:
                self.events.fault("encode")
            for image, exc in found.failed:
                image.error = incident(exc, "the vision encoder")
        if len(rows) > len(images):
            self.encoder_cache.count_hits(len(rows) - len(images))
        seconds = time.monotonic() - started
        kept = []
        for row in rows:
            if row.image.features is None:
                self.ledger.finish(row, EngineFault(row.image.error or "encoding failed"))
            else:
                row.encode_s = seconds
                kept.append(row)
        return kept

    def _encode_images(self, images: Sequence[PreparedImage]) -> None:
        found = self.encoder_cache.encode(
            [i.key for i in images], [i.pixels for i in images], self.model.backbone.encode_images
        )
        for image, feature in zip(images, found, strict=True):
            image.features = feature

    def _prefill(self, rows: list[Row]) -> list[Group]:
        """Prefill the joining rows together; on failure adapter by adapter, then row by row;
        the rows that fail alone end."""
        found = isolate([rows], self._prefill_rows, [grouped_by(_key), singles])
        if found.raised:
            log.warning("a prefill of %d rows failed; retried by adapter, then by row", len(rows))
            self.events.fault("prefill")
        for row, exc in found.failed:
            self.ledger.finish(row, EngineFault(incident(exc, "the prefill")))
        return [(group, state, first) for group, (state, first) in found.done]

    def _prefill_rows(self, rows: Sequence[Row]) -> tuple[DecodeState, torch.Tensor]:
        features = torch.stack([r.image.features for r in rows if r.image.features is not None])
        slots = [r.slot for r in rows if r.slot is not None]
        return DecodeState.prefill(self.model, self.bank, features, slots)


def _key(row: Row) -> AdapterVersion:
    return row.key
