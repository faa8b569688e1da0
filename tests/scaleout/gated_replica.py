"""`GatedEngineReplica`: the real `EngineReplica` with a gate on its vision encoder, so that a
test holds rows in flight on a replica exactly as long as it needs (fault injection, as
tests/e2e/openai_helpers.py's `encoder_gate` does in one process; here the replica runs in
its own Ray process, so the gate is driven through the deployment handle):

    every_replica(service, lambda h: h.close_gate.remote())   # rows now wait in the encoder
    ... send requests; `gate_entered` says when a batch reached it ...
    every_replica(service, lambda h: h.open_gate.remote())
    service.replicas.options(multiplexed_model_id="public/p0").close_gate_here.remote()
                                   # only the replica holding public/p0: Gate(replica, pid, ...)
    every_replica(service, lambda h: h.gate.remote())   # Gate(replica, pid, entered) each

Under load Ray's router sends a call to the replica with the shorter queue, so a replica whose
gate holds rows may not be reached through the handle: `ctxpeft_test_gate_entered` on its own
metrics endpoint (the target file it wrote) says whether its gate holds a batch.

Everything else is EngineReplica's, unchanged. Imported by Ray's workers from the checkout
(the fixture puts it on PYTHONPATH).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

from prometheus_client import Gauge

from service.scaleout.replica import EngineReplica

# A closed gate lets its rows go after this long even if a test never opens it.
SAFETY_S = 120.0


@dataclass(frozen=True)
class Gate:
    replica: str
    pid: int
    entered: bool  # a batch reached the closed gate since it was closed


class GatedEngineReplica(EngineReplica):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._open = threading.Event()
        self._open.set()
        self._entered = threading.Event()
        encode = self.engine.backbone.encode_images

        def gated(*a: Any, **k: Any) -> Any:
            if not self._open.is_set():
                self._entered.set()
                self._entered_gauge.set(1)
                self._open.wait(SAFETY_S)
            return encode(*a, **k)

        self.engine.backbone.encode_images = gated  # type: ignore[method-assign]
        self._entered_gauge = Gauge(
            "ctxpeft_test_gate_entered",
            "1 while a batch waits at this test replica's closed encoder gate.",
            registry=self.metrics.registry,
        )

    def close_gate(self) -> str:
        self._entered.clear()
        self._entered_gauge.set(0)
        self._open.clear()
        return self.replica

    def open_gate(self) -> str:
        self._open.set()
        self._entered_gauge.set(0)
        return self.replica

    def close_gate_here(self) -> Gate:
        """Close this replica's gate alone (call it through a handle routed by an adapter id
        to reach the replica holding that adapter)."""
        self.close_gate()
        return self.gate()

    def gate_entered(self) -> bool:
        return self._entered.is_set()

    def gate(self) -> Gate:
        return Gate(self.replica, os.getpid(), self._entered.is_set())
