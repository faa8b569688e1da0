"""/metrics of a real server, parsed with the Prometheus text parser: every family is there
with its type, and the values moved exactly as the test traffic says they should.

Traffic (sequential, so that batches are predictable):
    3 x news on image A       200, 200, 200   (encoder: 1 miss, then 2 hits)
    1 x sports on image B     200             (1 miss)
    1 x news,sports on C      200             (one request, two rows in one batch: 1 miss and
                                               1 hit, the second row riding on the same pass)
    1 x news, not an image    415
    1 x no API key            401
    1 x unknown adapter       404
    1 x body over the limit   413             (answered by the body-size middleware)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service import __version__
from tests.e2e.conftest import (
    ACME_ADMIN,
    METRICS_TOKEN,
    Scrape,
    Service,
    bearer,
    image_file,
    noise_png,
    running_service,
    scrape,
)
from tests.service.test_metrics import FAMILIES as METRIC_FAMILIES

MAX_BODY = 64 * 1024
# The families and types the service promises: one table, shared with the unit test.
FAMILIES = METRIC_FAMILIES


@pytest.fixture(scope="module")
def service(tiny_store: Path) -> Iterator[Service]:
    # Read-only use of the shared store; a 64 KiB body limit keeps the 413 cheap to send.
    # running_service protects /metrics with METRICS_TOKEN: the tenants' own adapter names
    # (acme/news, acme/sports) are label values.
    with running_service(tiny_store, max_body_bytes=MAX_BODY) as running:
        yield running


@pytest.fixture(scope="module")
def traffic(service: Service) -> dict[str, int]:
    """Send the traffic of the module docstring; returns tokens generated per adapter."""
    tokens = {"news": 0, "sports": 0}
    with httpx.Client(base_url=service.url, headers=bearer(ACME_ADMIN), timeout=30) as client:

        def caption(data: bytes, **form: str) -> httpx.Response:
            return client.post("/caption", files=image_file(data), data=form)

        for _ in range(3):
            answer = caption(noise_png(101), adapter="news")
            assert answer.status_code == 200, answer.text
            tokens["news"] += answer.json()["tokens"]
        answer = caption(noise_png(102), adapter="sports")
        assert answer.status_code == 200, answer.text
        tokens["sports"] += answer.json()["tokens"]
        answer = caption(noise_png(103), adapters="news,sports")
        assert answer.status_code == 200, answer.text
        for result in answer.json()["results"]:
            tokens[result["adapter"]] += result["tokens"]

        assert caption(b"GIF? no: plain text", adapter="news").status_code == 415
        no_key = httpx.post(
            f"{service.url}/caption", files=image_file(noise_png(104)), data={"adapter": "news"}
        )
        assert no_key.status_code == 401
        assert caption(noise_png(105), adapter="nope").status_code == 404
        assert caption(b"\x89PNG" + bytes(MAX_BODY), adapter="news").status_code == 413
    return tokens


@pytest.fixture(scope="module")
def metrics(service: Service, traffic: dict[str, int]) -> Scrape:
    return scrape(service.url)


def test_metrics_endpoint_serves_the_prometheus_text_format(service: Service) -> None:
    response = httpx.get(f"{service.url}/metrics", headers=bearer(METRICS_TOKEN))
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"


@pytest.mark.parametrize("token", [None, "wrong-token-0000000000001", ACME_ADMIN])
def test_metrics_need_the_scrape_token_when_one_is_set(service: Service, token: str | None) -> None:
    """An API key is not the scrape token: tenants cannot read the operator's metrics."""
    response = httpx.get(f"{service.url}/metrics", headers=bearer(token) if token else {})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"
    assert "ctxpeft_" not in response.text


def test_every_family_is_there_with_its_type(metrics: Scrape) -> None:
    found = {name: family.type for name, family in metrics.families.items()}
    assert {name: found.get(name) for name in FAMILIES} == FAMILIES
    assert all(name.startswith("ctxpeft_") for name in found if not name.startswith("python_"))


