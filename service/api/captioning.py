"""Running one caption request for an HTTP handler: the part every captioning route shares
(`POST /caption`, `POST /v1/chat/completions`), streamed or not.

    with CaptionObservation(state.metrics) as observed:       # in-flight gauge, status, latency
        observed.names = names
        image = image_decoder(state.settings, data)            # decoded after admission
        results = await run_caption(state, engine, request, caption_request)   # ApiError
    # or, streamed: admission and image errors are raised here, before any byte is sent
        stream = await start_stream(state, engine, request, caption_request)
        return StreamingResponse(my_events(stream, observed.detach()))
    async for event in stream: ...   # TokenText per token, then stream.results

The image is decoded by the engine after admission (tenant limit, queue bound), in its
bounded pool: a request refused for load never decodes, and at most `preprocess_threads`
images decode at once. While the engine works, the handler watches the client and the
shutdown: a client that goes away cancels its request (`cancel`: the wait on the request's
`Submission` is cancelled; rows still queued are dropped before any compute, running rows
leave at the engine's next step), and a drain whose time ran out answers 503 `draining`
instead of being cut off by the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from service.api.engine_port import EnginePort, SubmissionPort
from service.api.errors import ApiError, to_api_error
from service.api.state import ServiceState
from service.auth import Principal
from service.engine import CaptionRequest, CaptionResult
from service.engine.answers import pump, results_task
from service.exceptions import Cancelled, EngineError
from service.metrics import ServiceMetrics
from service.store import AdapterRef
from service.usage import Outcome, UsageLedger, UsageRecord

POLL_S = 0.25  # how often a waiting handler checks for a gone client or an expired drain
# A stream with nothing to say for this long sends an SSE comment: proxies keep the
# connection open, and a client that left is noticed at the write.
KEEPALIVE_S = 15.0

# Rejection reasons counted for bad input, by status.
_REJECTION = {
    400: "bad_request",
    404: "not_found",
    413: "too_large",
    415: "unsupported_media_type",
    422: "bad_request",
}
# Errors of admitted requests whose status is a 4xx but which refused nothing: not rejections.
_NOT_REJECTIONS = frozenset({"adapter_unservable", "adapter_non_finite", "adapter_quarantined"})
CLIENT_GONE = 499  # the status recorded for a request whose client left (nginx's convention)


async def cancel(task: asyncio.Future[Any]) -> None:
    """The one place that tells the engine a request is no longer wanted: cancelling the task
    that waits for its results cancels exactly that request's rows (no id involved)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, EngineError, ApiError):
        await task


class CaptionObservation:
    """Counts one caption request in the metrics: in flight from construction, then its
    status and duration under each adapter it named, and the rejection reason of a bad input.
    A name takes a label only once the engine resolved it (`refs`: from the results, or from
    the error of a request that failed after resolving): a name that does not exist, or a
    request refused before its names were looked up, counts as "none" (see
    service.metrics). As a context manager it closes with 200 (the handler sets `refs` from
    its results), the ApiError's status (and its refs) or 500; `detach()` hands the closing
    to a stream that outlives the handler. Closing also records the request's usage (one
    record per resolved adapter: its outcome, and a caption's tokens and compute) in the usage
    ledger when the service has one, and the tenant's token counters."""

    def __init__(
        self,
        metrics: ServiceMetrics,
        principal: Principal | None = None,
        usage: UsageLedger | None = None,
    ) -> None:
        self.metrics = metrics
        self.principal = principal
        self.usage = usage
        self.names: tuple[str, ...] = ()
        self.refs: tuple[AdapterRef, ...] = ()
        self.results: list[CaptionResult] = []
        self._started = time.perf_counter()
        self._open = True
        self._detached = False
        metrics.inflight.inc()

    def detach(self) -> CaptionObservation:
        self._detached = True
        return self

    def close(self, status: int, error_type: str | None = None) -> None:
        if not self._open:
            return
        self._open = False
        self.metrics.inflight.dec()
        if status in _REJECTION and error_type not in _NOT_REJECTIONS:
            self.metrics.reject(_REJECTION[status])
        seconds = time.perf_counter() - self._started
        if self.names and len(self.refs) == len(self.names):
            for name, ref in zip(self.names, self.refs, strict=True):
                self.metrics.observe_request(name, ref, status, seconds)
            self._record_usage(status)
        else:
            self.metrics.observe_request(None, None, status, seconds)

    def _record_usage(self, status: int) -> None:
        if self.principal is None:
            return
        tenant, key_id = self.principal.tenant, self.principal.key_id
        answers = self.results if status == 200 else [None] * len(self.refs)
        for ref, result in zip(self.refs, answers, strict=True):
            if result is not None:
                self.metrics.add_tenant_tokens(
                    tenant, result.prompt_tokens, result.image_tokens, result.tokens
                )
            if self.usage is None:
                continue
            adapter = f"{ref.tenant}/{ref.name}"
            if result is None:
                self.usage.record(UsageRecord(tenant, adapter, key_id, usage_outcome(status)))
                continue
            self.usage.record(
                UsageRecord(
                    tenant,
                    adapter,
                    key_id,
                    "completed",
                    prompt_tokens=result.prompt_tokens,
                    image_tokens=result.image_tokens,
                    completion_tokens=result.tokens,
                    cached_image=result.image_cached,
                    compute_s=result.compute_s,
                )
            )

    def __enter__(self) -> CaptionObservation:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None and self._detached:
            return
        if isinstance(exc, EngineError):  # answered by the app's one engine-error handler
            exc = to_api_error(exc)
        if isinstance(exc, ApiError):
            self.refs = exc.refs
            self.close(exc.status, exc.type)
        else:
            self.close(200 if exc is None else 500)


