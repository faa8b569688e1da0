"""The scheduler: per-adapter FIFO queues and the choice of rows to run next.

    scheduler.enqueue([row])               # now schedulable (the ledger admitted it)
    rows = scheduler.next_rows(is_ready, SlotBudget(free=3, present={...}), room=8, timeout=0)
    scheduler.discard(row)                 # a queued row ended (cancelled): out of line
    scheduler.expired(now)                 # queued rows past their deadline, out of line

Choosing rows: start from the oldest waiting row whose adapter is ready (on the device or the
CPU tier), take more rows of that adapter (grouping: its rows are contiguous), then the
adapters with the next-oldest heads, until `room` rows. Each adapter must first get a place
from the `SlotBudget` (a device slot it already holds, or a free one, within the cap of
distinct adapters); the first adapter refused ends the choice, so no younger row overtakes a
row that waits for a slot. That makes it fair: however hot one adapter is, a cold adapter's
row is the oldest after at most the rows that arrived before it, and from then on it waits
only for one slot to be unpinned (a running row ends within max_new_tokens steps). With
`fill` (static scheduling) `next_rows` also waits up to `max_wait_s` after the oldest ready
row's arrival for `room` rows.

Admission, counts and the end of rows are the row ledger's (service/engine/ledger.py); this
module only keeps rows in line and chooses. Thread-safe: the event loop enqueues and
discards, the engine's worker chooses.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from service.exceptions import Draining


class Schedulable(Protocol):
    """What the scheduler needs to know about a row."""

    @property
    def key(self) -> Hashable: ...  # the adapter version: rows of one key share a queue

    @property
    def tenant(self) -> str: ...

    @property
    def arrival(self) -> float: ...  # time.monotonic() at admission

    @property
    def deadline(self) -> float: ...  # time.monotonic() after which the row is dropped


T = TypeVar("T", bound=Schedulable)


class SlotBudget:
    """Which adapters may join: those in `present` (already holding a pinned device slot)
    always; others while `free` slots remain and the distinct adapters stay within `cap`."""

    def __init__(self, free: int, cap: int | None = None, present: Iterable[Hashable] = ()) -> None:
        self.free = free
        self.cap = cap
        self.present = set(present)
        self.chosen: set[Hashable] = set()

    def place(self, key: Hashable) -> bool:
        if key in self.present or key in self.chosen:
            return True
        distinct = len(self.present) + len(self.chosen)
        if self.free <= 0 or (self.cap is not None and distinct >= self.cap):
            return False
        self.free -= 1
        self.chosen.add(key)
        return True


@dataclass(order=True)
class _Queued(Generic[T]):
    seq: int
    row: T = field(compare=False)


class Scheduler(Generic[T]):
    """Per-adapter FIFO queues with oldest-first seeding, grouping and mixing."""

    def __init__(self, max_wait_s: float = 0.0) -> None:
        self.max_wait_s = max_wait_s
        self._cond = threading.Condition()
        self._queues: dict[Hashable, list[_Queued[T]]] = {}
        self._seq = 0
        self._closed = False
        self._draining = False  # static batches stop waiting to fill

    # --- in line ------------------------------------------------------------------------------
    def enqueue(self, rows: Sequence[T]) -> None:
        """Make admitted rows schedulable, in order (FIFO per adapter). Raises Draining if
        the scheduler was closed since their admission (nobody would run them)."""
        with self._cond:
            if self._closed:
                raise Draining("the service stopped before this request could run")
            for row in rows:
                self._seq += 1
                self._queues.setdefault(row.key, []).append(_Queued(self._seq, row))
            self._cond.notify_all()

    def requeue(self, rows: Iterable[tuple[int, T]]) -> None:
        """Put rows back with their original sequence numbers (their place in line), e.g.
        after their adapter was re-resolved."""
        with self._cond:
            for seq, row in rows:
                bisect.insort(self._queues.setdefault(row.key, []), _Queued(seq, row))
            self._cond.notify_all()

    def discard(self, row: T) -> bool:
        """Take `row` out of line if it is there (it ended while waiting); False if it is
        not (the worker took it, or it was never queued)."""
        with self._cond:
            queue = self._queues.get(row.key)
            if queue is None:
                return False
            for i, queued in enumerate(queue):
                if queued.row is row:
                    del queue[i]
                    if not queue:
                        del self._queues[row.key]
                    return True
            return False

    def expired(self, now: float) -> list[T]:
        """Take every queued row whose deadline passed out of line."""
        with self._cond:
            gone: list[T] = []
            for key in list(self._queues):
                queue = self._queues[key]
                kept = [q for q in queue if q.row.deadline > now]
                if len(kept) < len(queue):
                    gone.extend(q.row for q in queue if q.row.deadline <= now)
                    if kept:
                        self._queues[key] = kept
                    else:
                        del self._queues[key]
            return gone

    def take(self, key: Hashable) -> list[tuple[int, T]]:
        """Take every queued row of `key` out of line (its adapter failed to load)."""
        with self._cond:
            queue = self._queues.pop(key, [])
            return [(q.seq, q.row) for q in queue]

    # --- choosing rows (worker thread) ------------------------------------------------------
    def next_rows(
        self,
        is_ready: Callable[[Any], bool],
        budget: SlotBudget,
        room: int,
        timeout: float,
        fill: bool = False,
    ) -> list[tuple[int, T]]:
        """Up to `room` rows to run now, as (sequence number, row), grouped by adapter; [] when
        none was ready within `timeout` seconds or the scheduler is closed. With `fill`
        (static scheduling) it also waits up to `max_wait_s` after the oldest ready row's
        arrival for `room` rows."""
        give_up = time.monotonic() + timeout
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                ready = [k for k, q in self._queues.items() if is_ready(k)] if room > 0 else []
                wake = give_up
                if ready:
                    rows = sum(len(self._queues[k]) for k in ready)
                    fill_by = min(self._queues[k][0].row.arrival for k in ready) + self.max_wait_s
                    if not fill or rows >= room or now >= fill_by or self._draining:
                        taken = self._take(ready, budget, room)
                        if taken:
                            return taken
                    else:
                        wake = min(wake, fill_by)
                if now >= give_up:
                    return []
                self._cond.wait(max(0.0, wake - now))
        return []

    def ready_rows(self, is_ready: Callable[[Any], bool]) -> int:
        """Queued rows whose adapter is ready (the step loop's cue to prefill a group)."""
        with self._cond:
            return sum(len(q) for k, q in self._queues.items() if is_ready(k))

    def _take(self, ready: list[Hashable], budget: SlotBudget, room: int) -> list[tuple[int, T]]:
        order = sorted(ready, key=lambda k: self._queues[k][0].seq)
        batch: list[tuple[int, T]] = []
        for key in order:
            if not budget.place(key):
                break  # no younger row overtakes the oldest row waiting for a slot
            queue = self._queues[key]
            take = min(len(queue), room - len(batch))
            batch.extend((q.seq, q.row) for q in queue[:take])
            del queue[:take]
            if not queue:
                del self._queues[key]
            if len(batch) >= room:
                break
        return batch

    def waiting_keys(self) -> list[Hashable]:
        with self._cond:
            return list(self._queues)

    def notify(self) -> None:
        """Wake `next_rows` (an adapter finished loading, a row was cancelled)."""
        with self._cond:
            self._cond.notify_all()

    # --- lifecycle --------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        """Rows in the queues."""
        with self._cond:
            return sum(len(q) for q in self._queues.values())

    def drain(self) -> None:
        """Queued rows run without waiting to fill static batches."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()

    def close(self) -> list[tuple[int, T]]:
        """Stop: `next_rows` returns [] from now on. Returns the rows still queued."""
        with self._cond:
            self._closed = True
            self._draining = True
            rows = [(q.seq, q.row) for queue in self._queues.values() for q in queue]
            self._queues.clear()
            self._cond.notify_all()
            return rows