def test_requests_by_adapter_and_status(metrics: Scrape) -> None:
    requests = "ctxpeft_requests_total"
    # The two-adapter request counts once under each adapter it named.
    assert metrics.value(requests, adapter="news", status="200") == 4
    assert metrics.value(requests, adapter="sports", status="200") == 2
    assert metrics.value(requests, adapter="news", status="415") == 1
    # An unknown name never becomes a label value (bounded cardinality): it is "none".
    assert metrics.value(requests, adapter="none", status="404") == 1
    assert metrics.value(requests, adapter="nope", status="404") == 0
    durations = "ctxpeft_request_duration_seconds_count"
    assert metrics.value(durations, adapter="news") == 5
    assert metrics.value(durations, adapter="sports") == 2
    assert metrics.value("ctxpeft_request_duration_seconds_sum", adapter="news") > 0


def test_rejections_by_reason(metrics: Scrape) -> None:
    expected = {
        "unsupported_media_type": 1,
        "unauthorized": 1,
        "not_found": 1,
        "queue_full": 0,
        "tenant_limit": 0,
        "draining": 0,
        "deadline": 0,
        "too_large": 1,
    }
    got = {r: metrics.value("ctxpeft_rejections_total", reason=r) for r in expected}
    assert got == expected


def test_steps_queue_wait_and_tokens(
    metrics: Scrape, service: Service, traffic: dict[str, int]
) -> None:
    # Six rows joined the running batch (one queue wait each); every decode step observed its
    # rows and adapters, the same counts the engine's stats() reads (one counting system).
    stats = service.engine.stats()
    assert metrics.value("ctxpeft_queue_wait_seconds_count") == 6 == stats.rows
    steps = metrics.value("ctxpeft_engine_steps_total")
    assert steps == stats.steps > 0
    assert metrics.value("ctxpeft_batch_size_count") == steps
    assert metrics.value("ctxpeft_batch_size_sum") == stats.step_rows
    assert metrics.value("ctxpeft_batch_adapters_sum") == stats.step_adapters
    # The requests came one after another: two rows ran together only for the two-adapter
    # request, and then with two adapters.
    assert metrics.value("ctxpeft_batch_size_bucket", le="2.0") == steps
    mixed = steps - metrics.value("ctxpeft_batch_adapters_bucket", le="1.0")
    assert 0 < mixed == stats.step_adapters - stats.steps
    assert metrics.value("ctxpeft_time_to_first_token_seconds_count") == 6
    for adapter, tokens in traffic.items():
        assert tokens > 0
        assert metrics.value("ctxpeft_generated_tokens_total", adapter=adapter) == tokens
    assert metrics.value("ctxpeft_inflight_requests") == 0
    assert metrics.value("ctxpeft_queue_depth") == 0


def test_encoder_cache_hits_on_a_repeated_image(metrics: Scrape) -> None:
    assert metrics.value("ctxpeft_encoder_cache_misses_total") == 3  # images A, B, C
    assert metrics.value("ctxpeft_encoder_cache_hits_total") == 3  # A twice, C's second row
    assert metrics.value("ctxpeft_encoder_runs_total") == 3


def test_adapter_loads_and_residency(metrics: Scrape) -> None:
    # news and sports: read from disk once each (cpu tier), put in a bank slot once each.
    for tier in ("cpu", "device"):
        assert metrics.value("ctxpeft_adapter_loads_total", tier=tier) == 2
        assert metrics.value("ctxpeft_adapter_load_seconds_count", tier=tier) == 2
        assert metrics.value("ctxpeft_adapter_load_seconds_sum", tier=tier) > 0
    assert metrics.value("ctxpeft_adapters_resident", tier="device") == 2
    assert metrics.value("ctxpeft_adapters_resident", tier="cpu") == 2


def test_build_info(metrics: Scrape, service: Service) -> None:
    samples = metrics.families["ctxpeft_build_info"].samples
    assert len(samples) == 1
    assert samples[0].value == 1
    # The device the engine runs on, not the setting ("auto").
    assert service.settings.device == "auto"
    device = str(service.engine.backbone.device)
    assert device in ("cpu", "cuda:0")
    assert samples[0].labels == {"version": __version__, "backbone": "tiny", "device": device}
