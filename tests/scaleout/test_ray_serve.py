"""The service scaled out on a real local Ray cluster (loopback): 2 engine replicas of the tiny
backbone behind the ingress (our FastAPI app), routed by tenant-qualified adapter id.

The tests share one cluster (tests/scaleout/conftest.py) and each stands alone, in any order:
the fixture deploys the application again after the shutdown test deleted it, the kill test
waits for Ray's replacement replica. Nothing is mocked: HTTP through Serve's proxy, Ray's
router, replicas in their own processes, a real store on disk. Where a test needs rows held
in flight, it closes the replicas' encoder gates (gated_replica.py) and waits on events it
caused (a stream's first byte, a gate reached, a counter moved, a round of requests routed),
never on elapsed time.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from adapters.format import CONFIG_FILE, WEIGHTS_FILE, save_adapter
from service import __version__
from service.engine import CaptionRequest, Engine, EngineConfig
from service.images import ImageDecoder, ImageLimits
from service.scaleout.messages import adapter_id
from service.store import AdapterStore
from tests.e2e.conftest import (
    ACME_ADMIN,
    BETA_ADMIN,
    GAMMA_ADMIN,
    Scrape,
    assert_error,
    bearer,
    noise_png,
)
from tests.e2e.openai_helpers import eventually
from tests.scaleout.conftest import (
    ADAPTERS,
    REPLICAS,
    ROOT,
    TENANT_MAX_ADAPTERS,
    TENANT_MAX_INFLIGHT,
    RayService,
    untracked_paths,
)
from tests.scaleout.gated_replica import Gate
from tests.service.adapter_fixtures import random_adapter, tiny_backbone

pytest.importorskip("ray")

IMAGES = [noise_png(seed) for seed in range(3)]
HTTP_TIMEOUT_S = 120.0  # a safety net only: a request that reaches it counts as hung
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def caption(
    service: RayService, adapter: str, image: bytes = IMAGES[0], key: str = ACME_ADMIN
) -> httpx.Response:
    return httpx.post(
        f"{service.url}/caption",
        files={"image": ("image.png", image, "image/png")},
        data={"adapter": adapter},
        headers=bearer(key),
        timeout=HTTP_TIMEOUT_S,
    )


def single_process_captions(store_dir: Path, pairs: list[tuple[str, bytes]]) -> list[str]:
    """What the single-process engine answers for (adapter, image) pairs, tenant acme."""
    config = EngineConfig(default_max_new_tokens=4, max_new_tokens_limit=16)
    with Engine(tiny_backbone(), AdapterStore(store_dir), config) as engine:
        import asyncio

        async def run() -> list[str]:
            out = []
            for name, image in pairs:
                decoder = ImageDecoder(image, ImageLimits())  # as the HTTP layer does
                (result,) = await engine.caption(CaptionRequest(decoder, (name,), "acme"))
                out.append(result.caption)
            return out

        return asyncio.run(run())


def scrape_replicas(service: RayService) -> list[Scrape]:
    scrapes = []
    for group in service.replica_targets():
        (target,) = group["targets"]
        response = httpx.get(f"http://{target}/metrics", timeout=10)
        assert response.status_code == 200
        scrapes.append(Scrape(response.text))
    return scrapes


def routed(scrapes: list[Scrape], result: str) -> float:
    return sum(s.value("ctxpeft_routing_requests_total", result=result) for s in scrapes)


def replica_stats(service: RayService) -> dict[str, dict[str, Any]]:
    """Every replica's stats() (a plain call lands on a random replica): id -> stats."""
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(60):
        stats = service.replicas.stats.remote().result(timeout_s=30)
        seen[stats["replica"]] = stats
        if len(seen) == REPLICAS:
            return seen
    raise AssertionError(f"only replicas {sorted(seen)} answered")


def total(stats: dict[str, dict[str, Any]], read: Callable[[dict[str, Any]], int]) -> int:
    return sum(read(s) for s in stats.values())


