"""Map the engine's typed errors to HTTP answers (one place, used by every router)."""

from __future__ import annotations

import math

from service.api.errors import ApiError
from service.exceptions import (
    AdapterLoadError,
    AdapterNonFinite,
    AdapterNotFound,
    AdapterQuarantined,
    AdapterUnservable,
    Cancelled,
    DeadlineExceeded,
    Draining,
    EngineError,
    EngineFault,
    EngineStopped,
    InvalidRequest,
    QueueFull,
    TenantLimit,
)

# (status, error type) per engine error; the first matching class wins.
_STATUS: tuple[tuple[type[EngineError], int, str], ...] = (
    (AdapterNotFound, 404, "adapter_not_found"),
    (InvalidRequest, 422, "invalid_parameter"),
    (AdapterUnservable, 422, "adapter_unservable"),
    (AdapterNonFinite, 422, "adapter_non_finite"),
    (AdapterQuarantined, 422, "adapter_quarantined"),
    (TenantLimit, 429, "tenant_limit"),
    (QueueFull, 503, "queue_full"),
    (Draining, 503, "draining"),
    (AdapterLoadError, 503, "adapter_unavailable"),
    (EngineFault, 503, "engine_fault"),
    (EngineStopped, 503, "engine_stopped"),
    (DeadlineExceeded, 504, "deadline_exceeded"),
    (Cancelled, 499, "cancelled"),
)


def to_api_error(exc: EngineError) -> ApiError:
    for cls, status, kind in _STATUS:
        if isinstance(exc, cls):
            headers = None
            retry = exc.retry_after_s
            if retry is None and status == 503:
                retry = 1.0
            if retry is not None:
                headers = {"Retry-After": str(max(1, math.ceil(retry)))}
            error = ApiError(status, kind, exc.message, headers=headers)
            error.refs = exc.refs
            return error
    return ApiError(500, "internal", "internal error")
