"""The scheduler: admission control and the choice of rows to run, over per-adapter FIFO
queues.

    scheduler.admit("acme", rows=1)        # raises Draining / QueueFull / TenantLimit
    scheduler.enqueue([row])               # now schedulable
    rows = scheduler.next_rows(is_ready, SlotBudget(free=3, present={...}), room=8, timeout=0)
    ...                                    # they join the running batch (worker thread)
    scheduler.finished("acme", rows=1)     # the tenant's in-flight count goes down

Choosing rows: start from the oldest waiting row whose adapter is ready (on the device or the
CPU tier), take more rows of that adapter (grouping: its rows are contiguous), then the
adapters with the next-oldest heads, until `room` rows. Each adapter must first get a place
from the `SlotBudget` (a device slot it already holds, or a free one, within the cap of
distinct adapters); the first adapter refused ends the choice, so no younger row overtakes a
row that waits for a slot. That makes it fair: however hot one adapter is, a cold adapter's
row is the oldest after at most the rows that arrived before it, and from then on it waits
only for one slot to be unpinned (a running row ends within max_new_tokens steps).
`next_batch` is the static form: a whole batch (`max_batch_size` rows over at most `slots`
adapters), waiting up to `max_wait_s` after the oldest ready row's arrival to fill.

Admission: `queue_size` bounds rows waiting (admitted, not yet in a batch);
`tenant_max_inflight` bounds a tenant's rows admitted and not yet finished. A request that
names K adapters is K rows. Rows whose deadline passed or that were settled elsewhere
(cancelled, timed out on the caller's side) are dropped while scanning, before any compute;
`on_drop(row, reason)` is told about every dropped row: reason "deadline", or None for a
row that was already settled. Rejections and the queue depth are reported to `events` (the
engine's counters).

Thread-safe: the event loop admits and enqueues, the engine's worker forms batches.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from service.exceptions import Draining, QueueFull, TenantLimit


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

    def settled(self) -> bool: ...  # answered elsewhere (cancelled / timed out): skip it


T = TypeVar("T", bound=Schedulable)


class SchedulerEvents(Protocol):
    """Where the scheduler reports what it counts (the engine's `EngineCounters`)."""

    def rejected(self, reason: str) -> None: ...

    def queue_depth(self, rows: int) -> None: ...


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

    def __init__(
        self,
        max_batch_size: int,
        max_wait_s: float,
        queue_size: int,
        tenant_max_inflight: int,
        max_adapters_per_batch: int | None = None,
        events: SchedulerEvents | None = None,
        on_drop: Callable[[T, str | None], None] | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self.tenant_max_inflight = tenant_max_inflight
        self.max_adapters_per_batch = max_adapters_per_batch
        self._events = events
        self._on_drop = on_drop
        self._cond = threading.Condition()
        self._queues: dict[Hashable, list[_Queued[T]]] = {}
        self._seq = 0
        self._waiting = 0  # admitted rows not yet taken into a batch (reserved + queued)
        self._inflight: Counter[str] = Counter()
        self._draining = False
        self._closed = False
        self._row_seconds = 0.0  # moving average of a row's run time, for Retry-After hints

    # --- admission (event loop) ---------------------------------------------------------
    def admit(self, tenant: str, rows: int = 1) -> None:
        """Reserve room for `rows` rows of `tenant`, or raise why not (counted)."""
        with self._cond:
            if self._draining or self._closed:
                raise self._reject(Draining("the service is draining; retry on another replica"))
            if self._waiting + rows > self.queue_size:
                raise self._reject(
                    QueueFull(
                        f"the queue is full ({self._waiting} of {self.queue_size} rows waiting)",
                        retry_after_s=self._retry_after(),
                    )
                )
            if self._inflight[tenant] + rows > self.tenant_max_inflight:
                raise self._reject(
                    TenantLimit(
                        f"tenant {tenant!r} has {self._inflight[tenant]} rows in flight; the "
                        f"limit is {self.tenant_max_inflight} (tenant_max_inflight)",
                        retry_after_s=self._retry_after(),
                    )
                )
            self._waiting += rows
            self._inflight[tenant] += rows
            self._publish()

    def _reject(self, error: Draining | QueueFull | TenantLimit) -> Exception:
        assert error.reason is not None
        if self._events is not None:
            self._events.rejected(error.reason)
        return error

    def _retry_after(self) -> float:
        # Rows run max_batch_size at a time: the queue ahead clears in about this long.
        rounds = max(1.0, self._waiting / self.max_batch_size)
        return round(max(1.0, rounds * self._row_seconds), 1)

    def withdraw(self, tenant: str, rows: int = 1) -> None:
        """Give back an admission whose rows were never enqueued (e.g. a bad image)."""
        with self._cond:
            self._waiting -= rows
            self._release(tenant, rows)

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
        after their adapter was re-resolved; they count as waiting again."""
        with self._cond:
            for seq, row in rows:
                bisect.insort(self._queues.setdefault(row.key, []), _Queued(seq, row))
                self._waiting += 1
            self._cond.notify_all()

    def finished(self, tenant: str, rows: int = 1) -> None:
        """Rows taken into a batch are done (answered or failed)."""
        with self._cond:
            self._release(tenant, rows)

    def _release(self, tenant: str, rows: int) -> None:
        self._inflight[tenant] -= rows
        if self._inflight[tenant] <= 0:
            del self._inflight[tenant]
        self._publish()
        self._cond.notify_all()

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
                self._sweep(now)
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
            self._sweep(time.monotonic())
            return sum(len(q) for k, q in self._queues.items() if is_ready(k))

    def next_batch(
        self, is_ready: Callable[[Any], bool], slots: int, timeout: float
    ) -> list[tuple[int, T]]:
        """A static batch: up to `max_batch_size` rows over at most `slots` adapters (and
        `max_adapters_per_batch`), waiting up to `max_wait_s` to fill."""
        budget = SlotBudget(slots, self.max_adapters_per_batch)
        return self.next_rows(is_ready, budget, self.max_batch_size, timeout, fill=True)

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
        self._waiting -= len(batch)
        self._publish()
        return batch

    def _sweep(self, now: float) -> None:
        """Drop rows that were settled elsewhere or whose deadline passed."""
        for key in list(self._queues):
            queue = self._queues[key]
            kept = []
            for q in queue:
                row = q.row
                if row.settled():
                    self._drop(row, None)
                elif now >= row.deadline:
                    self._drop(row, "deadline")
                else:
                    kept.append(q)
            if not kept:
                del self._queues[key]
            elif len(kept) < len(queue):
                self._queues[key] = kept

    def _drop(self, row: T, reason: str | None) -> None:
        self._waiting -= 1
        self._release(row.tenant, 1)
        if self._on_drop is not None:
            self._on_drop(row, reason)

    def take(self, key: Hashable) -> list[tuple[int, T]]:
        """Remove every queued row of `key` (its adapter failed to load): they stop waiting
        but stay in flight until `finished`."""
        with self._cond:
            queue = self._queues.pop(key, [])
            self._waiting -= len(queue)
            self._publish()
            return [(q.seq, q.row) for q in queue]

    def waiting_keys(self) -> list[Hashable]:
        with self._cond:
            return list(self._queues)

    def notify(self) -> None:
        """Wake `next_rows` (an adapter finished loading, a row was cancelled)."""
        with self._cond:
            self._cond.notify_all()

    def record_row(self, seconds: float) -> None:
        """How long a finished row ran (joining to answer), for Retry-After hints."""
        with self._cond:
            self._row_seconds = 0.8 * self._row_seconds + 0.2 * seconds

    def _publish(self) -> None:
        if self._events is not None:
            self._events.queue_depth(self._waiting)

    # --- lifecycle --------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        with self._cond:
            return self._waiting

    @property
    def queued(self) -> int:
        """Rows in the queues (admitted rows still being preprocessed are not counted)."""
        with self._cond:
            return sum(len(q) for q in self._queues.values())

    @property
    def inflight(self) -> int:
        with self._cond:
            return sum(self._inflight.values())

    def inflight_of(self, tenant: str) -> int:
        """The tenant's rows admitted and not yet finished."""
        with self._cond:
            return self._inflight[tenant]

    def drain(self) -> None:
        """Admit nothing new; queued rows run without waiting to fill batches."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()

    @property
    def draining(self) -> bool:
        return self._draining

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no row is in flight; False if `timeout` seconds passed first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while sum(self._inflight.values()) > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self) -> list[tuple[int, T]]:
        """Stop: `next_batch` returns [] from now on. Returns the rows still queued."""
        with self._cond:
            self._closed = True
            self._draining = True
            rows = [(q.seq, q.row) for queue in self._queues.values() for q in queue]
            self._queues.clear()
            self._waiting -= len(rows)
            self._cond.notify_all()
            return rows
