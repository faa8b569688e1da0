"""GET /samples/random and GET /info on real servers: a demo-preset backbone (random weights:
what is checked is the picture, not a caption) hands out fresh synthetic scenes at its image
size, bounded per tenant; a server on another backbone says plainly that it offers none.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI
from PIL import Image

from adapters.backbone import Backbone
from adapters.data.samples import DEMO_BACKBONE, samples_for
from adapters.data.synthetic import BACKGROUND, COLORS, TASKS
from adapters.demo import DemoPlan
from adapters.presets import get_preset
from benchmarks.live_server import live_server
from service.api.app import create_app
from service.api.rate_limit import TokenBuckets
from service.api.routes.samples import (
    CAPTIONS_HEADER,
    LIMITER_STATE,
    SAMPLE_BURST,
    SAMPLE_RATE_PER_S,
)
from service.engine import Engine, EngineConfig
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.store import AdapterStore
from tests.e2e.conftest import (
    ACME_ADMIN,
    ACME_CAPTION,
    BETA_ADMIN,
    KEYS_JSON,
    TINY_SETTINGS,
    Service,
    assert_error,
    bearer,
    running_service,
    scrape,
)

ACME = bearer(ACME_ADMIN)


@dataclass
class Served:
    url: str
    app: FastAPI


@contextmanager
def serve(model: Backbone, store_dir: Path, **overrides: Any) -> Iterator[Served]:
    """create_app on a real server, keeping the app at hand (its limiter can be replaced)."""
    settings = Settings(
        **{**TINY_SETTINGS, "store_dir": store_dir, "runtime_dir": store_dir.parent,
           "keys": KEYS_JSON, "backbone": model.config.name, **overrides}
    )  # fmt: skip
    metrics = ServiceMetrics(backbone=settings.backbone)
    engine = Engine(model, AdapterStore(store_dir), EngineConfig.from_settings(settings), metrics)
    app = create_app(settings, engine=engine, metrics=metrics)
    with live_server(app) as url:
        yield Served(url, app)


@pytest.fixture(scope="module")
def demo_backbone() -> Backbone:
    """The demo preset's architecture with seeded random weights (no build, no training)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Backbone.build(get_preset("demo"))


@pytest.fixture(scope="module")
def demo(demo_backbone: Backbone, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    store = tmp_path_factory.mktemp("demo-samples") / "adapters"
    with serve(demo_backbone, store, default_adapter="describe") as served:
        yield served


@pytest.fixture(scope="module")
def tiny(tiny_store: Path) -> Iterator[Service]:
    with running_service(tiny_store) as running:
        yield running


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(demo: Served) -> Iterator[Clock]:
    """A fresh limiter on a manual clock for one test: 3 at once, then one every 2 s."""
    manual = Clock()
    setattr(demo.app.state, LIMITER_STATE, TokenBuckets(0.5, 3, clock=manual))
    yield manual
    delattr(demo.app.state, LIMITER_STATE)  # the next request makes the default one again


def sample(url: str, headers: dict[str, str] = ACME) -> httpx.Response:
    return httpx.get(f"{url}/samples/random", headers=headers, timeout=30)


def test_info_names_the_default_adapter_and_what_the_samples_are(demo: Served) -> None:
    response = httpx.get(f"{demo.url}/info", timeout=10)  # no key needed
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["backbone"] == "demo" and body["image_size"] == 64
    assert body["default_adapter"] == "describe"
    assert (body["default_max_new_tokens"], body["max_new_tokens_limit"]) == (4, 16)
    assert body["samples"]["image_size"] == 64
    assert body["samples"]["tasks"] == list(TASKS)
    trained_on = body["samples"]["trained_on"]
    assert trained_on.startswith("synthetic 64x64 pictures of 1 to 3 coloured shapes")
    assert all(colour in trained_on for colour in COLORS)


def test_a_sample_is_a_fresh_scene_at_the_backbones_size(demo: Served) -> None:
    before = scrape(demo.url).value("ctxpeft_samples_total", outcome="served")
    first, second = sample(demo.url), sample(demo.url, bearer(ACME_CAPTION))
    for response in (first, second):
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        assert response.headers["cache-control"] == "no-store"
        assert response.content.startswith(b"\x89PNG\r\n\x1a\n")
        image = Image.open(io.BytesIO(response.content))
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (64, 64))
        # The true captions agree with the pixels: exactly the named colours are drawn, on
        # white, and as many shapes as the count caption says.
        truth = json.loads(response.headers[CAPTIONS_HEADER])
        assert list(truth) == list(TASKS)
        named = truth["colors"].split()
        assert truth["count"] == {1: "one shape", 2: "two shapes", 3: "three shapes"}[len(named)]
        drawn = {rgb for _, rgb in image.getcolors() or ()} - {BACKGROUND}
        assert drawn == {COLORS[name] for name in named}
    assert first.content != second.content
    after = scrape(demo.url).value("ctxpeft_samples_total", outcome="served")
    assert after - before == 2


