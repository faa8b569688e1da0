"""Property-based requests generated from the live server's /openapi.json (schemathesis):
no generated request, valid or not, gets a 5xx, and every 4xx is in the one error shape."""

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

OPERATIONS = [
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


@pytest.fixture(scope="module")
def service(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    store = fresh_store(tiny_store, tmp_path_factory.mktemp("schemathesis") / "adapters")
    with running_service(store, max_body_bytes=256 * 1024) as running:
        yield running


@pytest.fixture(scope="module")
def api_schema(service: Service) -> Any:
    return schemathesis.openapi.from_url(f"{service.url}/openapi.json")


def test_schema_lists_every_operation(api_schema: Any) -> None:
    # The OpenAI-compatible /v1 routes have their own error shape: test_openai_schemathesis.py.
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert {(method, path) for method, path in found if not path.startswith("/v1/")} == set(
        OPERATIONS
    )


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_generated_requests_get_no_server_error(api_schema: Any, method: str, path: str) -> None:
    operation = api_schema[path][method]
    cases = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    )

    @given(case=cases)
    @settings(
        max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    def check(case: Any) -> None:
        # Every check but "schema-valid data is accepted": the schema cannot say that an
        # image must decode or that an adapter must exist, so those 4xx answers are right.
        response = case.call_and_validate(
            headers=bearer(ACME_ADMIN), excluded_checks=[positive_data_acceptance]
        )
        assert response.status_code < 500
        if response.status_code >= 400:
            body = response.json()
            assert set(body) == {"error", "request_id"}, body
            assert set(body["error"]) == {"type", "message"}, body
            assert body["request_id"] == response.headers["x-request-id"][0]

    check()
