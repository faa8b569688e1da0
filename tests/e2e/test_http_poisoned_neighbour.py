"""No tenant can change another tenant's output (issue 20), end to end over HTTP on a real
server, as the hostile tenant of the report did it.

Tenant beta uploads a BitFit set whose weights are all finite but whose activations overflow:
biases of 3e38 on o_proj and down_proj of the tiny backbone (two of them in one residual sum
are infinite, the next layer's norm makes NaN, and that layer's keys and values in the KV
cache are NaN). With the servability probe (the default) the upload is refused
with 422. With the probe off (a trusted store), the set reaches the step loop: while beta's
rows run beside acme's (acme's rows joining the buffer rows beta's rows left, padded, because
other rows are mid-caption), every acme caption is exactly the one it gets alone, every beta
row ends with 422 adapter_non_finite naming its version, and readiness stays 200. A version
that keeps doing it is quarantined until a new version replaces it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save as safetensors_bytes

from adapters.adapter_set import AdapterSet
from adapters.format import CONFIG_FILE, WEIGHTS_FILE
from tests.e2e.conftest import (
    ACME_ADMIN,
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

TOKENS = 16
ROUNDS = 12  # each: two beta requests, then three acme ones, all in flight together
METRICS_TOKEN = "scrape-token-poison-00001"


def overflowing_set() -> AdapterSet:
    adapter = random_adapter(tiny_backbone(), 31, method="bitfit")
    with torch.no_grad():
        # Two finite 3e38s in one layer's residual sum to infinity; the next layer's norm
        # turns it into NaN, which its keys and values (the KV cache) then hold.
        for layer in (0, 1):
            for module in ("o_proj", "down_proj"):
                adapter.params[f"lm__layers__{layer}__{module}__bias"].fill_(3e38)
    return adapter


def files_of(adapter: AdapterSet, **config_changes: Any) -> dict[str, tuple[str, bytes]]:
    tensors = {name: t.detach().contiguous() for name, t in adapter.tensors().items()}
    config = adapter.config.to_dict() | config_changes
    return {
        "config": (CONFIG_FILE, json.dumps(config).encode()),
        "weights": (WEIGHTS_FILE, safetensors_bytes(tensors)),
    }


def caption(client: httpx.Client, key: str, adapter: str, image: int) -> httpx.Response:
    return client.post(
        "/caption",
        files=image_file(noise_png(image)),
        data={"adapter": adapter, "max_new_tokens": str(TOKENS)},
        headers=bearer(key),
    )


@pytest.fixture(scope="module")
def trusted(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The probe off (a trusted store), quarantine out of reach: the step loop alone stands
    between beta's set and acme's rows."""
    store = fresh_store(tiny_store, tmp_path_factory.mktemp("poison") / "adapters")
    with running_service(
        store,
        adapter_probe=False,
        quarantine_after=10_000,
        default_max_new_tokens=TOKENS,
        max_batch_size=8,
        max_prefill_rows=4,
        prefill_min_rows=1,
        prefill_max_wait_steps=0,
        metrics_token=METRICS_TOKEN,
    ) as running:
        yield running


def test_the_probe_refuses_the_overflowing_upload_and_stores_nothing(
    tiny_store: Path, tmp_path: Path
) -> None:
    with (
        running_service(fresh_store(tiny_store, tmp_path / "adapters")) as service,
        httpx.Client(base_url=service.url, timeout=60) as client,
    ):
        reply = client.post(
            "/adapters/overflow/versions",
            files=files_of(overflowing_set()),
            headers=bearer(BETA_ADMIN),
        )
        body = assert_error(reply, 422, "adapter_unservable")
        assert "servability probe" in body["error"]["message"]
        assert "non-finite" in body["error"]["message"]
        assert client.get("/adapters/overflow", headers=bearer(BETA_ADMIN)).status_code == 404