def usage_outcome(status: int) -> Outcome:
    """How a request answered `status` counts in the usage ledger."""
    if status == CLIENT_GONE:
        return "cancelled"
    if status == 504:
        return "deadline"
    if status in (429, 503):
        return "rejected"
    return "failed"


def _retrieve(task: asyncio.Future[list[CaptionResult]]) -> None:
    # Mark the outcome of a task nobody awaits any more as seen (no "never retrieved" log).
    if not task.cancelled():
        task.exception()


async def submit(engine: EnginePort, caption_request: CaptionRequest) -> SubmissionPort:
    """Admit a request (and decode its image); its errors come out as ApiError."""
    try:
        return await engine.submit(caption_request)
    except EngineError as exc:
        raise to_api_error(exc) from None


async def run_caption(
    state: ServiceState,
    engine: EnginePort,
    request: Request,
    caption_request: CaptionRequest,
    submission: SubmissionPort | None = None,
) -> list[CaptionResult]:
    """Admit the request (unless `submission` already did) and await its results while
    watching the client and the drain; engine errors come out as ApiError (404, 422, 429,
    503, 504; 499 when the client left)."""
    submission = submission or await submit(engine, caption_request)
    task = results_task(submission)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=POLL_S)
            if done:
                return task.result()
            if state.drain_expired:
                await cancel(task)
                raise ApiError(
                    503,
                    "draining",
                    "the service shut down before this request finished (drain_timeout_s); retry",
                    headers={"Retry-After": "1"},
                )
            if await request.is_disconnected():
                await cancel(task)
                raise to_api_error(Cancelled("the client went away"))
    except EngineError as exc:
        raise to_api_error(exc) from None
    except asyncio.CancelledError:  # the handler itself was cancelled (a stream's client left)
        task.cancel()
        task.add_done_callback(_retrieve)
        raise


# --- streaming --------------------------------------------------------------------------------
class TextDeltas:
    """Turns one adapter's token ids, as they come, into text pieces whose concatenation is
    the decoded caption. Each piece is the new suffix of the decoded prefix; a prefix that
    ends inside a multi-byte character (U+FFFD) or that decodes differently from what was
    already sent yields "" until it settles, and `finish` sends what is left."""

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self.sent = ""

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        piece = text[len(self.sent) :]
        self.sent = text
        return piece

    def finish(self, caption: str) -> str:
        """The rest of the final caption ("" when everything was sent already)."""
        if not caption.startswith(self.sent):
            return ""  # cannot take back what was sent; the result carries the caption
        piece = caption[len(self.sent) :]
        self.sent = caption
        return piece


