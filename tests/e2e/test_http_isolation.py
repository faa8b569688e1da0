"""Tenants cannot touch each other's requests through the HTTP API, against a real server: a
client-chosen X-Request-ID shared by two tenants stays a correlation id (one client leaving
cancels its own request only), and the encoder cache never tells one tenant that another sent
the same image (its request is a miss and runs the encoder itself).

The worker is held inside the vision encoder (`encoder_gate`) while the requests queue, so
every wait is on an event the test caused, never on elapsed time.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

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
)
from tests.e2e.openai_helpers import encoder_gate, eventually


@pytest.fixture(scope="module")
def service(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    store = fresh_store(tiny_store, tmp_path_factory.mktemp("isolation") / "adapters")
    with running_service(store) as running:
        yield running


def caption(
    client: httpx.Client, key: str, adapter: str, image: bytes, request_id: str | None = None
) -> httpx.Response:
    headers = bearer(key) | ({"X-Request-ID": request_id} if request_id else {})
    return client.post(
        "/caption", files=image_file(image), data={"adapter": adapter}, headers=headers
    )


def test_two_tenants_share_a_request_id_and_one_leaves_the_other_answers(
    service: Service,
) -> None:
    engine = service.engine
    before = engine.stats()
    shared_id = "0123456789abcdef0123456789abcdef"
    with (
        httpx.Client(base_url=service.url, timeout=120) as client,
        ThreadPoolExecutor(2) as pool,
        encoder_gate(engine) as gate,
    ):
        holder = pool.submit(caption, client, GAMMA_ADMIN, "pub", noise_png(301))
        gate.wait_entered()  # gamma's row holds the worker: the next rows wait in the queue
        other = pool.submit(caption, client, BETA_ADMIN, "secret", noise_png(302), shared_id)
        with httpx.Client(base_url=service.url, timeout=120) as leaving:
            headers = bearer(ACME_ADMIN) | {"X-Request-ID": shared_id}
            with leaving.stream(
                "POST",
                "/caption",
                files=image_file(noise_png(303)),
                data={"adapter": "news", "stream": "true"},
                headers=headers,
            ) as response:
                assert response.status_code == 200  # admitted: the stream started
                assert response.headers["x-request-id"] == shared_id
                eventually(lambda: engine.scheduler.queued == 2, "both rows queued")
            # The block closed acme's connection: acme's client left.
        eventually(
            lambda: (
                engine.stats().dropped.get("cancelled", 0) == before.dropped.get("cancelled", 0) + 1
            ),
            "acme's row cancelled",
        )
        gate.release()
        answer = other.result(timeout=120)
        assert holder.result(timeout=120).status_code == 200
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-request-id"] == shared_id
    assert answer.json()["adapter"] == "secret" and answer.json()["tokens"] >= 1
    after = engine.stats()
    assert after.completed == before.completed + 2  # gamma's and beta's; acme's never ran
    assert engine.admission.inflight == 0


def test_another_tenants_image_is_an_encoder_cache_miss(service: Service) -> None:
    engine = service.engine
    image = noise_png(310)
    with httpx.Client(base_url=service.url, timeout=120) as client:
        first = caption(client, ACME_ADMIN, "news", image)
        runs = engine.stats().encoder_runs
        again = caption(client, ACME_ADMIN, "news", image)  # acme's own image: a hit
        hit_runs = engine.stats().encoder_runs
        other = caption(client, BETA_ADMIN, "secret", image)  # beta sends acme's image
    assert [r.status_code for r in (first, again, other)] == [200, 200, 200]
    assert hit_runs == runs  # acme's second request reused acme's entry
    assert engine.stats().encoder_runs == runs + 1  # beta's ran the encoder itself