def test_samples_need_a_key_when_the_service_has_keys(demo: Served) -> None:
    assert_error(sample(demo.url, headers={}), 401, "unauthorized")
    assert_error(sample(demo.url, headers=bearer("not-a-key-0000000000")), 401, "unauthorized")


def test_beyond_the_bound_429_with_retry_after_per_tenant(demo: Served, clock: Clock) -> None:
    before = scrape(demo.url)
    assert [sample(demo.url).status_code for _ in range(3)] == [200, 200, 200]
    body = assert_error(sample(demo.url), 429, "rate_limited")
    assert "per tenant" in body["error"]["message"]
    refused = sample(demo.url)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "2"
    # Another tenant has its own bucket; acme's refills with time.
    assert sample(demo.url, bearer(BETA_ADMIN)).status_code == 200
    clock.now += 1.0
    assert sample(demo.url).headers["retry-after"] == "1"
    clock.now += 1.0
    assert sample(demo.url).status_code == 200
    after = scrape(demo.url)
    counted = {
        outcome: after.value("ctxpeft_samples_total", outcome=outcome)
        - before.value("ctxpeft_samples_total", outcome=outcome)
        for outcome in ("served", "rate_limited")
    }
    assert counted == {"served": 5, "rate_limited": 3}


def test_the_default_bound_is_the_documented_one(demo: Served) -> None:
    assert sample(demo.url).status_code == 200
    limiter = getattr(demo.app.state, LIMITER_STATE)
    assert (limiter.rate_per_s, limiter.burst) == (SAMPLE_RATE_PER_S, SAMPLE_BURST) == (2.0, 10)


def test_another_backbone_offers_no_samples(tiny: Service) -> None:
    info = httpx.get(f"{tiny.url}/info", timeout=10).json()
    assert (info["backbone"], info["image_size"], info["samples"]) == ("tiny", 32, None)
    assert info["default_adapter"] is None
    body = assert_error(sample(tiny.url), 404, "samples_unavailable")
    message = body["error"]["message"]
    assert "'demo' backbone" in message and "runs 'tiny'" in message
    assert "upload an image of your own" in message
    assert scrape(tiny.url).value("ctxpeft_samples_total", outcome="served") == 0


def test_the_openapi_schema_documents_samples_and_info(demo: Served) -> None:
    schema = httpx.get(f"{demo.url}/openapi.json", timeout=10).json()
    operation = schema["paths"]["/samples/random"]["get"]
    ok = operation["responses"]["200"]
    assert list(ok["content"]) == ["image/png"]
    assert CAPTIONS_HEADER in ok["headers"]
    assert {"401", "404", "429", "503"} <= set(operation["responses"])
    assert operation["security"] == [{"APIKey": []}]
    info = schema["paths"]["/info"]["get"]
    assert info["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ServiceInfo"
    }


def test_samples_are_offered_on_the_backbone_ctxpeft_demo_builds() -> None:
    assert DemoPlan().backbone.name == DEMO_BACKBONE
    samples = samples_for(get_preset("demo"))
    assert samples is not None and samples.image_size == get_preset("demo").image_size
    sample = samples.draw(random.Random(0))
    assert Image.open(io.BytesIO(sample.png)).size == (samples.image_size, samples.image_size)
    assert set(sample.captions) == set(TASKS)
    assert samples_for(get_preset("small")) is None
