"""Bad input on the OpenAI-compatible routes, against a real server: each case gets its 4xx in
OpenAI's error shape, naming the field at fault, and the same cases reach the official SDK as
its error classes. The native routes keep their own shape.

Store: the tiny one (acme/news, acme/sports, beta/secret, public/pub).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import (
    ACME_ADMIN,
    ACME_CAPTION,
    KEYS_JSON,
    Service,
    assert_error,
    bearer,
    encode,
    fresh_store,
    image_file,
    noise_png,
    running_service,
)
from tests.e2e.openai_helpers import (
    assert_openai_error,
    chat_body,
    data_url,
    image_message,
    sdk,
)
from tests.service.adapter_fixtures import noise_image

MAX_BODY = 256 * 1024
MAX_PIXELS = 64 * 64
ADMIN = bearer(ACME_ADMIN)
PNG = noise_png(11)
URL_PARAM = "messages[0].content[0].image_url.url"
MANAGE_ONLY = "acme-manage-only-key-00001"  # may list models, may not caption


@pytest.fixture(scope="module")
def service(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    store = fresh_store(tiny_store, tmp_path_factory.mktemp("openai-bad-input") / "adapters")
    keys = json.loads(KEYS_JSON)
    keys["keys"].append({"key": MANAGE_ONLY, "tenant": "acme", "rights": ["manage"]})
    with running_service(
        store, max_body_bytes=MAX_BODY, max_image_pixels=MAX_PIXELS, keys=json.dumps(keys)
    ) as running:
        yield running


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=30) as http:
        yield http


def post(client: httpx.Client, body: Any, headers: dict[str, str] = ADMIN) -> httpx.Response:
    return client.post("/v1/chat/completions", json=body, headers=headers)


def test_a_good_request_answers_200_first(client: httpx.Client) -> None:
    response = post(client, chat_body("news", PNG, max_tokens=3))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["usage"]["completion_tokens"] == 3
    assert body["choices"][0]["finish_reason"] == "length"


# Each case: a body, then the status, code and param it must answer with.
_TEXT = {"type": "text", "text": "describe the picture"}
_IMAGE = {"type": "image_url", "image_url": {"url": data_url(PNG)}}
CASES: dict[str, tuple[dict[str, Any], int, str, str | None]] = {
    "remote http URL": (
        chat_body("news", "http://169.254.169.254/latest/meta-data/"),
        400,
        "remote_url_refused",
        URL_PARAM,
    ),
    "remote https URL": (
        chat_body("news", "HTTPS://example.com/cat.png"),
        400,
        "remote_url_refused",
        URL_PARAM,
    ),
    "a file URL": (chat_body("news", "file:///etc/passwd"), 400, "invalid_image_url", URL_PARAM),
    "data URL without a comma": (
        chat_body("news", "data:image/png;base64"),
        400,
        "invalid_image_url",
        URL_PARAM,
    ),
    "data URL not base64": (
        chat_body("news", "data:image/png,%89PNG"),
        400,
        "invalid_image_url",
        URL_PARAM,
    ),
    "data URL with broken base64": (
        chat_body("news", "data:image/png;base64,iVBOR$$$w0KGgo="),
        400,
        "invalid_image_url",
        URL_PARAM,
    ),
    "data URL of no bytes": (
        chat_body("news", "data:image/png;base64,"),
        400,
        "invalid_image",
        URL_PARAM,
    ),
    "data URL of a truncated PNG": (
        chat_body("news", data_url(PNG[: len(PNG) // 2])),
        400,
        "invalid_image",
        URL_PARAM,
    ),
    "non-image bytes": (
        chat_body("news", data_url(b"%PDF-1.7 not an image at all", "image/png")),
        415,
        "unsupported_media_type",
        URL_PARAM,
    ),
    "two images": (
        {"model": "news", "messages": [{"role": "user", "content": [_IMAGE, _IMAGE]}]},
        422,
        "invalid_parameter",
        "messages[0].content",
    ),
    "no image": (
        {"model": "news", "messages": [{"role": "user", "content": []}]},
        422,
        "invalid_parameter",
        "messages[0].content",
    ),
    "a text part": (
        {"model": "news", "messages": [{"role": "user", "content": [_IMAGE, _TEXT]}]},
        422,
        "invalid_parameter",
        "messages[0].content[1].text",
    ),
    "a text prompt as the content": (
        {"model": "news", "messages": [{"role": "user", "content": "what is this?"}]},
        422,
        "invalid_parameter",
        "messages[0].content[0].text",
    ),
    "a system message": (
        {
            "model": "news",
            "messages": [
                {"role": "system", "content": "you caption"},
                {"role": "user", "content": [_IMAGE]},
            ],
        },
        422,
        "invalid_parameter",
        "messages",
    ),
    "no messages": ({"model": "news", "messages": []}, 422, "invalid_parameter", "messages"),
    "n=2": (chat_body("news", PNG, n=2), 422, "invalid_parameter", "n"),
    "max_tokens 0": (chat_body("news", PNG, max_tokens=0), 422, "invalid_parameter", "max_tokens"),
    "max_completion_tokens over the limit": (
        chat_body("news", PNG, max_completion_tokens=17),
        422,
        "invalid_parameter",
        "max_completion_tokens",
    ),
    "max_tokens and max_completion_tokens differ": (
        chat_body("news", PNG, max_tokens=2, max_completion_tokens=3),
        422,
        "invalid_parameter",
        "max_tokens",
    ),
    "temperature out of range": (
        chat_body("news", PNG, temperature=3),
        422,
        "invalid_parameter",
        "temperature",
    ),
    "an unknown field": (
        chat_body("news", PNG, tools=[{"type": "function"}]),
        422,
        "invalid_parameter",
        "tools",
    ),
    "an unknown field in a part": (
        {
            "model": "news",
            "messages": [
                {"role": "user", "content": [{**_IMAGE, "image_url": {"url": "x", "zoom": 2}}]}
            ],
        },
        422,
        "invalid_parameter",
        "messages[0].content[0].image_url.zoom",
    ),
    "an unknown part type": (
        {"model": "news", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
        422,
        "invalid_parameter",
        "messages[0].content[0].type",
    ),
    "an image part without its image": (
        {"model": "news", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        422,
        "invalid_parameter",
        "messages[0].content[0]",
    ),
    "no model": (
        {"messages": image_message(PNG)},
        422,
        "invalid_parameter",
        "model",
    ),
    "an unknown model": (chat_body("gpt-4o", PNG), 404, "adapter_not_found", "model"),
    "a model name no adapter can have": (
        chat_body("../beta/secret", PNG),
        404,
        "adapter_not_found",
        "model",
    ),
    "another tenant's adapter": (chat_body("secret", PNG), 404, "adapter_not_found", "model"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_its_4xx_in_the_openai_shape(client: httpx.Client, case: str) -> None:
    body, status, code, param = CASES[case]
    error = assert_openai_error(post(client, body), status, code, param)
    assert "internal" not in error["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_streamed_request_is_checked_before_the_stream_starts(
    client: httpx.Client, stream: bool
) -> None:
    body = chat_body("news", "https://example.com/a.png", stream=stream)
    error = assert_openai_error(post(client, body), 400, "remote_url_refused", URL_PARAM)
    assert "never fetches URLs" in error["message"]


def test_messages_explain_what_to_send(client: httpx.Client) -> None:
    prompt = CASES["a text part"][0]
    assert "take no prompt" in post(client, prompt).json()["error"]["message"]
    two = CASES["two images"][0]
    assert "holds 2 images" in post(client, two).json()["error"]["message"]
    n = CASES["n=2"][0]
    assert "n must be 1" in post(client, n).json()["error"]["message"]


def test_the_image_may_come_with_empty_text_and_any_image_media_type(
    client: httpx.Client,
) -> None:
    empty_text = {"type": "text", "text": ""}
    body = {
        "model": "news",
        "messages": [{"role": "user", "content": [empty_text, _IMAGE, empty_text]}],
        "max_tokens": 2,
        "temperature": 0.7,
        "top_p": 0.5,
        "user": "someone",
    }
    with_text = post(client, body)
    assert with_text.status_code == 200, with_text.text
    # The format is read from the bytes, as on /caption; the declared type does not matter.
    jpeg = encode(noise_image(12), "JPEG")
    typed = post(client, chat_body("news", data_url(jpeg, "image/png"), max_tokens=2))
    assert typed.status_code == 200, typed.text
    # MIME-style base64 folded into 76-character lines, and no media type at all.
    text = base64.b64encode(jpeg).decode()
    folded = "\r\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    untyped = post(client, chat_body("news", f"data:;base64,{folded}", max_tokens=2))
    assert untyped.status_code == 200, untyped.text
    assert untyped.json()["choices"] == typed.json()["choices"]
    # Greedy decoding: temperature and top_p change nothing.
    plain = post(client, chat_body("news", PNG, max_tokens=2))
    assert with_text.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]


def test_a_body_that_is_not_json_is_refused(client: httpx.Client) -> None:
    response = client.post(
        "/v1/chat/completions",
        content=b'{"model": "news", "messages": [',
        headers={**ADMIN, "content-type": "application/json"},
    )
    assert_openai_error(response, 422, "invalid_parameter", None)


def test_an_oversized_body_is_413_in_the_openai_shape(client: httpx.Client) -> None:
    body = chat_body("news", data_url(b"\x89PNG\r\n\x1a\n" + bytes(MAX_BODY)))
    assert_openai_error(post(client, body), 413, "payload_too_large")


def test_an_image_over_the_pixel_limit_is_413(client: httpx.Client) -> None:
    big = encode(noise_image(13, size=65))
    error = assert_openai_error(
        post(client, chat_body("news", big)), 413, "image_too_large", URL_PARAM
    )
    assert "max_image_pixels" in error["message"]


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
        ("GET", "/v1/completions", 404, "not_found"),
        ("POST", "/v1/embeddings", 404, "not_found"),
        ("GET", "/v1/models/no-such-adapter", 404, "adapter_not_found"),
        ("GET", "/v1/models/secret", 404, "adapter_not_found"),
    ],
)
def test_routes_and_models_that_do_not_exist(
    client: httpx.Client, method: str, path: str, status: int, code: str
) -> None:
    param = "model" if code == "adapter_not_found" else None
    assert_openai_error(client.request(method, path, headers=ADMIN), status, code, param)


@pytest.mark.parametrize(
    ("headers", "message"),
    [({}, "missing API key"), (bearer("not-a-key-0000000000000"), "invalid API key")],
)
def test_authentication_errors_are_401_in_the_openai_shape(
    client: httpx.Client, headers: dict[str, str], message: str
) -> None:
    for response in (
        post(client, chat_body("news", PNG), headers),
        client.get("/v1/models", headers=headers),
    ):
        error = assert_openai_error(response, 401, "unauthorized")
        assert error["message"] == message
        assert response.headers["www-authenticate"] == "Bearer"


def test_the_native_routes_keep_their_own_error_shape(client: httpx.Client) -> None:
    """The OpenAI shape is for /v1 only: /caption and unknown routes elsewhere are native."""
    response = client.post(
        "/caption", files=image_file(b"nope"), data={"adapter": "news"}, headers=ADMIN
    )
    assert_error(response, 415, "unsupported_media_type")
    assert_error(client.get("/v1x/models", headers=ADMIN), 404, "not_found")


# --- the same errors through the official SDK -------------------------------------------------
def test_the_sdk_raises_its_error_classes(service: Service) -> None:
    client = sdk(service, ACME_ADMIN)
    with pytest.raises(openai.BadRequestError) as remote:
        client.chat.completions.create(
            model="news", messages=image_message("https://example.com/cat.png")
        )
    assert remote.value.status_code == 400
    assert remote.value.code == "remote_url_refused"
    assert remote.value.param == URL_PARAM
    assert remote.value.type == "invalid_request_error"
    assert remote.value.request_id  # the X-Request-ID header
    with pytest.raises(openai.UnprocessableEntityError) as n:
        client.chat.completions.create(model="news", messages=image_message(PNG), n=2)
    assert n.value.param == "n"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="secret", messages=image_message(PNG))
    assert unknown.value.code == "adapter_not_found"
    with pytest.raises(openai.AuthenticationError):
        sdk(service, "wrong-key-00000000000000").models.list()
    with pytest.raises(openai.APIStatusError) as too_big:
        client.chat.completions.create(
            model="news", messages=image_message(encode(noise_image(14, size=80)))
        )
    assert too_big.value.status_code == 413
    assert too_big.value.code == "image_too_large"
    with pytest.raises(openai.APIStatusError) as not_an_image:
        client.chat.completions.create(
            model="news", messages=image_message(data_url(b"GIF00 not really"))
        )
    assert type(not_an_image.value) is openai.APIStatusError
    assert not_an_image.value.status_code == 415
    assert not_an_image.value.code == "unsupported_media_type"


def test_a_key_without_the_caption_right_gets_403(service: Service, client: httpx.Client) -> None:
    manager = sdk(service, MANAGE_ONLY)
    assert {m.id for m in manager.models.list()} == {"news", "sports", "pub"}
    with pytest.raises(openai.PermissionDeniedError) as refused:
        manager.chat.completions.create(model="news", messages=image_message(PNG))
    assert refused.value.code == "forbidden" and refused.value.type == "permission_error"
    error = assert_openai_error(
        post(client, chat_body("news", PNG), bearer(MANAGE_ONLY)), 403, "forbidden"
    )
    assert "'caption' right" in error["message"]


def test_a_caption_only_key_may_list_models_and_caption(service: Service) -> None:
    client = sdk(service, ACME_CAPTION)
    assert {m.id for m in client.models.list()} == {"news", "sports", "pub"}
    answer = client.chat.completions.create(model="pub", messages=image_message(PNG), max_tokens=2)
    assert answer.usage is not None and answer.usage.completion_tokens == 2


def test_the_server_still_serves_after_all_of_that(client: httpx.Client) -> None:
    response = post(client, chat_body("news", PNG, max_tokens=2))
    assert response.status_code == 200, response.text
    assert client.get("/readyz").status_code == 200