def on_every_replica(service: RayService, method: str, *args: Any) -> None:
    """Call a replica method (it returns its replica id) on each replica."""
    answered: set[str] = set()
    for _ in range(60):
        answered.add(getattr(service.replicas, method).remote(*args).result(timeout_s=30))
        if len(answered) == REPLICAS:
            return
    raise AssertionError(f"only replicas {sorted(answered)} answered {method}")


@contextmanager
def gates_closed(service: RayService) -> Iterator[None]:
    """Rows that reach a replica's vision encoder wait there until the block ends."""
    on_every_replica(service, "close_gate")
    try:
        yield
    finally:
        on_every_replica(service, "open_gate")


def ingress_inflight(service: RayService) -> int:
    inflight: int = service.ingress.inflight.remote().result(timeout_s=30)
    return inflight


def every_replica(service: RayService, call: Callable[[Any], Any]) -> dict[str, Any]:
    """Call a replica method until each replica answered (Ray picks one per call): replica
    id -> answer. The handle spreads plain calls over replicas at random."""
    answers: dict[str, Any] = {}
    for _ in range(60):
        answer = call(service.replicas).result(timeout_s=30)
        answers[answer.replica] = answer
        if len(answers) == REPLICAS:
            return answers
    raise AssertionError(f"only replicas {sorted(answers)} answered")


def settle_routing(service: RayService) -> None:
    """Warm up until the router routes by adapter: each adapter's first rows claim a replica,
    and the replicas tell the router which ids they hold asynchronously (pushed every 0.1 s),
    so the event that says the router knows them all is a round of requests, one per
    adapter, in which every row was a hit. Repeated until then; a safety net bounds it."""
    deadline = time.monotonic() + HTTP_TIMEOUT_S
    while True:
        before = routed(scrape_replicas(service), "hit")
        for name in ADAPTERS:
            assert caption(service, name).status_code == 200
        if routed(scrape_replicas(service), "hit") - before == len(ADAPTERS):
            return
        assert time.monotonic() < deadline, "a round of requests never routed to its replicas"


def gate_entered(service: RayService, replica: str) -> bool:
    """Whether `replica`'s closed gate holds a batch, read from its own metrics endpoint (a
    call through the handle would go to the replica with the shorter queue)."""
    (group,) = [g for g in service.replica_targets() if g["labels"]["replica"] == replica]
    (target,) = group["targets"]
    scrape = Scrape(httpx.get(f"http://{target}/metrics", timeout=10).text)
    return scrape.value("ctxpeft_test_gate_entered") == 1


# --- the cluster itself ---------------------------------------------------------------------
def test_cluster_listens_on_loopback_only_and_leaves_no_files_in_the_tree(
    ray_service: RayService,
) -> None:
    listening = []
    for process in psutil.Process().children(recursive=True):
        try:
            connections = process.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        listening += [
            (process.name(), c.laddr.ip, c.laddr.port)
            for c in connections
            if c.status == psutil.CONN_LISTEN
        ]
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, names  # the cluster's own processes were seen
    assert len(listening) >= 10, listening
    assert [s for s in listening if s[1] not in LOOPBACK] == []
    # Token auth is on, with the token in the environment only: no file in HOME or the tree.
    assert os.environ["RAY_AUTH_MODE"] == "token" and len(os.environ["RAY_AUTH_TOKEN"]) == 64
    if not ray_service.token_file_before:
        assert not (Path.home() / ".ray" / "auth_token").exists()
    new = untracked_paths() - ray_service.tree_before
    assert [p for p in new if "ray" in p.lower() or "auth_token" in p or "session_" in p] == []
    assert ROOT not in ray_service.root.parents  # the store and the targets are temp folders


