"""POST /caption: an uploaded image and one or more adapter names -> captions, as one JSON
answer or (`stream=true`) as Server-Sent Events, one per generated token."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from starlette.responses import Response

from service.api.captioning import (
    CLIENT_GONE,
    SSE_KEEPALIVE,
    CaptionObservation,
    CaptionStream,
    EventStreamResponse,
    KeepAlive,
    run_caption,
    sse,
    start_stream,
    stream_response,
)
from service.api.deps import CaptionPrincipal, ReadyEngine, RequestPriority, State
from service.api.errors import (
    ApiError,
    checked_name,
    error_content,
    error_responses,
    request_id_from_scope,
)
from service.api.schemas import CaptionOut, CaptionUsage, MultiCaptionOut, Timings
from service.engine import CaptionRequest, CaptionResult
from service.images import image_decoder

router = APIRouter(tags=["caption"])

_STREAM_DOC = (
    "The JSON answer; with `stream=true`, Server-Sent Events instead: `event: token` per "
    'generated token, data `{"adapter", "index", "token_id", "text"}` (the texts concatenate '
    "to the caption), then `event: result` with the JSON answer, or `event: error` with the "
    "error shape when the request fails after the stream began."
)


def _names(adapter: str | None, adapters: str | None, default: str | None) -> tuple[str, ...]:
    if adapter is not None and adapters is not None:
        raise ApiError(422, "invalid_parameter", "give either `adapter` or `adapters`, not both")
    if adapters is not None:
        names = tuple(n.strip() for n in adapters.split(",") if n.strip())
    elif adapter is not None:
        names = (adapter.strip(),)
    elif default is not None:
        names = (default,)
    else:
        raise ApiError(
            422,
            "invalid_parameter",
            "name an adapter in the `adapter` form field (GET /adapters lists them); this "
            "service has no default_adapter",
        )
    if not names:
        raise ApiError(422, "invalid_parameter", "`adapters` names no adapter")
    return tuple(checked_name(name) for name in names)


def _out(result: CaptionResult) -> CaptionOut:
    t = result.timings
    return CaptionOut(
        caption=result.caption,
        adapter=result.adapter,
        adapter_version=result.ref.version,
        tokens=result.tokens,
        request_id=result.request_id,
        # Microseconds are the most a client can use; more digits only clutter the JSON.
        timings_ms=Timings(
            queue=round(t.queue_ms, 3),
            encode=round(t.encode_ms, 3),
            generate=round(t.generate_ms, 3),
            total=round(t.total_ms, 3),
        ),
        usage=CaptionUsage(
            prompt_tokens=result.prompt_tokens,
            image_tokens=result.image_tokens,
            completion_tokens=result.tokens,
            total_tokens=result.prompt_tokens + result.tokens,
            image_cached=result.image_cached,
            compute_ms=round(result.compute_s * 1000, 3),
        ),
    )


async def _events(stream: CaptionStream, multi: bool) -> AsyncIterator[str]:
    """The native event stream: `token` per token, then `result` (or `error`)."""
    names = stream.caption_request.adapters
    try:
        async for event in stream:
            if isinstance(event, KeepAlive):
                yield SSE_KEEPALIVE
                continue
            yield _token_event(names, event.index, event.token_id, event.text)
    except ApiError as exc:
        if exc.status != CLIENT_GONE:
            content = error_content(exc.type, exc.message, stream.caption_request.request_id)
            yield sse(content, "error")
        return
    for index, tail in enumerate(stream.tails):
        if tail:  # text the last tokens could not settle (see TextDeltas)
            yield _token_event(names, index, None, tail)
    answer = _answer(stream.results, stream.caption_request.request_id, multi)
    yield sse(answer.model_dump(mode="json"), "result")


def _token_event(names: tuple[str, ...], index: int, token_id: int | None, text: str) -> str:
    return sse(
        {"adapter": names[index], "index": index, "token_id": token_id, "text": text}, "token"
    )


def _answer(
    results: list[CaptionResult], request_id: str, multi: bool
) -> CaptionOut | MultiCaptionOut:
    if not multi:
        return _out(results[0])
    return MultiCaptionOut(request_id=request_id, results=[_out(r) for r in results])


@router.post(
    "/caption",
    response_model=CaptionOut | MultiCaptionOut,
    summary="Caption an uploaded image with an adapter",
    responses={
        **stream_response(_STREAM_DOC),
        **error_responses(400, 401, 403, 404, 413, 415, 422, 429, 503, 504),
    },
)
async def caption(
    request: Request,
    state: State,
    engine: ReadyEngine,
    principal: CaptionPrincipal,
    priority: RequestPriority,
    # The examples are what /docs' "Try it out" fills in, chosen so that a first try works:
    # an adapter of the demo, no `adapters` (an empty form field counts as absent), and the
    # default caption length (Swagger UI would otherwise send 0, or "null").
    image: Annotated[
        UploadFile, File(description="PNG, JPEG, WEBP, BMP or GIF; checked by content.")
    ],
    adapter: Annotated[
        str | None,
        Form(
            description="Adapter name; GET /adapters lists those your key sees. Default: the "
            "service's default_adapter, when one is set.",
            examples=["describe"],
        ),
    ] = None,
    adapters: Annotated[
        str | None,
        Form(
            description="Instead of `adapter`: several adapters for one image, comma-separated "
            "(describe,count); one result per adapter.",
            examples=[""],
        ),
    ] = None,
    max_new_tokens: Annotated[
        int | None,
        Form(
            description="Most tokens to generate: 1 to the service's max_new_tokens_limit "
            "(64 unless configured). Default: default_max_new_tokens (32 unless configured).",
            examples=[32],
        ),
    ] = None,
    stream: Annotated[
        bool,
        Form(
            description="Answer Server-Sent Events: one `token` event per generated token, "
            "then one `result` event with the JSON answer.",
            examples=[False],
        ),
    ] = False,
) -> CaptionOut | MultiCaptionOut | Response:
    settings = state.settings
    with CaptionObservation(state.metrics, principal, state.usage) as observed:
        names = _names(adapter, adapters, settings.default_adapter)
        observed.names = names
        if max_new_tokens is not None and not 1 <= max_new_tokens <= settings.max_new_tokens_limit:
            raise ApiError(
                422,
                "invalid_parameter",
                f"max_new_tokens must be between 1 and {settings.max_new_tokens_limit}",
            )
        decoder = image_decoder(settings, await image.read())
        request_id = request_id_from_scope(request.scope)
        caption_request = CaptionRequest(
            decoder,
            names,
            principal.tenant,
            max_new_tokens,
            request_id=request_id,
            priority=priority,
        )
        multi = adapters is not None
        if stream:
            tokens = await start_stream(state, engine, request, caption_request)
            return EventStreamResponse(_events(tokens, multi), tokens, observed)
        # Generated tokens are counted by the engine as it answers each row (not again here).
        results = await run_caption(state, engine, request, caption_request)
        observed.refs, observed.results = tuple(r.ref for r in results), results
        return _answer(results, request_id, multi)
