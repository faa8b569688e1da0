"""What the HTTP layer shares across requests: settings, keys, metrics, the engine and the
service's life-cycle (loading -> ready -> draining). Stored on `app.state.service`.

The engine is loaded in a background thread at start-up so that the process answers
`/healthz` at once and `/readyz` says 503 until the backbone is loaded.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from service.auth import KeyStore
from service.engine import Engine
from service.metrics import ServiceMetrics
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ServiceState:
    settings: Settings
    keys: KeyStore
    metrics: ServiceMetrics
    engine: Engine | None = None
    load_error: str | None = None
    draining: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.ready and not self.draining

    def not_ready_reason(self) -> str:
        if self.draining:
            return "draining: the service is shutting down"
        if self.load_error is not None:
            return f"the backbone failed to load: {self.load_error}"
        return "loading the backbone"

    def load_in_background(self, factory: Callable[[], Engine]) -> threading.Thread:
        def load() -> None:
            try:
                engine = factory()
            except Exception as exc:  # reported by /readyz and the log; the process stays up
                log.exception("engine failed to load")
                self.load_error = f"{type(exc).__name__}: {exc}"
                return
            with self._lock:
                self.engine = engine
            log.info("engine ready", extra={"backbone": self.settings.backbone})

        thread = threading.Thread(target=load, name="ctxpeft-load", daemon=True)
        thread.start()
        return thread

    def begin_drain(self) -> None:
        """Readiness goes 503 and new requests are refused; in-flight ones go on."""
        self.draining = True
        if self.engine is not None:
            self.engine.scheduler.drain()

    def drain(self, timeout_s: float) -> bool:
        """Blocking: refuse new work, wait for in-flight work (True if it all finished)."""
        self.begin_drain()
        return True if self.engine is None else self.engine.drain(timeout_s)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
