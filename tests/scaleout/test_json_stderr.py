"""Every stderr line of `ctxpeft serve --ray` is JSON (service.scaleout.json_stderr), checked in
a child process whose fd 2 is the test's pipe: lines written to the file descriptor itself
(as Ray's C++ core worker writes them), a raw print, Ray's own Python loggers and ours."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.scaleout.conftest import ROOT

SCRIPT = r"""
import logging, os, sys
from service.logging import configure_logging
from service.scaleout.json_stderr import JsonStderr, route_ray_loggers

configure_logging("info")
ray_logger = logging.getLogger("ray.serve")  # as Ray installs it: its own plain handler
ray_logger.addHandler(logging.StreamHandler(sys.stderr))
ray_logger.propagate = False
ray_logger.setLevel(logging.INFO)
with JsonStderr():
    route_ray_loggers()
    logging.getLogger("service.serve").info("ours", extra={"n": 1})
    os.write(2, b"[2026-01-01 10:00:00,000 E 12 34] rpc_client.h:204: Failed to connect to GCS\n")
    os.write(2, b"2026-01-01 10:00:00,000\tINFO worker.py:2038 -- Started a local Ray instance.\n")
    ray_logger.info("Deployed app 'ctxpeft' successfully.")
    ray_logger.warning("The new client HTTP config differs")
    print("a raw print", file=sys.stderr)
    os.write(2, b"unfinished")
logging.getLogger("service.serve").info("after")
"""


def test_every_line_comes_out_as_one_json_object_with_its_level() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines()]  # each line is JSON
    got = [(e["level"], e["logger"], e["msg"]) for e in lines]
    assert got == [
        ("info", "service.serve", "ours"),
        (
            "error",
            "stderr",
            "[2026-01-01 10:00:00,000 E 12 34] rpc_client.h:204: Failed to connect to GCS",
        ),
        (
            "info",
            "stderr",
            "2026-01-01 10:00:00,000\tINFO worker.py:2038 -- Started a local Ray instance.",
        ),
        # Ray's INFO is dropped (our own lines say it), its WARNING goes through our handler.
        ("warning", "ray.serve", "The new client HTTP config differs"),
        ("warning", "stderr", "a raw print"),
        ("warning", "stderr", "unfinished"),
        ("info", "service.serve", "after"),
    ], got
    assert lines[0]["n"] == 1
