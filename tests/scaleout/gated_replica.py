"""`GatedEngineReplica`: the real `EngineReplica` with a gate on its vision encoder, so that a
test holds rows in flight on a replica exactly as long as it needs (fault injection, as
tests/e2e/openai_helpers.py's `encoder_gate` does in one process; here the replica runs in
its own Ray process, so the gate is driven through the deployment handle):

    every_replica(service, lambda h: h.close_gate.remote())   # rows now wait in the encoder
    ... send requests; `gate_entered` says when a batch reached it ...
    every_replica(service, lambda h: h.open_gate.remote())
    every_replica(service, lambda h: h.open_gate_unless.remote(victim))  # all but one
    every_replica(service, lambda h: h.gate.remote())   # Gate(replica, pid, entered) each

Everything else is EngineReplica's, unchanged. Imported by Ray's workers from the checkout
(the fixture puts it on PYTHONPATH).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

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
                self._open.wait(SAFETY_S)
            return encode(*a, **k)

        self.engine.backbone.encode_images = gated  # type: ignore[method-assign]

    def close_gate(self) -> str:
        self._entered.clear()
        self._open.clear()
        return self.replica

    def open_gate(self) -> str:
        self._open.set()
        return self.replica

    def open_gate_unless(self, replica: str) -> str:
        """Open the gate unless this is `replica` (whose rows stay held)."""
        if self.replica != replica:
            self._open.set()
        return self.replica

    def gate_entered(self) -> bool:
        return self._entered.is_set()

    def gate(self) -> Gate:
        return Gate(self.replica, os.getpid(), self._entered.is_set())