@dataclass(frozen=True)
class TokenText:
    """One generated token of the adapter at `index` and the text it adds."""

    index: int
    token_id: int
    text: str


@dataclass(frozen=True)
class KeepAlive:
    """Nothing happened for KEEPALIVE_S."""


class CaptionStream:
    """The events of one streamed caption request: TokenText for every token in order,
    KeepAlive while nothing happens; iteration ends when every adapter has answered (then
    `results` holds the CaptionResults and `tails` the text left after the last token of
    each adapter) and raises ApiError when the request fails. Closing it (or leaving the
    `async for` early) cancels a request still running. `status` is what the metrics record:
    200 once every result is in, the error's status, or 499 while the client may leave."""

    def __init__(
        self,
        state: ServiceState,
        engine: EnginePort,
        request: Request,
        caption_request: CaptionRequest,
        queue: asyncio.Queue[tuple[int, int]],
        submission: SubmissionPort,
    ) -> None:
        self.caption_request = caption_request
        self._queue = queue
        self._texts = [TextDeltas(engine.model.decode) for _ in caption_request.adapters]
        self._task = asyncio.ensure_future(
            run_caption(state, engine, request, caption_request, submission)
        )
        self.results: list[CaptionResult] = []
        self.tails: list[str] = []
        self.status = CLIENT_GONE
        self.error_type: str | None = None
        self.refs: tuple[AdapterRef, ...] = submission.refs  # what the request resolved to

    async def __aiter__(self) -> AsyncIterator[TokenText | KeepAlive]:
        try:
            async for event in pump(self._task, self._queue, idle_s=KEEPALIVE_S):
                yield KeepAlive() if event is None else self._token(event.index, event.token_id)
            try:
                self.results = self._task.result()
            except ApiError as exc:
                self.status, self.refs, self.error_type = exc.status, exc.refs, exc.type
                raise
            self.status, self.refs = 200, tuple(r.ref for r in self.results)
            self.tails = [
                text.finish(result.caption)
                for text, result in zip(self._texts, self.results, strict=True)
            ]
        finally:
            await self.aclose()

    def _token(self, index: int, token_id: int) -> TokenText:
        return TokenText(index, token_id, self._texts[index].add(token_id))

    async def aclose(self) -> None:
        if not self._task.done():
            await cancel(self._task)


async def start_stream(
    state: ServiceState, engine: EnginePort, request: Request, caption_request: CaptionRequest
) -> CaptionStream:
    """Admit a request whose tokens are to be streamed: its admission and image errors are
    raised here (an ApiError with its own status, before any byte of the stream is sent)."""
    queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    streamed = dataclasses.replace(
        caption_request, on_token=lambda index, token: queue.put_nowait((index, token))
    )
    submission = await submit(engine, streamed)
    return CaptionStream(state, engine, request, streamed, queue, submission)


# --- Server-Sent Events -----------------------------------------------------------------------
SSE_MEDIA_TYPE = "text/event-stream"


def stream_response(description: str) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI 200 of a route that answers JSON, or Server-Sent Events when asked to."""
    return {
        200: {
            "description": description,
            "content": {SSE_MEDIA_TYPE: {"schema": {"type": "string"}}},
        }
    }


# No proxy buffering (nginx honours X-Accel-Buffering) and no caching of a live stream.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_KEEPALIVE = ": keep-alive\n\n"  # a comment line: every SSE client skips it


def sse(data: Any, event: str | None = None) -> str:
    """One Server-Sent Event carrying `data` as compact JSON (or a bare string as is)."""
    head = f"event: {event}\n" if event else ""
    body = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"{head}data: {body}\n\n"


class EventStreamResponse(StreamingResponse):
    """The SSE answer of a streamed caption request. However the response ends (the last
    event sent, the client gone, the server stopping), the request is cancelled if it still
    runs and the observation closes with the stream's status."""

    def __init__(
        self, body: AsyncIterator[str], stream: CaptionStream, observed: CaptionObservation
    ) -> None:
        super().__init__(body, media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)
        self._stream = stream
        self._observed = observed.detach()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._stream.aclose()
            self._observed.refs, self._observed.results = self._stream.refs, self._stream.results
            self._observed.close(self._stream.status, self._stream.error_type)
