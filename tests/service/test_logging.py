"""service.logging.configure_logging routes everything the process reports through its one
JSON handler: warnings from library code, library loggers that install their own plain-text
handler (transformers, huggingface_hub, torch), and uncaught exceptions in any thread.

Each test runs `configure_logging` in a child interpreter (it changes process-wide hooks) and
reads what that process wrote to stderr: every line must be one JSON object.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def run_configured(body: str, json_logs: bool = True) -> tuple[list[dict[str, Any]], str]:
    """Run `body` after configure_logging("info", json=json_logs) in a fresh interpreter;
    returns (stderr lines parsed as JSON, stdout)."""
    script = (
        "from service.logging import configure_logging\n"
        f"configure_logging('info', json={json_logs})\n" + textwrap.dedent(body)
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}\nstderr:\n{done.stderr}") from None
    return parsed, done.stdout


def test_a_library_warning_is_one_json_line_with_its_category_and_source() -> None:
    lines, stdout = run_configured(
        """
        import io
        from PIL import Image
        Image.MAX_IMAGE_PIXELS = 100  # Pillow warns (DecompressionBombWarning) above it
        buffer = io.BytesIO()
        Image.new("L", (12, 12)).save(buffer, format="PNG")  # 144 pixels (an error above 200)
        Image.open(buffer)
        """
    )
    assert stdout == ""
    (warning,) = lines
    assert warning["logger"] == "py.warnings"
    assert warning["level"] == "warning"
    assert warning["category"] == "DecompressionBombWarning"
    assert "exceeds limit of 100 pixels" in warning["msg"]
    assert "/PIL/Image.py:" in warning["source"]


def test_library_loggers_with_their_own_handlers_go_through_ours() -> None:
    lines, _ = run_configured(
        """
        import logging
        from transformers.utils import logging as hf_logging
        hf_logging.get_logger("transformers.models.llama").warning("from transformers")
        logging.getLogger("huggingface_hub.file_download").warning("from the hub")
        logging.getLogger("torch._dynamo").warning("from torch")
        """
    )
    assert [(line["logger"], line["msg"]) for line in lines] == [
        ("transformers.models.llama", "from transformers"),
        ("huggingface_hub.file_download", "from the hub"),
        ("torch._dynamo", "from torch"),
    ]


def test_uncaught_exceptions_in_threads_and_main_are_logged_not_printed() -> None:
    lines, _ = run_configured(
        """
        import threading
        worker = threading.Thread(target=lambda: 1 / 0, name="worker-1")
        worker.start()
        worker.join()
        raise RuntimeError("the end")
        """
    )
    assert [(line["level"], line["msg"]) for line in lines] == [
        ("critical", "uncaught exception in a thread"),
        ("critical", "uncaught exception"),
    ]
    assert lines[0]["thread_name"] == "worker-1"
    assert "ZeroDivisionError: division by zero" in lines[0]["exc"]
    assert lines[1]["exc"].endswith("RuntimeError: the end")


def test_plain_text_mode_also_routes_warnings() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from service.logging import configure_logging\n"
            "configure_logging('info', json=False)\n"
            "import warnings\nwarnings.warn('plain one', UserWarning)\n",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    (line,) = done.stderr.splitlines()
    assert line.endswith("WARNING py.warnings [None] plain one"), line


def test_extras_are_kept_and_other_libraries_private_record_marks_are_not() -> None:
    # Ray installs a record factory that adds `_ray_timestamp_ns` to every record in the
    # process; such private marks stay out of our lines, `extra=` fields stay in.
    lines, _ = run_configured(
        """
        import logging
        factory = logging.getLogRecordFactory()
        def marked(*args, **kwargs):
            record = factory(*args, **kwargs)
            record._ray_timestamp_ns = 1
            return record
        logging.setLogRecordFactory(marked)
        logging.getLogger("service.x").info("batch done", extra={"rows": 4})
        """
    )
    (line,) = lines
    assert line["msg"] == "batch done" and line["rows"] == 4
    assert not [key for key in line if key.startswith("_")], line
