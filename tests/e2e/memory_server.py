"""A real ctxpeft server in its own process, for measurements of its memory (RSS).

    python -m tests.e2e.memory_server STORE_DIR '{"max_concurrent_decodes": 2}'

Serves the tiny test backbone (tests/service/adapter_fixtures.py) over the store with the e2e
keys and TINY_SETTINGS plus the JSON overrides; prints "PORT <n>" once it accepts requests and
runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path

import uvicorn

from service.api.app import create_app
from service.engine import Engine, EngineConfig
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.store import AdapterStore
from tests.e2e.conftest import KEYS_JSON, TINY_SETTINGS
from tests.service.adapter_fixtures import tiny_backbone


def main(argv: list[str]) -> None:
    store_dir = Path(argv[0])
    overrides = json.loads(argv[1]) if len(argv) > 1 else {}
    values = {
        **TINY_SETTINGS,
        "runtime_dir": store_dir.parent,
        "store_dir": store_dir,
        "keys": KEYS_JSON,
        **overrides,
    }
    settings = Settings(**values)
    metrics = ServiceMetrics(backbone=settings.backbone)
    engine = Engine(
        tiny_backbone(), AdapterStore(store_dir), EngineConfig.from_settings(settings), metrics
    )
    app = create_app(settings, engine=engine, metrics=metrics)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="auto"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit("uvicorn exited before it started")
        time.sleep(0.01)
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    thread.join()


if __name__ == "__main__":
    main(sys.argv[1:])
