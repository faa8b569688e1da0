"""A job's progress, from its worker's `events.jsonl` into the database.

    reader = EventReader(jobs, root)
    records = reader.ingest(job)     # the new complete lines: events, status, checkpoints

The worker appends one JSON record a line (service.jobs.worker). The reader reads from the
offset stored with the job, and inserts the events it makes of them together with the new
offset and the job's changes in one transaction: a line is never read twice, across restarts
too. Records: `started` (status running), `event` (an event as is), `plan` and `progress`
(tokens trained so far, the estimated finish), `checkpoint` (a checkpoint row), `trained`
(trained tokens); `stopped` and `error` end a worker and are handled by the supervisor.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.jobs import worker as w
from service.jobs.store import Job, JobStore

EventRow = tuple[Any, str, str, dict[str, Any] | None]  # level, message, type, data


# Told about a job's trained tokens once, when its `trained` record is read (usage metering).
TrainedHook = Callable[[Job, int], None]


class EventReader:
    def __init__(self, jobs: JobStore, root: Path, on_trained: TrainedHook | None = None) -> None:
        self.jobs = jobs
        self.root = root
        self.on_trained = on_trained
        # job id -> (total steps, tokens per epoch, first step of this attempt, its start time)
        self._plans: dict[str, tuple[int, int, int, float]] = {}

    def forget(self, job_id: str) -> None:
        self._plans.pop(job_id, None)

    def ingest(self, job: Job) -> list[dict[str, Any]]:
        """Read the new complete lines of the job's events.jsonl into the database; returns
        the records read (the worker's final record, if any, is the last)."""
        path = self.root / job.id / w.EVENTS
        try:
            with open(path, "rb") as handle:
                handle.seek(job.events_offset)
                chunk = handle.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1
        if end == 0:
            return []
        records = []
        for line in chunk[:end].splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        events: list[EventRow] = []
        changes: dict[str, Any] = {"events_offset": job.events_offset + end}
        for record in records:
            self._apply(job, record, events, changes)
        self.jobs.add_events(job.id, events, **changes)
        # After the commit: the line is never read again, so the tokens count once.
        if self.on_trained is not None and "trained_tokens" in changes:
            self.on_trained(job, int(changes["trained_tokens"]))
        return records

    def _apply(
        self,
        job: Job,
        record: dict[str, Any],
        events: list[EventRow],
        changes: dict[str, Any],
    ) -> None:
        kind = record.get("kind")
        now = int(time.time())
        if kind == "started":
            if job.status == "queued":
                changes["status"] = "running"
            where = f" (training process {record.get('pid')}, {record.get('where', '')})"
            if job.started_at is None and "started_at" not in changes:
                changes["started_at"] = now
                events.append(("info", f"Fine-tuning job started{where}", "message", None))
            else:
                events.append(("info", f"Fine-tuning job resumed{where}", "message", None))
        elif kind == "event":
            events.append(
                (record["level"], record["message"], record.get("type", "message"), record.get("data"))
            )  # fmt: skip
        elif kind == "plan":
            self._plans[job.id] = (
                int(record["total_steps"]),
                int(record["tokens_per_epoch"]),
                int(record.get("start_step", 0)),
                time.monotonic(),
            )
        elif kind == "progress":
            plan = self._plans.get(job.id)
            if plan is not None:
                total, per_epoch, first, started = plan
                step = int(record["step"])
                epochs = int(job.hyperparameters["n_epochs"])
                changes["tokens_so_far"] = per_epoch * epochs * step // max(total, 1)
                elapsed = time.monotonic() - started
                done_here = max(1, step - first)
                left = (total - step) * elapsed / done_here
                changes["estimated_finish"] = now + math.ceil(left)
        elif kind == "checkpoint":
            self.jobs.add_checkpoint(
                job.id, int(record["step"]), int(record["epoch"]), record.get("metrics") or {}
            )
            events.append(
                ("info", f"Checkpoint saved at step {record['step']} (epoch {record['epoch']})", "message", None)
            )  # fmt: skip
        elif kind == "trained":
            changes["trained_tokens"] = int(record["trained_tokens"])
            events.append(
                (
                    "info",
                    f"Training finished: best epoch {record['best_epoch']} (validation loss "
                    f"{record['best_valid_loss']:.4f}, perplexity "
                    f"{record['best_valid_perplexity']:.4f}); the training process peaked at "
                    f"{record.get('peak_rss_mib', '?')} MiB resident",
                    "message",
                    None,
                )
            )
