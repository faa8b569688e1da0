"""Property-based requests generated from the live server's /openapi.json (schemathesis): no
generated request, valid or not, gets a 5xx, and every 4xx is in its API's error shape: the
native one ({"error": {type, message}, "request_id"}) or, under /v1/, OpenAI's
({"error": {message, type, param, code}})."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from tests.e2e.conftest import ACME_ADMIN, Service, bearer, fresh_store, running_service

NATIVE = [
    ("POST", "/caption"),
    ("GET", "/adapters"),
    ("GET", "/adapters/{name}"),
    ("POST", "/adapters/{name}/versions"),
    ("DELETE", "/adapters/{name}"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/info"),
    ("GET", "/samples/random"),
]
OPENAI = [
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"),
    # fine-tuning (issue 22)
    ("POST", "/v1/files"),
    ("GET", "/v1/files"),
    ("GET", "/v1/files/{file_id}"),
    ("DELETE", "/v1/files/{file_id}"),
    ("GET", "/v1/files/{file_id}/content"),
    ("POST", "/v1/fine_tuning/jobs"),
    ("GET", "/v1/fine_tuning/jobs"),
    ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}"),
    ("POST", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel"),
    ("POST", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/pause"),
    ("POST", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/resume"),
    ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events"),
    ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints"),
    # usage metering (issue 23)
    ("GET", "/v1/usage"),
]
EXAMPLES = {"native": 25, "openai": 40}  # per operation


@pytest.fixture(scope="module")
def service(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    store = fresh_store(tiny_store, tmp_path_factory.mktemp("schemathesis") / "adapters")
    with running_service(store, max_body_bytes=256 * 1024) as running:
        yield running


@pytest.fixture(scope="module")
def api_schema(service: Service) -> Any:
    return schemathesis.openapi.from_url(f"{service.url}/openapi.json")


def test_schema_lists_every_operation(api_schema: Any) -> None:
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == set(NATIVE) | set(OPENAI)


def assert_native_error(body: dict[str, Any], request_id: str) -> None:
    assert set(body) == {"error", "request_id"}, body
    assert set(body["error"]) == {"type", "message"}, body
    assert body["request_id"] == request_id


def assert_openai_error(body: dict[str, Any], request_id: str) -> None:
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert request_id


@pytest.mark.parametrize(
    ("api", "method", "path"),
    [("native", *op) for op in NATIVE] + [("openai", *op) for op in OPENAI],
)
def test_generated_requests_get_no_server_error(
    api_schema: Any, api: str, method: str, path: str
) -> None:
    operation = api_schema[path][method]
    cases = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    )
    assert_error = assert_openai_error if api == "openai" else assert_native_error

    @given(case=cases)
    @settings(
        max_examples=EXAMPLES[api],
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def check(case: Any) -> None:
        # Every check but "schema-valid data is accepted": the schema cannot say that an image
        # must decode, that a URL must be a data: URL of an image, or that an adapter (model)
        # must exist, so those 4xx answers are right.
        response = case.call_and_validate(
            headers=bearer(ACME_ADMIN), excluded_checks=[positive_data_acceptance]
        )
        assert response.status_code < 500
        if response.status_code >= 400:
            assert_error(response.json(), response.headers["x-request-id"][0])

    check()
