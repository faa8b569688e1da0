"""Helpers of the fine-tuning tests: training files as a tenant writes them, and waits on a
job's state (conditions, never the clock: the timeout is only a safety net).

    body = chat_jsonl("count", "train", 120)          # OpenAI vision fine-tuning JSONL
    file = client.files.create(file=("train.jsonl", body), purpose="fine-tune")
    job = wait_status(client, job.id, {"succeeded"})
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Callable, Iterable
from typing import Any

import openai
from PIL import Image

from adapters.data.synthetic import SyntheticCaptions
from tests.e2e.openai_helpers import data_url

JOB_TIMEOUT_S = 600.0  # safety net only: a slow shared machine must not fail a waiting test
FINAL = {"succeeded", "failed", "cancelled"}


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def examples(task: str, split: str, size: int, seed: int = 0) -> list[tuple[bytes, str]]:
    return [(png(image), text) for image, text in SyntheticCaptions(task, split, size, seed)]


def chat_line(image: bytes, caption: str) -> str:
    return json.dumps(
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}}]},
                {"role": "assistant", "content": caption},
            ]
        }
    )  # fmt: skip


def chat_jsonl(task: str, split: str, size: int, seed: int = 0) -> bytes:
    """OpenAI's vision fine-tuning format: one chat (image -> caption) per line."""
    lines = [chat_line(image, text) for image, text in examples(task, split, size, seed)]
    return ("\n".join(lines) + "\n").encode()


def coco_zip(pairs: Iterable[tuple[bytes, str]]) -> bytes:
    """`ctxpeft train`'s COCO captions JSON and its images, zipped."""
    buffer = io.BytesIO()
    images, notes = [], []
    with zipfile.ZipFile(buffer, "w") as archive:
        for index, (image, text) in enumerate(pairs):
            archive.writestr(f"images/{index}.png", image)
            images.append({"id": index, "file_name": f"{index}.png"})
            notes.append({"image_id": index, "caption": text})
        archive.writestr("captions.json", json.dumps({"images": images, "annotations": notes}))
    return buffer.getvalue()


def wait_until(condition: Callable[[], Any], what: str, timeout_s: float = JOB_TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.05)


def wait_status(client: openai.OpenAI, job_id: str, statuses: set[str]) -> Any:
    """Poll the job until its status is one of `statuses`; a final status it was not waiting
    for fails at once (with the job's error)."""

    def reached() -> Any:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        if job.status in FINAL:
            raise AssertionError(f"job ended {job.status} ({job.error}), waited for {statuses}")
        return None

    return wait_until(reached, f"job {job_id} in {statuses}")


def events(client: openai.OpenAI, job_id: str) -> list[Any]:
    """Every event of the job, oldest first (the API lists newest first)."""
    return list(reversed(list(client.fine_tuning.jobs.list_events(job_id, limit=100))))


def metrics(client: openai.OpenAI, job_id: str) -> list[dict[str, Any]]:
    return [e.data for e in events(client, job_id) if e.type == "metrics"]


def has_event(client: openai.OpenAI, job_id: str, text: str) -> bool:
    return any(text in e.message for e in events(client, job_id))
