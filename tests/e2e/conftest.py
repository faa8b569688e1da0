"""Shared pieces of the end-to-end tests: a real uvicorn server on loopback, real keys, a real
adapter store, an httpx client. Nothing is mocked.

    with running_service(store_dir, queue_size=4) as service:
        httpx.post(f"{service.url}/caption", files=image_file(png), data={"adapter": "news"},
                   headers=bearer(ACME_ADMIN))

Tenants and keys (the same in every server):

    acme   ACME_ADMIN (caption, manage), ACME_CAPTION (caption only)
    beta   BETA_ADMIN (caption, manage)
    gamma  GAMMA_ADMIN (caption, manage)

The `tiny_store` (session) holds random adapters on the tiny test backbone of
tests/service/adapter_fixtures.py: acme/news, acme/sports, beta/secret, public/pub. Tests that
upload or delete copy it first (`fresh_store`).

`reduced_demo` (session) is a real demo build (`adapters.demo.build_demo`) with small budgets
and two tasks, count and colors, whose adapters caption synthetic images correctly. It takes a
minute or more of CPU, so it is cached under the system temp folder, keyed by the plan and the
source of the `adapters` package: later runs reuse it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import io
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import adapters
from adapters.backbone import Backbone
from adapters.demo import DemoPlan, backbone_dir, build_demo
from adapters.pretrain import StageOptions
from benchmarks.live_server import live_server
from service.api.app import create_app
from service.commands.demo import StoreSink
from service.engine import Engine, EngineConfig
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.store import AdapterStore
from tests.service.adapter_fixtures import noise_image, put, random_adapter, tiny_backbone

ACME_ADMIN = "acme-admin-key-0000000001"
ACME_CAPTION = "acme-caption-key-00000001"
BETA_ADMIN = "beta-admin-key-0000000001"
GAMMA_ADMIN = "gamma-admin-key-000000001"
OPERATOR_KEY = "ops-operator-key-00000001"  # reads every tenant's usage
KEYS_JSON = json.dumps(
    {
        "keys": [
            {"key": ACME_ADMIN, "tenant": "acme", "rights": ["caption", "manage"]},
            {"key": ACME_CAPTION, "tenant": "acme", "rights": ["caption"]},
            {"key": BETA_ADMIN, "tenant": "beta", "rights": ["caption", "manage"]},
            {"key": GAMMA_ADMIN, "tenant": "gamma", "rights": ["caption", "manage"]},
            {"key": OPERATOR_KEY, "tenant": "ops", "rights": ["operator"]},
        ]
    }
)
# Every test server protects /metrics with this scrape token (so tenants' own adapter names are
# label values there); `scrape` sends it.
METRICS_TOKEN = "scrape-token-e2e-00000001"
# Short captions keep the tiny model's CPU time per request in the tens of milliseconds.
TINY_SETTINGS: dict[str, Any] = {
    "backbone": "tiny",
    "default_max_new_tokens": 4,
    "max_new_tokens_limit": 16,
    "log_level": "warning",
}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def encode(image: Image.Image, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def image_file(
    data: bytes, filename: str = "image.png", content_type: str = "image/png"
) -> dict[str, tuple[str, bytes, str]]:
    """httpx `files=` for the caption form's `image` field."""
    return {"image": (filename, data, content_type)}


def noise_png(seed: int, size: int = 32) -> bytes:
    return encode(noise_image(seed, size))


def assert_error(response: httpx.Response, status: int, error_type: str) -> dict[str, Any]:
    """The response is `status` in the one error shape with `error_type`; returns the body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "request_id"}, body
    assert set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == error_type, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["request_id"] == response.headers["x-request-id"]
    return body


class Scrape:
    """One /metrics answer parsed with the Prometheus text parser."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self._samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in self.families.values()
            for s in family.samples
        }

    def value(self, sample: str, **labels: str) -> float:
        """The value of one sample (0 when the series does not exist yet)."""
        return self._samples.get((sample, frozenset(labels.items())), 0.0)


def scrape(url: str, token: str | None = METRICS_TOKEN) -> Scrape:
    response = httpx.get(f"{url}/metrics", headers=bearer(token) if token else {}, timeout=10)
    assert response.status_code == 200, response.text
    return Scrape(response.text)


@dataclass
class Service:
    """A running server and the in-process objects behind it (read them, never mock them)."""

    url: str
    engine: Engine
    metrics: ServiceMetrics
    settings: Settings


@contextmanager
def running_service(
    store_dir: Path, model: Backbone | None = None, **overrides: Any
) -> Iterator[Service]:
    """create_app on a real uvicorn server; the engine runs the backbone `model` (the tiny one
    by default) over the store at `store_dir`, with the test keys and `overrides` as settings
    (`backbone=` there is only the name metrics and logs show)."""
    values: dict[str, Any] = {
        **TINY_SETTINGS,
        "runtime_dir": store_dir.parent,
        "store_dir": store_dir,
        "keys": KEYS_JSON,
        "metrics_token": METRICS_TOKEN,
    }
    values.update(overrides)
    settings = Settings(**values)
    metrics = ServiceMetrics(
        adapter_labels=settings.metrics_adapter_labels, backbone=settings.backbone
    )
    engine = Engine(
        model or tiny_backbone(),
        AdapterStore(store_dir),
        EngineConfig.from_settings(settings),
        metrics,
    )
    app = create_app(settings, engine=engine, metrics=metrics)
    with live_server(app) as url:
        yield Service(url, engine, metrics, settings)


