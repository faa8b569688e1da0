"""Helpers of the OpenAI-compatible API tests: SDK clients, data URLs, the OpenAI error shape,
and a gate that holds the engine's worker inside the vision encoder.

    client = sdk(service, ACME_ADMIN)
    client.chat.completions.create(model="news", messages=image_message(noise_png(3)))

The gate is fault injection, not a mock: the real encoder runs once the test releases it, and
until then the request it holds stays in flight, so tests count events instead of timing.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest

from service.engine import Engine
from tests.e2e.conftest import Service

SAFETY_TIMEOUT_S = 60.0  # a safety net for waits on events; no test relies on it passing


def sdk(service: Service, key: str, **options: Any) -> openai.OpenAI:
    """The official client pointed at the service; no retries, so every answer is seen."""
    return openai.OpenAI(
        base_url=f"{service.url}/v1", api_key=key, max_retries=0, timeout=60, **options
    )


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def image_message(image: bytes | str, *extra_parts: dict[str, Any]) -> list[dict[str, Any]]:
    """One user message holding one image (bytes become a PNG data URL) and `extra_parts`."""
    url = image if isinstance(image, str) else data_url(image)
    parts = [{"type": "image_url", "image_url": {"url": url}}, *extra_parts]
    return [{"role": "user", "content": parts}]


def chat_body(model: str, image: bytes | str, **fields: Any) -> dict[str, Any]:
    """A raw /v1/chat/completions JSON body, for the tests that send what the SDK would not."""
    return {"model": model, "messages": image_message(image), **fields}


def assert_openai_error(
    response: httpx.Response, status: int, code: str, param: str | None = None
) -> dict[str, Any]:
    """The response is `status` in OpenAI's error shape with this `code` (and `param`)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, body
    assert error["code"] == code, body
    assert error["param"] == param, body
    assert isinstance(error["message"], str) and error["message"], body
    assert error["type"] == expected_type(status), body
    assert response.headers["x-request-id"]
    return error


def expected_type(status: int) -> str:
    types = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}
    types[429] = "rate_limit_error"
    return types.get(status, "server_error" if status >= 500 else "invalid_request_error")


def eventually(condition: Callable[[], bool], what: str) -> None:
    """Wait for `condition` (an event the test caused), polling; fail after the safety net."""
    deadline = time.monotonic() + SAFETY_TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.02)


class EncoderGate:
    """Holds every vision-encoder call of `engine` until `release()`; `entered` is set when
    the worker reaches it (then the rows of that batch are in flight, past the queue)."""

    def __init__(self, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self._release = threading.Event()
        encode = engine.backbone.encode_images

        def gated(*args: Any, **kwargs: Any) -> Any:
            self.entered.set()
            if not self._release.wait(SAFETY_TIMEOUT_S):
                raise RuntimeError("the test never released the encoder gate")
            return encode(*args, **kwargs)

        monkeypatch.setattr(engine.backbone, "encode_images", gated)

    def wait_entered(self) -> None:
        assert self.entered.wait(SAFETY_TIMEOUT_S), "the worker never reached the encoder"

    def release(self) -> None:
        self._release.set()


@contextmanager
def encoder_gate(engine: Engine) -> Iterator[EncoderGate]:
    """An EncoderGate for the block; released and removed when it ends, whatever happened."""
    with pytest.MonkeyPatch.context() as patch:
        gate = EncoderGate(engine, patch)
        try:
            yield gate
        finally:
            gate.release()
