"""The scheduler: admission control and batch formation over per-adapter FIFO queues.

    scheduler.admit("acme", rows=1)        # raises Draining / QueueFull / TenantLimit
    scheduler.enqueue([row])               # now schedulable
    batch = scheduler.next_batch(is_ready, slots=16, timeout=0.1)   # worker thread
    ...                                    # run it
    scheduler.finished("acme", rows=1)     # the tenant's in-flight count goes down

Batch formation: the batch starts from the oldest waiting row whose adapter is ready (on
the device or the CPU tier), takes more rows of that adapter (grouping: its rows are
contiguous), then the adapters with the next-oldest heads, until `max_batch_size` rows or
`slots` adapters (mixing). When fewer rows are ready than fit, it waits up to `max_wait_s`
after the oldest row's arrival. Seeding from the globally oldest row makes it fair: however
hot one adapter is, a cold adapter's row is the oldest after at most the rows that arrived
before it, so it waits a bounded number of batches.

Admission: `queue_size` bounds rows waiting (admitted, not yet in a batch);
`tenant_max_inflight` bounds a tenant's rows admitted and not yet finished. A request that
names K adapters is K rows. Rows whose deadline passed or that were settled elsewhere
(cancelled, timed out on the caller's side) are dropped while scanning, before any compute;
`on_drop(row, reason)` is told about every dropped row: reason "deadline", or None for a
row that was already settled.

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
from service.metrics import ServiceMetrics


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
        metrics: ServiceMetrics | None = None,
        on_drop: Callable[[T, str | None], None] | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self.tenant_max_inflight = tenant_max_inflight
        self.max_adapters_per_batch = max_adapters_per_batch
        self._metrics = metrics
        self._on_drop = on_drop
        self._cond = threading.Condition()
        self._queues: dict[Hashable, list[_Queued[T]]] = {}
        self._seq = 0
        self._waiting = 0  # admitted rows not yet taken into a batch (reserved + queued)
        self._inflight: Counter[str] = Counter()
        self._draining = False
        self._closed = False
        self._batch_seconds = 0.0  # moving average, for Retry-After hints
        self.dropped: Counter[str] = Counter()  # rows dropped while queued, by reason
        self.rejected: Counter[str] = Counter()  # admissions refused, by reason

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
        self.rejected[error.reason] += 1
        if self._metrics is not None:
            self._metrics.reject(error.reason)
        return error

    def _retry_after(self) -> float:
        batches = max(1.0, self._waiting / self.max_batch_size)
        return round(max(1.0, batches * self._batch_seconds), 1)

    def withdraw(self, tenant: str, rows: int = 1) -> None:
        """Give back an admission whose rows were never enqueued (e.g. a bad image)."""
        with self._cond:
            self._waiting -= rows
            self._release(tenant, rows)

    def enqueue(self, rows: Sequence[T]) -> None:
        """Make admitted rows schedulable, in order (FIFO per adapter)."""
        with self._cond:
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

    # --- batch formation (worker thread) ----------------------------------------------------
    def next_batch(
        self, is_ready: Callable[[Any], bool], slots: int, timeout: float
    ) -> list[tuple[int, T]]:
        """The next batch as (sequence number, row) pairs, grouped by adapter; [] when nothing
        was ready within `timeout` seconds or the scheduler is closed."""
        give_up = time.monotonic() + timeout
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                self._sweep(now)
                ready = [k for k, q in self._queues.items() if is_ready(k)]
                wake = give_up
                if ready:
                    rows = sum(len(self._queues[k]) for k in ready)
                    oldest = min(self._queues[k][0].row.arrival for k in ready)
                    fill_by = oldest + self.max_wait_s
                    if rows >= self.max_batch_size or now >= fill_by or self._draining:
                        return self._take(ready, slots)
                    wake = min(wake, fill_by)
                if now >= give_up:
                    return []
                self._cond.wait(max(0.0, wake - now))
        return []

    def _take(self, ready: list[Hashable], slots: int) -> list[tuple[int, T]]:
        order = sorted(ready, key=lambda k: self._queues[k][0].seq)
        adapters = min(slots, self.max_adapters_per_batch or slots)
        batch: list[tuple[int, T]] = []
        for key in order[:adapters]:
            queue = self._queues[key]
            take = min(len(queue), self.max_batch_size - len(batch))
            batch.extend((q.seq, q.row) for q in queue[:take])
            del queue[:take]
            if not queue:
                del self._queues[key]
            if len(batch) >= self.max_batch_size:
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
        if reason is not None:
            self.dropped[reason] += 1
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
        """Wake `next_batch` (an adapter finished loading, a row was cancelled)."""
        with self._cond:
            self._cond.notify_all()

    def record_batch(self, seconds: float) -> None:
        with self._cond:
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds

    def _publish(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.set(self._waiting)

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
