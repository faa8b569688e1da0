"""Caption round trip on the demo backbone over HTTP: a reduced real demo build (count and
colors adapters, `reduced_demo`), served by a real server, captions a synthetic scene whose
captions are known, with the task each adapter was trained for.

Store: public/count and public/colors from the build; tenant acme has its own copies of both
(acme/count, acme/colors); tenant beta has its own copy of count named beta-count.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from adapters.data.synthetic import SyntheticCaptions, caption, render
from tests.e2e.conftest import (
    ACME_ADMIN,
    ACME_CAPTION,
    BETA_ADMIN,
    REDUCED_DEMO_PLAN,
    DemoBuild,
    Service,
    assert_error,
    bearer,
    encode,
    image_file,
    running_demo,
)

# The first held-out (test split) scene with two shapes, as tests/e2e/test_demo.py checks the
# reduced demo in-process: here the same captions must come back over HTTP.
_TEST_SCENES = SyntheticCaptions("count", "test", 200, 0)
SCENE = next(scene for scene in map(_TEST_SCENES.scene, range(200)) if len(scene.shapes) == 2)
COUNT = caption(SCENE, "count")
COLORS = caption(SCENE, "colors")
IMAGE = encode(render(SCENE, REDUCED_DEMO_PLAN.backbone.image_size))
ACME = bearer(ACME_ADMIN)


@pytest.fixture(scope="module")
def service(reduced_demo: DemoBuild, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_demo(
        reduced_demo,
        tmp_path_factory.mktemp("demo-store"),
        tenant_copies=True,
        default_max_new_tokens=32,
        max_new_tokens_limit=64,
    ) as running:
        yield running


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=60) as http:
        yield http


def post_caption(client: httpx.Client, headers: dict[str, str], **form: str) -> httpx.Response:
    return client.post("/caption", files=image_file(IMAGE), data=form, headers=headers)


def test_the_scene_has_the_captions_the_test_expects() -> None:
    assert (COUNT, COLORS) == ("two shapes", "yellow yellow")


@pytest.mark.parametrize(("adapter", "expected"), [("count", COUNT), ("colors", COLORS)])
def test_two_adapters_of_one_tenant_caption_their_task(
    client: httpx.Client, adapter: str, expected: str
) -> None:
    response = post_caption(client, ACME, adapter=adapter)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["caption"] == expected
    assert body["adapter"] == adapter and body["adapter_version"] == 1
    assert body["tokens"] == len(expected.split())
    assert body["request_id"] == response.headers["x-request-id"]
    timings = body["timings_ms"]
    assert set(timings) == {"queue", "encode", "generate", "total"}
    assert 0 <= timings["queue"] <= timings["total"]
    assert timings["generate"] > 0


def test_both_tasks_for_one_image_in_one_call(client: httpx.Client) -> None:
    response = post_caption(client, bearer(ACME_CAPTION), adapters="count,colors")
    assert response.status_code == 200, response.text
    body = response.json()
    assert [(r["adapter"], r["caption"]) for r in body["results"]] == [
        ("count", COUNT),
        ("colors", COLORS),
    ]
    assert {r["request_id"] for r in body["results"]} == {body["request_id"]}


def test_a_client_request_id_is_echoed(client: httpx.Client) -> None:
    headers = {**ACME, "X-Request-ID": "e2e-caption-1"}
    response = post_caption(client, headers, adapter="count")
    assert response.headers["x-request-id"] == "e2e-caption-1"
    assert response.json()["request_id"] == "e2e-caption-1"


def test_another_tenants_adapter_is_refused_without_leaking_its_name(
    client: httpx.Client,
) -> None:
    beta = post_caption(client, bearer(BETA_ADMIN), adapter="beta-count")
    assert beta.json()["caption"] == COUNT
    response = post_caption(client, ACME, adapter="beta-count")
    body = assert_error(response, 404, "adapter_not_found")
    assert "beta" not in body["error"]["message"].replace("beta-count", "")
    listed = client.get("/adapters", headers=ACME).json()["adapters"]
    assert sorted((a["name"], a["public"]) for a in listed) == [
        ("colors", False),
        ("colors", True),
        ("count", False),
        ("count", True),
    ]


def test_management_without_the_right_key_is_refused(client: httpx.Client) -> None:
    assert_error(client.delete("/adapters/count"), 401, "unauthorized")
    assert_error(client.delete("/adapters/count", headers=bearer(ACME_CAPTION)), 403, "forbidden")
    # beta manages its own tenant only: acme's count is not beta's to delete.
    assert_error(client.delete("/adapters/colors", headers=bearer(BETA_ADMIN)), 404,
                 "adapter_not_found")  # fmt: skip
    assert post_caption(client, ACME, adapter="colors").json()["caption"] == COLORS