# --- routing by adapter -----------------------------------------------------------------------
def test_rows_land_on_the_replica_holding_their_adapter_and_captions_match_one_process(
    ray_service: RayService,
) -> None:
    pairs = [(name, image) for name in ADAPTERS for image in IMAGES]
    settle_routing(ray_service)
    before = scrape_replicas(ray_service)
    assert len(before) == REPLICAS
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda p: caption(ray_service, p[0], p[1]), pairs * 2))
    after = scrape_replicas(ray_service)
    assert [r.status_code for r in responses] == [200] * len(responses)
    hits = routed(after, "hit") - routed(before, "hit")
    misses = routed(after, "miss") - routed(before, "miss")
    assert hits + misses == len(responses)
    assert hits / len(responses) >= 0.9, (hits, misses)
    # Each row joined a running batch once, on one replica: the replicas' own families count it.
    joins = sum(s.value("ctxpeft_queue_wait_seconds_count") for s in after) - sum(
        s.value("ctxpeft_queue_wait_seconds_count") for s in before
    )
    assert joins == len(responses)
    for scrape in after:
        assert scrape.value("ctxpeft_engine_up") == 1
        build = {"version": __version__, "backbone": ray_service.settings.backbone, "device": "cpu"}
        assert scrape.value("ctxpeft_build_info", **build) == 1
    # The captions are the single-process service's, for every adapter and image.
    expected = single_process_captions(ray_service.store.root, pairs)
    got = [r.json()["caption"] for r in responses]
    assert got == expected * 2
    # The ingress serves its own /metrics: the HTTP requests it answered.
    ingress = Scrape(httpx.get(f"{ray_service.url}/metrics", timeout=10).text)
    assert ingress.value("ctxpeft_requests_total", adapter="p0", status="200") >= 8


def test_the_http_contract_is_the_single_process_one(ray_service: RayService) -> None:
    url = ray_service.url
    png = IMAGES[1]
    assert_error(httpx.get(f"{url}/adapters", timeout=10), 401, "unauthorized")
    listed = httpx.get(f"{url}/adapters", headers=bearer(BETA_ADMIN), timeout=30).json()
    assert {a["name"] for a in listed["adapters"]} == set(ADAPTERS)
    assert_error(caption(ray_service, "no-such"), 404, "adapter_not_found")
    # One X-Request-ID per answer: the client's when well-formed, else a fresh one.
    for offered, kept in (("trace-42", True), ("bad id\twith tab", False)):
        answer = httpx.get(f"{url}/adapters/p0", headers={"X-Request-ID": offered}, timeout=30)
        assert answer.headers.get_list("x-request-id") == [answer.headers["x-request-id"]]
        assert (answer.headers["x-request-id"] == offered) is kept
        assert_error(answer, 401, "unauthorized")
    assert_error(caption(ray_service, "p0", b"not an image"), 415, "unsupported_media_type")
    many = httpx.post(
        f"{url}/caption",
        files={"image": ("i.png", png, "image/png")},
        data={"adapters": "p1,p4,p2"},
        headers=bearer(ACME_ADMIN),
        timeout=HTTP_TIMEOUT_S,
    )
    assert many.status_code == 200, many.text
    singles = [caption(ray_service, n, png).json()["caption"] for n in ("p1", "p4", "p2")]
    assert [r["caption"] for r in many.json()["results"]] == singles
    streamed = httpx.post(
        f"{url}/caption",
        files={"image": ("i.png", png, "image/png")},
        data={"adapter": "p3", "stream": "true"},
        headers=bearer(ACME_ADMIN),
        timeout=HTTP_TIMEOUT_S,
    )
    assert streamed.status_code == 200
    events = [line for line in streamed.text.splitlines() if line.startswith("event: ")]
    assert events.count("event: token") >= 1 and events[-1] == "event: result"
    chat = httpx.post(
        f"{url}/v1/chat/completions",
        json={
            "model": "p3",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": _data_url(png)}}],
                }
            ],
        },
        headers=bearer(ACME_ADMIN),
        timeout=HTTP_TIMEOUT_S,
    )
    assert chat.status_code == 200, chat.text
    assert (
        chat.json()["choices"][0]["message"]["content"]
        == caption(ray_service, "p3", png).json()["caption"]
    )


