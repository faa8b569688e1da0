"""Graceful drain.

SIGTERM during load: the real `ctxpeft serve` process (python -m service.cli serve, settings
from CTXPEFT_* variables) on a saved tiny backbone. Requests in flight when the signal comes
all finish with 200; new ones get 503 and /readyz says 503; the process exits, status 0,
within the configured drain time.

A drain whose time runs out (in-process DrainingServer, the exit signal handed to it as
uvicorn's signal handler would): the requests still running are answered 503 "draining" in
the error shape, never a bare 500, and the server stops within its budget.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

from service.api.app import create_app
from service.commands.serve import GRACEFUL_S, DrainingServer
from service.engine import Engine, EngineConfig
from service.metrics import ServiceMetrics
from service.settings import ANSWER_GRACE_S, Settings
from service.store import AdapterStore
from tests.e2e.conftest import (
    ACME_ADMIN,
    KEYS_JSON,
    TINY_SETTINGS,
    assert_error,
    bearer,
    image_file,
    noise_png,
    scrape,
)
from tests.e2e.serve_process import ServedProcess, saved_tiny_service, serve_process
from tests.service.adapter_fixtures import tiny_backbone

DRAIN_TIMEOUT_S = 20.0
IN_FLIGHT = 8  # four batches of two


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedProcess]:
    """`ctxpeft serve` in a child process (tests/e2e/serve_process.py), ready."""
    root = tmp_path_factory.mktemp("drain")
    env = {
        **saved_tiny_service(root).env(),
        "CTXPEFT_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
        # Two rows per batch and long captions: the requests take a few batches to finish.
        "CTXPEFT_MAX_BATCH_SIZE": "2",
        "CTXPEFT_MAX_NEW_TOKENS_LIMIT": "64",
    }
    with serve_process(root, env) as process:
        process.wait_ready()
        yield process


def _caption(client: httpx.Client, seed: int, tokens: int) -> httpx.Response:
    return client.post(
        "/caption",
        files=image_file(noise_png(seed)),
        data={"adapter": "news", "max_new_tokens": str(tokens)},
        headers=bearer(ACME_ADMIN),
    )


def _launch(
    pool: ThreadPoolExecutor, client: httpx.Client, count: int, tokens: int
) -> list[Future[httpx.Response]]:
    """Send `count` caption requests at once; return as soon as the engine has admitted all of
    them: each is then waiting in the queue (ctxpeft_queue_depth) or has started its batch
    (one ctxpeft_queue_wait_seconds observation per row)."""
    futures = [pool.submit(_caption, client, seed, tokens) for seed in range(count)]
    deadline = time.monotonic() + 60
    while True:
        metrics = scrape(str(client.base_url))
        admitted = metrics.value("ctxpeft_queue_depth") + metrics.value(
            "ctxpeft_queue_wait_seconds_count"
        )
        if admitted >= count:
            return futures
        assert time.monotonic() < deadline, f"only {admitted} of {count} requests admitted"
        time.sleep(0.005)


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(served: ServedProcess) -> None:
    process, url = served.process, served.url
    with (
        httpx.Client(base_url=url, timeout=DRAIN_TIMEOUT_S + 10) as client,
        ThreadPoolExecutor(IN_FLIGHT) as pool,
    ):
        # Enough decode steps that the load outlasts its own admission check (8 rows of up to
        # 48 tokens, two rows a step: ~190 steps), and few enough that the drain ends well
        # within its time on a busy CI machine. (8 tokens each, ~30 steps, was over before the
        # engine had reported every row admitted once decoding went per step.)
        futures = _launch(pool, client, IN_FLIGHT, tokens=48)
        in_flight = [f for f in futures if not f.done()]
        assert len(in_flight) >= 2, "the load finished before the signal"

        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        # Readiness goes 503 at once, and new work is refused, while the old work goes on.
        deadline = time.monotonic() + 5
        while (ready := httpx.get(f"{url}/readyz", timeout=5)).status_code == 200:
            assert time.monotonic() < deadline, "/readyz stayed 200 after SIGTERM"
            time.sleep(0.02)
        assert_error(ready, 503, "unavailable")
        refused = _caption(client, 100, tokens=8)
        body = assert_error(refused, 503, refused.json()["error"]["type"])
        assert body["error"]["type"] in ("unavailable", "draining")
        assert "drain" in body["error"]["message"]
        assert int(refused.headers["retry-after"]) >= 1

        answers = [f.result() for f in futures]
    assert [a.status_code for a in answers] == [200] * IN_FLIGHT, [a.text for a in answers]
    assert all(a.json()["adapter"] == "news" and a.json()["tokens"] >= 1 for a in answers)

    returncode = process.wait(timeout=DRAIN_TIMEOUT_S + 10)
    took = time.monotonic() - signalled
    assert returncode == 0, served.output()
    assert took < DRAIN_TIMEOUT_S, f"exit took {took:.1f} s"

    # JSON logs: the drain is logged, and every line is one JSON object.
    lines = served.json_lines()
    messages = [line["msg"] for line in lines]
    assert "drain started" in messages and "drain finished" in messages
    finished = next(line for line in lines if line["msg"] == "drain finished")
    assert finished["all_finished"] is True


# --- a drain that runs out of time ------------------------------------------------------------
@contextmanager
def draining_server(
    service_store: Path, budget_s: float
) -> Iterator[tuple[DrainingServer, threading.Thread, str]]:
    """create_app + DrainingServer (what `ctxpeft serve` runs) on a loopback socket, in a
    thread; one row per batch so that a few requests take a while."""
    settings = Settings(
        **{**TINY_SETTINGS, "max_new_tokens_limit": 64},
        store_dir=service_store,
        runtime_dir=service_store.parent,
        keys=KEYS_JSON,
        max_batch_size=1,
    )
    metrics = ServiceMetrics(backbone=settings.backbone)
    engine = Engine(
        tiny_backbone(), AdapterStore(service_store), EngineConfig.from_settings(settings), metrics
    )
    app = create_app(settings, engine=engine, metrics=metrics)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, log_config=None, access_log=False, timeout_graceful_shutdown=GRACEFUL_S
    )
    server = DrainingServer(config, app.state.service.drain, budget_s)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "uvicorn exited before it started"
            time.sleep(0.01)
        yield server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def test_requests_still_running_when_the_drain_time_ends_get_503_not_500(
    tiny_store: Path,
) -> None:
    budget_s = 0.05
    with (
        draining_server(tiny_store, budget_s) as (server, thread, url),
        httpx.Client(base_url=url, timeout=30) as client,
        ThreadPoolExecutor(4) as pool,
    ):
        # Four requests of 64 tokens, one per batch: far more work than the drain budget.
        futures = _launch(pool, client, 4, tokens=64)
        assert sum(not f.done() for f in futures) >= 2, "the load finished before the signal"
        server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
        signalled = time.monotonic()
        answers = [f.result() for f in futures]
        thread.join(timeout=30)  # the server stops by itself once the drain is over
        stopped_after = time.monotonic() - signalled
        assert not thread.is_alive()

    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {200, 503}, [a.text for a in answers]
    cut_off = [a for a in answers if a.status_code == 503]
    assert cut_off, statuses  # a queued 64-token caption cannot finish within 50 ms
    for answer in cut_off:
        body = assert_error(answer, 503, "draining")
        assert "drain_timeout_s" in body["error"]["message"]
        assert answer.headers["retry-after"] == "1"
    # The drain budget, the answer grace and uvicorn's own shutdown, with room for a slow CI.
    assert stopped_after < budget_s + ANSWER_GRACE_S + GRACEFUL_S + 3.0
