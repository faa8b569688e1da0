"""The scheduler: the line of queued rows, and the choice of which rows join the running batch
at a step.

    scheduler.enqueue([row])               # now schedulable (the ledger admitted it)
    rows = scheduler.next_rows(is_ready, budget, room=8, timeout=0, step=n,
                               running={"acme": 12}, weight=lambda t: 1.0)
    scheduler.discard(row)                 # a queued row ended (cancelled): out of line
    scheduler.expired(now)                 # queued rows past their deadline, out of line

The choice, one row at a time until `room` rows (only rows whose adapter is ready, on the
device or the CPU tier, are candidates):
  1. classes: `interactive` rows first; `batch` rows fill what interactive rows leave. A batch
     row that has waited `batch_aging_steps` steps counts as interactive from then on, so no
     batch row starves.
  2. tenants, weighted fair: among the tenants with a candidate of the best class, the one
     holding the fewest batch rows for its weight (`(running + chosen) / weight`) goes next,
     ties to the oldest row; within a tenant, oldest first. A tenant with waiting rows
     therefore gets the next batch rows that free up until it holds its weighted share,
     whatever the others send (the bound is stated and tested in tests/service/
     test_fair_share.py).
  3. adapters: each row's adapter must get a place from the `SlotBudget` (a device slot it
     already holds, or a free one, within the cap of distinct adapters). Once a row is
     refused a slot, only rows whose adapter already has its place join for the rest of the
     step (they take no slot), and one adapter holding a slot is chosen to drain: the one
     with the fewest running rows gets no new rows until the refused row is placed. Its rows
     end within max_new_tokens steps, its slot is unpinned, and the refused row, still the
     first of its tenant, takes it: a cold adapter waits for at most one row lifetime
     however hot the others are, and the batch keeps filling meanwhile.
With `fill` (static scheduling) `next_rows` also waits up to `max_wait_s` after the oldest
ready row's arrival for `room` rows.

Admission, counts and the end of rows are the row ledger's (service/engine/ledger.py); this
module only keeps rows in line and chooses. Thread-safe: the event loop enqueues and
discards, the engine's worker chooses.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar

from service.exceptions import Draining

Priority = Literal["interactive", "batch"]
PRIORITIES: tuple[Priority, ...] = ("interactive", "batch")


class Schedulable(Protocol):
    """What the scheduler needs to know about a row."""

    @property
    def key(self) -> Hashable: ...  # the adapter version: rows of one key share a slot

    @property
    def tenant(self) -> str: ...

    @property
    def priority(self) -> Priority: ...

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
    step: int = field(compare=False, default=0)  # the step count when it entered the line


def _equal(_: str) -> float:
    return 1.0


def _drainer(
    budget: SlotBudget, running_keys: Mapping[Hashable, int], used: set[Hashable]
) -> Hashable | None:
    """The adapter holding a slot that drains for a refused row: the one with the fewest
    running rows (the soonest free), not one given rows this step; None if there is none."""
    holders = [k for k in budget.present if k not in used]
    if not holders:
        return None
    return min(holders, key=lambda k: (running_keys.get(k, 0), repr(k)))


class Scheduler(Generic[T]):
    """The line of queued rows (oldest first) and the weighted fair choice."""

    def __init__(self, max_wait_s: float = 0.0, batch_aging_steps: int = 64) -> None:
        self.max_wait_s = max_wait_s
        self.batch_aging_steps = batch_aging_steps
        self._cond = threading.Condition()
        self._line: list[_Queued[T]] = []  # sorted by sequence number (arrival order)
        self._seq = 0
        self._step = 0  # the latest step the worker announced (ages batch rows)
        self._closed = False
        self._draining = False  # static batches stop waiting to fill
        # No queued row's deadline is before this (a lower bound): `expired` scans the line
        # only once it passed, not at every step.
        self._next_deadline = float("inf")

    # --- in line ------------------------------------------------------------------------------
    def enqueue(self, rows: Sequence[T]) -> None:
        """Make admitted rows schedulable, in order. Raises Draining if the scheduler was
        closed since their admission (nobody would run them)."""
        with self._cond:
            if self._closed:
                raise Draining("the service stopped before this request could run")
            for row in rows:
                self._seq += 1
                self._line.append(_Queued(self._seq, row, self._step))
                self._next_deadline = min(self._next_deadline, row.deadline)
            self._cond.notify_all()

    def requeue(self, rows: Iterable[tuple[int, T]]) -> None:
        """Put rows back with their original sequence numbers (their place in line), e.g.
        after their adapter was re-resolved."""
        with self._cond:
            for seq, row in rows:
                bisect.insort(self._line, _Queued(seq, row, self._step))
                self._next_deadline = min(self._next_deadline, row.deadline)
            self._cond.notify_all()

    def discard(self, row: T) -> bool:
        """Take `row` out of line if it is there (it ended while waiting); False if it is
        not (the worker took it, or it was never queued)."""
        with self._cond:
            for i, queued in enumerate(self._line):
                if queued.row is row:
                    del self._line[i]
                    return True
            return False

    def expired(self, now: float) -> list[T]:
        """Take every queued row whose deadline passed out of line."""
        with self._cond:
            if now < self._next_deadline:
                return []
            gone = [q.row for q in self._line if q.row.deadline <= now]
            if gone:
                self._line = [q for q in self._line if q.row.deadline > now]
            self._next_deadline = min((q.row.deadline for q in self._line), default=float("inf"))
            return gone

    def take(self, key: Hashable) -> list[tuple[int, T]]:
        """Take every queued row of `key` out of line (its adapter failed to load)."""
        with self._cond:
            taken = [(q.seq, q.row) for q in self._line if q.row.key == key]
            if taken:
                self._line = [q for q in self._line if q.row.key != key]
            return taken

    # --- choosing rows (worker thread) ------------------------------------------------------
    def next_rows(
        self,
        is_ready: Callable[[Any], bool],
        budget: SlotBudget,
        room: int,
        timeout: float,
        fill: bool = False,
        step: int | None = None,
        running: Mapping[str, int] | None = None,
        weight: Callable[[str], float] = _equal,
        running_keys: Mapping[Hashable, int] | None = None,
    ) -> list[tuple[int, T]]:
        """Up to `room` rows to run now, as (sequence number, row), in the order of the
        choice (module docstring); [] when none was ready within `timeout` seconds or the
        scheduler is closed. `running`: each tenant's rows in the batch now, `running_keys`: each
        adapter's; `step`: the worker's step count (ages batch rows). With `fill` (static scheduling) it also waits
        up to `max_wait_s` after the oldest ready row's arrival for `room` rows."""
        give_up = time.monotonic() + timeout
        with self._cond:
            if step is not None:
                self._step = step
            while not self._closed:
                now = time.monotonic()
                ready = self._ready(is_ready) if room > 0 else []
                wake = give_up
                if ready:
                    fill_by = ready[0].row.arrival + self.max_wait_s
                    if not fill or len(ready) >= room or now >= fill_by or self._draining:
                        taken = self._choose(
                            ready, budget, room, running or {}, weight, running_keys or {}
                        )
                        if taken:
                            return taken
                    else:
                        wake = min(wake, fill_by)
                if now >= give_up:
                    return []
                self._cond.wait(max(0.0, wake - now))
        return []

    def ready_rows(self, is_ready: Callable[[Any], bool], limit: int | None = None) -> int:
        """Queued rows whose adapter is ready (the step loop's cue to prefill a group),
        counted up to `limit` (the line is not scanned further)."""
        with self._cond:
            return len(self._ready(is_ready, limit))

    def _ready(self, is_ready: Callable[[Any], bool], limit: int | None = None) -> list[_Queued[T]]:
        known: dict[Hashable, bool] = {}
        ready: list[_Queued[T]] = []
        for queued in self._line:
            key = queued.row.key
            if key not in known:
                known[key] = is_ready(key)
            if known[key]:
                ready.append(queued)
                if len(ready) == limit:
                    break
        return ready

    def _choose(
        self,
        ready: list[_Queued[T]],
        budget: SlotBudget,
        room: int,
        running: Mapping[str, int],
        weight: Callable[[str], float],
        running_keys: Mapping[Hashable, int],
    ) -> list[tuple[int, T]]:
        by_tenant: dict[str, list[_Queued[T]]] = {}
        for queued in ready:  # in arrival order
            by_tenant.setdefault(queued.row.tenant, []).append(queued)
        load: Counter[str] = Counter(running)
        weights = {tenant: max(weight(tenant), 1e-9) for tenant in by_tenant}
        blocked = False  # a row was refused a slot: only placed adapters join from now on
        victim: Hashable | None = None  # the adapter that drains for it

        def head(tenant: str) -> _Queued[T] | None:
            """The tenant's next row: its oldest of the best class, or once blocked its
            oldest of the best class whose adapter already has its place (and is not the
            draining one)."""
            best: _Queued[T] | None = None
            for queued in by_tenant[tenant]:
                key = queued.row.key
                if blocked and (
                    key == victim or not (key in budget.present or key in budget.chosen)
                ):
                    continue
                if self._class(queued) == 0:
                    return queued  # the oldest interactive (or aged) row
                best = best or queued
            return best

        chosen: list[_Queued[T]] = []
        while len(chosen) < room:
            heads = {t: h for t in by_tenant if (h := head(t)) is not None}
            if not heads:
                break
            tenant = min(
                heads,
                key=lambda t: (self._class(heads[t]), load[t] / weights[t], heads[t].seq),
            )
            queued = heads[tenant]
            if not blocked and not budget.place(queued.row.key):
                blocked = True
                victim = _drainer(budget, running_keys, {q.row.key for q in chosen})
                continue
            by_tenant[tenant].remove(queued)
            if not by_tenant[tenant]:
                del by_tenant[tenant]
            chosen.append(queued)
            load[tenant] += 1
        if chosen:
            taken = {id(q) for q in chosen}
            self._line = [q for q in self._line if id(q) not in taken]
        return [(q.seq, q.row) for q in chosen]

    def _class(self, queued: _Queued[T]) -> int:
        """0 for interactive rows and batch rows that waited batch_aging_steps, else 1."""
        if queued.row.priority == "interactive":
            return 0
        return 0 if self._step - queued.step >= self.batch_aging_steps else 1

    def waiting_keys(self) -> list[Hashable]:
        with self._cond:
            return list(dict.fromkeys(q.row.key for q in self._line))

    def notify(self) -> None:
        """Wake `next_rows` (an adapter finished loading, a row was cancelled)."""
        with self._cond:
            self._cond.notify_all()

    # --- lifecycle --------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        """Rows in line."""
        with self._cond:
            return len(self._line)

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
            rows = [(q.seq, q.row) for q in self._line]
            self._line.clear()
            self._cond.notify_all()
            return rows