def _data_url(png: bytes) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(png).decode()


# --- one shared store -------------------------------------------------------------------------
def _upload(
    service: RayService, name: str, seed: int, tmp: Path, key: str = ACME_ADMIN
) -> httpx.Response:
    folder = tmp / f"{name}-{seed}"
    if not folder.exists():
        save_adapter(random_adapter(tiny_backbone(), seed), folder)
    return httpx.post(
        f"{service.url}/adapters/{name}/versions",
        files={
            "config": (CONFIG_FILE, (folder / CONFIG_FILE).read_bytes(), "application/json"),
            "weights": (
                WEIGHTS_FILE,
                (folder / WEIGHTS_FILE).read_bytes(),
                "application/octet-stream",
            ),
        },
        headers=bearer(key),
        timeout=HTTP_TIMEOUT_S,
    )


def test_an_upload_serves_on_every_replica_and_a_delete_is_never_served_again(
    ray_service: RayService, tmp_path: Path
) -> None:
    for version, seed in ((1, 41), (2, 42)):
        created = _upload(ray_service, "fresh", seed, tmp_path)
        assert created.status_code == 201, created.text
        assert created.json() == {"name": "fresh", "version": version}
        answer = caption(ray_service, "fresh", IMAGES[2])
        assert answer.status_code == 200 and answer.json()["adapter_version"] == version
        # Every replica resolves the new version on its next request.
        seen = every_replica(ray_service, lambda h: h.resolve.remote("acme", "fresh"))
        assert {r.version for r in seen.values()} == {version}, seen
    expected = single_process_captions(ray_service.store.root, [("fresh", IMAGES[2])])
    assert answer.json()["caption"] == expected[0]
    deleted = httpx.delete(
        f"{ray_service.url}/adapters/fresh", headers=bearer(ACME_ADMIN), timeout=30
    )
    assert deleted.status_code == 200 and deleted.json()["deleted_versions"] == 2
    for _ in range(4):  # whichever replica a request lands on
        assert_error(caption(ray_service, "fresh", IMAGES[2]), 404, "adapter_not_found")
    gone = every_replica(ray_service, lambda h: h.resolve.remote("acme", "fresh"))
    assert {(r.version, r.error) for r in gone.values()} == {(None, "AdapterNotFound")}
    # Beta never saw acme's adapter.
    listed = httpx.get(f"{ray_service.url}/adapters", headers=bearer(BETA_ADMIN), timeout=30)
    assert "fresh" not in {a["name"] for a in listed.json()["adapters"]}


def test_concurrent_uploads_across_replicas_take_exactly_the_quota(
    ray_service: RayService, tmp_path: Path
) -> None:
    """Six uploads of new adapters at once by a tenant with room for TENANT_MAX_ADAPTERS:
    exactly that many are stored, whichever replicas validated them (the quota is checked
    under the tenant's lock in the shared store). Ray sends a new adapter id to the replicas
    holding the fewest ids, so one round may land on one replica alone (it then holds more,
    and the next round goes to the other): rounds repeat until both replicas validated
    uploads, at most three."""
    url, gamma = ray_service.url, bearer(GAMMA_ADMIN)
    spread: Counter[str] = Counter()
    for attempt in range(3):
        before = replica_stats(ray_service)
        names = [f"q{attempt}-{i}" for i in range(6)]
        with ThreadPoolExecutor(6) as pool:
            answers = list(
                pool.map(lambda n: _upload(ray_service, n, 60, tmp_path, GAMMA_ADMIN), names)
            )
        after = replica_stats(ray_service)
        statuses = Counter(a.status_code for a in answers)
        assert statuses == {201: TENANT_MAX_ADAPTERS, 413: 6 - TENANT_MAX_ADAPTERS}, statuses
        for refused in (a for a in answers if a.status_code == 413):
            assert_error(refused, 413, "quota_exceeded")
            assert "(tenant_max_adapters)" in refused.json()["error"]["message"]
        stored = ray_service.store.names("gamma")
        assert len(stored) == TENANT_MAX_ADAPTERS and set(stored) <= set(names)
        round_spread = {r: after[r]["uploads"] - before[r]["uploads"] for r in after if r in before}
        assert sum(round_spread.values()) == 6, round_spread
        spread.update(round_spread)
        for name in stored:
            assert (
                httpx.delete(f"{url}/adapters/{name}", headers=gamma, timeout=30).status_code == 200
            )
        if len(+spread) == REPLICAS:
            break
    print(f"uploads per replica: {spread}")
    assert len(+spread) == REPLICAS, (
        f"three rounds of uploads never reached both replicas: {spread}"
    )


