"""The official `openai` SDK, unchanged, against a real server on the reduced demo: a chat
completion with `model="count"` captions a synthetic scene exactly as `POST /caption` does,
streamed or not; `models.list()` shows exactly what the key can use; errors reach the SDK as
its own error classes.

Store: public/count and public/colors from the build; tenant acme has its own copies of both
(acme/count, acme/colors); tenant beta has its own copy of count named beta-count.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from tests.e2e.conftest import (
    ACME_ADMIN,
    BETA_ADMIN,
    GAMMA_ADMIN,
    DemoBuild,
    Service,
    bearer,
    encode,
    image_file,
    running_demo,
)
from tests.e2e.openai_helpers import data_url, image_message, sdk
from tests.e2e.test_http_caption import COLORS, COUNT, IMAGE

MAX_PIXELS = 256 * 256


@pytest.fixture(scope="module")
def service(reduced_demo: DemoBuild, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_demo(
        reduced_demo,
        tmp_path_factory.mktemp("openai-demo-store"),
        tenant_copies=True,
        default_max_new_tokens=32,
        max_new_tokens_limit=64,
        max_image_pixels=MAX_PIXELS,
    ) as running:
        yield running


@pytest.fixture(scope="module")
def acme(service: Service) -> openai.OpenAI:
    return sdk(service, ACME_ADMIN)


def native_caption(service: Service, key: str, **form: str) -> dict[str, Any]:
    response = httpx.post(
        f"{service.url}/caption",
        files=image_file(IMAGE),
        data=form,
        headers=bearer(key),
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.mark.parametrize(("model", "expected"), [("count", COUNT), ("colors", COLORS)])
def test_a_chat_completion_is_the_caption_post_caption_gives(
    service: Service, acme: openai.OpenAI, model: str, expected: str
) -> None:
    completion = acme.chat.completions.create(model=model, messages=image_message(IMAGE))
    native = native_caption(service, ACME_ADMIN, adapter=model)
    assert completion.choices[0].message.content == native["caption"] == expected
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert len(completion.choices) == 1 and completion.choices[0].index == 0
    assert completion.object == "chat.completion"
    assert completion.model == model
    assert completion.id.startswith("chatcmpl-")
    assert isinstance(completion.created, int) and completion.created > 1_600_000_000
    assert completion.system_fingerprint == f"{model}@v{native['adapter_version']}"
    usage = completion.usage
    assert usage is not None
    assert usage.completion_tokens == native["tokens"] == len(expected.split())
    assert usage.prompt_tokens == 1 + service.engine.backbone.num_image_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_chunks_concatenate_to_the_caption(acme: openai.OpenAI) -> None:
    chunks = list(
        acme.chat.completions.create(
            model="count",
            messages=image_message(IMAGE),
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    first, *tokens, last, usage = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert [c.choices[0].finish_reason for c in tokens] == [None] * len(tokens)
    assert "".join(c.choices[0].delta.content or "" for c in tokens) == COUNT
    assert len(tokens) == len(COUNT.split())  # one chunk per generated token
    assert last.choices[0].finish_reason == "stop" and not last.choices[0].delta.content
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.completion_tokens == len(tokens)
    assert {c.id for c in chunks} == {first.id} and first.id.startswith("chatcmpl-")
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert {c.model for c in chunks} == {"count"}
    assert last.system_fingerprint == "count@v1"


def test_max_tokens_cuts_the_caption_with_finish_reason_length(acme: openai.OpenAI) -> None:
    completion = acme.chat.completions.create(
        model="count", messages=image_message(IMAGE), max_tokens=1
    )
    first_word = COUNT.split()[0]
    assert completion.choices[0].message.content == first_word
    assert completion.choices[0].finish_reason == "length"
    stream = acme.chat.completions.create(
        model="count", messages=image_message(IMAGE), max_completion_tokens=1, stream=True
    )
    chunks = [c for c in stream if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == first_word
    assert chunks[-1].choices[0].finish_reason == "length"


def test_the_async_client_streams_the_same_caption(service: Service) -> None:
    async def run() -> str:
        client = openai.AsyncOpenAI(
            base_url=f"{service.url}/v1", api_key=GAMMA_ADMIN, max_retries=0, timeout=60
        )
        async with client:
            stream = await client.chat.completions.create(
                model="colors", messages=image_message(IMAGE), stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream])

    assert asyncio.run(run()) == COLORS


def test_models_list_shows_exactly_what_the_key_can_use(service: Service) -> None:
    def listed(key: str) -> list[tuple[str, str]]:
        models = list(sdk(service, key).models.list())
        assert {m.object for m in models} == {"model"}
        assert all(m.created > 1_600_000_000 for m in models)
        return sorted((m.id, m.owned_by) for m in models)

    # acme's own count and colors shadow the public ones: `model="count"` resolves to acme's.
    assert listed(ACME_ADMIN) == [("colors", "acme"), ("count", "acme")]
    assert listed(BETA_ADMIN) == [("beta-count", "beta"), ("colors", "public"), ("count", "public")]
    assert listed(GAMMA_ADMIN) == [("colors", "public"), ("count", "public")]
    one = sdk(service, BETA_ADMIN).models.retrieve("beta-count")
    assert (one.id, one.owned_by) == ("beta-count", "beta")
    with pytest.raises(openai.NotFoundError):
        sdk(service, ACME_ADMIN).models.retrieve("beta-count")  # another tenant's: never seen


@pytest.mark.parametrize("stream", [False, True])
def test_an_unknown_or_foreign_model_raises_not_found(acme: openai.OpenAI, stream: bool) -> None:
    for model in ("gpt-4o", "beta-count"):
        with pytest.raises(openai.NotFoundError) as error:
            acme.chat.completions.create(model=model, messages=image_message(IMAGE), stream=stream)
        assert error.value.code == "adapter_not_found" and error.value.param == "model"
        assert "beta" not in str(error.value.message).replace("beta-count", "")


def test_a_bad_key_raises_authentication_error(service: Service) -> None:
    client = sdk(service, "not-a-key-of-this-service-0000")
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="count", messages=image_message(IMAGE))
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_an_oversized_image_raises_the_sdks_413_error(acme: openai.OpenAI) -> None:
    big = encode(Image.new("RGB", (257, 256), "white"))
    with pytest.raises(openai.APIStatusError) as error:
        acme.chat.completions.create(model="count", messages=image_message(data_url(big)))
    # The SDK has no class of its own for 413: it raises APIStatusError itself.
    assert type(error.value) is openai.APIStatusError
    assert error.value.status_code == 413
    assert error.value.code == "image_too_large"
    assert "max_image_pixels" in error.value.message


def _events(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def test_the_native_route_streams_the_same_tokens(service: Service) -> None:
    response = httpx.post(
        f"{service.url}/caption",
        files=image_file(IMAGE),
        data={"adapters": "count,colors", "stream": "true"},
        headers=bearer(ACME_ADMIN),
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = _events(response.text)
    kinds = [kind for kind, _ in events]
    assert kinds == ["token"] * (len(kinds) - 1) + ["result"]
    tokens = [data for kind, data in events if kind == "token"]
    result = events[-1][1]
    assert [r["caption"] for r in result["results"]] == [COUNT, COLORS]
    for index, (name, caption) in enumerate([("count", COUNT), ("colors", COLORS)]):
        own = [t for t in tokens if t["index"] == index]
        assert {t["adapter"] for t in own} == {name}
        assert "".join(t["text"] for t in own) == caption
        assert len(own) == result["results"][index]["tokens"]
    native = native_caption(service, ACME_ADMIN, adapters="count,colors")
    assert [r["caption"] for r in native["results"]] == [COUNT, COLORS]
    assert result["request_id"] == response.headers["x-request-id"]


def test_usage_counts_the_image_and_says_when_its_encoding_was_cached(service: Service) -> None:
    """Issue 23: each answer's usage is what it actually used. A new image (for this tenant's
    encoder cache) costs an encoder pass; the same image again is served from the cache, and
    the usage says so (`cached_tokens`: the image's tokens), natively and through the SDK."""
    fresh = encode(Image.new("RGB", (64, 64), (12, 200, 80)))
    image_tokens = service.engine.backbone.num_image_tokens
    beta = sdk(service, BETA_ADMIN)
    answers = []
    for _ in range(2):
        answers.append(
            list(
                beta.chat.completions.create(
                    model="count",
                    messages=image_message(fresh),
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
        )
    for chunks, cached in zip(answers, (0, image_tokens), strict=True):
        *content, _last, usage_chunk = chunks
        usage = usage_chunk.usage
        assert usage_chunk.choices == [] and usage is not None
        generated = len([c for c in content if c.choices and c.choices[0].delta.content])
        assert usage.completion_tokens == generated
        assert usage.prompt_tokens == 1 + image_tokens
        assert usage.prompt_tokens_details is not None
        assert usage.prompt_tokens_details.cached_tokens == cached
    # The native answer carries the same figures and the compute time it was given.
    response = httpx.post(
        f"{service.url}/caption",
        files=image_file(fresh),
        data={"adapter": "count"},
        headers=bearer(BETA_ADMIN),
        timeout=60,
    )
    body = response.json()
    usage = body["usage"]
    assert usage["completion_tokens"] == body["tokens"]
    assert usage["prompt_tokens"] == 1 + image_tokens and usage["image_tokens"] == image_tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["image_cached"] is True and usage["compute_ms"] > 0
