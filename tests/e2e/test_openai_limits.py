"""Limits, disconnects and request ids on the OpenAI-compatible routes (and the native stream),
against real servers, through the official SDK where a client would use it.

The worker is held inside the vision encoder (`encoder_gate`, fault injection) so that a
request stays in flight exactly as long as a test needs: every wait is on an event the test
caused (a chunk received, a counter moved), never on elapsed time. The deadline test uses a
1 s request_timeout_s against a worker held for up to a minute, so its outcome does not depend
on the machine's speed.

Store: the tiny one (acme/news, acme/sports, beta/secret, public/pub).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from service.api import captioning
from tests.e2e.conftest import (
    ACME_ADMIN,
    BETA_ADMIN,
    GAMMA_ADMIN,
    Service,
    bearer,
    fresh_store,
    image_file,
    noise_png,
    running_service,
    scrape,
)
from tests.e2e.openai_helpers import (
    SAFETY_TIMEOUT_S,
    encoder_gate,
    eventually,
    image_message,
    sdk,
)


@pytest.fixture(scope="module")
def limited(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One row in flight per tenant, one row waiting in the queue."""
    store = fresh_store(tiny_store, tmp_path_factory.mktemp("openai-limits") / "adapters")
    with running_service(store, tenant_max_inflight=1, queue_size=1) as running:
        yield running


def requests_total(service: Service, adapter: str, status: int) -> float:
    return scrape(service.url).value("ctxpeft_requests_total", adapter=adapter, status=str(status))


def caption_ok(service: Service, key: str, model: str, image: bytes) -> bool:
    """One caption request; True when it answers 200 (False on the tenant limit's 429)."""
    try:
        sdk(service, key).chat.completions.create(model=model, messages=image_message(image))
    except openai.RateLimitError:
        return False
    return True


def test_a_client_that_leaves_mid_stream_frees_its_row(limited: Service) -> None:
    engine = limited.engine
    before = engine.stats()
    gone_before = requests_total(limited, "news", 499)
    with encoder_gate(engine) as gate:
        stream = sdk(limited, ACME_ADMIN).chat.completions.create(
            model="news", messages=image_message(noise_png(101)), stream=True
        )
        first = next(iter(stream))  # the role chunk: admitted, the status is 200
        assert first.choices[0].delta.role == "assistant"
        gate.wait_entered()  # the row is in a batch, held in the encoder
        stream.close()  # the client leaves mid-stream
        eventually(lambda: requests_total(limited, "news", 499) == gone_before + 1, "499 counted")
        eventually(
            lambda: (
                engine.stats().dropped.get("cancelled", 0) == before.dropped.get("cancelled", 0) + 1
            ),
            "the engine counted the row cancelled",
        )
    # The row's tenant slot is free again (tenant_max_inflight=1): acme captions again.
    eventually(lambda: caption_ok(limited, ACME_ADMIN, "news", noise_png(102)), "acme serves")
    after = engine.stats()
    assert after.completed == before.completed + 1  # the new request; the left one never
    assert after.dropped.get("cancelled", 0) == before.dropped.get("cancelled", 0) + 1


