"""`ctxpeft serve` start-up, as a real child process: a configuration it cannot serve with ends
start-up with one JSON log line naming the problem and its fix, and exit status 2 (never a
traceback, never a port bound); a stop during start-up exits at once with status 0.

The permission cases run the child without root's permission override when the tests run as
root (tests/e2e/serve_process.py), so file modes bind it as they bind uid 10001 in the image.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.serve_process import ServedProcess, saved_tiny_service, serve_process

EXIT_TIMEOUT_S = 120.0  # covers the imports of a cold interpreter on a busy machine


def refused(served: ServedProcess) -> dict[str, Any]:
    """The process exited 2 having logged one error line (returned), no traceback, and never
    listened."""
    assert served.process.wait(timeout=EXIT_TIMEOUT_S) == 2, served.output()
    lines = served.json_lines()
    errors = [line for line in lines if line["level"] in ("error", "critical")]
    assert len(errors) == 1, lines
    (error,) = errors
    assert error["exit_code"] == 2
    assert "exc" not in error and "Traceback" not in served.output()
    assert not any(line["logger"].startswith("uvicorn") for line in lines), lines
    assert served.stdout_path.read_text() == ""
    return error


def test_serve_without_a_built_demo_exits_2_naming_ctxpeft_demo(tmp_path: Path) -> None:
    runtime = tmp_path / "var"
    with serve_process(tmp_path, {"CTXPEFT_RUNTIME_DIR": str(runtime)}) as served:
        error = refused(served)
    message = error["msg"]
    assert message.startswith("backbone 'demo' is not built")
    assert "run `ctxpeft demo`" in message
    assert f"CTXPEFT_RUNTIME_DIR={runtime}" in message
    assert not (runtime / "backbones").exists()  # nothing was built


def test_serve_refuses_a_store_whose_adapters_all_name_another_backbone(tmp_path: Path) -> None:
    saved = saved_tiny_service(tmp_path)
    ours = json.loads((saved.backbone / "backbone.json").read_text())["fingerprint"]
    other = "0123456789abcdef0123456789abcdef"
    (config_path,) = saved.store.glob("acme/news/v*/adapter_config.json")
    config = json.loads(config_path.read_text())
    assert config["base_fingerprint"] == ours
    config["base_fingerprint"] = other  # as if trained on another build of the backbone
    config_path.write_text(json.dumps(config))
    with serve_process(tmp_path, saved.env()) as served:
        error = refused(served)
    message = error["msg"]
    assert message.startswith(f"none of the 1 adapters in the store {saved.store}")
    assert f"(fingerprint {ours})" in message
    assert f"they name {other} (1)" in message
    assert "CTXPEFT_BACKBONE" in message and "CTXPEFT_STORE_DIR" in message


def test_unreadable_keys_file_exits_2_naming_path_uid_and_fix(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": []}')
    keys.chmod(0o000)
    env = {"CTXPEFT_KEYS_FILE": str(keys), "CTXPEFT_RUNTIME_DIR": str(tmp_path / "var")}
    with serve_process(tmp_path, env, obey_permissions=True) as served:
        error = refused(served)
    message = error["msg"]
    assert message.startswith(f"keys file {keys} cannot be read by uid {os.getuid()}")
    assert "permission denied" in message
    assert "chmod a+r" in message and "CTXPEFT_KEYS_FILE" in message


def test_unwritable_runtime_folder_exits_2_naming_path_uid_and_fix(tmp_path: Path) -> None:
    runtime = tmp_path / "var"
    runtime.mkdir()
    runtime.chmod(0o555)  # readable, not writable: a root-owned mount seen by uid 10001
    try:
        with serve_process(
            tmp_path, {"CTXPEFT_RUNTIME_DIR": str(runtime)}, obey_permissions=True
        ) as served:
            error = refused(served)
    finally:
        runtime.chmod(0o755)
    message = error["msg"]
    assert message.startswith(f"runtime folder {runtime} is not writable by uid {os.getuid()}")
    assert f"chown -R {os.getuid()}:{os.getgid()}" in message
    assert "CTXPEFT_RUNTIME_DIR" in message


def test_invalid_setting_exits_2_with_one_line(tmp_path: Path) -> None:
    with serve_process(tmp_path, {"CTXPEFT_MAX_BATCH_SIZE": "lots"}) as served:
        error = refused(served)
    assert error["msg"].startswith("invalid settings: max_batch_size (CTXPEFT_MAX_BATCH_SIZE)")


def test_sigterm_during_start_up_exits_0_at_once(tmp_path: Path) -> None:
    """The signal lands while the process imports torch and the app (it has logged
    "starting", not yet listened): nothing to drain, so it exits with status 0."""
    env = saved_tiny_service(tmp_path).env()
    with serve_process(tmp_path, env) as served:
        served.wait_for_log("starting")
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(timeout=EXIT_TIMEOUT_S) == 0, served.output()
        lines = served.json_lines()
    messages = [line["msg"] for line in lines]
    # Either still starting (the usual case: the app's imports take seconds) or already
    # serving, where the drain handles it; both end with status 0.
    assert "stopped during start-up" in messages or "drain finished" in messages, messages
    if "stopped during start-up" in messages:
        assert messages[-1] == "stopped during start-up"
        assert not any(line["logger"].startswith("uvicorn") for line in lines)


def test_sigterm_once_listening_before_ready_exits_0(tmp_path: Path) -> None:
    env = saved_tiny_service(tmp_path).env()
    with serve_process(tmp_path, env) as served:
        deadline = time.monotonic() + EXIT_TIMEOUT_S
        while True:  # the first moment it answers /healthz, ready or not
            assert served.process.poll() is None, served.output()
            assert time.monotonic() < deadline, served.output()
            try:
                if httpx.get(f"{served.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(timeout=EXIT_TIMEOUT_S) == 0, served.output()
        messages = [line["msg"] for line in served.json_lines()]
    assert "drain started" in messages and "drain finished" in messages


@pytest.mark.parametrize("backbone", ["nope", "/no/such/folder"])
def test_unknown_backbone_exits_2(tmp_path: Path, backbone: str) -> None:
    env = {"CTXPEFT_RUNTIME_DIR": str(tmp_path / "var"), "CTXPEFT_BACKBONE": backbone}
    with serve_process(tmp_path, env) as served:
        error = refused(served)
    assert error["msg"].startswith(f"backbone {backbone!r} (CTXPEFT_BACKBONE) is neither a preset")
