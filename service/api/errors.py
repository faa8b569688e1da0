"""One error shape for every 4xx/5xx answer, and the handlers that produce it.

    {"error": {"type": "image_too_large", "message": "..."}, "request_id": "3f2a..."}

Code under `service.api` raises `ApiError(status, type, message, headers=...)`; the app factory
calls `install_error_handlers(app)` so that ApiError, FastAPI's validation errors, Starlette's
HTTP exceptions (unknown route, wrong method) and any unexpected exception all answer in that
shape. An unexpected exception is logged with its traceback and answered as a bare 500
"internal": its message may hold internals and never reaches the client.

A path prefix may answer its errors in another shape, with the same statuses and types:
`add_error_shape(app, "/v1/", openai_error_content)` (the OpenAI-compatible routes). Every
error answer goes through `error_response(..., scope=...)`, which picks the shape by path.
"""

from __future__ import annotations

import http
import logging
import math
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service.api.openai_schemas import OpenAIErrorBody
from service.exceptions import (
    AdapterLoadError,
    AdapterNonFinite,
    AdapterNotFound,
    AdapterQuarantined,
    AdapterUnservable,
    BatchShed,
    Cancelled,
    DeadlineExceeded,
    Draining,
    EngineError,
    EngineFault,
    EngineStopped,
    ImageError,
    ImageTooLarge,
    InvalidImage,
    InvalidRequest,
    QueueFull,
    RequestError,
    TenantLimit,
    TokenRateLimit,
)
from service.logging import current_request_id
from service.tenancy import InvalidId, check_name

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
_TYPE_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")

# Error type used when only a status is known (Starlette's own exceptions, bare statuses).
DEFAULT_ERROR_TYPES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    409: "conflict",
    411: "length_required",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_parameter",
    429: "too_many_requests",
    500: "internal",
    501: "not_implemented",
    503: "unavailable",
    504: "timeout",
}


class ErrorDetail(BaseModel):
    type: str = Field(description="Stable snake_case error kind, e.g. image_too_large.")
    message: str = Field(description="Human-readable explanation; wording may change.")


class ErrorBody(BaseModel):
    """The body of every 4xx/5xx response (for OpenAPI `responses=`)."""

    error: ErrorDetail
    request_id: str = Field(description="Id of the request; also in the X-Request-ID header.")


class ApiError(RequestError):
    """An error answered to the client as-is: status, snake_case type, message, headers."""

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        if not 400 <= status <= 599:
            raise ValueError(f"ApiError status must be 4xx or 5xx, got {status}")
        if not _TYPE_PATTERN.match(type):
            raise ValueError(f"ApiError type must be snake_case, got {type!r}")
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})
        self.param = param  # the request field at fault, when one is (shapes that name it)

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.type!r}, {self.message!r})"


def default_error_type(status: int) -> str:
    """The snake_case type for a bare status: 404 -> not_found, 418 -> client_error."""
    if status in DEFAULT_ERROR_TYPES:
        return DEFAULT_ERROR_TYPES[status]
    return "server_error" if status >= 500 else "client_error"


def request_id_from_scope(scope: Mapping[str, Any]) -> str:
    """The request id RequestIdMiddleware stored, else the logging context's, else a new one."""
    state = scope.get("state")
    request_id = state.get("request_id") if isinstance(state, Mapping) else None
    if not request_id:
        request_id = current_request_id()
    return request_id or uuid.uuid4().hex


def error_content(type: str, message: str, request_id: str) -> dict[str, Any]:
    """The error shape as a JSON-ready dict."""
    return {"error": {"type": type, "message": message}, "request_id": request_id}


# (status, type, message, param, request_id) -> the JSON body of an error answer.
ErrorShape = Callable[[int, str, str, str | None, str], dict[str, Any]]


def add_error_shape(app: FastAPI, prefix: str, shape: ErrorShape) -> None:
    """Answer the errors of paths under `prefix` (e.g. "/v1/") in `shape` instead."""
    shapes: dict[str, ErrorShape] = getattr(app.state, "error_shapes", {})
    app.state.error_shapes = {**shapes, prefix: shape}


def _shape_for(scope: Mapping[str, Any] | None) -> ErrorShape | None:
    if scope is None:
        return None
    state = getattr(scope.get("app"), "state", None)
    shapes: Mapping[str, ErrorShape] = getattr(state, "error_shapes", None) or {}
    path = str(scope.get("path", ""))
    for prefix, shape in shapes.items():
        if path.startswith(prefix) or path == prefix.rstrip("/"):
            return shape
    return None


def error_response(
    status: int,
    type: str,
    message: str,
    request_id: str,
    headers: Mapping[str, str] | None = None,
    *,
    scope: Mapping[str, Any] | None = None,
    param: str | None = None,
) -> Response:
    """A response in the error shape (the one `add_error_shape` gave the scope's path, else
    the native one), with the request id echoed in X-Request-ID."""
    all_headers = {**(headers or {}), REQUEST_ID_HEADER: request_id}
    if status in (204, 304) or status < 200:  # these must not carry a body
        return Response(status_code=status, headers=all_headers)
    shape = _shape_for(scope)
    content = (
        shape(status, type, message, param, request_id)
        if shape is not None
        else error_content(type, message, request_id)
    )
    return JSONResponse(content, status, headers=all_headers)


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "error"


def error_responses(
    *statuses: int, model: type[BaseModel] = ErrorBody
) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting the error shape (`model`) for the statuses."""
    return {status: {"model": model, "description": _phrase(status)} for status in statuses}


def openai_error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`error_responses` for the routes under /v1/, which answer in OpenAI's error shape."""
    return error_responses(*statuses, model=OpenAIErrorBody)


