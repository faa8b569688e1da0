"""Admission: how many rows each tenant has in flight, how many wait, and whether the service
still admits at all. One object answers "may these rows come in?" for the single-process
engine (tenant limit and queue bound) and for the Ray ingress (tenant limit; each replica
bounds its own queue), and the drain waits on it.

    admission = Admission(tenant_max_inflight=32, queue_size=256, events=counters)
    admission.admit("acme", rows=2)     # raises Draining / QueueFull / TenantLimit (counted)
    admission.withdraw("acme", rows=2)  # the rows never queued (a bad image)
    admission.dequeued(rows=2)          # they left the queue (joined a batch, or ended there)
    admission.finished("acme", rows=2)  # they ended: the tenant's count goes down
    admission.drain(); admission.wait_idle(timeout_s=20)

A request that names K adapters is K rows. `waiting` counts rows admitted and not yet out of
the queue (reserved during image decoding too); `queue_size=None` bounds nothing (the ingress).
Counts never go below zero: a second release of the same rows is a bug, and it raises here
rather than hiding as a negative count that admits too much later. Thread-safe.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Protocol

from service.exceptions import Draining, EngineError, QueueFull, TenantLimit


class AdmissionEvents(Protocol):
    """Where admission reports what it counts (the engine's event sink, or the ingress's)."""

    def rejected(self, reason: str) -> None: ...

    def queue_depth(self, rows: int) -> None: ...


class Admission:
    def __init__(
        self,
        tenant_max_inflight: int,
        queue_size: int | None = None,
        events: AdmissionEvents | None = None,
        batch_size: int = 1,
    ) -> None:
        self.tenant_max_inflight = tenant_max_inflight
        self.queue_size = queue_size
        self._events = events
        self._batch_size = batch_size  # rows served together: for Retry-After hints
        self._cond = threading.Condition()
        self._inflight: Counter[str] = Counter()
        self._waiting = 0
        self._draining = False
        self._row_seconds = 0.0  # moving average of a row's run time, for Retry-After hints

    # --- coming in -------------------------------------------------------------------------
    def admit(self, tenant: str, rows: int = 1) -> None:
        """Reserve room for `rows` rows of `tenant`, or raise why not (counted)."""
        with self._cond:
            error: EngineError | None = None
            if self._draining:
                error = Draining("the service is draining; retry on another replica")
            elif self.queue_size is not None and self._waiting + rows > self.queue_size:
                error = QueueFull(
                    f"the queue is full ({self._waiting} of {self.queue_size} rows waiting)",
                    retry_after_s=self._retry_after(),
                )
            elif self._inflight[tenant] + rows > self.tenant_max_inflight:
                error = TenantLimit(
                    f"tenant {tenant!r} has {self._inflight[tenant]} rows in flight; the limit "
                    f"is {self.tenant_max_inflight} (tenant_max_inflight)",
                    retry_after_s=self._retry_after(),
                )
            if error is not None:
                if self._events is not None and error.reason is not None:
                    self._events.rejected(error.reason)
                raise error
            self._waiting += rows
            self._inflight[tenant] += rows
            self._publish()

    def withdraw(self, tenant: str, rows: int = 1) -> None:
        """Give back an admission whose rows were never queued (e.g. a bad image)."""
        with self._cond:
            self._leave_queue(rows)
            self._release(tenant, rows)

    # --- the queue ---------------------------------------------------------------------------
    def dequeued(self, rows: int = 1) -> None:
        """Rows left the queue: they joined a batch, or ended while waiting."""
        with self._cond:
            self._leave_queue(rows)
            self._publish()

    def requeued(self, rows: int = 1) -> None:
        """Rows taken out of the queue went back in (their adapter was re-resolved...)."""
        with self._cond:
            self._waiting += rows
            self._publish()

    # --- going out ---------------------------------------------------------------------------
    def finished(self, tenant: str, rows: int = 1) -> None:
        """Rows of `tenant` ended (answered, failed or dropped): its count goes down."""
        with self._cond:
            self._release(tenant, rows)

    def record_row(self, seconds: float) -> None:
        """How long a finished row ran (joining to answer), for Retry-After hints."""
        with self._cond:
            self._row_seconds = 0.8 * self._row_seconds + 0.2 * seconds

    # --- the drain ---------------------------------------------------------------------------
    def drain(self) -> None:
        """Admit nothing new from now on (Draining, 503)."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()

    @property
    def draining(self) -> bool:
        return self._draining

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no row is in flight; False if `timeout_s` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._inflight, timeout=timeout_s)

    # --- reading -----------------------------------------------------------------------------
    @property
    def inflight(self) -> int:
        with self._cond:
            return sum(self._inflight.values())

    def inflight_of(self, tenant: str) -> int:
        with self._cond:
            return self._inflight[tenant]

    @property
    def waiting(self) -> int:
        with self._cond:
            return self._waiting

    # --- internals (lock held) ---------------------------------------------------------------
    def _leave_queue(self, rows: int) -> None:
        if rows > self._waiting:
            raise RuntimeError(f"{rows} rows left a queue of {self._waiting}: counted twice")
        self._waiting -= rows

    def _release(self, tenant: str, rows: int) -> None:
        if rows > self._inflight[tenant]:
            raise RuntimeError(
                f"{rows} rows of tenant {tenant!r} ended but {self._inflight[tenant]} were in "
                "flight: a row ended twice"
            )
        self._inflight[tenant] -= rows
        if self._inflight[tenant] == 0:
            del self._inflight[tenant]
        self._publish()
        self._cond.notify_all()

    def _retry_after(self) -> float:
        # Rows run batch_size at a time: the queue ahead clears in about this long.
        rounds = max(1.0, self._waiting / self._batch_size)
        return round(max(1.0, rounds * self._row_seconds), 1)

    def _publish(self) -> None:
        if self._events is not None:
            self._events.queue_depth(self._waiting)
