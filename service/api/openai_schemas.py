"""Request and response models of the OpenAI-compatible routes (`/v1`), as the OpenAI API
reference names them, restricted to what a captioning service can honour.

Requests are strict: unknown fields are refused (422 naming the field) rather than silently
ignored, so a client never believes an option (tools, logprobs, stop, ...) took effect.
`temperature` and `top_p` are the exception: accepted because every client sends them, and
ignored because decoding is greedy (documented in docs/API.md).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from service.engine import FinishReason

OPENAI_PREFIX = "/v1"
# A 16x16 PNG (a red disc on white): what /docs' "Try it out" sends as the image.
_EXAMPLE_IMAGE = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAAATUlEQVR42mP8//8/"
    "AymAiYFEwIJFjJERwcawnwWnUmQRJG1M+FRjkyLZD0yEjUdVQLYNtNdAML5hCihxEh5LkKRYsEiQkDSI8A/"
    "JfgAAoG8VI+IkRI0AAAAASUVORK5CYII="
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- request -------------------------------------------------------------------------------
class ImageURL(_Strict):
    url: str = Field(
        description="A `data:` URL holding the image (data:image/png;base64,...). Remote "
        "http(s) URLs are refused: the service never fetches URLs.",
        examples=[_EXAMPLE_IMAGE],
    )
    detail: Literal["auto", "low", "high"] | None = Field(
        default=None, description="Accepted and ignored: the encoder has one resolution."
    )


class ContentPart(_Strict):
    """One part of a message's content: an image or a text. (One model with a `type` rather
    than a tagged union, so that a validation error names the field plainly:
    messages[0].content[0].image_url.url.)"""

    type: Literal["image_url", "text"]
    image_url: ImageURL | None = Field(default=None, description="With type image_url.")
    text: str | None = Field(
        default=None, description="With type text; must be empty: adapters take no prompt."
    )

    @model_validator(mode="after")
    def _fields_match_type(self) -> ContentPart:
        wanted, other = ("image_url", "text") if self.type == "image_url" else ("text", "image_url")
        if getattr(self, wanted) is None:
            raise ValueError(f"a part of type {self.type!r} needs the field {wanted!r}")
        if getattr(self, other) is not None:
            raise ValueError(f"a part of type {self.type!r} has no field {other!r}")
        return self


def _parts(content: Any) -> Any:
    # OpenAI allows a plain string as content: it is a text part.
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [] if content is None else content


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="Exactly one message, with role `user`."
    )
    content: Annotated[list[ContentPart], BeforeValidator(_parts)] = Field(
        default_factory=list,
        description="Exactly one `image_url` part (empty text parts are allowed); a string is "
        "a text part.",
    )
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = Field(
        default=False, description="Send a last chunk with `usage` and no choices."
    )


class ChatCompletionRequest(_Strict):
    model: str = Field(
        description="The adapter name (GET /v1/models lists those your key may use).",
        examples=["count"],
    )
    messages: list[ChatMessage] = Field(
        description="One user message whose content holds one image_url part (a data: URL)."
    )
    max_tokens: int | None = Field(
        default=None, description="Most tokens to generate (the native max_new_tokens)."
    )
    max_completion_tokens: int | None = Field(
        default=None, description="The same as max_tokens (the newer name); give one."
    )
    n: int | None = Field(default=None, description="Must be 1.")
    temperature: float | None = Field(
        default=None, ge=0, le=2, description="Accepted and ignored: decoding is greedy."
    )
    top_p: float | None = Field(
        default=None, ge=0, le=1, description="Accepted and ignored: decoding is greedy."
    )
    stream: bool | None = Field(
        default=False, description="Answer Server-Sent Events, one chunk per token."
    )
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, description="Accepted and ignored.")


# --- responses ------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(
        description="Prompt tokens whose image encoding came from the encoder cache (the "
        "image's tokens when it did, else 0)."
    )


class Usage(BaseModel):
    prompt_tokens: int = Field(description="LM positions before the caption: BOS + image.")
    completion_tokens: int = Field(description="Generated tokens (the end token excluded).")
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str = Field(description="chatcmpl-<request id> (the X-Request-ID of the request).")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(description="Unix time (seconds) of the answer.")
    model: str = Field(description="The adapter name as requested.")
    system_fingerprint: str = Field(description="<adapter>@v<version> that answered.")
    choices: list[Choice]
    usage: Usage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One Server-Sent Event of a streamed completion (`data: <this JSON>`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = Field(
        default=None, description="Set on the last chunks, once the version is known."
    )
    choices: list[ChunkChoice]
    usage: Usage | None = None


class Model(BaseModel):
    id: str = Field(description="The adapter name, to pass as `model`.")
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time of the adapter's latest version.")
    owned_by: str = Field(description="The owning tenant, or `public`.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


# --- errors ---------------------------------------------------------------------------------
class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, ...")
    param: str | None = Field(description="The request field at fault, when one is.")
    code: str = Field(description="The native error type, e.g. adapter_not_found.")


class OpenAIErrorBody(BaseModel):
    error: OpenAIErrorDetail


# OpenAI's error `type` by status; the finer native type is the `code`.
_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def openai_error_type(status: int) -> str:
    if status in _ERROR_TYPES:
        return _ERROR_TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


def openai_error_content(
    status: int, type: str, message: str, param: str | None, request_id: str
) -> dict[str, Any]:
    """The OpenAI error shape (`service.api.errors.ErrorShape`); the request id stays in the
    X-Request-ID header, where the SDK reads it (`exc.request_id`)."""
    return {
        "error": {
            "message": message,
            "type": openai_error_type(status),
            "param": param,
            "code": type,
        }
    }
