"""Property-based requests generated from the live server's /openapi.json (schemathesis), with
every check schemathesis has (a schema-valid request is accepted, an invalid one refused, the
answers, statuses, headers and Allow headers are the documented ones, ...), one request at a
time and in stateful sequences (upload, then describe, caption and delete what was uploaded).
tests/e2e/schemathesis.toml lists, per operation, the answers a schema-valid request may get
for what no schema can say (an image's bytes, an adapter file's content). Besides: no
generated request, valid or not, gets a 5xx, and every 4xx is in its API's error shape: the
native one ({"error": {type, message}, "request_id"}) or, under /v1/, OpenAI's
({"error": {message, type, param, code}}).

The same run by hand, against `ctxpeft serve`: see the header of tests/e2e/schemathesis.toml.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import CHECKS, CheckContext, load_all_checks
from schemathesis.config import SchemathesisConfig

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
STATEFUL = {"sequences": 15, "steps": 6}  # kept small: this runs in `make test`
CONFIG = Path(__file__).with_name("schemathesis.toml")
HYPOTHESIS = {
    "deadline": None,
    "suppress_health_check": list(HealthCheck),
    "database": None,
}


@pytest.fixture(scope="module")
def service(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    store = fresh_store(tiny_store, tmp_path_factory.mktemp("schemathesis") / "adapters")
    with running_service(store, max_body_bytes=256 * 1024) as running:
        yield running


@pytest.fixture(scope="module")
def api_schema(service: Service) -> Any:
    config = SchemathesisConfig.from_path(str(CONFIG))
    return schemathesis.openapi.from_url(f"{service.url}/openapi.json", config=config)


def test_schema_lists_every_operation(api_schema: Any) -> None:
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == set(NATIVE) | set(OPENAI)


def test_every_check_runs(api_schema: Any) -> None:
    """What each case below is validated with: every check schemathesis registers."""
    load_all_checks()
    for method, path in NATIVE + OPENAI:
        operation = api_schema[path][method]
        config = api_schema.config.checks_config_for(operation=operation, phase=None)
        ctx = CheckContext(
            override=None,
            auth=None,
            headers=None,
            config=config,
            transport_kwargs=None,
            response_checks=[],
        )
        assert set(ctx.internals.checks) >= set(CHECKS.get_all()), (method, path)


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
    @settings(max_examples=EXAMPLES[api], **HYPOTHESIS)
    def check(case: Any) -> None:
        response = case.call_and_validate(headers=bearer(ACME_ADMIN))  # every check
        assert response.status_code < 500
        if response.status_code >= 400:
            assert_error(response.json(), response.headers["x-request-id"][0])

    check()


def test_stateful_sequences_keep_the_contract(api_schema: Any) -> None:
    """Sequences that follow the schema's links (an upload's name to describe, caption and
    delete it; a listing's names to a model), every check on every answer."""
    machine = api_schema.as_state_machine()

    class Sequences(machine):  # type: ignore[misc, valid-type]
        def get_call_kwargs(self, case: Case) -> dict[str, Any]:
            return {"headers": bearer(ACME_ADMIN)}

    Sequences.run(
        settings=settings(
            max_examples=STATEFUL["sequences"],
            stateful_step_count=STATEFUL["steps"],
            **HYPOTHESIS,
        )
    )


# --- the five contract failures a full run once found, one by one -------------------------------
def _validator(service: Service, component: str) -> Any:
    document = httpx.get(f"{service.url}/openapi.json", timeout=30).json()
    schema = {"$ref": f"#/components/schemas/{component}", "components": document["components"]}
    return jsonschema.Draft202012Validator(schema)


def _body_component(service: Service, path: str) -> str:
    document = httpx.get(f"{service.url}/openapi.json", timeout=30).json()
    (media,) = document["paths"][path]["post"]["requestBody"]["content"].values()
    return str(media["schema"]["$ref"].rsplit("/", 1)[-1])


def test_the_schema_no_longer_allows_what_the_server_refuses(service: Service) -> None:
    """Each was schema-valid and refused (422/400); the schema now says so (this service has
    no default adapter)."""
    caption = _validator(service, _body_component(service, "/caption"))
    assert caption.is_valid({"image": "x", "adapter": "news"})
    assert caption.is_valid({"image": "x", "adapters": "news,sports", "max_new_tokens": 4})
    assert not caption.is_valid({"image": "", "adapter": "news"})  # an empty image
    assert not caption.is_valid({"image": "x"})  # no adapter, and no default one
    assert not caption.is_valid({"image": "x", "adapter": "news", "adapters": "news"})
    assert not caption.is_valid({"image": "x", "adapter": "news", "max_new_tokens": None})
    upload = _validator(service, _body_component(service, "/adapters/{name}/versions"))
    assert upload.is_valid({"config": "{}", "weights": "x"})
    assert not upload.is_valid({"config": "", "weights": ""})  # empty config and weights
    chat = _validator(service, "ChatCompletionRequest")
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    message = {"role": "user", "content": [image]}
    assert chat.is_valid({"model": "news", "messages": [message]})
    text_null = {"role": "user", "content": [image, {"type": "text", "text": None}]}
    assert not chat.is_valid({"model": "news", "messages": [text_null]})


def test_a_405_names_every_method_of_the_path(service: Service) -> None:
    response = httpx.request(
        "OPTIONS", f"{service.url}/adapters/news", headers=bearer(ACME_ADMIN), timeout=30
    )
    assert response.status_code == 405
    assert response.headers["allow"] == "DELETE, GET"
    assert_native_error(response.json(), response.headers["x-request-id"])
