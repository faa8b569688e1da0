"""Shared deployment fixtures: the real service with caption traffic, and a real Prometheus
scraping it with the project's own docker/prometheus.yml adapted to loopback.

    def test_x(traffic: LiveService) -> None: ...   # live service, caption traffic already sent
    def test_y(scraped: Scraped) -> None: ...   # + Prometheus has scraped it after the traffic

All are session-scoped: one tiny-backbone service and one Prometheus serve every test here.
`scraped` skips (with the reason) only when the `prometheus` binary is not installed; CI
installs Debian's package in .ci/run.
"""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.live_server import live_server
from service.api.app import create_app
from service.engine import Engine, EngineConfig
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.store import AdapterStore
from service.tenancy import PUBLIC_TENANT
from tests.service.adapter_fixtures import noise_image, put, random_adapter, tiny_backbone

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
METRICS_TOKEN_FILE = DOCKER / "metrics_token.example"  # what compose gives both by default
SCRAPE_INTERVAL_S = 1
READY_TIMEOUT_S = 20.0

# The traffic every deploy test sees: captions per adapter, and one unknown adapter (404).
CAPTIONS = {"x": 5, "y": 2}
UNKNOWN_ADAPTER = "nope"
MAX_NEW_TOKENS = 4


@dataclass
class LiveService:
    """The running service and the caption traffic sent to it so far."""

    base_url: str
    responses: list[dict[str, Any]] = field(default_factory=list)  # the 200 bodies
    statuses: list[tuple[str, int]] = field(default_factory=list)  # (adapter, status) sent

    def metrics_text(self) -> str:
        token = METRICS_TOKEN_FILE.read_text().strip()
        reply = httpx.get(
            f"{self.base_url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10
        )
        reply.raise_for_status()
        return reply.text

    def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of the live /metrics: (name, sorted labels) -> value."""
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(self.metrics_text())
            for s in family.samples
        }

    def exported_names(self) -> set[str]:
        """Sample names as exported, suffixes included (_total, _bucket, _sum, _count)."""
        return {name for name, _ in self.samples()}


@dataclass
class Scraped:
    """A real Prometheus that has scraped `service` after all of its traffic."""

    url: str
    service: LiveService
    config: dict[str, Any]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; the result vector (raises on a PromQL error)."""
        reply = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
        body = reply.json()
        if body.get("status") != "success":
            raise AssertionError(f"query {promql!r} failed: {body.get('error')}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, promql: str) -> float:
        """The single value of a query that must return exactly one series."""
        result = self.query(promql)
        assert len(result) == 1, f"{promql!r} returned {len(result)} series: {result}"
        return float(result[0]["value"][1])


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    noise_image(seed).save(buffer, format="PNG")
    return buffer.getvalue()


def caption(base_url: str, adapter: str, image: bytes) -> httpx.Response:
    return httpx.post(
        f"{base_url}/caption",
        files={"image": ("image.png", image, "image/png")},
        data={"adapter": adapter, "max_new_tokens": str(MAX_NEW_TOKENS)},
        timeout=30,
    )


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    """The real app on a real uvicorn, an in-process engine on the tiny backbone, two public
    adapters; no traffic yet."""
    backbone = tiny_backbone()
    store = AdapterStore(tmp_path_factory.mktemp("deploy") / "adapters")
    for seed, name in enumerate(CAPTIONS):
        put(store, PUBLIC_TENANT, name, random_adapter(backbone, seed))
    metrics = ServiceMetrics(backbone="tiny", device="cpu")
    settings = Settings(device="cpu", backbone="tiny", metrics_token_file=METRICS_TOKEN_FILE)
    engine = Engine(backbone, store, EngineConfig(max_wait_ms=0), metrics)
    app = create_app(settings, engine=engine, metrics=metrics)
    try:
        with live_server(app) as base_url:
            yield LiveService(base_url)
    finally:
        engine.close()


@pytest.fixture(scope="session")
def traffic(service: LiveService) -> LiveService:
    """`service` after CAPTIONS (a different image each) and one unknown adapter."""
    send_traffic(service)
    return service


def send_traffic(service: LiveService) -> None:
    seed = 0
    for adapter, count in CAPTIONS.items():
        for _ in range(count):
            reply = caption(service.base_url, adapter, png(seed))
            seed += 1
            assert reply.status_code == 200, reply.text
            service.responses.append(reply.json())
            service.statuses.append((adapter, 200))
    reply = caption(service.base_url, UNKNOWN_ADAPTER, png(0))
    assert reply.status_code == 404, reply.text
    service.statuses.append((UNKNOWN_ADAPTER, 404))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def loopback_config(service_target: str, listen: str) -> dict[str, Any]:
    """docker/prometheus.yml with its targets on loopback and a 1 s scrape/evaluation."""
    config: dict[str, Any] = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    interval = f"{SCRAPE_INTERVAL_S}s"
    config["global"].update(
        scrape_interval=interval, scrape_timeout=interval, evaluation_interval=interval
    )
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["ctxpeft"]["static_configs"][0]["targets"] = [service_target]
    jobs["prometheus"]["static_configs"][0]["targets"] = [listen]
    return config


@pytest.fixture(scope="session")
def scraped(
    service: LiveService, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scraped]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(
            "the prometheus binary is not installed (Debian package `prometheus`; "
            ".ci/run installs it)"
        )
    folder = tmp_path_factory.mktemp("prometheus")
    listen = f"127.0.0.1:{free_port()}"
    config = loopback_config(service.base_url.removeprefix("http://"), listen)
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    # rule_files and credentials_file are relative to the config file: the shipped rules and
    # the example scrape token load beside it, as in the container.
    shutil.copy(DOCKER / "alerts.yml", folder / "alerts.yml")
    shutil.copy(METRICS_TOKEN_FILE, folder / "metrics_token")
    log = (folder / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address={listen}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = Scraped(f"http://{listen}", service, config)
    try:
        wait_ready(server, process, folder / "prometheus.log")
        # A scrape before the traffic (unless an earlier test already sent it) and one after:
        # rate() then has two samples, and the last one holds every request.
        wait_for_scrape_after(server, time.time())
        request.getfixturevalue("traffic")
        wait_for_scrape_after(server, time.time())
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def wait_ready(server: Scraped, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise AssertionError(f"prometheus exited ({process.returncode}):\n{log.read_text()}")
        try:
            if httpx.get(f"{server.url}/-/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"prometheus not ready in {READY_TIMEOUT_S} s:\n{log.read_text()}")
        time.sleep(0.1)


def wait_for_scrape_after(server: Scraped, since: float) -> None:
    """Block until Prometheus holds a successful scrape of the service taken after `since`."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        # timestamp() of the bare selector: over an expression it returns the query time.
        taken = server.query('timestamp(up{job="ctxpeft"})')
        after = bool(taken) and float(taken[0]["value"][1]) > since
        if after and server.value('up{job="ctxpeft"}') == 1:
            return
        time.sleep(0.2)
    raise AssertionError(f"no successful scrape of the service within {READY_TIMEOUT_S} s")
