"""/adapters against a real server: list, get, upload, delete, scoped by tenant, with the
new version served by /caption at once (no restart).

Every test gets its own server on its own copy of the store (acme/news, acme/sports,
beta/secret, public/pub) and makes the changes it checks itself: any one runs alone, in any
order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from safetensors.torch import save as safetensors_bytes

from adapters.format import CONFIG_FILE, WEIGHTS_FILE
from tests.e2e.conftest import (
    ACME_ADMIN,
    ACME_CAPTION,
    BETA_ADMIN,
    Service,
    assert_error,
    bearer,
    fresh_store,
    image_file,
    noise_png,
    running_service,
)
from tests.service.adapter_fixtures import random_adapter, tiny_backbone

ACME = bearer(ACME_ADMIN)
BETA = bearer(BETA_ADMIN)


@pytest.fixture
def service(tiny_store: Path, tmp_path: Path) -> Iterator[Service]:
    store = fresh_store(tiny_store, tmp_path / "adapters")
    with running_service(store) as running:
        yield running


@pytest.fixture
def client(service: Service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=30) as http:
        yield http


def upload_files(seed: int, header_starts_with: int | None = None) -> dict[str, tuple[str, bytes]]:
    """adapter_config.json and adapter.safetensors of a random tiny adapter. With
    `header_starts_with`, metadata padding makes the safetensors file's first byte (the low
    byte of its header length) that value."""
    adapter = random_adapter(tiny_backbone(), seed)
    tensors = {name: t.detach().contiguous() for name, t in adapter.tensors().items()}
    weights = safetensors_bytes(tensors)
    pad = 0
    while header_starts_with is not None and weights[0] != header_starts_with:
        pad += 1
        weights = safetensors_bytes(tensors, metadata={"padding": "x" * pad})
    config = json.dumps(adapter.config.to_dict()).encode()
    return {"config": (CONFIG_FILE, config), "weights": (WEIGHTS_FILE, weights)}


def names(client: httpx.Client, headers: dict[str, str]) -> dict[str, bool]:
    response = client.get("/adapters", headers=headers)
    assert response.status_code == 200, response.text
    return {a["name"]: a["public"] for a in response.json()["adapters"]}


def caption_with(client: httpx.Client, headers: dict[str, str], adapter: str) -> httpx.Response:
    return client.post(
        "/caption", files=image_file(noise_png(7)), data={"adapter": adapter}, headers=headers
    )


def test_a_tenant_lists_its_own_and_the_public_adapters(client: httpx.Client) -> None:
    assert names(client, ACME) == {"news": False, "sports": False, "pub": True}
    assert names(client, BETA) == {"secret": False, "pub": True}
    assert names(client, bearer(ACME_CAPTION)) == names(client, ACME)  # listing needs no right


def test_get_describes_an_adapter(client: httpx.Client) -> None:
    response = client.get("/adapters/news", headers=ACME)
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "news" and body["public"] is False
    assert body["latest_version"] == 1 and body["versions"] == [1]
    assert body["method"] == "lora" and body["rank"] == 4
    assert body["contexts"] == ["image", "text"]
    public = client.get("/adapters/pub", headers=BETA).json()
    assert public["public"] is True and public["latest_version"] == 1


def test_another_tenants_adapter_is_not_found_and_not_named(client: httpx.Client) -> None:
    response = client.get("/adapters/secret", headers=ACME)
    assert_error(response, 404, "adapter_not_found")
    assert "beta" not in response.text
    assert_error(caption_with(client, ACME, "secret"), 404, "adapter_not_found")


def test_management_needs_a_key_with_the_manage_right(client: httpx.Client) -> None:
    files = upload_files(seed=11)
    assert_error(client.post("/adapters/news/versions", files=files), 401, "unauthorized")
    assert_error(
        client.post("/adapters/news/versions", files=files, headers=bearer("not-a-key-0000000")),
        401,
        "unauthorized",
    )
    caption_only = bearer(ACME_CAPTION)
    assert_error(
        client.post("/adapters/news/versions", files=files, headers=caption_only), 403, "forbidden"
    )
    assert_error(client.delete("/adapters/news", headers=caption_only), 403, "forbidden")
    assert client.get("/adapters/news", headers=ACME).json()["versions"] == [1]  # unchanged


def test_an_uploaded_version_is_served_at_once(client: httpx.Client) -> None:
    before = caption_with(client, ACME, "news")
    assert before.json()["adapter_version"] == 1
    response = client.post("/adapters/news/versions", files=upload_files(seed=12), headers=ACME)
    assert response.status_code == 201, response.text
    assert response.json() == {"name": "news", "version": 2}
    assert client.get("/adapters/news", headers=ACME).json()["versions"] == [1, 2]
    after = caption_with(client, ACME, "news")
    assert after.status_code == 200
    assert after.json()["adapter_version"] == 2
    assert after.json()["caption"] != before.json()["caption"]  # other weights, other words


def test_a_safetensors_file_whose_header_length_starts_with_0x80_is_accepted(
    client: httpx.Client,
) -> None:
    # 0x80 is also the first byte of a pickle; the upload must not be mistaken for one.
    files = upload_files(seed=13, header_starts_with=0x80)
    assert files["weights"][1][0] == 0x80
    response = client.post("/adapters/fresh/versions", files=files, headers=ACME)
    assert response.status_code == 201, response.text
    assert caption_with(client, ACME, "fresh").json()["adapter_version"] == 1


def test_uploads_go_to_the_callers_tenant_only(client: httpx.Client) -> None:
    # beta uploads "news": that is beta/news, and acme's news is untouched.
    acme_before = caption_with(client, ACME, "news").json()["caption"]
    response = client.post("/adapters/news/versions", files=upload_files(seed=14), headers=BETA)
    assert response.status_code == 201
    assert response.json() == {"name": "news", "version": 1}
    assert client.get("/adapters/news", headers=ACME).json()["versions"] == [1]
    assert caption_with(client, BETA, "news").json()["adapter_version"] == 1
    acme_after = caption_with(client, ACME, "news").json()
    assert (acme_after["adapter_version"], acme_after["caption"]) == (1, acme_before)


def test_an_own_adapter_shadows_the_public_one_of_that_name(client: httpx.Client) -> None:
    public_caption = caption_with(client, ACME, "pub").json()["caption"]
    response = client.post("/adapters/pub/versions", files=upload_files(seed=15), headers=ACME)
    assert response.status_code == 201
    own = caption_with(client, ACME, "pub")
    assert own.json()["adapter_version"] == 1
    assert own.json()["caption"] != public_caption
    assert caption_with(client, BETA, "pub").json()["caption"] == public_caption
    assert client.get("/adapters/pub", headers=ACME).json()["public"] is False


def test_delete_removes_an_own_adapter_only(client: httpx.Client) -> None:
    # acme's own copy of "pub", shadowing the public one (deleted below).
    own_pub = client.post("/adapters/pub/versions", files=upload_files(seed=15), headers=ACME)
    assert own_pub.status_code == 201, own_pub.text
    response = client.delete("/adapters/sports", headers=ACME)
    assert response.status_code == 200
    assert response.json() == {"name": "sports", "deleted_versions": 1}
    assert_error(client.get("/adapters/sports", headers=ACME), 404, "adapter_not_found")
    assert_error(caption_with(client, ACME, "sports"), 404, "adapter_not_found")
    # Another tenant's adapter, and a public one, cannot be deleted (and are not named).
    assert_error(client.delete("/adapters/secret", headers=ACME), 404, "adapter_not_found")
    assert "secret" in names(client, BETA)
    acme_pub = client.delete("/adapters/pub", headers=ACME)  # acme's own copy goes ...
    assert acme_pub.json() == {"name": "pub", "deleted_versions": 1}
    assert_error(client.delete("/adapters/pub", headers=ACME), 404, "adapter_not_found")
    assert names(client, ACME) == {"news": False, "pub": True}  # ... not the public one


def test_a_megabyte_of_nested_json_config_is_422_on_an_intact_connection(
    client: httpx.Client,
) -> None:
    """Once a 500 with the connection reset: now refused by size before any parsing."""
    nested = b"[" * 500_000 + b"]" * 500_000
    files = {**upload_files(seed=16), "config": (CONFIG_FILE, nested)}
    response = client.post("/adapters/nested/versions", files=files, headers=ACME)
    body = assert_error(response, 422, "invalid_adapter")
    assert "larger than 65536 bytes" in body["error"]["message"]
    # The same connection carries on.
    assert client.get("/adapters/news", headers=ACME).status_code == 200
    assert_error(client.get("/adapters/nested", headers=ACME), 404, "adapter_not_found")


def test_quotas_and_versions_stored_by_older_builds(
    tiny_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    store_dir = fresh_store(tiny_store, tmp_path_factory.mktemp("quota") / "adapters")
    # A version an older build accepted: its description is not a string (that once made
    # the tenant's GET /adapters answer 500).
    legacy = json.loads(upload_files(seed=17)["config"][1]) | {"description": ["old", 1]}
    folder = store_dir / "acme" / "legacy" / "v1"
    folder.mkdir(parents=True)
    (folder / CONFIG_FILE).write_text(json.dumps(legacy))
    (folder / WEIGHTS_FILE).write_bytes(upload_files(seed=17)["weights"][1])
    with (
        running_service(store_dir, tenant_max_adapters=3) as running,
        httpx.Client(base_url=running.url, timeout=30) as http,
    ):
        listed = http.get("/adapters", headers=ACME)
        assert listed.status_code == 200, listed.text
        described = {a["name"]: a["description"] for a in listed.json()["adapters"]}
        assert described["legacy"] == '["old", 1]'
        assert caption_with(http, ACME, "legacy").status_code == 200  # it still serves
        # acme holds news, sports and legacy: a fourth adapter is over its quota ...
        response = http.post("/adapters/fourth/versions", files=upload_files(18), headers=ACME)
        body = assert_error(response, 413, "quota_exceeded")
        assert body["error"]["message"] == (
            "the tenant already has 3 adapters; the limit is 3 (tenant_max_adapters): delete "
            "one or upload a new version of an existing adapter"
        )
        # ... a new version of one it has is not, and beta's quota is its own.
        assert (
            http.post("/adapters/news/versions", files=upload_files(19), headers=ACME).status_code
            == 201
        )
        assert (
            http.post("/adapters/other/versions", files=upload_files(20), headers=BETA).status_code
            == 201
        )