# --- the single process's guarantees, through Ray ------------------------------------------
def test_a_three_adapter_request_decodes_and_moves_its_image_once(
    ray_service: RayService,
) -> None:
    ingress_before = ray_service.ingress.stats.remote().result(timeout_s=30)
    replicas_before = replica_stats(ray_service)
    answer = httpx.post(
        f"{ray_service.url}/caption",
        files={"image": ("i.png", noise_png(220), "image/png")},
        data={"adapters": "p1,p4,p2"},
        headers=bearer(ACME_ADMIN),
        timeout=HTTP_TIMEOUT_S,
    )
    assert answer.status_code == 200, answer.text
    assert [r["adapter"] for r in answer.json()["results"]] == ["p1", "p4", "p2"]
    ingress_after = ray_service.ingress.stats.remote().result(timeout_s=30)
    replicas_after = replica_stats(ray_service)
    # Decoded once at the ingress and put once in the object store ...
    assert ingress_after["images_decoded"] == ingress_before["images_decoded"] + 1
    assert ingress_after["images_shared"] == ingress_before["images_shared"] + 1
    # ... and each of the 3 rows read those pixels on its replica (no decoder travels there).
    read = total(replicas_after, lambda s: s["images_read"])
    assert read == total(replicas_before, lambda s: s["images_read"]) + 3


def test_a_client_that_leaves_cancels_its_row_on_the_replica(ray_service: RayService) -> None:
    before = replica_stats(ray_service)
    with gates_closed(ray_service):
        with (
            httpx.Client(base_url=ray_service.url, timeout=HTTP_TIMEOUT_S) as client,
            client.stream(
                "POST",
                "/caption",
                files={"image": ("i.png", noise_png(230), "image/png")},
                data={"adapter": "p5", "stream": "true"},
                headers=bearer(ACME_ADMIN),
            ) as response,
        ):
            assert response.status_code == 200  # a replica admitted the row: the stream began
            eventually(
                lambda: bool(ray_service.replicas.gate_entered.remote().result(timeout_s=30)),
                "the row reached a replica's encoder",
            )
        # The client left mid-stream: the proxy, the ingress and the replica let the row go.
        eventually(
            lambda: (
                total(replica_stats(ray_service), lambda s: s["dropped"].get("cancelled", 0))
                == total(before, lambda s: s["dropped"].get("cancelled", 0)) + 1
            ),
            "the replica's engine counted the row cancelled",
        )
        eventually(lambda: ingress_inflight(ray_service) == 0, "the tenant's row given back")
    after = replica_stats(ray_service)
    assert total(after, lambda s: s["completed"]) == total(before, lambda s: s["completed"])


def _caption_many(service: RayService, adapters: str, image: bytes, key: str) -> httpx.Response:
    return httpx.post(
        f"{service.url}/caption",
        files={"image": ("i.png", image, "image/png")},
        data={"adapters": adapters},
        headers=bearer(key),
        timeout=HTTP_TIMEOUT_S,
    )


