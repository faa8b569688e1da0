"""Usage metering end to end (issue 23): a mixed run over two tenants with a restart of the
service in the middle; the ledger's sums, read back through GET /v1/usage, equal the usage
the answers reported, nothing lost or counted twice; each tenant sees only its own usage, an
operator key every tenant's."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import (
    ACME_ADMIN,
    BETA_ADMIN,
    OPERATOR_KEY,
    bearer,
    fresh_store,
    image_file,
    noise_png,
    running_service,
)

Totals = Counter[tuple[str, str]]  # (adapter, figure) -> sum


def send(url: str, key: str, adapters: str, image: int, totals: Totals) -> httpx.Response:
    reply = httpx.post(
        f"{url}/caption",
        files=image_file(noise_png(image)),
        data={"adapters": adapters},
        headers=bearer(key),
        timeout=60,
    )
    if reply.status_code == 200:
        for result in reply.json()["results"]:
            owner = "public" if result["adapter"] == "pub" else key.split("-")[0]
            adapter = f"{owner}/{result['adapter']}"
            usage = result["usage"]
            totals[(adapter, "completed")] += 1
            totals[(adapter, "completion")] += usage["completion_tokens"]
            totals[(adapter, "prompt")] += usage["prompt_tokens"]
            totals[(adapter, "cached")] += usage["image_cached"]
    return reply


def usage(url: str, key: str, **params: Any) -> httpx.Response:
    params.setdefault("start_time", int(time.time()) - 3600)
    params.setdefault("group_by", "adapter")
    return httpx.get(f"{url}/v1/usage", params=params, headers=bearer(key), timeout=30)


def sums(reply: httpx.Response) -> Totals:
    assert reply.status_code == 200, reply.text
    return sums_of_page(reply.json())


def sums_of_page(page: dict[str, Any]) -> Totals:
    assert page["object"] == "page" and page["has_more"] is False
    found: Totals = Counter()
    for bucket in page["data"]:
        assert bucket["object"] == "bucket" and bucket["start_time"] < bucket["end_time"]
        for r in bucket["results"]:
            assert r["object"] == "organization.usage.completions.result"
            found[(r["model"], "completed")] += r["num_model_requests"]
            found[(r["model"], "completion")] += r["output_tokens"]
            found[(r["model"], "prompt")] += r["input_tokens"]
            found[(r["model"], "cached")] += r["cached_images"]
            for outcome, n in r["requests_by_outcome"].items():
                if outcome != "completed":
                    found[(r["model"], outcome)] += n
    return Counter({k: v for k, v in found.items() if v})


def test_the_ledger_sums_what_the_answers_said_across_a_restart(
    tiny_store: Path, tmp_path: Path
) -> None:
    store = fresh_store(tiny_store, tmp_path / "runtime" / "adapters")
    acme: Totals = Counter()
    beta: Totals = Counter()
    settings = {"usage_flush_s": 3600.0, "tenant_max_inflight": 2}  # written at the drain only
    with running_service(store, **settings) as service:
        for image in (1, 2, 1):  # image 1 again: its encoding comes from the cache
            assert send(service.url, ACME_ADMIN, "news", image, acme).status_code == 200
        assert send(service.url, ACME_ADMIN, "news,sports", 3, acme).status_code == 200
        assert send(service.url, BETA_ADMIN, "secret,pub", 4, beta).status_code == 200
        # Refused at admission (3 rows > tenant_max_inflight 2): a rejection, per adapter.
        assert send(service.url, ACME_ADMIN, "news,sports,pub", 5, acme).status_code == 429
        for adapter in ("acme/news", "acme/sports", "public/pub"):
            acme[(adapter, "rejected")] += 1
        # A name that does not resolve is nobody's usage.
        assert send(service.url, ACME_ADMIN, "nope", 5, acme).status_code == 404
    with running_service(store, **settings) as service:  # a restart
        assert send(service.url, ACME_ADMIN, "news", 6, acme).status_code == 200
        assert send(service.url, BETA_ADMIN, "pub", 6, beta).status_code == 200
        assert acme[("acme/news", "cached")] == 1 and acme[("acme/news", "completed")] == 5
        assert sums(usage(service.url, ACME_ADMIN)) == acme
        assert sums(usage(service.url, BETA_ADMIN)) == beta
        # Another tenant's usage is not to be had; an operator's view holds everybody's.
        forbidden = usage(service.url, BETA_ADMIN, tenant="acme")
        assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "forbidden"
        everyone = usage(service.url, OPERATOR_KEY, group_by=["adapter", "tenant"])
        assert sums(everyone) == acme + beta
        tenants = {r["project_id"] for b in everyone.json()["data"] for r in b["results"]}
        assert tenants == {"acme", "beta"}
        only_beta = usage(service.url, OPERATOR_KEY, tenant="beta")
        assert sums(only_beta) == beta
        # `ctxpeft usage` prints the same page.
        command = [sys.executable, "-m", "service.cli", "usage", "--url", service.url]
        printed = subprocess.run(
            [*command, "--api-key", ACME_ADMIN, "--json"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        assert sums_of_page(json.loads(printed.stdout)) == acme
        table = subprocess.run(
            [*command, "--api-key", ACME_ADMIN], capture_output=True, text=True, timeout=120
        )
        assert table.returncode == 0 and "acme/news" in table.stdout
        refused = subprocess.run(
            [*command, "--api-key", BETA_ADMIN, "--tenant", "acme"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert refused.returncode == 4 and "operator right" in refused.stderr


@pytest.mark.parametrize(
    ("params", "status"),
    [({"bucket_width": "2h"}, 422), ({"end_time": 5}, 400), ({"start_time": -1}, 422)],
)
def test_bad_usage_queries_say_what_is_wrong(
    tiny_store: Path, tmp_path: Path, params: dict[str, Any], status: int
) -> None:
    store = fresh_store(tiny_store, tmp_path / "runtime" / "adapters")
    with running_service(store) as service:
        reply = usage(service.url, ACME_ADMIN, **params)
        assert reply.status_code == status, reply.text
        assert reply.json()["error"]["message"]
