"""`ctxpeft serve --ray` as a new user meets it, in a child process with a real Ray cluster:

- the README's command, exactly (`ctxpeft serve --ray --replicas 2`, the installed console
  script, the CLI's own defaults; settings only for the port, the test backbone and keys, and
  a short drain), gets ready on this machine, serves, trains a fine-tuning job in the CPUs it
  keeps for jobs, and stops on SIGTERM: exit 0 within
  `drain_timeout_s + STOP_GRACE_S`, one drain, every stderr line JSON, Ray's processes gone;
- a SIGTERM to its whole process group (which stops Ray's own processes too) ends it at once,
  status 0, no 60 s wait for a GCS that is gone;
- flags this machine cannot place fail in seconds, before anything starts, with one line
  naming what was asked and what the cluster has;
- so does a joined cluster (`--address`, a `ray start --head` of 1 CPU) too small for them.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from service.jobs.ray_runner import reserved_cpus
from service.scaleout.sizing import cpus_text
from service.settings import Settings
from tests.e2e.conftest import ACME_ADMIN, bearer, noise_png
from tests.e2e.fine_tuning_helpers import chat_jsonl, examples, wait_status
from tests.e2e.openai_helpers import image_message
from tests.e2e.serve_process import base_env, free_port, saved_tiny_service, serve_process
from tests.scaleout.conftest import ROOT

ray = pytest.importorskip("ray")

README_COMMAND = "ctxpeft serve --ray --replicas 2"
RAY_START_TIMEOUT_S = 240.0  # a cold cluster and 3 Serve replicas on 2 loaded cores (~45 s)
DRAIN_TIMEOUT_S = 5.0
FAIL_FAST_S = 10.0


def ctxpeft() -> list[str]:
    """The installed console script beside this interpreter (what the README runs)."""
    script = Path(sys.executable).with_name("ctxpeft")
    return [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]


def json_lines(stderr: str) -> list[dict[str, Any]]:
    lines = []
    for line in stderr.splitlines():
        if line.strip():
            entry = json.loads(line)  # a line that is not JSON fails the test here
            assert isinstance(entry, dict), line
            lines.append(entry)
    return lines


def test_the_readme_shows_the_command_tested_here() -> None:
    assert f".venv/bin/{README_COMMAND} " in (ROOT / "README.md").read_text()


def test_the_readme_command_gets_ready_with_its_defaults_and_stops_cleanly_on_sigterm(
    tmp_path: Path,
) -> None:
    from service.scaleout import cluster
    from service.scaleout.launch import STOP_GRACE_S

    cpus = cluster.local_cpus()
    saved = saved_tiny_service(tmp_path)
    env = {**saved.env(), "CTXPEFT_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S)}
    command = [*ctxpeft(), *README_COMMAND.split()[1:]]
    with serve_process(tmp_path, env, command=command) as served:
        served.wait_ready(timeout_s=RAY_START_TIMEOUT_S)  # /readyz: the first replica runs
        served.wait_for_log("serving on Ray", timeout_s=RAY_START_TIMEOUT_S)  # and the second
        (plan,) = [e for e in served.json_lines() if e["msg"] == "Ray cluster started"]
        # The defaults fit the machine: the replicas share what the ingress and the
        # fine-tuning jobs' reserve (jobs_max_running x jobs_ray_cpus) leave of it.
        assert plan["replicas"] == 2 and plan["cpus_per_replica_derived"] is True, plan
        assert plan["jobs_cpus"] == reserved_cpus(Settings()) > 0, plan
        used = 2 * plan["cpus_per_replica"] + plan["ingress_cpus"] + plan["jobs_cpus"]
        assert cpus - 0.02 < used <= cpus, plan
        answer = httpx.post(
            f"{served.url}/caption",
            files={"image": ("i.png", noise_png(7), "image/png")},
            data={"adapter": "news"},
            headers=bearer(ACME_ADMIN),
            timeout=120,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["adapter_version"] == 1
        # A fine-tuning job with the defaults finds its CPUs: trains, publishes, is served.
        client = openai.OpenAI(
            base_url=f"{served.url}/v1", api_key=ACME_ADMIN, max_retries=0, timeout=120
        )
        upload = client.files.create(
            file=("t.jsonl", chat_jsonl("count", "train", 16, seed=3)), purpose="fine-tune"
        )
        model = httpx.get(f"{served.url}/info", timeout=30).json()["backbone"]
        method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}}
        job = client.fine_tuning.jobs.create(model=model, training_file=upload.id, method=method)
        job = wait_status(client, job.id, {"succeeded"})
        image, _ = examples("count", "test", 1)[0]
        completion = client.chat.completions.create(
            model=job.fine_tuned_model, messages=image_message(image)
        )
        assert completion.system_fingerprint == f"{job.fine_tuned_model}@v1"
        ray_processes = psutil.Process(served.process.pid).children(recursive=True)
        assert {"gcs_server", "raylet"} <= {p.name() for p in ray_processes}
        served.process.send_signal(signal.SIGTERM)
        # The stated bound (docs/OPERATIONS.md), plus the watchdog's poll and the log flush.
        assert served.process.wait(timeout=DRAIN_TIMEOUT_S + STOP_GRACE_S + 2) == 0
        lines = served.json_lines()  # every stderr line is JSON
    said = [e["msg"] for e in lines]
    assert said.count("drain started") == 1 and said.count("drain finished") == 1, said
    assert said.index("serving on Ray") < said.index("drain started") < said.index("stopped")
    assert [e for e in lines if e["level"] in ("error", "critical")] == [], lines
    assert next(e for e in lines if e["msg"] == "drain finished")["all_finished"] is True
    # The cluster it started went with it.
    _, alive = psutil.wait_procs(ray_processes, timeout=60)
    assert alive == [], alive


def test_a_signal_to_the_whole_process_group_exits_at_once_without_waiting_for_ray(
    tmp_path: Path,
) -> None:
    """`timeout`, `kill -- -PGID` or systemd's default stop signal Ray's own processes (GCS,
    raylet) with ours: nothing is left to drain, and Ray's core worker would wait 60 s for
    the GCS, then exit 1. The process says so and leaves, status 0, within STOP_GRACE_S."""
    from service.scaleout.launch import STOP_GRACE_S

    saved = saved_tiny_service(tmp_path)
    command = [*ctxpeft(), *README_COMMAND.split()[1:]]
    with serve_process(tmp_path, saved.env(), command=command, new_group=True) as served:
        served.wait_ready(timeout_s=RAY_START_TIMEOUT_S)
        os.killpg(served.process.pid, signal.SIGTERM)
        assert served.process.wait(timeout=STOP_GRACE_S) == 0
        lines = served.json_lines()  # every stderr line is JSON
    (left,) = [e for e in lines if e["msg"] == "leaving without waiting for Ray"]
    assert "whole process group" in left["reason"], left


def test_flags_this_machine_cannot_place_fail_in_seconds_before_anything_starts() -> None:
    """More CPUs per replica than the machine has: refused before the other start-up checks
    (the runtime folder here could not even be created) and before Ray starts."""
    from service.scaleout import cluster

    cpus = cluster.local_cpus()
    command = [*ctxpeft(), *README_COMMAND.split()[1:], "--cpus-per-replica", str(cpus)]
    env = {**base_env(free_port()), "CTXPEFT_RUNTIME_DIR": "/nonexistent-never-created"}
    began = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - began
    assert done.returncode == 2, done.stderr
    lines = json_lines(done.stderr)
    (error,) = [e for e in lines if e["level"] == "error"]
    assert error["exit_code"] == 2
    asked = cpus_text(cpus)
    assert error["msg"].startswith(f"cannot place 2 engine replicas of {asked} each"), error
    assert f"the Ray cluster has {asked} (1 node)" in error["msg"]
    assert "Pass --cpus-per-replica" in error["msg"]
    assert "Ray cluster started" not in [e["msg"] for e in lines]
    assert took < FAIL_FAST_S, took


def test_a_joined_cluster_too_small_for_the_flags_is_refused_before_deploying(
    tmp_path: Path,
) -> None:
    """`ray start --head` with 1 CPU, then `ctxpeft serve --ray --address` asking for two
    1-CPU replicas: exit 2 naming the cluster's CPU, and the cluster keeps running, empty."""
    port = free_port()
    ray_env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    ray_start = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block"]
    # Short: Ray's socket paths under it must stay within the 107 bytes allowed.
    ray_tmp = tempfile.mkdtemp(prefix="ray-")
    head = subprocess.Popen(
        [
            *ray_start,
            f"--port={port}",
            "--num-cpus=1",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=false",
            f"--temp-dir={ray_tmp}",
        ],
        env=ray_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_listening(port, head)
        saved = saved_tiny_service(tmp_path)
        command = [*ctxpeft(), "serve", "--ray", "--address", f"127.0.0.1:{port}"]
        env = {
            **base_env(free_port()),
            **saved.env(),
            **{k: v for k, v in ray_env.items() if k.startswith("RAY_")},
        }
        done = subprocess.run(
            [*command, "--replicas", "2", "--cpus-per-replica", "1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 2, done.stderr
        lines = json_lines(done.stderr)
        (error,) = [e for e in lines if e["level"] == "error"]
        assert error["msg"].startswith(
            "cannot place 2 engine replicas of 1 CPU each and the ingress (0.5 CPU) with "
            "fine-tuning jobs (0.5 CPU): the Ray cluster has 1 CPU (1 node), room for 0 such "
            "replicas."
        ), error
        assert head.poll() is None  # the operator's cluster is left as it was
    finally:
        # The whole cluster (ray start, its GCS and raylet; the workers follow the raylet).
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=60)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + RAY_START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, "ray start exited"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"ray start never listened on {port}")
