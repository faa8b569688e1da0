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

from service import __version__
from service.api.engine_port import EnginePort
from service.auth import KeyStore
from service.metrics import ServiceMetrics
from service.settings import CLOSE_GRACE_S, Settings
from service.usage import UsageLedger

log = logging.getLogger(__name__)


@dataclass
class ServiceState:
    settings: Settings
    keys: KeyStore
    metrics: ServiceMetrics
    engine: EnginePort | None = None
    metrics_token: str | None = None  # GET /metrics requires it as a bearer token, when set
    usage: UsageLedger | None = None  # opened by the app's lifespan (service.usage)
    load_error: str | None = None
    draining: bool = False
    # The drain time ran out with requests still in flight: their handlers stop waiting and
    # answer 503 draining (in the error shape) before the server closes their connections.
    drain_expired: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def loading(self) -> bool:
        """The engine is still being built (in a background thread)."""
        return self.engine is None and self.load_error is None

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.ready and not self.draining

    def not_ready_reason(self) -> str:
        if self.engine is not None and not self.engine.alive:
            return f"the engine stopped: {self.engine.stopped}"
        if self.draining:
            return "draining: the service is shutting down"
        if self.load_error is not None:
            return f"the backbone failed to load: {self.load_error}"
        return "loading the backbone"

    def load_in_background(self, factory: Callable[[], EnginePort]) -> threading.Thread:
        def load() -> None:
            try:
                engine = factory()
            except Exception as exc:  # reported by /readyz and the log; the process stays up
                log.exception("engine failed to load")
                self.load_error = f"{type(exc).__name__}: {exc}"
                return
            with self._lock:
                self.engine = engine
            self.publish_build_info()
            log.info(
                "engine ready",
                extra={"backbone": self.settings.backbone, "device": str(engine.backbone.device)},
            )

        thread = threading.Thread(target=load, name="ctxpeft-load", daemon=True)
        thread.start()
        return thread

    def publish_build_info(self) -> None:
        """ctxpeft_build_info names the device the engine runs on ("cpu", "cuda:0"), not the
        setting ("auto"), once there is an engine."""
        device = str(self.engine.backbone.device) if self.engine else self.settings.device
        self.metrics.set_build_info(__version__, self.settings.backbone, device)

    def begin_drain(self) -> None:
        """Readiness goes 503 and new requests are refused; in-flight ones go on."""
        self.draining = True
        if self.engine is not None:
            self.engine.begin_drain()

    def drain(self, timeout_s: float) -> bool:
        """Blocking: refuse new work, wait for in-flight work (True if it all finished).
        When the time runs out first, `drain_expired` tells the waiting handlers to give up."""
        self.begin_drain()
        finished = True if self.engine is None else self.engine.drain(timeout_s)
        if not finished:
            self.drain_expired = True
        return finished

    def close(self) -> None:
        if self.engine is None:
            return
        if not self.drain_expired:
            self.engine.close()
            return
        # A batch may still be running, and Engine.close waits for it; the process is on its
        # way out (the drain time is spent), so wait only briefly: the worker is a daemon.
        closer = threading.Thread(target=self.engine.close, name="ctxpeft-close", daemon=True)
        closer.start()
        closer.join(timeout=CLOSE_GRACE_S)
