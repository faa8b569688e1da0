"""The OpenAI-compatible surface: `POST /v1/chat/completions` (JSON or Server-Sent Events)
and `GET /v1/models`, so that an OpenAI client (the official SDK, curl, tools) captions an
image with an adapter named as the `model`, unchanged.

Same service behind it as `POST /caption`: the same keys and tenants (the SDK sends the key
as `Authorization: Bearer`), image checks, limits, engine, metrics and request ids; errors
carry the native statuses in OpenAI's error shape (`service.api.openai_schemas`).
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from starlette.concurrency import run_in_threadpool
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
from service.api.deps import AnyPrincipal, CaptionPrincipal, ReadyEngine, RequestPriority, State
from service.api.engine_port import EnginePort
from service.api.errors import (
    ApiError,
    openai_error_responses,
    request_id_from_scope,
    to_api_error,
)
from service.api.openai_schemas import (
    OPENAI_PREFIX,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ImageURL,
    Model,
    ModelList,
    PromptTokensDetails,
    Usage,
    openai_error_content,
)
from service.engine import CaptionRequest, CaptionResult
from service.exceptions import EngineError
from service.images import image_decoder
from service.registry import AdapterInfo
from service.tenancy import InvalidId, check_name

router = APIRouter(prefix=OPENAI_PREFIX, tags=["openai"])

_STREAM_DOC = (
    "A `chat.completion`; with `stream: true`, Server-Sent Events instead: `data: "
    "<chat.completion.chunk>` per event (first the assistant role, then one chunk per "
    "generated token, then one with `finish_reason`, then `usage` when "
    "`stream_options.include_usage`), ending with `data: [DONE]`."
)
_MESSAGES_HELP = (
    "send one message with role `user` whose content holds the image as one image_url part "
    "(a data: URL); captioning adapters take no prompt"
)


def _model_not_found(model: str) -> ApiError:
    return ApiError(
        404,
        "adapter_not_found",
        f"no model named {model!r} for this key (GET /v1/models lists them)",
        param="model",
    )


def _checked_model(model: str) -> str:
    """A name no adapter can have is simply a model that does not exist (404, as OpenAI)."""
    try:
        return check_name(model)
    except InvalidId:
        raise _model_not_found(model) from None


# --- GET /v1/models ---------------------------------------------------------------------------
def _model(engine: EnginePort, info: AdapterInfo) -> Model:
    try:  # the latest version folder's time: when this model became what it is
        created = int(engine.registry.store.path(info.latest).stat().st_mtime)
    except OSError:  # deleted meanwhile
        created = 0
    return Model(id=info.name, created=created, owned_by=info.tenant)


def _visible_models(engine: EnginePort, tenant: str) -> list[Model]:
    """What `model=` can name for this tenant: its own adapters, then the public ones that
    no own adapter shadows (resolution picks the own one)."""
    seen: set[str] = set()
    models = []
    for info in engine.registry.list_adapters(tenant):  # own first, then public
        if info.name not in seen:
            seen.add(info.name)
            models.append(_model(engine, info))
    return models


@router.get(
    "/models",
    response_model=ModelList,
    summary="Models (adapters) this key can use",
    responses=openai_error_responses(401, 503),
)
async def list_models(engine: ReadyEngine, principal: AnyPrincipal) -> ModelList:
    models = await run_in_threadpool(_visible_models, engine, principal.tenant)
    return ModelList(data=models)


@router.get(
    "/models/{model}",
    response_model=Model,
    summary="One model (adapter)",
    responses=openai_error_responses(401, 404, 503),
)
async def get_model(
    model: Annotated[str, Path(description="An adapter name.", max_length=200)],
    engine: ReadyEngine,
    principal: AnyPrincipal,
) -> Model:
    name = _checked_model(model)
    try:
        info = await run_in_threadpool(engine.registry.describe, principal.tenant, name)
    except EngineError as exc:
        error = to_api_error(exc)
        raise (_model_not_found(model) if error.status == 404 else error) from None
    return await run_in_threadpool(_model, engine, info)


# --- POST /v1/chat/completions ------------------------------------------------------------------
def _image_part(messages: list[ChatMessage]) -> tuple[ImageURL, str]:
    """The one image of the request and where it is (the `param` of its errors)."""
    if len(messages) != 1 or messages[0].role != "user":
        roles = [m.role for m in messages]
        raise ApiError(
            422,
            "invalid_parameter",
            f"messages has roles {roles}: {_MESSAGES_HELP}",
            param="messages",
        )
    images: list[tuple[int, ImageURL]] = []
    for index, part in enumerate(messages[0].content):
        if part.image_url is not None:
            images.append((index, part.image_url))
        elif part.text and part.text.strip():
            raise ApiError(
                422,
                "invalid_parameter",
                "captioning adapters take no prompt: text must be empty (send only the "
                "image_url part)",
                param=f"messages[0].content[{index}].text",
            )
    if len(images) != 1:
        raise ApiError(
            422,
            "invalid_parameter",
            f"messages[0].content holds {len(images)} images: {_MESSAGES_HELP}",
            param="messages[0].content",
        )
    index, image = images[0]
    return image, f"messages[0].content[{index}].image_url.url"


def _data_url_bytes(url: str, param: str) -> bytes:
    """The bytes of a base64 `data:` URL. The service never fetches a URL: no request ever
    leaves it on a client's behalf (no server-side request forgery, no slow remote hosts)."""
    scheme = url.split(":", 1)[0].strip().lower() if ":" in url else ""
    if scheme in ("http", "https"):
        raise ApiError(
            400,
            "remote_url_refused",
            "this service never fetches URLs (it makes no requests on a client's behalf): send "
            "the image inline as a data: URL, data:image/png;base64,<base64 of the file>",
            param=param,
        )
    if scheme != "data":
        raise ApiError(
            400,
            "invalid_image_url",
            "image_url.url must be a data: URL (data:image/png;base64,<base64 of the file>)",
            param=param,
        )
    header, comma, payload = url.partition(",")
    if not comma or "base64" not in [p.strip().lower() for p in header.split(";")[1:]]:
        raise ApiError(
            400,
            "invalid_image_url",
            "malformed data URL: expected data:<image type>;base64,<base64 of the file>",
            param=param,
        )
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(
            400,
            "invalid_image_url",
            "malformed data URL: its payload is not valid base64",
            param=param,
        ) from None


