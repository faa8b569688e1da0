"""Every line `ctxpeft serve` writes is one JSON object: its own records, uvicorn's, and a
warning raised inside a library while serving a request.

The real process (tests/e2e/serve_process.py) captions an image, then receives an upload
whose header declares 9500 x 9500 pixels: Pillow warns (DecompressionBombWarning, from
PIL/Image.py, through `warnings.warn`) when it opens the header, and the service answers 413.
Then SIGTERM drains it, and every stderr line must parse as JSON.
"""

from __future__ import annotations

import io
import signal
from pathlib import Path

import httpx
from PIL import Image

from tests.e2e.conftest import ACME_ADMIN, assert_error, bearer, image_file, noise_png
from tests.e2e.serve_process import saved_tiny_service, serve_process

# Above Pillow's MAX_IMAGE_PIXELS (89,478,485), which warns, and below twice that, which
# raises: a warning from library code. A 1-bit PNG of zeros is a few kB.
BOMB_SIDE = 9500


def bomb_png() -> bytes:
    assert Image.MAX_IMAGE_PIXELS is not None
    assert Image.MAX_IMAGE_PIXELS < BOMB_SIDE**2 < 2 * Image.MAX_IMAGE_PIXELS
    buffer = io.BytesIO()
    Image.new("1", (BOMB_SIDE, BOMB_SIDE)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_stderr_line_is_json_with_a_library_warning_and_a_drain(tmp_path: Path) -> None:
    env = saved_tiny_service(tmp_path).env()
    with serve_process(tmp_path, env) as served:
        served.wait_ready()
        with httpx.Client(base_url=served.url, timeout=60) as client:
            ok = client.post(
                "/caption",
                files=image_file(noise_png(1)),
                data={"adapter": "news", "max_new_tokens": "4"},
                headers=bearer(ACME_ADMIN),
            )
            assert ok.status_code == 200, ok.text
            bomb = client.post(
                "/caption",
                files=image_file(bomb_png()),
                data={"adapter": "news"},
                headers=bearer(ACME_ADMIN),
            )
            assert_error(bomb, 413, "image_too_large")
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(timeout=60) == 0, served.output()
        lines = served.json_lines()  # fails on the first line that is not JSON
        assert served.stdout_path.read_text() == ""

    assert all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    messages = [line["msg"] for line in lines]
    for expected in ("starting", "engine ready", "drain started", "drain finished"):
        assert expected in messages, messages
    assert any(line["logger"].startswith("uvicorn") for line in lines)  # uvicorn's own lines
    (warning,) = [line for line in lines if line["logger"] == "py.warnings"]
    assert warning["category"] == "DecompressionBombWarning"
    assert f"Image size ({BOMB_SIDE**2} pixels) exceeds limit" in warning["msg"]
    assert "/PIL/Image.py:" in warning["source"]
    # Logged while serving that request: it carries the request's id.
    assert warning["request_id"] == bomb.headers["x-request-id"]
