"""Graceful drain.

SIGTERM during load: the real `ctxpeft serve` process (settings from CTXPEFT_* variables, run
by tests/e2e/gated_serve.py, which adds a gate on the vision encoder) on a saved tiny
backbone. Requests in flight when the signal comes (held at the closed gate, so the signal
cannot come too late) all finish with 200; new ones get 503 and /readyz says 503; the process
exits, status 0, its drain finished within the configured time (as it logs).

A drain whose time runs out (in-process DrainingServer, the exit signal handed to it as
uvicorn's signal handler would, the rows held at an encoder gate): the requests still running
are answered 503 "draining" in the error shape, never a bare 500, and the server stops by
itself.

Every wait is on an event the test caused (a gate reached, a queue filled, a signal handled),
with a safety net that is never what is checked.
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from service.api.app import create_app
from service.commands.serve import GRACEFUL_S, DrainingServer
from service.engine import Engine, EngineConfig
from service.metrics import ServiceMetrics
from service.settings import Settings
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
from tests.e2e.openai_helpers import SAFETY_TIMEOUT_S, encoder_gate, eventually
from tests.e2e.serve_process import ServedProcess, saved_tiny_service, serve_process
from tests.service.adapter_fixtures import tiny_backbone

DRAIN_TIMEOUT_S = 20.0
IN_FLIGHT = 8  # one held at the encoder gate, seven queued behind it


@dataclass
class Gated:
    served: ServedProcess
    gate: Path  # tests/e2e/gated_serve.py's folder: `closed` and `entered` appear there


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[Gated]:
    """`ctxpeft serve` with an encoder gate (tests/e2e/gated_serve.py) in a child process,
    ready."""
    gate = tmp_path / "gate"
    gate.mkdir()
    env = {
        **saved_tiny_service(tmp_path).env(),
        "CTXPEFT_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
        "CTXPEFT_MAX_BATCH_SIZE": "2",
    }
    command = [sys.executable, "-m", "tests.e2e.gated_serve", str(gate)]
    with serve_process(tmp_path, env, command=command) as process:
        process.wait_ready()
        yield Gated(process, gate)


def _caption(client: httpx.Client, seed: int, tokens: int) -> httpx.Response:
    return client.post(
        "/caption",
        files=image_file(noise_png(seed)),
        data={"adapter": "news", "max_new_tokens": str(tokens)},
        headers=bearer(ACME_ADMIN),
    )


def _held(
    pool: ThreadPoolExecutor,
    client: httpx.Client,
    count: int,
    tokens: int,
    entered: Callable[[], bool],
) -> list[Future[httpx.Response]]:
    """With the encoder gate closed: one request whose row waits at the gate (`entered`),
    then `count - 1` more queued behind it (ctxpeft_queue_depth). All `count` are then
    admitted and none can finish before the gate opens."""
    futures = [pool.submit(_caption, client, 0, tokens)]
    eventually(entered, "the first row reached the closed encoder gate")
    futures += [pool.submit(_caption, client, seed, tokens) for seed in range(1, count)]
    eventually(
        lambda: scrape(str(client.base_url)).value("ctxpeft_queue_depth") == count - 1,
        f"{count - 1} rows queued behind the gate",
    )
    return futures


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(gated: Gated) -> None:
    served = gated.served
    process, url = served.process, served.url
    process.send_signal(signal.SIGUSR1)  # close the encoder gate
    eventually((gated.gate / "closed").exists, "the gate closed")
    with (
        httpx.Client(base_url=url, timeout=SAFETY_TIMEOUT_S) as client,
        ThreadPoolExecutor(IN_FLIGHT) as pool,
    ):
        futures = _held(pool, client, IN_FLIGHT, 8, (gated.gate / "entered").exists)
        assert not any(f.done() for f in futures)

        process.send_signal(signal.SIGTERM)
        # Readiness goes 503, and new work is refused, while the old work waits at the gate.
        eventually(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 503, "/readyz 503")
        assert_error(httpx.get(f"{url}/readyz", timeout=5), 503, "unavailable")
        refused = _caption(client, 100, tokens=8)
        body = assert_error(refused, 503, refused.json()["error"]["type"])
        assert body["error"]["type"] in ("unavailable", "draining")
        assert "drain" in body["error"]["message"]
        assert int(refused.headers["retry-after"]) >= 1
        assert not any(f.done() for f in futures)

        process.send_signal(signal.SIGUSR2)  # open the gate: the admitted work goes on
        answers = [f.result() for f in futures]
    assert [a.status_code for a in answers] == [200] * IN_FLIGHT, [a.text for a in answers]
    assert all(a.json()["adapter"] == "news" and a.json()["tokens"] >= 1 for a in answers)

    returncode = process.wait(timeout=DRAIN_TIMEOUT_S + SAFETY_TIMEOUT_S)  # a safety net
    assert returncode == 0, served.output()

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
) -> Iterator[tuple[DrainingServer, threading.Thread, str, Engine]]:
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
        yield server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}", engine
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def test_requests_still_running_when_the_drain_time_ends_get_503_not_500(
    tiny_store: Path,
) -> None:
    budget_s = 0.05
    with (
        draining_server(tiny_store, budget_s) as (server, thread, url, engine),
        encoder_gate(engine) as gate,
        httpx.Client(base_url=url, timeout=SAFETY_TIMEOUT_S) as client,
        ThreadPoolExecutor(4) as pool,
    ):
        # Four requests held at the encoder gate: none can finish within the drain budget.
        futures = _held(pool, client, 4, 8, gate.entered.is_set)
        server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
        answers = [f.result() for f in futures]
        gate.release()
        thread.join(timeout=SAFETY_TIMEOUT_S)  # the server stops by itself after the drain
        assert not thread.is_alive()

    statuses = [a.status_code for a in answers]
    assert statuses == [503] * 4, [a.text for a in answers]
    for answer in answers:
        body = assert_error(answer, 503, "draining")
        assert "drain_timeout_s" in body["error"]["message"]
        assert answer.headers["retry-after"] == "1"
