"""The row ledger: one owner for a row's whole life, so that every guarantee about rows holds
by construction rather than by each exit path remembering four calls in the right order.

A row holds, from admission to its end: a place in its tenant's in-flight count (and, while it
waits, in the queue bound), a want on its adapter version's CPU copy until it is bound to a
device slot, and then a pin on that slot. It ends exactly once, with one answer: a caption or
an error. Every path that ends a row, whatever thread it runs on, calls `finish(row, outcome)`
(the worker) or `abandon(rows, reason)` (the caller: cancelled, deadline):

    ledger.admit(tenant, rows); ...; ledger.open(rows)          # admitted, queued, wanting
    rows = ledger.next_rows(is_ready, budget, room, timeout)    # worker: out of the queue
    ledger.bound(row, slot)                                     # worker: pinned, want dropped
    ledger.requeue([(seq, row)])                                # worker: back in line
    ledger.finish(row, result_or_error)                         # worker: the one end
    ledger.abandon(rows, "cancelled")                           # any thread: the caller's end
    ledger.sweep_expired(); ledger.take_key(key); ledger.close(error)

The answer is claimed once under the row's lock, counted once under one outcome name
(`completed`, `failed`, `deadline`, `cancelled`), and delivered once. What the row holds is
released by whoever holds the row: a row still in the queue is taken out and released by the
caller that ends it; a row the worker holds (choosing, joining, running) is released by the
worker, which sees it settled at its next step and calls `finish` (the answer part is then a
no-op). Releases happen before the answer is delivered, so whoever awaits it sees the
tenant's count already lowered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

from service.adapter_cache import AdapterCache
from service.admission import Admission
from service.engine.rows import Place, Row
from service.engine.types import CaptionResult
from service.events import EngineEvents
from service.exceptions import Cancelled, DeadlineExceeded, Draining, EngineError
from service.registry import AdapterVersion
from service.scheduler import Scheduler, SlotBudget

log = logging.getLogger(__name__)
Outcome = CaptionResult | EngineError


def outcome_name(outcome: Outcome) -> str:
    """How a row that ended with `outcome` is counted (ctxpeft_rows_total's outcome)."""
    if isinstance(outcome, CaptionResult):
        return "completed"
    if isinstance(outcome, DeadlineExceeded):
        return "deadline"
    if isinstance(outcome, Cancelled):
        return "cancelled"
    return "failed"


class RowLedger:
    def __init__(
        self,
        admission: Admission,
        scheduler: Scheduler[Row],
        cache: AdapterCache[AdapterVersion],
        events: EngineEvents,
    ) -> None:
        self.admission = admission
        self.scheduler = scheduler
        self.cache = cache
        self.events = events

    # --- coming in (event loop) -------------------------------------------------------------
    def admit(self, tenant: str, rows: int, priority: str = "interactive") -> None:
        """Reserve room for `rows` rows (raises the admission's errors, counted)."""
        self.admission.admit(tenant, rows, priority)

    def withdraw(self, tenant: str, rows: int) -> None:
        """An admission whose rows never opened (the image failed to decode)."""
        self.admission.withdraw(tenant, rows)

    def open(self, rows: Sequence[Row]) -> None:
        """Admitted rows start waiting: they want their version's CPU copy and are queued.
        Raises Draining (and gives everything back) if the scheduler closed meanwhile."""
        for row in rows:
            self._want(row)
        try:
            self.scheduler.enqueue(rows)
        except Draining:
            for row in rows:
                self._unwant(row)
                row.place = Place.GONE
            self.admission.withdraw(rows[0].tenant, len(rows))
            raise

    # --- the worker's rows -----------------------------------------------------------------
    def next_rows(
        self,
        is_ready: Callable[[Any], bool],
        budget: SlotBudget,
        room: int,
        timeout: float,
        fill: bool = False,
        step: int | None = None,
        running: Mapping[str, int] | None = None,
        running_keys: Mapping[Hashable, int] | None = None,
    ) -> list[tuple[int, Row]]:
        """Rows to join now (out of the queue: the worker holds them), chosen weighted fair
        across tenants by the tenants' policies."""
        chosen = self.scheduler.next_rows(
            is_ready,
            budget,
            room,
            timeout,
            fill,
            step=step,
            running=running,
            weight=self.admission.tenants.weight,
            running_keys=running_keys,
        )
        self._taken([row for _, row in chosen])
        return chosen

    def take_key(self, key: Hashable) -> list[tuple[int, Row]]:
        """Every queued row of `key` (its version failed to load): the worker holds them, and
        they no longer want that version (one moved to another version wants that one when it
        is put back in line)."""
        taken = self.scheduler.take(key)
        self._taken([row for _, row in taken])
        for _, row in taken:
            self._unwant(row)
        return taken

    def requeue(self, rows: Iterable[tuple[int, Row]]) -> None:
        """Rows the worker holds go back in line, at their place (their sequence number)."""
        back = list(rows)
        if not back:
            return
        for _, row in back:
            row.place = Place.QUEUE
            self._want(row)
        self.admission.requeued(len(back))
        self.scheduler.requeue(back)

    def bound(self, row: Row, slot: int) -> None:
        """The row's version sits pinned in `slot`: the CPU copy is not needed any more."""
        row.slot = slot
        self._unwant(row)

    def sweep_expired(self) -> None:
        """Queued rows whose deadline passed end before any compute is spent on them."""
        expired = self.scheduler.expired(time.monotonic())
        self._taken(expired)
        for row in expired:
            self.finish(row, DeadlineExceeded("the deadline passed while the request was queued"))

    def close(self, error: EngineError) -> None:
        """Shut down: every queued row ends with `error`."""
        queued = [row for _, row in self.scheduler.close()]
        self._taken(queued)
        for row in queued:
            self.finish(row, error)

    # --- the end ---------------------------------------------------------------------------
    def finish(self, row: Row, outcome: Outcome | None = None) -> bool:
        """The worker ends a row it holds: answered with `outcome` unless it was answered
        already (then only released; `outcome` None means "it was answered elsewhere").
        Releases its pin, its want and its tenant's count, then delivers. Never raises;
        returns whether this call answered it."""
        answered = outcome is not None and self._claim(row)
        try:
            self._release(row, by_worker=True)
        except Exception:
            log.exception("releasing a row failed")
            self.events.fault("deliver")
        if answered:
            assert outcome is not None
            self._count(row, outcome)
            self._deliver(row, outcome)
        return answered

    def abandon(self, rows: Sequence[Row], reason: str) -> int:
        """The caller ends rows it no longer waits for (`cancelled`, `deadline`): those not
        answered yet are answered now with Cancelled / DeadlineExceeded. A row still in the
        queue leaves it at once; one the worker holds is released at the worker's next step.
        Returns how many this call answered."""
        error: EngineError = (
            Cancelled("the request was cancelled")
            if reason == "cancelled"
            else DeadlineExceeded("the request's deadline passed")
        )
        claimed = [row for row in rows if self._claim(row)]
        for row in claimed:
            self._release(row, by_worker=False)
            self._count(row, error)
            self._deliver(row, error)
        if claimed:
            self.scheduler.notify()
        return len(claimed)

    # --- internals ---------------------------------------------------------------------------
    def _claim(self, row: Row) -> bool:
        with row.lock:
            if row.answered:
                return False
            row.answered = True
            return True

    def _taken(self, rows: Sequence[Row]) -> None:
        for row in rows:
            row.place = Place.WORKER
        if rows:
            self.admission.dequeued(len(rows))

    def _release(self, row: Row, by_worker: bool) -> None:
        """Give back whatever the row still holds, if the caller may: a row still in the
        queue is taken out by whoever ends it; a row the worker holds only by the worker.
        Once: a second call finds nothing."""
        if self.scheduler.discard(row):  # it was still queued: whoever ends it owns it now
            self.admission.dequeued(1)
        elif not by_worker and row.place is not Place.GONE:
            return  # the worker holds it: it releases it when it sees it settled
        with row.lock:
            if row.place is Place.GONE:
                return
            row.place = Place.GONE
        self._unwant(row)
        if row.slot is not None:
            self.cache.release({row.key: row.slot}, [row.key])
            row.slot = None
        self.admission.finished(row.tenant, 1)

    def _deliver(self, row: Row, outcome: Outcome) -> None:
        """Never raises: a delivery that fails is logged and counted (the caller's deadline
        answers it)."""
        try:
            row.deliver(outcome)
        except Exception:
            log.exception("answering a row failed")
            self.events.fault("deliver")

    def _count(self, row: Row, outcome: Outcome) -> None:
        if isinstance(outcome, CaptionResult):
            self.events.completed(row.name, row.key.ref, outcome.tokens)
            self.admission.record_row(time.monotonic() - row.joined)
            self.admission.charge(row.tenant, outcome.tokens)
        else:
            self.events.ended(outcome_name(outcome))

    def _want(self, row: Row) -> None:
        with row.lock:
            if row.wanting:
                return
            row.wanting = True
        self.cache.want(row.key)

    def _unwant(self, row: Row) -> None:
        with row.lock:
            if not row.wanting:
                return
            row.wanting = False
        self.cache.unwant(row.key)