def fresh_store(source: Path, target: Path) -> Path:
    """A private copy of a store, for tests that upload or delete."""
    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """acme/news, acme/sports, beta/secret, public/pub: random adapters on the tiny backbone."""
    root = tmp_path_factory.mktemp("tiny-store") / "adapters"
    store = AdapterStore(root)
    backbone = tiny_backbone()
    for seed, (tenant, name) in enumerate(
        [("acme", "news"), ("acme", "sports"), ("beta", "secret"), ("public", "pub")], start=1
    ):
        put(store, tenant, name, random_adapter(backbone, seed))
    return root


# The demo preset with small budgets and two tasks: about a minute of CPU on 2 cores, enough
# for count and colors adapters that caption clear synthetic scenes right.
REDUCED_DEMO_PLAN = dataclasses.replace(
    DemoPlan(),
    tasks=("count", "colors"),
    encoder=StageOptions(samples_per_epoch=2000, epochs=4, batch_size=32, lr=3e-3),
    lm=StageOptions(samples_per_epoch=500, epochs=2, batch_size=32, lr=3e-3),
    adapter=dataclasses.replace(DemoPlan().adapter, epochs=3, progress=False),
    train_images=1000,
    val_images=100,
)


@dataclass(frozen=True)
class DemoBuild:
    backbone_dir: Path
    store_dir: Path  # public/count and public/colors (read-only: copy it to change it)


# The modules that decide what a demo build contains: a build made with other code in them is
# not reused.
_BUILD_SOURCES = (
    "demo.py", "pretrain.py", "training.py", "presets.py", "config.py", "backbone.py",
    "adapter_set.py", "format.py", "model.py", "layers.py", "data/synthetic.py",
    "data/tokenizer.py",
)  # fmt: skip
_CACHE_PREFIX = "ctxpeft-e2e-demo-"


def _cache_key(plan: DemoPlan) -> str:
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(plan), default=str).encode())
    package = Path(adapters.__file__).parent
    for name in _BUILD_SOURCES:
        digest.update((package / name).read_bytes())
    return digest.hexdigest()[:16]


def _remove_stale_builds(keep: Path) -> None:
    """Builds for other keys, unless a test run is using them."""
    for old in keep.parent.glob(f"{_CACHE_PREFIX}*"):
        if old == keep or not (old / ".use.lock").is_file():
            continue
        with (old / ".use.lock").open("w") as in_use:
            try:
                fcntl.flock(in_use, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            shutil.rmtree(old, ignore_errors=True)


@pytest.fixture(scope="session")
def reduced_demo() -> Iterator[DemoBuild]:
    root = Path(tempfile.gettempdir()) / f"{_CACHE_PREFIX}{_cache_key(REDUCED_DEMO_PLAN)}"
    root.mkdir(parents=True, exist_ok=True)
    store_dir = root / "adapters"
    # Several test runs may share the machine: one builds while the others wait, then all
    # reuse it; a shared lock held for the session keeps other runs from removing it.
    with (root / ".use.lock").open("w") as in_use:
        fcntl.flock(in_use, fcntl.LOCK_SH)
        with (root / ".build.lock").open("w") as building, torch.random.fork_rng():
            fcntl.flock(building, fcntl.LOCK_EX)  # fork_rng: the build seeds torch
            # One intra-op thread, as `ctxpeft demo` trains: on models this small a second one
            # only synchronises, and on a busy machine it spins (several times slower).
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                build_demo(root, StoreSink(AdapterStore(store_dir)), REDUCED_DEMO_PLAN,
                           progress=False, log=lambda _: None)  # fmt: skip
            finally:
                torch.set_num_threads(threads)
        _remove_stale_builds(keep=root)
        yield DemoBuild(backbone_dir(root, REDUCED_DEMO_PLAN.backbone.name), store_dir)


@contextmanager
def running_demo(
    demo: DemoBuild, folder: Path, tenant_copies: bool = False, **overrides: Any
) -> Iterator[Service]:
    """`running_service` on the reduced demo's backbone over a copy of its store in
    `folder/adapters`. `tenant_copies`: acme also owns count and colors, beta owns beta-count
    (copies of the public versions)."""
    store = folder / "adapters"
    shutil.copytree(demo.store_dir, store)
    if tenant_copies:
        for task in ("count", "colors"):
            shutil.copytree(store / "public" / task, store / "acme" / task)
        shutil.copytree(store / "public" / "count", store / "beta" / "beta-count")
    backbone = Backbone.load(demo.backbone_dir)
    with running_service(store, model=backbone, backbone="demo", **overrides) as running:
        yield running