def test_a_tenant_over_its_row_limit_gets_429_with_retry_after(ray_service: RayService) -> None:
    assert TENANT_MAX_INFLIGHT == 8  # the two held requests below fill it exactly
    with ThreadPoolExecutor(3) as pool:
        with gates_closed(ray_service):
            held = [
                pool.submit(
                    _caption_many, ray_service, ",".join(ADAPTERS), noise_png(240), ACME_ADMIN
                ),
                pool.submit(_caption_many, ray_service, "p0,p1", noise_png(241), ACME_ADMIN),
            ]
            eventually(lambda: ingress_inflight(ray_service) == 8, "acme's 8 rows in flight")
            over = caption(ray_service, "p2", noise_png(242))
            assert_error(over, 429, "tenant_limit")
            assert over.headers["retry-after"] == "1"
            assert "tenant_max_inflight" in over.json()["error"]["message"]
            # Another tenant's rows are not held to acme's limit.
            beta = pool.submit(_caption_many, ray_service, "p3", noise_png(243), BETA_ADMIN)
            eventually(lambda: ingress_inflight(ray_service) == 9, "beta's row admitted")
        answers = [f.result(timeout=HTTP_TIMEOUT_S) for f in [*held, beta]]
    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    assert len(answers[0].json()["results"]) == len(ADAPTERS)
    eventually(lambda: ingress_inflight(ray_service) == 0, "every row given back")
    assert caption(ray_service, "p2", noise_png(242)).status_code == 200


# --- faults -----------------------------------------------------------------------------------
class Load:
    """`clients` threads captioning in a loop until `stop()`, with 16-token captions so that
    rows are always in flight: every answer's status and error type, in arrival order. A
    request that hangs (past HTTP_TIMEOUT_S) or loses its connection ends its client with the
    exception, and `stop()` reports it, as it does a 503 without Retry-After."""

    def __init__(self, service: RayService, clients: int = 6, images: list[bytes] = IMAGES) -> None:
        self.images = images
        self.answers: list[tuple[int, str | None]] = []
        self.failures: list[BaseException] = []
        self.without_retry_after: list[int] = []  # 503s that did not say when to come back
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(service, k), daemon=True)
            for k in range(clients)
        ]
        for thread in self._threads:
            thread.start()

    def _client(self, service: RayService, first: int) -> None:
        i = first
        while not self._stopping.is_set():
            i += 1  # every client goes through the adapters (and so both replicas)
            try:
                response = httpx.post(
                    f"{service.url}/caption",
                    files={"image": ("i.png", self.images[i % len(self.images)], "image/png")},
                    data={"adapter": ADAPTERS[i % len(ADAPTERS)], "max_new_tokens": "16"},
                    headers=bearer(ACME_ADMIN),
                    timeout=HTTP_TIMEOUT_S,
                )
                kind = None if response.status_code == 200 else response.json()["error"]["type"]
                if response.status_code == 503 and "retry-after" not in response.headers:
                    self.without_retry_after.append(response.status_code)
            except Exception as exc:
                with self._cond:
                    self.failures.append(exc)
                    self._cond.notify_all()
                return
            with self._cond:
                self.answers.append((response.status_code, kind))
                self._cond.notify_all()

    def wait_for(self, count: int) -> int:
        """Block until `count` answers came (a safety-net timeout only); returns how many."""
        with self._cond:
            assert self._cond.wait_for(
                lambda: len(self.answers) >= count or self.failures, timeout=HTTP_TIMEOUT_S
            ), f"only {len(self.answers)} answers"
            return len(self.answers)

    def stop(self) -> list[tuple[int, str | None]]:
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=2 * HTTP_TIMEOUT_S)
            assert not thread.is_alive(), "a request hung"
        assert self.failures == [], self.failures
        assert self.without_retry_after == [], "a 503 without Retry-After"
        return self.answers


