"""`ctxpeft serve` with a gate on its vision encoder: fault injection for tests that need
rows held in flight inside the real served process (as tests/scaleout/gated_replica.py does
in a Ray replica, and tests/e2e/openai_helpers.encoder_gate in this process).

    python -m tests.e2e.gated_serve GATE_DIR      # then as `python -m service.cli serve`

The gate starts open. SIGUSR1 closes it (the process then creates GATE_DIR/closed); a batch
that reaches the encoder while it is closed waits there (creating GATE_DIR/entered) until
SIGUSR2 opens it. Everything else is `ctxpeft serve`'s, unchanged.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from adapters.backbone import Backbone
from service.cli import main

# A closed gate lets its rows go after this long even if a test never opens it.
SAFETY_S = 120.0


def install(folder: Path) -> None:
    opened = threading.Event()
    opened.set()
    encode = Backbone.encode_images

    def gated(self: Backbone, *args: Any, **kwargs: Any) -> Any:
        if not opened.is_set():
            (folder / "entered").touch()
            opened.wait(SAFETY_S)
        return encode(self, *args, **kwargs)

    def close(sig: int, frame: FrameType | None) -> None:
        opened.clear()
        (folder / "closed").touch()

    def open_(sig: int, frame: FrameType | None) -> None:
        opened.set()

    Backbone.encode_images = gated  # type: ignore[method-assign]
    signal.signal(signal.SIGUSR1, close)
    signal.signal(signal.SIGUSR2, open_)


if __name__ == "__main__":
    install(Path(sys.argv[1]))
    sys.exit(main(["serve"]))
