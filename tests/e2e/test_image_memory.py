"""Decoding memory under a flood of maximum-size images, measured on a real server process.

The server (tests/e2e/memory_server.py) runs in its own process so that its resident memory
is its own. Its peak RSS is reset (Linux: /proc/PID/clear_refs) after a warm-up caption, then
twelve 16-megapixel RGBA PNGs (the most memory a decode can take: 8 bytes a pixel) are
captioned at once. The peak must stay under the bound docs/OPERATIONS.md states:

    idle RSS + max_concurrent_decodes * (8 * max_image_pixels + 16 * (2 * image_decode_side)^2)
             + in-flight uploads * (their body + 1 MiB)

(The same flood of 24 images took the server from 0.56 GB to 6.6 GB peak RSS before decoding
was bounded; see docs/OPERATIONS.md.)
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.images import ImageLimits
from service.settings import Settings
from tests.e2e.conftest import ACME_ADMIN, bearer, fresh_store, image_file, noise_png

MiB = 1024 * 1024
FLOOD = 12
SIDE = 4000  # 16 MP: the default max_image_pixels
OVERRIDES = {"max_concurrent_decodes": 2, "max_image_pixels": SIDE * SIDE}

# slow: about 50 s on a loaded 2-core machine (a server process to start, 13 decodes of 16 MP).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak RSS"
    ),
]


@dataclass
class Server:
    url: str
    pid: int

    def memory(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS since the last reset) in bytes."""
        found = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) * 1024
        return found

    def reset_peak(self) -> None:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")


@pytest.fixture(scope="module")
def server(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    store = fresh_store(tiny_store, tmp_path_factory.mktemp("memory") / "adapters")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.e2e.memory_server", str(store), json.dumps(OVERRIDES)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("PORT "), f"the server did not start: {line!r}"
        yield Server(f"http://127.0.0.1:{int(line.split()[1])}", process.pid)
    finally:
        process.terminate()
        process.wait(timeout=60)


def maximum_size_png() -> bytes:
    """A 4000x4000 RGBA PNG: 16 MP, 8 bytes a pixel while decoding; smooth, so that it is
    small on the wire (the bodies are not what is measured)."""
    ramp = np.arange(SIDE, dtype=np.uint32)
    pixels = np.empty((SIDE, SIDE, 4), dtype=np.uint8)
    pixels[..., 0] = (ramp * 255 // SIDE).astype(np.uint8)[None, :]
    pixels[..., 1] = (ramp * 255 // SIDE).astype(np.uint8)[:, None]
    pixels[..., 2] = ((ramp[:, None] + ramp[None, :]) % 256).astype(np.uint8)
    pixels[..., 3] = (128 + ramp % 64).astype(np.uint8)[None, :]
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def caption(url: str, data: bytes) -> int:
    with httpx.Client(base_url=url, timeout=300) as client:
        response = client.post(
            "/caption",
            files=image_file(data),
            data={"adapter": "news"},
            headers=bearer(ACME_ADMIN),
        )
        return response.status_code


def test_peak_rss_under_a_flood_of_maximum_size_pngs_stays_under_the_bound(
    server: Server,
) -> None:
    png = maximum_size_png()
    assert caption(server.url, noise_png(1)) == 200  # warm: model, threads, allocator
    assert caption(server.url, png) == 200  # one big decode: Pillow's code paths are loaded
    server.reset_peak()
    idle = server.memory()["VmRSS"]

    statuses: list[int] = []
    threads = [
        threading.Thread(target=lambda: statuses.append(caption(server.url, png)))
        for _ in range(FLOOD)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    peak = server.memory()["VmHWM"]

    assert statuses == [200] * FLOOD
    limits = ImageLimits.from_settings(Settings(**OVERRIDES))
    bound = limits.decode_bound_bytes() + FLOOD * (len(png) + MiB)
    grew = peak - idle
    print(f"idle {idle / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB (+{grew / MiB:.0f} MiB), "
          f"bound +{bound / MiB:.0f} MiB")  # fmt: skip
    assert grew <= bound, f"peak RSS grew {grew / MiB:.0f} MiB; the bound is {bound / MiB:.0f}"
    # The measurement is not vacuous: at least one full decode (61 MiB of RGBA) happened.
    assert grew >= SIDE * SIDE * 4
