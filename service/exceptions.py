"""Typed errors of the serving engine (registry, scheduler, engine), for the HTTP layer to map.

Every error is an `EngineError`; `reason` is the `ctxpeft_rejections_total` reason the engine
counted it under (None when the engine does not count it), `retry_after_s` a hint for a
Retry-After header (None when retrying cannot help).

    AdapterNotFound    404  no such adapter for this tenant (own or public), or it was deleted
    AdapterLoadError   503  the adapter version on disk failed validation or could not be read
    AdapterUnservable  422  the version failed the servability probe (a forward on a fixed
                            image raised or gave NaN/infinity): it can never serve
    AdapterNonFinite   422  the adapter's computation gave NaN or infinity for this request; the
                            row was stopped alone (co-batched rows are untouched)
    AdapterQuarantined 422  the version kept producing non-finite values and is refused until a
                            new version replaces it
    InvalidRequest     422  bad parameters (no adapter named, max_new_tokens out of range, ...)
    QueueFull          503  the bounded queue is full (Retry-After)
    Draining           503  the engine is shutting down and admits nothing new
    TenantLimit        429  the tenant has too many requests in flight (Retry-After)
    DeadlineExceeded   504  the request's deadline passed before its answer
    Cancelled          499  the request was cancelled (client gone) before its answer
    EngineFault        503  an internal error while computing this request (contained: other
                            requests were not affected); retrying may help
    EngineStopped      503  the engine's worker stopped; the process needs a restart
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.store import AdapterRef


class RequestError(Exception):
    """An error that answers one request: the engine's errors, and the HTTP layer's (whose
    image decoder the engine calls). `refs`: the adapter versions the request had resolved
    to when it failed (empty before resolution); the metrics label only resolved names."""

    refs: tuple[AdapterRef, ...] = ()


class EngineError(RequestError):
    """Base of the engine's errors."""

    reason: str | None = None

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class AdapterNotFound(EngineError, LookupError):
    """No adapter of that name is visible to the tenant (its own first, then public)."""


class AdapterLoadError(EngineError):
    """The resolved adapter version could not be loaded; the message says why."""


class AdapterUnservable(AdapterLoadError):
    """The version failed the servability probe: final (versions are immutable)."""

    load_failure = "invalid"  # the ctxpeft_adapter_load_failures_total reason


class AdapterNonFinite(EngineError):
    """This row's logits held NaN or an infinity (the adapter's numbers overflowed)."""


class AdapterQuarantined(EngineError):
    """The version produced non-finite values again and again: refused until replaced."""


class InvalidRequest(EngineError, ValueError):
    """The request's parameters are invalid; the message names the parameter."""


class QueueFull(EngineError):
    reason = "queue_full"


class Draining(EngineError):
    reason = "draining"


class TenantLimit(EngineError):
    reason = "tenant_limit"


class DeadlineExceeded(EngineError):
    reason = "deadline"


class Cancelled(EngineError):
    reason = "cancelled"


class EngineFault(EngineError):
    """An exception inside the engine failed this request's row (and only the rows it could
    be attributed to); the message says at which stage."""


class EngineStopped(EngineError):
    """The engine's worker thread stopped: nothing can run until the process restarts."""
