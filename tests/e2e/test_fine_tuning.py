"""Fine-tuning as a service, end to end: the official `openai` SDK against a real server on
the reduced demo backbone; every job trains in a real worker process.

The module's service trains one job once (`trained`, auto hyperparameters on 600 `count`
examples) that several tests read; the others start their own jobs to cancel, pause, kill or
refuse. Waits are on the job's state and events, never on the clock.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types import FileObject as SdkFileObject
from openai.types.fine_tuning import FineTuningJob as SdkJob
from openai.types.fine_tuning import FineTuningJobEvent as SdkEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint as SdkCheckpoint

from tests.e2e.conftest import (
    ACME_ADMIN,
    ACME_CAPTION,
    BETA_ADMIN,
    DemoBuild,
    Service,
    bearer,
    image_file,
    running_demo,
)
from tests.e2e.fine_tuning_helpers import (
    chat_jsonl,
    chat_line,
    coco_zip,
    events,
    examples,
    has_event,
    metrics,
    wait_status,
    wait_until,
)
from tests.e2e.openai_helpers import image_message, sdk

# Exact match of the trained adapter on 40 held-out test images. The reduced demo's encoder
# bounds it: its own public `count` adapter (1,000 images, 375 steps) gets 90% of these 40.
HELD_OUT_FLOOR = 0.8
LONG = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 100}}}


def jobs_settings(demo: DemoBuild, **overrides: Any) -> dict[str, Any]:
    return {"jobs_backbone": str(demo.backbone_dir), "log_level": "warning", **overrides}


@pytest.fixture(scope="module")
def service(reduced_demo: DemoBuild, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    folder = tmp_path_factory.mktemp("fine-tuning")
    settings = jobs_settings(reduced_demo, jobs_max_running=2, jobs_tenant_max_running=2)
    with running_demo(reduced_demo, folder, **settings) as running:
        yield running


@pytest.fixture(scope="module")
def acme(service: Service) -> openai.OpenAI:
    return sdk(service, ACME_ADMIN)


@pytest.fixture(scope="module")
def small_file(acme: openai.OpenAI) -> Any:
    """60 count examples: jobs that are cancelled, paused or killed train on these."""
    return acme.files.create(
        file=("small.jsonl", chat_jsonl("count", "train", 60, seed=1)), purpose="fine-tune"
    )


@pytest.fixture(scope="module")
def trained(acme: openai.OpenAI) -> tuple[Any, Any]:
    """(file, job): 600 count examples, every hyperparameter auto, trained to the end."""
    upload = acme.files.create(
        file=("count-train.jsonl", chat_jsonl("count", "train", 600)), purpose="fine-tune"
    )
    job = acme.fine_tuning.jobs.create(
        model="demo", training_file=upload.id, suffix="count", metadata={"task": "count"}, seed=0
    )
    assert job.status == "validating_files"
    return upload, wait_status(acme, job.id, {"succeeded"})


def caption_chat(client: openai.OpenAI, model: str, image: bytes) -> str:
    completion = client.chat.completions.create(model=model, messages=image_message(image))
    return completion.choices[0].message.content or ""


def worker_pid(service: Service, job_id: str) -> int:
    path = Path(service.settings.runtime_dir) / "jobs" / job_id / "worker.pid"
    return int(path.read_text())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- the whole loop ------------------------------------------------------------------------------
def test_a_job_trains_and_its_model_serves_at_once(
    service: Service, acme: openai.OpenAI, trained: tuple[Any, Any]
) -> None:
    upload, job = trained
    assert job.fine_tuned_model == f"ft-count-{job.id.removeprefix('ftjob-')[:8]}"
    assert job.trained_tokens and job.trained_tokens > 0
    assert job.finished_at and job.error is None
    assert job.hyperparameters.n_epochs >= 2 and job.hyperparameters.batch_size == 8
    assert job.metadata == {"task": "count"}
    assert job.training_file == upload.id and job.organization_id == "acme"

    # The events tell the story in order, the loss goes down, and the last says it serves.
    story = [e.message for e in events(acme, job.id)]
    for first, then in [
        ("Validating training file", "Files validated"),
        ("Files validated", "Fine-tuning job started"),
        ("Fine-tuning job started", "New fine-tuned model created"),
    ]:
        assert _index(story, first) < _index(story, then), story
    assert story[-1].startswith("The job has successfully completed")
    assert job.fine_tuned_model in story[-1] and "/v1/chat/completions" in story[-1]
    steps = [m for m in metrics(acme, job.id) if "valid_loss" in m]
    losses = [m["train_loss"] for m in steps]
    assert len(losses) >= 3 and losses[-1] < losses[0] / 10, losses
    assert all(m["valid_perplexity"] >= 1.0 and m["step"] <= m["total_steps"] for m in steps)
    epochs = [m for m in metrics(acme, job.id) if "full_valid_loss" in m]
    assert len(epochs) == job.hyperparameters.n_epochs
    assert all(m["full_valid_perplexity"] >= 1.0 for m in epochs)

    # Served by both APIs and listed, with the caption the adapter gives.
    assert job.fine_tuned_model in [m.id for m in acme.models.list()]
    held_out = examples("count", "test", 40)
    right = 0
    for image, expected in held_out:
        right += caption_chat(acme, job.fine_tuned_model, image) == expected
    exact_match = right / len(held_out)
    print(f"held-out exact match of {job.fine_tuned_model}: {exact_match:.3f}")
    assert exact_match >= HELD_OUT_FLOOR
    image, expected = held_out[0]
    native = httpx.post(
        f"{service.url}/caption",
        files=image_file(image),
        data={"adapter": job.fine_tuned_model},
        headers=bearer(ACME_ADMIN),
        timeout=60,
    )
    assert native.status_code == 200, native.text
    assert native.json()["caption"] == caption_chat(acme, job.fine_tuned_model, image)

    # The usage ledger counts the job's trained tokens under its adapter (issue 23).
    usage = httpx.get(
        f"{service.url}/v1/usage",
        params={"start_time": job.created_at - 60, "group_by": "adapter"},
        headers=bearer(ACME_ADMIN),
        timeout=30,
    )
    assert usage.status_code == 200, usage.text
    trained_here = sum(
        r["training_tokens"]
        for bucket in usage.json()["data"]
        for r in bucket["results"]
        if r["model"] == f"acme/{job.fine_tuned_model}"
    )
    assert trained_here == job.trained_tokens


def _index(messages: list[str], prefix: str) -> int:
    return next(i for i, m in enumerate(messages) if m.startswith(prefix))


def test_objects_are_the_sdk_types_field_for_field(
    service: Service, trained: tuple[Any, Any]
) -> None:
    """The raw JSON validates against the SDK's own models (their Literals included) and
    carries every field they declare."""
    upload, job = trained
    headers = bearer(ACME_ADMIN)
    base = f"{service.url}/v1"
    checks = [
        (f"{base}/files/{upload.id}", SdkFileObject),
        (f"{base}/fine_tuning/jobs/{job.id}", SdkJob),
    ]
    for url, model in checks:
        body = httpx.get(url, headers=headers).json()
        model.model_validate(body, strict=False)
        assert set(model.model_fields) <= set(body), url
    for path, model in [("events", SdkEvent), ("checkpoints", SdkCheckpoint)]:
        page = httpx.get(f"{base}/fine_tuning/jobs/{job.id}/{path}", headers=headers).json()
        assert page["object"] == "list" and page["data"]
        for item in page["data"]:
            model.model_validate(item)
            assert set(model.model_fields) <= set(item), path
    assert SdkJob.model_fields["status"].annotation is not None


def test_files_can_be_listed_read_back_and_deleted(acme: openai.OpenAI) -> None:
    body = chat_jsonl("colors", "train", 4)
    upload = acme.files.create(file=("colors.jsonl", body), purpose="fine-tune")
    assert upload.bytes == len(body) and upload.status == "processed"
    assert upload.purpose == "fine-tune" and upload.filename == "colors.jsonl"
    assert upload.model_extra and upload.model_extra["training_data"]["examples"] == 4
    assert acme.files.content(upload.id).read() == body
    assert upload.id in [f.id for f in acme.files.list(purpose="fine-tune")]
    deleted = acme.files.delete(upload.id)
    assert deleted.deleted and deleted.id == upload.id
    with pytest.raises(openai.NotFoundError):
        acme.files.retrieve(upload.id)


def test_a_coco_zip_is_a_training_file(acme: openai.OpenAI) -> None:
    upload = acme.files.create(
        file=("captions.zip", coco_zip(examples("count", "train", 6))), purpose="fine-tune"
    )
    assert upload.model_extra and upload.model_extra["training_data"]["format"] == "zip_coco"
    acme.files.delete(upload.id)


# --- refusals -------------------------------------------------------------------------------------
def test_a_bad_file_is_refused_naming_its_lines(acme: openai.OpenAI) -> None:
    (image, caption), *_ = examples("count", "train", 1)
    lines = [
        chat_line(image, caption),
        "{not json",
        chat_line(image, ""),
        '{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": '
        '{"url": "https://example.com/a.png"}}]}, {"role": "assistant", "content": "x"}]}',
        chat_line(b"not an image", caption),
    ]
    with pytest.raises(openai.BadRequestError) as refused:
        acme.files.create(file=("bad.jsonl", "\n".join(lines).encode()), purpose="fine-tune")
    message = refused.value.message
    assert "4 invalid examples" in message
    for number, reason in [(2, "not valid JSON"), (3, "the caption is empty"), (4, "remote image URLs"), (5, "not an image of a known format")]:  # fmt: skip
        assert f"line {number}: {reason}" in message, message
    assert refused.value.code == "invalid_training_file"
    assert "line 1" not in message


def test_rights_and_tenants(service: Service, trained: tuple[Any, Any]) -> None:
    upload, job = trained
    caption_only = sdk(service, ACME_CAPTION)
    with pytest.raises(openai.PermissionDeniedError):
        caption_only.fine_tuning.jobs.create(model="demo", training_file=upload.id)
    assert caption_only.fine_tuning.jobs.retrieve(job.id).id == job.id  # reading is allowed

    beta = sdk(service, BETA_ADMIN)
    for call in (
        lambda: beta.files.retrieve(upload.id),
        lambda: beta.files.content(upload.id),
        lambda: beta.files.delete(upload.id),
        lambda: beta.fine_tuning.jobs.retrieve(job.id),
        lambda: beta.fine_tuning.jobs.list_events(job.id),
        lambda: beta.fine_tuning.jobs.cancel(job.id),
        lambda: beta.chat.completions.create(
            model=job.fine_tuned_model, messages=image_message(examples("count", "test", 1)[0][0])
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError) as refused:
        beta.fine_tuning.jobs.create(model="demo", training_file=upload.id)
    assert refused.value.body["param"] == "training_file"  # type: ignore[index]
    assert job.fine_tuned_model not in [m.id for m in beta.models.list()]
    assert job.id not in [j.id for j in beta.fine_tuning.jobs.list()]


def test_requests_the_service_cannot_honour_are_400(acme: openai.OpenAI, small_file: Any) -> None:
    for kwargs, param in [
        ({"model": "gpt-4o-mini"}, "model"),
        ({"suffix": "no spaces allowed"}, "suffix"),
        ({"method": {"type": "dpo"}}, "method.type"),
        ({"extra_body": {"adapter": {"method": "prefix"}}}, "adapter.method"),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ]:
        values = {"model": "demo", "training_file": small_file.id, **kwargs}
        with pytest.raises(openai.BadRequestError) as refused:
            acme.fine_tuning.jobs.create(**values)
        assert refused.value.body["param"] == param, refused.value.body  # type: ignore[index]


def test_list_queries_take_each_parameter_once(service: Service) -> None:
    """What the schema allows, and nothing else: an unknown or repeated query parameter is a
    400 naming it (schemathesis found `purpose=a&purpose=b` answered 200)."""
    headers = bearer(ACME_ADMIN)
    for path, query, param in [
        ("/v1/files", "purpose=fine-tune&purpose=batch", "purpose"),
        ("/v1/files", "limit=2&limit=3", "limit"),
        ("/v1/fine_tuning/jobs", "after=a&after=b", "after"),
        ("/v1/files", "colour=blue", "colour"),
        ("/v1/usage", "start_time=0&start_time=1", "start_time"),
        ("/v1/usage", "start_time=0&colour=blue", "colour"),
    ]:
        answer = httpx.get(f"{service.url}{path}?{query}", headers=headers, timeout=30)
        assert answer.status_code == 400, (path, query, answer.text)
        assert answer.json()["error"]["param"] == param
    ok = httpx.get(f"{service.url}/v1/files?purpose=fine-tune&limit=2", headers=headers)
    assert ok.status_code == 200 and ok.json()["object"] == "list"
    lists = "start_time=0&group_by=adapter&group_by=key"  # group_by (and tenant) are lists
    ok = httpx.get(f"{service.url}/v1/usage?{lists}", headers=headers)
    assert ok.status_code == 200 and ok.json()["object"] == "page"


# --- cancel, pause and resume, faults --------------------------------------------------------------
def test_cancel_stops_the_job_and_publishes_nothing(
    service: Service, acme: openai.OpenAI, small_file: Any
) -> None:
    job = acme.fine_tuning.jobs.create(model="demo", training_file=small_file.id, method=LONG)
    wait_until(lambda: metrics(acme, job.id), "a first metrics event")
    pid = worker_pid(service, job.id)
    cancelled = acme.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status in ("running", "cancelled")
    job = wait_status(acme, job.id, {"cancelled"})
    assert job.fine_tuned_model is None and job.finished_at
    wait_until(lambda: not alive(pid), "the worker exits")
    steps = metrics(acme, job.id)
    assert steps[-1]["step"] < steps[-1]["total_steps"]  # it stopped long before its end
    assert job.id.removeprefix("ftjob-")[:8] not in " ".join(m.id for m in acme.models.list())
    assert not (service.settings.resolved_store_dir() / "acme" / f"ft-{job.id[6:14]}").exists()
    with pytest.raises(openai.ConflictError):
        acme.fine_tuning.jobs.cancel(job.id)


def test_pause_and_resume_go_on_where_it_paused(
    service: Service, acme: openai.OpenAI, small_file: Any
) -> None:
    method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 30}}}
    job = acme.fine_tuning.jobs.create(model="demo", training_file=small_file.id, method=method)
    wait_until(lambda: metrics(acme, job.id), "a first metrics event")
    acme.fine_tuning.jobs.pause(job.id)
    paused = wait_until(
        lambda: (j := acme.fine_tuning.jobs.retrieve(job.id)).model_extra.get("paused_at") and j,
        "the job pauses",
    )
    assert paused.status == "queued"
    at = next(e for e in events(acme, job.id) if e.message.startswith("Job paused at step"))
    paused_step = int(at.message.split("step ")[1].split(";")[0])
    with pytest.raises(openai.ConflictError):
        acme.fine_tuning.jobs.pause(job.id)
    before = len(metrics(acme, job.id))
    acme.fine_tuning.jobs.resume(job.id)
    done = wait_status(acme, job.id, {"succeeded"})
    after = [m["step"] for m in metrics(acme, job.id)[before:]]
    assert after and min(after) > paused_step  # resumed there, not from the start
    assert after[-1] == metrics(acme, job.id)[-1]["total_steps"]
    assert has_event(acme, job.id, "Fine-tuning job resumed")
    assert done.fine_tuned_model in [m.id for m in acme.models.list()]


def test_a_killed_worker_fails_its_job_and_nothing_else(
    service: Service, acme: openai.OpenAI, small_file: Any, trained: tuple[Any, Any]
) -> None:
    job = acme.fine_tuning.jobs.create(model="demo", training_file=small_file.id, method=LONG)
    wait_until(lambda: metrics(acme, job.id), "a first metrics event")
    os.kill(worker_pid(service, job.id), signal.SIGKILL)
    failed = wait_status(acme, job.id, {"failed"})
    assert failed.error.code == "worker_crashed"
    assert "SIGKILL" in failed.error.message
    assert events(acme, job.id)[-1].level == "error"
    assert httpx.get(f"{service.url}/readyz").status_code == 200
    _, done = trained
    image, expected = examples("count", "test", 1)[0]
    assert caption_chat(acme, done.fine_tuned_model, image) == expected


def test_over_the_memory_bound_the_job_fails_with_its_reason(
    reduced_demo: DemoBuild, tmp_path: Path
) -> None:
    settings = jobs_settings(reduced_demo, jobs_memory_limit_mb=200)
    with running_demo(reduced_demo, tmp_path, **settings) as running:
        client = sdk(running, ACME_ADMIN)
        upload = client.files.create(
            file=("a.jsonl", chat_jsonl("count", "train", 8)), purpose="fine-tune"
        )
        job = client.fine_tuning.jobs.create(model="demo", training_file=upload.id)
        failed = wait_status(client, job.id, {"failed"})
        assert failed.error.code == "memory_limit", failed.error
        assert "200 MiB" in failed.error.message and "jobs_memory_limit_mb" in failed.error.message
        assert httpx.get(f"{running.url}/readyz").status_code == 200


def test_over_the_limits_429_with_retry_after(reduced_demo: DemoBuild, tmp_path: Path) -> None:
    budget = 2_000
    settings = jobs_settings(
        reduced_demo, jobs_tenant_max_queued=0, jobs_tenant_tokens_per_day=budget
    )
    with running_demo(reduced_demo, tmp_path, **settings) as running:
        client = sdk(running, ACME_ADMIN)
        upload = client.files.create(
            file=("a.jsonl", chat_jsonl("count", "train", 20)), purpose="fine-tune"
        )
        per_epoch = upload.model_extra["training_data"]["tokens_per_epoch"]  # type: ignore[index]
        assert per_epoch == 20 * 3  # "one shape", "two shapes": 2 words + the end token
        job_epoch = 18 * 3  # a job holds 2 of the 20 images out for validation

        # A job alone over the daily budget can never run: 400, not 429.
        with pytest.raises(openai.BadRequestError) as too_big:
            client.fine_tuning.jobs.create(
                model="demo", training_file=upload.id,
                hyperparameters={"n_epochs": budget // job_epoch + 1},
            )  # fmt: skip
        assert too_big.value.code == "too_many_tokens"

        first = client.fine_tuning.jobs.create(
            model="demo", training_file=upload.id, hyperparameters={"n_epochs": 10}
        )
        with pytest.raises(openai.RateLimitError) as queue:  # one may run, none may wait
            client.fine_tuning.jobs.create(
                model="demo", training_file=upload.id, hyperparameters={"n_epochs": 2}
            )
        assert queue.value.code == "too_many_jobs"
        assert int(queue.value.response.headers["retry-after"]) >= 1

        # What the first job trained counts for 24 hours: a job that does not fit with it is
        # 429 with a Retry-After until the first leaves the window.
        trained = wait_status(client, first.id, {"succeeded"}).trained_tokens
        assert trained == 10 * job_epoch
        epochs = (budget - trained) // job_epoch + 1
        with pytest.raises(openai.RateLimitError) as spent:
            client.fine_tuning.jobs.create(
                model="demo", training_file=upload.id, hyperparameters={"n_epochs": epochs}
            )
        assert spent.value.code == "token_budget_exceeded"
        assert 23 * 3600 < int(spent.value.response.headers["retry-after"]) <= 24 * 3600
        fits = client.fine_tuning.jobs.create(
            model="demo", training_file=upload.id, hyperparameters={"n_epochs": epochs - 1}
        )
        client.fine_tuning.jobs.cancel(fits.id)


# --- the command line -----------------------------------------------------------------------------
def test_the_jobs_command(
    service: Service, tmp_path: Path, capsys: pytest.CaptureFixture[str], trained: tuple[Any, Any]
) -> None:
    from service.cli import main

    remote = ["--url", service.url, "--api-key", ACME_ADMIN]
    data = tmp_path / "train.jsonl"
    data.write_bytes(chat_jsonl("count", "train", 20, seed=3))
    code = main(
        ["jobs", "create", str(data), *remote, "--suffix", "cli", "--epochs", "2", "--wait"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "uploaded train.jsonl as file-" in out and "20 examples" in out
    assert "2 epochs, batch size 8" in out
    assert "Fine-tuning job started" in out and "The job has successfully completed" in out
    job_id = out.split("created ")[1].split(" ")[0]

    assert main(["jobs", "list", *remote, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert job_id in [j["id"] for j in listed["data"]]
    assert main(["jobs", "show", job_id, *remote]) == 0
    shown = capsys.readouterr().out
    assert "status:         succeeded" in shown and "fine-tuned:     ft-cli-" in shown
    assert main(["jobs", "events", job_id, *remote]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "Validating training file" in lines[0] and "successfully completed" in lines[-1]
    assert main(["jobs", "cancel", job_id, *remote]) == 1  # it has ended: 409
    assert "job_not_cancellable" in capsys.readouterr().err
    assert main(["jobs", "show", "ftjob-0000", *remote]) == 3
    assert main(["jobs", "show", trained[1].id, "--url", service.url, "--api-key", BETA_ADMIN]) == 3
    assert main(["jobs", "create", "nothing-here", *remote]) == 2