def test_a_native_stream_client_that_leaves_while_queued_is_dropped(limited: Service) -> None:
    engine = limited.engine
    before = engine.stats()
    gone_before = requests_total(limited, "pub", 499)
    with encoder_gate(engine) as gate:
        holder = sdk(limited, BETA_ADMIN).chat.completions.create(
            model="secret", messages=image_message(noise_png(103)), stream=True
        )
        gate.wait_entered()  # beta's row holds the worker; the next one waits in the queue
        with (
            httpx.Client(base_url=limited.url, timeout=60) as client,
            client.stream(
                "POST",
                "/caption",
                files=image_file(noise_png(104)),
                data={"adapter": "pub", "stream": "true"},
                headers=bearer(ACME_ADMIN),
            ) as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
        # The client left before any token.
        eventually(lambda: requests_total(limited, "pub", 499) == gone_before + 1, "499 counted")
        assert engine.stats().dropped.get("cancelled", 0) == before.dropped.get("cancelled", 0) + 1
    chunks = list(holder)  # beta's stream completes once the gate opens
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    eventually(lambda: engine.stats().completed == before.completed + 1, "beta answered")
    assert engine.stats().completed == before.completed + 1  # the dropped row never ran


def test_tenant_limit_and_full_queue_answer_their_statuses(limited: Service) -> None:
    image = noise_png(105)
    with encoder_gate(limited.engine) as gate:
        held = sdk(limited, ACME_ADMIN).chat.completions.create(
            model="news", messages=image_message(noise_png(106)), stream=True
        )
        gate.wait_entered()  # acme's one row is in flight
        with pytest.raises(openai.RateLimitError) as limit:
            sdk(limited, ACME_ADMIN).chat.completions.create(
                model="sports", messages=image_message(image), stream=True
            )
        assert limit.value.code == "tenant_limit"
        assert int(limit.value.response.headers["retry-after"]) >= 1
        queued = sdk(limited, BETA_ADMIN).chat.completions.create(
            model="pub", messages=image_message(image), stream=True
        )
        assert next(iter(queued)).choices[0].delta.role == "assistant"  # admitted: queue full
        with pytest.raises(openai.InternalServerError) as full:
            sdk(limited, GAMMA_ADMIN).chat.completions.create(
                model="pub", messages=image_message(image)
            )
        assert full.value.status_code == 503 and full.value.code == "queue_full"
        assert full.value.response.headers["retry-after"]
    held_text = "".join(c.choices[0].delta.content or "" for c in held if c.choices)
    assert held_text  # the held stream finished once released
    queued_chunks = [c for c in queued if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in queued_chunks)
    again = sdk(limited, BETA_ADMIN).chat.completions.create(
        model="pub", messages=image_message(image)
    )
    assert text == again.choices[0].message.content  # the queued stream was the real caption


def test_request_ids_metrics_and_usage_match_the_native_route(limited: Service) -> None:
    client = sdk(limited, ACME_ADMIN)
    image = noise_png(107)
    before = scrape(limited.url)
    raw = client.chat.completions.with_raw_response.create(
        model="news",
        messages=image_message(image),
        max_tokens=3,
        extra_headers={"X-Request-ID": "trace-me.42"},
    )
    assert raw.headers["x-request-id"] == "trace-me.42"
    completion = raw.parse()
    assert completion.id == "chatcmpl-trace-me.42"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 3
    # BOS + the image tokens of the tiny backbone (32x32 image, 8x8 patches: 16).
    assert completion.usage.prompt_tokens == 1 + limited.engine.backbone.num_image_tokens
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 3
    after = scrape(limited.url)
    counted = ("ctxpeft_requests_total", {"adapter": "news", "status": "200"})
    assert after.value(counted[0], **counted[1]) == before.value(counted[0], **counted[1]) + 1
    tokens = ("ctxpeft_generated_tokens_total", {"adapter": "news"})
    assert after.value(tokens[0], **tokens[1]) == before.value(tokens[0], **tokens[1]) + 3
    native = httpx.post(
        f"{limited.url}/caption",
        files=image_file(image),
        data={"adapter": "news", "max_new_tokens": "3"},
        headers=bearer(ACME_ADMIN),
        timeout=60,
    ).json()
    assert completion.choices[0].message.content == native["caption"]
    assert completion.system_fingerprint == f"news@v{native['adapter_version']}"
    assert scrape(limited.url).value("ctxpeft_inflight_requests") == 0


# --- deadline -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hurried(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    store = fresh_store(tiny_store, tmp_path_factory.mktemp("openai-deadline") / "adapters")
    with running_service(store, request_timeout_s=1.0) as running:
        yield running


def test_the_deadline_answers_504_or_ends_the_stream_with_an_error(hurried: Service) -> None:
    client = sdk(hurried, ACME_ADMIN)
    with encoder_gate(hurried.engine):
        with pytest.raises(openai.InternalServerError) as late:
            client.chat.completions.create(model="news", messages=image_message(noise_png(108)))
        assert late.value.status_code == 504 and late.value.code == "deadline_exceeded"
        stream = client.chat.completions.create(
            model="news", messages=image_message(noise_png(109)), stream=True
        )
        chunks = iter(stream)
        assert next(chunks).choices[0].delta.role == "assistant"
        with pytest.raises(openai.APIError) as in_stream:
            next(chunks)  # the deadline passes while the worker is held
        assert isinstance(in_stream.value.body, dict)
        assert in_stream.value.body["code"] == "deadline_exceeded"
        assert in_stream.value.body["type"] == "server_error"
    assert hurried.engine.stats().dropped.get("deadline", 0) == 2


def test_a_quiet_stream_sends_keep_alive_comments_that_clients_skip(
    limited: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Keep-alives every 10 ms instead of 15 s; the gate keeps the stream quiet until the test
    # has seen some, so the count does not depend on the machine's speed.
    monkeypatch.setattr(captioning, "KEEPALIVE_S", 0.01)
    image = noise_png(110)
    with encoder_gate(limited.engine) as gate:
        stream = sdk(limited, BETA_ADMIN).chat.completions.with_streaming_response.create(
            model="pub", messages=image_message(image), stream=True
        )
        with stream as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk
            comments = 0
            for line in lines:
                if line == ": keep-alive":
                    comments += 1
                    if comments == 3:
                        break
            gate.release()
            rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in rest[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    expected = sdk(limited, BETA_ADMIN).chat.completions.create(
        model="pub", messages=image_message(image)
    )
    assert text == expected.choices[0].message.content
    # The SDK's own stream parser skips the comments: count the keep-alives the server makes
    # while the gate holds the row, then let it finish.
    made = threading.Semaphore(0)

    class CountedKeepAlive(captioning.KeepAlive):
        def __init__(self) -> None:
            made.release()

    monkeypatch.setattr(captioning, "KeepAlive", CountedKeepAlive)
    other = noise_png(111)  # a new image: the encoder (and so the gate) runs for it
    with encoder_gate(limited.engine) as gate:
        sdk_stream = sdk(limited, BETA_ADMIN).chat.completions.create(
            model="pub", messages=image_message(other), stream=True
        )
        for _ in range(3):
            assert made.acquire(timeout=SAFETY_TIMEOUT_S)
        gate.release()
        chunks_seen = list(sdk_stream)
    assert chunks_seen[0].choices[0].delta.role == "assistant"
    expected = sdk(limited, BETA_ADMIN).chat.completions.create(
        model="pub", messages=image_message(other)
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks_seen)
    assert streamed == expected.choices[0].message.content