def _max_new_tokens(body: ChatCompletionRequest, limit: int) -> int | None:
    given = {
        name: value
        for name in ("max_completion_tokens", "max_tokens")
        if (value := getattr(body, name)) is not None
    }
    if len(set(given.values())) > 1:
        raise ApiError(
            422,
            "invalid_parameter",
            "max_tokens and max_completion_tokens differ: give one",
            param="max_tokens",
        )
    for name, value in given.items():
        if not 1 <= value <= limit:
            raise ApiError(
                422,
                "invalid_parameter",
                f"{name} must be between 1 and {limit} (max_new_tokens_limit)",
                param=name,
            )
    return next(iter(given.values()), None)


def _usage(result: CaptionResult) -> Usage:
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.tokens,
        total_tokens=result.prompt_tokens + result.tokens,
        prompt_tokens_details=PromptTokensDetails(
            cached_tokens=result.image_tokens if result.image_cached else 0
        ),
    )


def _fingerprint(result: CaptionResult) -> str:
    return f"{result.adapter}@v{result.ref.version}"


def _completion(
    result: CaptionResult, completion_id: str, created: int, model: str
) -> ChatCompletion:
    return ChatCompletion(
        id=completion_id,
        created=created,
        model=model,
        system_fingerprint=_fingerprint(result),
        choices=[
            Choice(
                message=AssistantMessage(content=result.caption),
                finish_reason=result.finish_reason,
            )
        ],
        usage=_usage(result),
    )


async def _chunks(
    stream: CaptionStream, completion_id: str, created: int, model: str, include_usage: bool
) -> AsyncIterator[str]:
    """chat.completion.chunk events: role, one per token, finish_reason, [usage], [DONE]."""

    def chunk(
        delta: dict[str, str], finish: str | None = None, fingerprint: str | None = None
    ) -> str:
        data: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        if include_usage:  # as OpenAI: null on every chunk but the last
            data["usage"] = None
        return sse(data)

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for event in stream:
            yield SSE_KEEPALIVE if isinstance(event, KeepAlive) else chunk({"content": event.text})
    except ApiError as exc:
        if exc.status != CLIENT_GONE:
            yield sse(openai_error_content(exc.status, exc.type, exc.message, exc.param, ""))
            yield sse("[DONE]")
        return
    result = stream.results[0]
    tail = stream.tails[0]  # text the last tokens could not settle (see TextDeltas)
    yield chunk({"content": tail} if tail else {}, result.finish_reason, _fingerprint(result))
    if include_usage:
        usage = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": _fingerprint(result),
            "choices": [],
            "usage": _usage(result).model_dump(),
        }
        yield sse(usage)
    yield sse("[DONE]")


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    summary="Caption an image (a data: URL) with the adapter named as `model`",
    responses={
        **stream_response(_STREAM_DOC),
        **openai_error_responses(400, 401, 403, 404, 413, 415, 422, 429, 503, 504),
    },
)
async def chat_completions(
    request: Request,
    body: ChatCompletionRequest,
    state: State,
    engine: ReadyEngine,
    principal: CaptionPrincipal,
    priority: RequestPriority,
) -> ChatCompletion | Response:
    settings = state.settings
    with CaptionObservation(state.metrics, principal, state.usage) as observed:
        model = _checked_model(body.model)
        observed.names = (model,)
        if body.n not in (None, 1):
            raise ApiError(
                422,
                "invalid_parameter",
                "n must be 1: decoding is greedy, so every choice would be the same caption",
                param="n",
            )
        max_new_tokens = _max_new_tokens(body, settings.max_new_tokens_limit)
        image, where = _image_part(body.messages)
        data = await run_in_threadpool(_data_url_bytes, image.url, where)
        request_id = request_id_from_scope(request.scope)
        caption_request = CaptionRequest(
            image_decoder(settings, data, param=where),
            (model,),
            principal.tenant,
            max_new_tokens,
            request_id=request_id,
            priority=priority,
        )
        completion_id = f"chatcmpl-{request_id}"
        created = int(time.time())
        try:
            if body.stream:
                tokens = await start_stream(state, engine, request, caption_request)
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                chunks = _chunks(tokens, completion_id, created, model, include_usage)
                return EventStreamResponse(chunks, tokens, observed)
            results = await run_caption(state, engine, request, caption_request)
        except ApiError as exc:
            if exc.type == "adapter_not_found":
                exc.param = "model"
            raise
        observed.refs, observed.results = (results[0].ref,), results
        return _completion(results[0], completion_id, created, model)
