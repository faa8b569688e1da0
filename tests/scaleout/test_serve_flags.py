"""`ctxpeft serve` refuses scale-out flags it cannot use, with exit status 2 and one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--replicas", "2"], "--replicas, --cpus-per-replica and --address need --ray"),
        (["--ray", "--replicas", "0"], "--replicas must be at least 1, got 0"),
        (["--ray", "--cpus-per-replica", "0"], "--cpus-per-replica must be positive"),
    ],
)
def test_bad_scale_out_flags_exit_2_with_the_reason(flags: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", *flags],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CTXPEFT_RUNTIME_DIR": "/nonexistent-never-created"},
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