def test_killing_a_replica_under_load_answers_200_or_503_and_serves_after_restart(
    ray_service: RayService,
) -> None:
    from ray import serve

    from service.scaleout.application import APP_NAME

    assert len(ray_service.replica_pids()) == REPLICAS
    # Kill a replica while its engine holds rows (their answers are then 503): the replica
    # holding p0 (reached through a handle routed by p0's id) closes its encoder gate before
    # the load starts, the other's stays open, and it is killed once a batch of the load's p0
    # rows waits there.
    assert caption(ray_service, "p0").status_code == 200  # a replica holds p0
    holder = ray_service.replicas.options(multiplexed_model_id=adapter_id("public", "p0"))
    victim: Gate = holder.close_gate_here.remote().result(timeout_s=30)
    # Images no replica has seen: the encoder cache would let a seen one pass the gate.
    load = Load(ray_service, images=[noise_png(400 + k) for k in range(3)])
    try:
        eventually(lambda: gate_entered(ray_service, victim.replica), "a batch held on it")
        os.kill(victim.pid, signal.SIGKILL)
        killed = time.monotonic()
        at_kill = load.wait_for(0)
        load.wait_for(at_kill + 30)  # the service keeps answering
    finally:
        answers = load.stop()
    statuses = Counter(status for status, _ in answers)
    assert set(statuses) <= {200, 503}, statuses
    assert {kind for _, kind in answers if kind} <= {"engine_fault"}, answers
    assert statuses[503] >= 1, statuses  # the rows the killed replica was running
    assert sum(1 for status, _ in answers[at_kill:] if status == 200) >= 20, answers
    # Ray starts a new replica; the service then serves every adapter again.
    # (Serve may report the replica RUNNING a moment before its process carries the
    # deployment's name, which is how replica_pids finds it: wait for both.)
    deadline = killed + 150
    while time.monotonic() < deadline:
        status = serve.status().applications[APP_NAME].deployments["EngineReplica"]
        new_pids = ray_service.replica_pids()
        if status.replica_states.get("RUNNING", 0) == REPLICAS and len(new_pids) == REPLICAS:
            break
        time.sleep(1)
    else:
        raise AssertionError(f"no replacement replica: {status}, processes {new_pids}")
    print(f"replacement running {time.monotonic() - killed:.1f} s after the kill; {statuses}")
    assert victim.pid not in new_pids
    for name in ADAPTERS:
        assert caption(ray_service, name).status_code == 200


def test_shutdown_under_load_answers_every_request(ray_service: RayService) -> None:
    """The drain `ctxpeft serve --ray` runs on SIGTERM, under load: requests in flight finish
    (200), later ones get 503 draining; none is lost or hangs. Then the application is
    deleted (the next test's fixture deploys it again)."""
    from ray import serve

    from service.scaleout.application import APP_NAME

    load = Load(ray_service)
    load.wait_for(12)
    finished = ray_service.ingress.drain.remote(30.0).result(timeout_s=60)
    after_drain = load.wait_for(0)
    load.wait_for(after_drain + 12)  # requests keep coming: refused
    answers = load.stop()
    statuses = Counter(status for status, _ in answers)
    assert finished is True
    assert set(statuses) <= {200, 503}, statuses
    # As in one process: refused at the door (unavailable: draining) or by the engine.
    assert {kind for _, kind in answers if kind} <= {"unavailable", "draining"}, statuses
    # 12 answers came before the drain; of the 12 after it, at most one per client (6) can
    # be a 200 still on its way when the drain returned.
    assert statuses[200] >= 12 and statuses[503] >= 6, statuses
    print(f"drain under load: {statuses}")
    assert_error(httpx.get(f"{ray_service.url}/readyz", timeout=10), 503, "unavailable")
    assert ray_service.ingress.inflight.remote().result(timeout_s=30) == 0
    serve.delete(APP_NAME)  # replicas stop gracefully: their metrics targets are removed
    left = ray_service.replica_targets(live_only=False)  # a killed replica's only (up 0)
    assert all(not psutil.pid_exists(int(g["labels"]["pid"])) for g in left), left
