"""Run an ASGI app on a real uvicorn server in a background thread, in this process: the
benchmarks measure through it (benchmarks/scaleout.py) and the HTTP-level tests serve with it.

    with live_server(app) as base_url:
        httpx.get(f"{base_url}/healthz")

The socket is bound (127.0.0.1, port 0) before the server starts, so the port is free and
known without a race. The block is entered once uvicorn says it listens (an event its
start-up sets, not a poll), or raises when the server thread ended first. The server runs its
lifespan, uses uvicorn's default HTTP parser, and leaves the process's logging configuration
alone. (A tool of the checkout, like every module here: `service` never imports it.)
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from starlette.types import ASGIApp

# A safety net, not a measure: start-up (the app's lifespan) normally takes milliseconds.
START_TIMEOUT_S = 60.0


class _Server(uvicorn.Server):
    """A uvicorn Server that says when it listens, or that it never will."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.settled = threading.Event()  # set once listening, or once the thread ended

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.settled.set()

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            super().run(sockets=sockets)
        finally:
            self.settled.set()


@contextmanager
def live_server(app: ASGIApp, **config: Any) -> Iterator[str]:
    """Serve `app` until the block exits; yields the base URL (http://127.0.0.1:PORT)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    options: dict[str, Any] = {"log_config": None, "access_log": False, "lifespan": "auto"}
    options.update(config)
    server = _Server(uvicorn.Config(app, **options))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="live-server", daemon=True
    )
    thread.start()
    try:
        if not server.settled.wait(START_TIMEOUT_S):
            raise RuntimeError(f"uvicorn did not start within {START_TIMEOUT_S} s")
        if not server.started:
            raise RuntimeError("uvicorn exited before it started; see the log above")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=START_TIMEOUT_S)
        sock.close()
