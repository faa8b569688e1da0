"""A bounded burst at several times capacity against a real server with a small queue and a
small per-tenant limit: every request gets an answer within a bound, the answers are only
200 / 429 / 503, the refusals carry Retry-After, and the server is idle and serving after.
Each test sends its own burst and counts what it changed: any one runs alone, in any order.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import (
    ACME_ADMIN,
    BETA_ADMIN,
    GAMMA_ADMIN,
    Service,
    bearer,
    image_file,
    noise_png,
    running_service,
    scrape,
)

QUEUE_SIZE = 4
TENANT_MAX_INFLIGHT = 3
MAX_BATCH = 2
PER_TENANT = 12  # 3 tenants x 12 = 36 requests at once; capacity is about 4 waiting + 2 running
ANSWER_WITHIN_S = 30.0


@pytest.fixture(scope="module")
def service(tiny_store: Path) -> Iterator[Service]:
    # Read-only use of the shared store: nothing here uploads or deletes.
    with running_service(
        tiny_store,
        queue_size=QUEUE_SIZE,
        tenant_max_inflight=TENANT_MAX_INFLIGHT,
        max_batch_size=MAX_BATCH,
        default_max_new_tokens=8,
    ) as running:
        yield running


Job = tuple[str, str]  # (API key, adapter)
Answer = tuple[float, httpx.Response]  # (seconds to answer, response)


async def _burst(url: str, jobs: list[Job]) -> list[Answer]:
    """Send every request at once and wait for all the answers."""
    limits = httpx.Limits(max_connections=len(jobs), max_keepalive_connections=len(jobs))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=ANSWER_WITHIN_S) as client:

        async def one(index: int, key: str, adapter: str) -> Answer:
            started = time.monotonic()
            response = await asyncio.wait_for(
                client.post(
                    "/caption",
                    files=image_file(noise_png(index)),
                    data={"adapter": adapter},
                    headers=bearer(key),
                ),
                ANSWER_WITHIN_S,
            )
            return time.monotonic() - started, response

        return await asyncio.gather(*(one(i, *job) for i, job in enumerate(jobs)))


def _check_answers(answers: list[Answer]) -> collections.Counter[int]:
    """Only 200 / 429 / 503, each within the bound; refusals typed and with Retry-After."""
    statuses = collections.Counter(response.status_code for _, response in answers)
    assert set(statuses) <= {200, 429, 503}, statuses
    assert statuses[200] >= MAX_BATCH, statuses
    assert max(seconds for seconds, _ in answers) < ANSWER_WITHIN_S
    for _, response in answers:
        if response.status_code == 200:
            assert response.json()["tokens"] >= 1
            continue
        body = response.json()
        expected = "tenant_limit" if response.status_code == 429 else "queue_full"
        assert body["error"]["type"] == expected, body
        assert int(response.headers["retry-after"]) >= 1
        assert body["request_id"] == response.headers["x-request-id"]
    return statuses


def test_burst_over_capacity_is_answered_200_429_or_503(service: Service) -> None:
    before = scrape(service.url)
    # One tenant alone cannot fill the queue (3 in flight < 4 queue places): its excess is 429.
    one_tenant = asyncio.run(_burst(service.url, [(ACME_ADMIN, "news")] * PER_TENANT))
    alone = _check_answers(one_tenant)
    assert alone[429] >= 1 and alone[503] == 0, alone

    # Three tenants together can (up to 9 in flight, 2 running): the queue fills, 503.
    jobs = [(ACME_ADMIN, "news"), (BETA_ADMIN, "secret"), (GAMMA_ADMIN, "pub")] * PER_TENANT
    together = _check_answers(asyncio.run(_burst(service.url, jobs)))
    assert together[503] >= 1, together

    # The refusals are counted by reason, exactly as answered.
    after = scrape(service.url)

    def refused(reason: str) -> float:
        return after.value("ctxpeft_rejections_total", reason=reason) - before.value(
            "ctxpeft_rejections_total", reason=reason
        )

    assert refused("tenant_limit") == alone[429] + together[429]
    assert refused("queue_full") == together[503]


def test_server_is_idle_and_serving_after_a_burst(service: Service) -> None:
    jobs = [(ACME_ADMIN, "news"), (BETA_ADMIN, "secret"), (GAMMA_ADMIN, "pub")] * PER_TENANT
    _check_answers(asyncio.run(_burst(service.url, jobs)))
    engine = service.engine
    # Every request was answered; their rows are let go of as they end (a wait on the
    # admission's own condition, with a safety net, not a poll of the clock).
    assert engine.admission.wait_idle(ANSWER_WITHIN_S), "rows still in flight after the burst"
    assert engine.admission.inflight == 0 and engine.admission.waiting == 0
    assert engine.stats().failed == 0
    assert scrape(service.url).value("ctxpeft_inflight_requests") == 0
    response = httpx.post(
        f"{service.url}/caption",
        files=image_file(noise_png(99)),
        data={"adapter": "news"},
        headers=bearer(ACME_ADMIN),
        timeout=ANSWER_WITHIN_S,
    )
    assert response.status_code == 200, response.text
    assert httpx.get(f"{service.url}/readyz").json() == {"status": "ready"}