def _validation_message(errors: Iterable[Mapping[str, Any]]) -> str:
    parts = []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ())]
        # ("body", "max_new_tokens") -> "max_new_tokens"; keep the source for query/header.
        if len(loc) > 1 and loc[0] == "body":
            loc = loc[1:]
        where = ".".join(loc) or "request"
        parts.append(f"{where}: {error.get('msg', 'invalid value')}")
    return "; ".join(parts) or "invalid request parameters"


def _validation_param(errors: Iterable[Mapping[str, Any]]) -> str | None:
    """The field of the first error, as clients write it: ("body", "messages", 0, "content")
    -> "messages[0].content"; None for a body that is not JSON at all."""
    for error in errors:
        loc = tuple(error.get("loc", ()))
        if error.get("type") == "json_invalid" or loc[:1] != ("body",):
            return None
        param = ""
        for part in loc[1:]:
            if isinstance(part, int):
                param += f"[{part}]"
            else:
                param += f".{part}" if param else str(part)
        return param or None
    return None


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(
        exc.status,
        exc.type,
        exc.message,
        request_id_from_scope(request.scope),
        exc.headers,
        scope=request.scope,
        param=exc.param,
    )


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    return error_response(
        422,
        "invalid_parameter",
        _validation_message(errors),
        request_id_from_scope(request.scope),
        scope=request.scope,
        param=_validation_param(errors),
    )


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    phrase = _phrase(status)
    message = exc.detail if isinstance(exc.detail, str) and exc.detail else phrase
    if message == phrase and status == 404:
        message = f"no route for {request.method} {request.url.path}"
    elif message == phrase and status == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    headers = exc.headers
    if status == 405:
        # Starlette names only the methods of the first route whose path matched; a path
        # served by several routes (GET and DELETE /adapters/{name}) allows them all.
        allowed = _allowed_methods(request)
        if allowed:
            headers = {**(headers or {}), "Allow": allowed}
    return error_response(
        status,
        default_error_type(status),
        message,
        request_id_from_scope(request.scope),
        headers,
        scope=request.scope,
    )


def _allowed_methods(request: Request) -> str:
    """The methods the published contract lists for this request's path ("" if none)."""
    methods: set[str] = set()
    for path, item in request.app.openapi().get("paths", {}).items():
        if re.fullmatch(re.sub(r"\\{[^/}]+\\}", "[^/]+", re.escape(path)), request.url.path):
            methods |= {method.upper() for method in item if method in _HTTP_METHODS}
    return ", ".join(sorted(methods))


_HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


async def _unexpected(request: Request, exc: Exception) -> Response:
    request_id = request_id_from_scope(request.scope)
    log.error(
        "unhandled %s in %s %s",
        type(exc).__name__,
        request.method,
        request.url.path,
        exc_info=exc,
        extra={"request_id": request_id},
    )
    return error_response(
        500,
        "internal",
        "internal error; quote the request id when reporting it",
        request_id,
        scope=request.scope,
    )


def install_error_handlers(app: FastAPI) -> None:
    """Make every error `app` answers use the error shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(EngineError, _engine_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    # Starlette runs this one in its outermost ServerErrorMiddleware, outside user middleware,
    # then re-raises for the server to see; error_response sets X-Request-ID itself for that.
    app.add_exception_handler(Exception, _unexpected)


# --- the engine's typed errors as HTTP answers (one place) --------------------------------------
# (status, error type) per engine error; the first matching class wins.
_STATUS: tuple[tuple[type[EngineError], int, str], ...] = (
    (AdapterNotFound, 404, "adapter_not_found"),
    (InvalidRequest, 422, "invalid_parameter"),
    (InvalidImage, 400, "invalid_image"),
    (ImageTooLarge, 413, "image_too_large"),
    (ImageError, 415, "unsupported_media_type"),
    (AdapterUnservable, 422, "adapter_unservable"),
    (AdapterNonFinite, 422, "adapter_non_finite"),
    (AdapterQuarantined, 422, "adapter_quarantined"),
    (TenantLimit, 429, "tenant_limit"),
    (TokenRateLimit, 429, "token_rate_limit"),
    (BatchShed, 429, "batch_shed"),
    (QueueFull, 503, "queue_full"),
    (Draining, 503, "draining"),
    (AdapterLoadError, 503, "adapter_unavailable"),
    (EngineFault, 503, "engine_fault"),
    (EngineStopped, 503, "engine_stopped"),
    (DeadlineExceeded, 504, "deadline_exceeded"),
    (Cancelled, 499, "cancelled"),
)


def checked_name(name: str) -> str:
    """An adapter name from a request, or ApiError 422 invalid_parameter saying the rule."""
    try:
        return check_name(name)
    except InvalidId as exc:
        raise ApiError(422, "invalid_parameter", str(exc)) from None


def to_api_error(exc: EngineError) -> ApiError:
    for cls, status, kind in _STATUS:
        if isinstance(exc, cls):
            headers = None
            retry = exc.retry_after_s
            if retry is None and status == 503:
                retry = 1.0
            if retry is not None:
                headers = {"Retry-After": str(max(1, math.ceil(retry)))}
            param = exc.param if isinstance(exc, ImageError) else None
            error = ApiError(status, kind, exc.message, headers=headers, param=param)
            error.refs = exc.refs
            return error
    return ApiError(500, "internal", "internal error")


async def _engine_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EngineError)
    return await _api_error(request, to_api_error(exc))