def test_a_bitfit_set_saying_rank_0_is_accepted_and_serves(
    tiny_store: Path, tmp_path: Path
) -> None:
    """The report's second point: BitFit carries no rank; "rank": 0 once divided by zero
    at every caption (503 forever). Now the upload is judged by the probe and it serves."""
    with (
        running_service(fresh_store(tiny_store, tmp_path / "adapters")) as service,
        httpx.Client(base_url=service.url, timeout=60) as client,
    ):
        bitfit = random_adapter(tiny_backbone(), 32, method="bitfit")
        reply = client.post(
            "/adapters/rankless/versions",
            files=files_of(bitfit, rank=0),
            headers=bearer(BETA_ADMIN),
        )
        assert reply.status_code == 201, reply.text
        answer = caption(client, BETA_ADMIN, "rankless", 3)
        assert answer.status_code == 200, answer.text
        assert answer.json()["adapter_version"] == 1


def test_a_poisoned_neighbour_changes_no_caption(trusted: Service) -> None:
    with httpx.Client(base_url=trusted.url, timeout=120) as client:
        images = range(1, 1 + ROUNDS)
        alone = {}
        for image in images:  # acme's captions with nobody else on the service
            reply = caption(client, ACME_ADMIN, "news", image)
            assert reply.status_code == 200, reply.text
            alone[image] = (reply.json()["caption"], reply.json()["tokens"])
        assert len({c for c, _ in alone.values()}) > 1  # the images give different captions

        upload = client.post(
            "/adapters/overflow/versions",
            files=files_of(overflowing_set()),
            headers=bearer(BETA_ADMIN),
        )
        assert upload.status_code == 201, upload.text  # finite weights; no probe here

        jobs: list[tuple[str, str, int]] = []
        for image in images:
            jobs += [(BETA_ADMIN, "overflow", image)] * 2
            jobs += [(ACME_ADMIN, "news", image)] * 3
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda job: caption(client, *job), jobs))

        changed = []
        for (key, _, image), reply in zip(jobs, replies, strict=True):
            if key == BETA_ADMIN:
                body = assert_error(reply, 422, "adapter_non_finite")
                assert "beta/overflow@v1" in body["error"]["message"]
            else:
                assert reply.status_code == 200, reply.text
                if (reply.json()["caption"], reply.json()["tokens"]) != alone[image]:
                    changed.append((image, reply.json()["caption"], alone[image]))
        assert changed == []
        assert client.get("/readyz").status_code == 200

        stats = trusted.engine.stats()
        assert stats.non_finite == 2 * ROUNDS and stats.quarantined == 0
        metrics = client.get("/metrics", headers=bearer(METRICS_TOKEN)).text
        assert f"ctxpeft_non_finite_rows_total {2.0 * ROUNDS}" in metrics
        assert trusted.engine.scheduler.inflight == 0


def test_a_version_that_keeps_overflowing_is_quarantined_until_replaced(
    tiny_store: Path, tmp_path: Path
) -> None:
    with (
        running_service(
            fresh_store(tiny_store, tmp_path / "adapters"), adapter_probe=False, quarantine_after=2
        ) as service,
        httpx.Client(base_url=service.url, timeout=60) as client,
    ):
        upload = client.post(
            "/adapters/overflow/versions",
            files=files_of(overflowing_set()),
            headers=bearer(BETA_ADMIN),
        )
        assert upload.status_code == 201, upload.text
        for image in (1, 2):
            assert_error(caption(client, BETA_ADMIN, "overflow", image), 422, "adapter_non_finite")
        body = assert_error(caption(client, BETA_ADMIN, "overflow", 3), 422, "adapter_quarantined")
        assert "beta/overflow@v1" in body["error"]["message"]
        assert "upload a new version" in body["error"]["message"]
        assert service.engine.stats().quarantined == 1
        assert client.get("/readyz").status_code == 200
        # Other adapters are not affected, and a new version replaces the quarantined one.
        assert caption(client, ACME_ADMIN, "news", 3).status_code == 200
        healthy = random_adapter(tiny_backbone(), 33, method="bitfit")
        upload = client.post(
            "/adapters/overflow/versions", files=files_of(healthy), headers=bearer(BETA_ADMIN)
        )
        assert upload.status_code == 201, upload.text
        answer = caption(client, BETA_ADMIN, "overflow", 3)
        assert answer.status_code == 200, answer.text
        assert answer.json()["adapter_version"] == 2
