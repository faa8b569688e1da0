"""The real `ctxpeft serve` in a child process (python -m service.cli serve, settings from
CTXPEFT_* variables), its stdout and stderr each kept in a file.

    with serve_process(root, {"CTXPEFT_BACKBONE": str(folder), ...}) as served:
        served.wait_ready()
        httpx.get(f"{served.url}/readyz")
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(timeout=30) == 0
    served.json_lines()        # every stderr line parsed as JSON (fails on one that is not)

`saved_tiny_service(root).env()` serves what most of these servers run: the tiny test backbone
saved as a folder and a store with acme/news trained on it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.store import AdapterStore
from tests.e2e.conftest import KEYS_JSON
from tests.service.adapter_fixtures import put, random_adapter, tiny_backbone

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0  # a cold interpreter imports torch and transformers first


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class SavedService:
    """What `saved_tiny_service` laid out under `root`."""

    root: Path
    backbone: Path
    store: Path

    def env(self) -> dict[str, str]:
        """The CTXPEFT_* variables that serve it (runtime folder `root/var`)."""
        return {
            "CTXPEFT_RUNTIME_DIR": str(self.root / "var"),
            "CTXPEFT_BACKBONE": str(self.backbone),
            "CTXPEFT_STORE_DIR": str(self.store),
        }


def saved_tiny_service(root: Path) -> SavedService:
    """The tiny backbone saved as a folder and a store with acme/news trained on it."""
    saved = SavedService(root, root / "backbone", root / "adapters")
    tiny_backbone().save(saved.backbone)
    put(AdapterStore(saved.store), "acme", "news", random_adapter(tiny_backbone(), 1))
    return saved


def base_env(port: int) -> dict[str, str]:
    """The environment every served process gets: loopback, the test keys, offline, cpu."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("CTXPEFT_")},
        "PYTHONPATH": str(REPO),
        "CTXPEFT_HOST": "127.0.0.1",
        "CTXPEFT_PORT": str(port),
        "CTXPEFT_DEVICE": "cpu",
        "CTXPEFT_KEYS": KEYS_JSON,
        "CTXPEFT_LOG_LEVEL": "info",
        "HF_HUB_OFFLINE": "1",
        # One intra-op thread: on a model this small a second one only synchronises, and on
        # a busy machine it spins, making a batch many times slower.
        "OMP_NUM_THREADS": "1",
    }


@dataclass
class ServedProcess:
    process: subprocess.Popen[bytes]
    url: str
    stdout_path: Path
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def output(self) -> str:
        """Both streams, for failure messages."""
        return f"stdout:\n{self.stdout_path.read_text()}\nstderr:\n{self.stderr()}"

    def json_lines(self) -> list[dict[str, Any]]:
        """Every stderr line as a JSON object; fails naming the first line that is not."""
        parsed = []
        for line in self.stderr().splitlines():
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                pytest.fail(f"stderr line is not JSON: {line!r}\n{self.output()}")
            assert isinstance(entry, dict), line
            parsed.append(entry)
        return parsed

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    f"ctxpeft serve exited with {self.process.returncode}:\n{self.output()}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        pytest.fail(f"ctxpeft serve was not ready within {timeout_s} s:\n{self.output()}")

    def wait_for_log(self, msg: str, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until a JSON line with this `msg` is on stderr."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(f'"msg": {json.dumps(msg)}' in line for line in self.stderr().splitlines()):
                return
            if self.process.poll() is not None:
                pytest.fail(
                    f"exited with {self.process.returncode} before {msg!r}:\n{self.output()}"
                )
            time.sleep(0.05)
        pytest.fail(f"no {msg!r} log line within {timeout_s} s:\n{self.output()}")


# Root ignores file permissions (capabilities DAC_OVERRIDE, DAC_READ_SEARCH); without them
# it meets them like any user, as the service's uid 10001 does in the image.
_AS_ROOT_WITHOUT_OVERRIDE = [
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
]


@contextmanager
def serve_process(
    folder: Path,
    env: dict[str, str],
    obey_permissions: bool = False,
    command: list[str] | None = None,
    new_group: bool = False,
) -> Iterator[ServedProcess]:
    """Start `ctxpeft serve` with `env` (on top of base_env's; a port is chosen unless env
    names one), its output in `folder`. `obey_permissions`: file modes bind the process even
    when the tests run as root. `command`: another command line than
    `python -m service.cli serve` (the installed `ctxpeft` with flags, say). `new_group`:
    the process leads a process group of its own (a test signals the group). Killed on
    leaving the block if still running."""
    port = int(env.get("CTXPEFT_PORT") or free_port())
    full_env = {**base_env(port), **env}
    command = command or [sys.executable, "-m", "service.cli", "serve"]
    if obey_permissions and os.geteuid() == 0:
        command = _AS_ROOT_WITHOUT_OVERRIDE + command
    stdout_path, stderr_path = folder / "serve.stdout", folder / "serve.stderr"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        process = subprocess.Popen(
            command, cwd=REPO, env=full_env, stdout=out, stderr=err, start_new_session=new_group
        )
    served = ServedProcess(process, f"http://127.0.0.1:{port}", stdout_path, stderr_path)
    try:
        yield served
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
