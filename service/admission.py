"""Admission: how many rows each tenant has in flight, how many wait, and whether the service
still admits at all. One object answers "may these rows come in?" for the single-process
engine (tenant limit and queue bound) and for the Ray ingress (tenant limit; each replica
bounds its own queue), and the drain waits on it.

    admission = Admission(tenant_max_inflight=32, queue_size=256, events=events,
                          tenants=policies, batch_queue_share=0.5)
    admission.admit("acme", rows=2)     # raises Draining / QueueFull / TenantLimit /
                                        # TokenRateLimit / BatchShed (each counted)
    admission.withdraw("acme", rows=2)  # the rows never queued (a bad image)
    admission.dequeued(rows=2)          # they left the queue (joined a batch, or ended there)
    admission.finished("acme", rows=2)  # they ended: the tenant's count goes down
    admission.charge("acme", tokens=9)  # completion tokens, against the tenant's rate
    admission.drain(); admission.wait_idle(timeout_s=20)

A request that names K adapters is K rows. Token rates: a tenant with `tokens_per_minute`
has a bucket of that many completion tokens, refilled continuously; rows are charged the
tokens they generated when they end, and while the bucket is empty (in debt: a request does
not know its length in advance) the tenant's requests get 429 with the Retry-After at which it
refills. Priority classes: a `batch` request is refused (429 batch_shed) once the rows waiting
reach `batch_queue_share` of the queue, so under overload batch requests are refused before
interactive ones (which wait for `queue_size`). `waiting` counts rows admitted and not yet out of
the queue (reserved during image decoding too); `queue_size=None` bounds nothing (the ingress).
Counts never go below zero: a second release of the same rows is a bug, and it raises here
rather than hiding as a negative count that admits too much later. Thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Protocol

from service.exceptions import (
    BatchShed,
    Draining,
    EngineError,
    QueueFull,
    TenantLimit,
    TokenRateLimit,
)
from service.tenancy import TenantPolicies


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
        tenants: TenantPolicies | None = None,
        batch_queue_share: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tenant_max_inflight = tenant_max_inflight
        self.queue_size = queue_size
        self.tenants = tenants or TenantPolicies()
        self.batch_queue_share = batch_queue_share
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._events = events
        self._batch_size = batch_size  # rows served together: for Retry-After hints
        self._cond = threading.Condition()
        self._inflight: Counter[str] = Counter()
        self._waiting = 0
        self._draining = False
        self._row_seconds = 0.0  # moving average of a row's run time, for Retry-After hints

    # --- coming in -------------------------------------------------------------------------
    def admit(self, tenant: str, rows: int = 1, priority: str = "interactive") -> None:
        """Reserve room for `rows` rows of `tenant`, or raise why not (counted)."""
        with self._cond:
            error: EngineError | None = None
            debt = self._debt(tenant)
            if self._draining:
                error = Draining("the service is draining; retry on another replica")
            elif debt is not None:
                error = TokenRateLimit(
                    f"tenant {tenant!r} used its {self.tenants.tokens_per_minute(tenant)} "
                    "completion tokens per minute (tokens_per_minute in the keys file)",
                    retry_after_s=debt,
                )
            elif (
                priority == "batch"
                and self.queue_size is not None
                and self._waiting + rows > self.batch_queue_share * self.queue_size
            ):
                error = BatchShed(
                    f"the service is busy ({self._waiting} of {self.queue_size} rows waiting): "
                    "batch requests are refused first; retry later or send it as interactive",
                    retry_after_s=self._retry_after(),
                )
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

    def charge(self, tenant: str, tokens: int) -> None:
        """A row of `tenant` generated `tokens` completion tokens (its rate limit, if any)."""
        rate = self.tenants.tokens_per_minute(tenant)
        if rate is None or tokens <= 0:
            return
        with self._cond:
            bucket = self._buckets.get(tenant)
            if bucket is None:
                bucket = self._buckets[tenant] = _Bucket(float(rate), self._clock())
            bucket.take(tokens, rate, self._clock())

    def _debt(self, tenant: str) -> float | None:
        """Seconds until the tenant's token bucket is out of debt, or None when it has
        tokens (or no limit). Lock held."""
        rate = self.tenants.tokens_per_minute(tenant)
        bucket = self._buckets.get(tenant)
        if rate is None or bucket is None:
            return None
        level = bucket.level(rate, self._clock())
        if level > 0:
            return None
        return max(1.0, -level * 60.0 / rate)

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


class _Bucket:
    """A token bucket of capacity `rate` (one minute's tokens), refilled at rate / 60 a
    second; it may go into debt (a row's tokens are known only when it ends)."""

    def __init__(self, tokens: float, now: float) -> None:
        self.tokens = tokens
        self.at = now

    def level(self, rate: int, now: float) -> float:
        self.tokens = min(float(rate), self.tokens + (now - self.at) * rate / 60.0)
        self.at = now
        return self.tokens

    def take(self, tokens: int, rate: int, now: float) -> None:
        self.level(rate, now)
        self.tokens -= tokens
