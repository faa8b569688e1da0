"""One `X-Request-ID` per answer behind Ray Serve's HTTP proxy.

Ray's proxy gives every request an id (the client's `X-Request-ID` as sent, else a new one),
passes it on in the request's header and appends it to every answer. Our app takes the same
header as its request id (`service.api.middleware.RequestIdMiddleware`), so both agree, and:
- `ProxyRequestIds` (a proxy middleware, outside Ray's own) drops a client's id that our app
  would refuse (see REQUEST_ID_PATTERN: it could forge log lines), so that Ray makes a fresh
  one and the proxy, the app and the answer all carry that one;
- `WithoutAppRequestId` (the ingress app's outermost middleware) removes the app's copy of the
  header from the answer, since the proxy appends the same id: one header, as without Ray.
"""

from __future__ import annotations

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import REQUEST_ID_HEADER
from service.api.middleware import REQUEST_ID_PATTERN


class ProxyRequestIds:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            offered = Headers(scope=scope).get(REQUEST_ID_HEADER)
            if offered is not None and not REQUEST_ID_PATTERN.match(offered):
                del MutableHeaders(scope=scope)[REQUEST_ID_HEADER]
        await self.app(scope, receive, send)


class WithoutAppRequestId:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_without_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if REQUEST_ID_HEADER in headers:
                    del headers[REQUEST_ID_HEADER]
            await send(message)

        await self.app(scope, receive, send_without_id)


def proxy_middlewares() -> list[Middleware]:
    """Serve's proxy callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, set by cluster.py)."""
    return [Middleware(ProxyRequestIds)]
