"""POST /caption: an uploaded image and one or more adapter names -> captions."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile

from service.api.deps import CaptionPrincipal, ReadyEngine, State
from service.api.engine_errors import to_api_error
from service.api.errors import ApiError, error_responses, request_id_from_scope
from service.api.images import ImageLimits, decode_image
from service.api.schemas import CaptionOut, MultiCaptionOut, Timings
from service.api.state import ServiceState
from service.engine import CaptionRequest, CaptionResult, Engine
from service.exceptions import Cancelled, EngineError
from service.store import StoreError, check_name

router = APIRouter(tags=["caption"])

# Rejection reasons counted for bad input, by status.
_REJECTION = {
    400: "bad_request",
    404: "not_found",
    413: "too_large",
    415: "unsupported_media_type",
    422: "bad_request",
}
_POLL_S = 0.25  # how often a waiting handler checks for a gone client or an expired drain


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
    for name in names:
        try:
            check_name(name)
        except StoreError as exc:
            raise ApiError(422, "invalid_parameter", str(exc)) from None
    return names


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
    )


async def _run(
    state: ServiceState, engine: Engine, request: Request, caption_request: CaptionRequest
) -> list[CaptionResult]:
    """Await the engine; if the client goes away first, cancel the request (its rows stop at
    the engine's next step, or are dropped before any compute). If the shutdown's drain time
    runs out first, give up with a 503 in the error shape (the server would otherwise cut the
    request off with a bare 500)."""
    task = asyncio.ensure_future(engine.caption(caption_request))
    while True:
        done, _ = await asyncio.wait({task}, timeout=_POLL_S)
        if done:
            return task.result()
        if state.drain_expired:
            await _cancel(task)
            raise ApiError(
                503,
                "draining",
                "the service shut down before this request finished (drain_timeout_s); retry",
                headers={"Retry-After": "1"},
            )
        if await request.is_disconnected():
            await _cancel(task)
            raise Cancelled("the client went away")


async def _cancel(task: asyncio.Future[list[CaptionResult]]) -> None:
    """Cancel a caption() task and wait until the engine let go of its rows."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, EngineError):
        await task


@router.post(
    "/caption",
    response_model=CaptionOut | MultiCaptionOut,
    summary="Caption an uploaded image with an adapter",
    responses=error_responses(400, 401, 403, 404, 413, 415, 422, 429, 503, 504),
)
async def caption(
    request: Request,
    state: State,
    engine: ReadyEngine,
    principal: CaptionPrincipal,
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
) -> CaptionOut | MultiCaptionOut:
    started = time.perf_counter()
    settings = state.settings
    names: tuple[str, ...] = ()
    status = 200
    state.metrics.inflight.inc()
    try:
        names = _names(adapter, adapters, settings.default_adapter)
        if max_new_tokens is not None and not 1 <= max_new_tokens <= settings.max_new_tokens_limit:
            raise ApiError(
                422,
                "invalid_parameter",
                f"max_new_tokens must be between 1 and {settings.max_new_tokens_limit}",
            )
        data = await image.read()
        limits = ImageLimits.from_settings(settings)
        request_id = request_id_from_scope(request.scope)
        # Decoded by the engine after admission (tenant limit, queue), in its bounded pool.
        caption_request = CaptionRequest(
            lambda: decode_image(data, limits).rgb,
            names,
            principal.tenant,
            max_new_tokens,
            request_id=request_id,
        )
        try:
            results = await _run(state, engine, request, caption_request)
        except EngineError as exc:
            raise to_api_error(exc) from None
        # Generated tokens are counted by the engine as it answers each row (not again here).
        if adapters is None:
            return _out(results[0])
        return MultiCaptionOut(request_id=request_id, results=[_out(r) for r in results])
    except ApiError as exc:
        status = exc.status
        if status in _REJECTION:
            state.metrics.reject(_REJECTION[status])
        raise
    except BaseException:
        status = 500
        raise
    finally:
        state.metrics.inflight.dec()
        # A multi-adapter request counts once under each adapter it named. Names that did
        # not resolve (404) or were invalid (422) never take one of the bounded label values.
        seconds = time.perf_counter() - started
        labels: tuple[str | None, ...] = names if names and status not in (404, 422) else (None,)
        for name in labels:
            state.metrics.observe_request(name, status, seconds)
