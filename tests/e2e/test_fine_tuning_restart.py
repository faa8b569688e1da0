"""A service that stops or dies while a job trains: the job is never left `running`.

- Stopped (the lifespan ends, as on SIGTERM): the worker pauses at its next step, the job is
  queued again, and the next service resumes it exactly there.
- Killed (SIGKILL of `ctxpeft serve`): the worker dies with it (PR_SET_PDEATHSIG), and the next
  service finds the job `running` in the database, queues it again, and resumes it from its
  last epoch checkpoint.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import openai

from adapters.backbone import Backbone
from tests.e2e.conftest import ACME_ADMIN, DemoBuild, running_demo, running_service
from tests.e2e.fine_tuning_helpers import (
    chat_jsonl,
    events,
    metrics,
    wait_status,
    wait_until,
)
from tests.e2e.openai_helpers import sdk
from tests.e2e.serve_process import serve_process

EPOCHS = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 25}}}


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=ACME_ADMIN, max_retries=0, timeout=60)


def _start(client: openai.OpenAI) -> Any:
    upload = client.files.create(
        file=("count.jsonl", chat_jsonl("count", "train", 60, seed=2)), purpose="fine-tune"
    )
    return client.fine_tuning.jobs.create(
        model="demo", training_file=upload.id, method=EPOCHS, seed=0
    )


def _checkpointed(client: openai.OpenAI, job_id: str) -> bool:
    return any(e.message.startswith("Checkpoint saved") for e in events(client, job_id))


def _steps_after(client: openai.OpenAI, job_id: str, marker: str) -> list[int]:
    story = events(client, job_id)
    start = max(i for i, e in enumerate(story) if e.message.startswith(marker))
    return [e.data["step"] for e in story[start:] if e.type == "metrics"]


def test_a_stopped_service_pauses_the_job_and_the_next_one_resumes_it(
    reduced_demo: DemoBuild, tmp_path: Path
) -> None:
    settings = {"jobs_backbone": str(reduced_demo.backbone_dir), "log_level": "warning"}
    with running_demo(reduced_demo, tmp_path, **settings) as first:
        client = sdk(first, ACME_ADMIN)
        job = _start(client)
        wait_until(lambda: _checkpointed(client, job.id), "an epoch checkpoint")
        pid = int((tmp_path / "jobs" / job.id / "worker.pid").read_text())
    # The lifespan ended: the worker paused at a step and exited; nothing is `running`.
    assert not _alive(pid)
    backbone = Backbone.load(reduced_demo.backbone_dir)
    with running_service(
        tmp_path / "adapters", model=backbone, backbone="demo", **settings
    ) as second:
        client = sdk(second, ACME_ADMIN)
        stopped = next(e for e in events(client, job.id) if "The service is stopping" in e.message)
        paused_at = int(stopped.message.split("step ")[1].split(" ")[0])
        done = wait_status(client, job.id, {"succeeded"})
        steps = _steps_after(client, job.id, "Fine-tuning job resumed")
        assert steps and min(steps) > paused_at
        assert metrics(client, job.id)[-1]["step"] == metrics(client, job.id)[-1]["total_steps"]
        assert done.fine_tuned_model in [m.id for m in client.models.list()]


def test_a_killed_service_leaves_no_trainer_and_the_next_one_resumes_the_job(
    reduced_demo: DemoBuild, tmp_path: Path
) -> None:
    store = tmp_path / "adapters"
    shutil.copytree(reduced_demo.store_dir, store)
    env = {
        "CTXPEFT_RUNTIME_DIR": str(tmp_path / "var"),
        "CTXPEFT_BACKBONE": str(reduced_demo.backbone_dir),
        "CTXPEFT_STORE_DIR": str(store),
    }
    (tmp_path / "first").mkdir()
    with serve_process(tmp_path / "first", env) as served:
        served.wait_ready()
        client = _client(served.url)
        job = _start(client)
        wait_until(lambda: _checkpointed(client, job.id), "an epoch checkpoint")
        pid = int((tmp_path / "var" / "jobs" / job.id / "worker.pid").read_text())
        served.process.send_signal(signal.SIGKILL)
        served.process.wait(timeout=30)
    # The kernel killed the worker with its parent: no trainer outlives the service.
    wait_until(lambda: not _alive(pid), "the worker dies with the service")
    (tmp_path / "second").mkdir()
    with serve_process(tmp_path / "second", env) as served:
        served.wait_ready()
        client = _client(served.url)
        done = wait_status(client, job.id, {"succeeded"})
        story = [e.message for e in events(client, job.id)]
        assert any(
            m.startswith(
                "The service restarted while this job ran; it resumes from its last checkpoint"
            )
            for m in story
        ), story
        resumed = _steps_after(client, job.id, "Fine-tuning job resumed")
        assert resumed and min(resumed) > 1  # from the checkpoint, not from step 1
        assert done.fine_tuned_model in [m.id for m in client.models.list()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by a dead parent's reaper) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
