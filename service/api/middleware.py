"""Pure-ASGI middlewares of the HTTP edge: request ids and the request-body size limit.

    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)   # added last = outermost: the 413 carries the id

Both are plain ASGI classes (no BaseHTTPMiddleware): they wrap `receive`/`send` and never
buffer a body.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Mapping

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import REQUEST_ID_HEADER, error_response, request_id_from_scope
from service.logging import request_id_var

log = logging.getLogger(__name__)

REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestIdMiddleware:
    """Gives every request an id: the client's `X-Request-ID` when well-formed, else a uuid4.

    The id goes into `scope["state"]["request_id"]` (`request.state.request_id`), into the
    logging context (`service.logging.request_id_var`) and into the response header.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        offered = Headers(scope=scope).get(REQUEST_ID_HEADER)
        # Anything else (too long, spaces, control characters) could forge log lines.
        request_id = offered if offered and REQUEST_ID_PATTERN.match(offered) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if REQUEST_ID_HEADER not in headers:
                    headers.append(REQUEST_ID_HEADER, request_id)
            await send(message)

        token = request_id_var.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` once the body passes the limit.

    An HTTPException so that FastAPI's body parsing re-raises it unchanged instead of turning
    it into a 400 "error parsing the body".
    """

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body is larger than the limit of {max_bytes} bytes")


class _LimitedRequest:
    """Per-request state of BodySizeLimitMiddleware."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        scope: Scope,
        receive: Receive,
        send: Send,
        on_reject: Callable[[], None] | None = None,
    ):
        self.app = app
        self.max_bytes = max_bytes
        self.on_reject = on_reject
        self.scope = scope
        self.receive = receive
        self.send = send
        self.received = 0
        self.exceeded = False
        self.app_started_response = False  # the app's response went out before the limit hit
        self.rejected = False  # our 413 went out

    async def run(self) -> None:
        try:
            await self.app(self.scope, self.limited_receive, self.guarded_send)
        except Exception:
            if not self.exceeded or self.app_started_response:
                raise
            # Whatever the app raised after the limit hit (BodyTooLarge itself, or something
            # its body parsing wrapped it in), the answer is the 413.
            log.debug("request body over the limit; app raised", exc_info=True)
        if self.exceeded and not self.app_started_response and not self.rejected:
            await self.reject()

    async def limited_receive(self) -> Message:
        if self.exceeded:
            raise BodyTooLarge(self.max_bytes)
        message = await self.receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.max_bytes:
                self.exceeded = True
                raise BodyTooLarge(self.max_bytes)
        return message

    async def guarded_send(self, message: Message) -> None:
        if self.exceeded and not self.app_started_response:
            # The app answered after seeing BodyTooLarge (an exception handler, or code that
            # swallowed it): the client gets our 413 instead of whatever the app made of it.
            if message["type"] == "http.response.start" and not self.rejected:
                await self.reject()
            return
        if message["type"] == "http.response.start":
            self.app_started_response = True
        await self.send(message)

    async def reject(self) -> None:
        self.rejected = True
        if self.on_reject is not None:
            self.on_reject()
        response = error_response(
            413,
            "payload_too_large",
            f"request body is larger than the limit of {self.max_bytes} bytes",
            request_id_from_scope(self.scope),
            scope=self.scope,
        )
        await response(self.scope, self.receive, self.send)


class BodySizeLimitMiddleware:
    """Answers 413 (error shape) when a request body is larger than `max_bytes`.

    A declared Content-Length over the limit is refused before the app runs. A body without
    one (chunked) is counted as the app reads it; the read that crosses the limit raises
    `BodyTooLarge`, and the client gets the 413 whether the app lets that propagate or answers
    something else. Nothing beyond the crossing chunk is read by the app.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        on_reject: Callable[[], None] | None = None,
        path_limits: Mapping[str, int] | None = None,
    ) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes
        self.on_reject = on_reject  # called once per 413 it answers (e.g. to count it)
        # Exact paths with a limit of their own (the training-file upload, POST /v1/files).
        self.path_limits = dict(path_limits or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.path_limits.get(scope.get("path", ""), self.max_bytes)
        request = _LimitedRequest(self.app, limit, scope, receive, send, self.on_reject)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            request.exceeded = True
            await request.reject()
            return
        await request.run()


def _content_length(scope: Scope) -> int | None:
    value = Headers(scope=scope).get("content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
