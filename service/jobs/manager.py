"""The fine-tuning supervisor: creates jobs, runs them one training process each, follows
their events, publishes what they train, and survives restarts.

    manager = JobManager(db, files, config, runner, publisher)
    manager.start()                       # recover what a previous run left, then supervise
    job = manager.create(tenant, request) # validating_files
    manager.cancel(tenant, job.id)        # cancelled now, or within one step if it runs
    manager.close()                       # running jobs stop at their next step, resumable

One thread (`ctxpeft-jobs`) does all the supervising, every `TICK_S`: it checks the files of
jobs in `validating_files`, starts queued jobs while fewer than `max_running` run (oldest
first, at most `tenant_max_running` per tenant), reads the new lines of each running job's
`events.jsonl` into the database, and handles a worker's end (publish, cancel, pause, fail).
The routes only insert jobs and ask for transitions; none of this runs on the engine's worker
thread, and training itself runs in a separate process (`service.jobs.runner`), so a worker
that crashes, is killed or runs out of memory fails its job and nothing else.

Restarts: a job left `running` by a service that stopped (or died) is put back in the queue
and resumes from its last checkpoint (an epoch's end, or where a graceful stop paused it);
after `max_restarts` interruptions it fails with that reason. A worker that outlived its
service (it should not: PR_SET_PDEATHSIG) is found through its lock file and killed first,
so two trainers never run one job.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.database import Database
from service.jobs import worker as w
from service.jobs.auto import Chosen, resolve
from service.jobs.data import DataLimits
from service.jobs.files import FileNotFound, FileRecord, FileStore
from service.jobs.runner import Exit, JobRunner, Launch, WorkerLimits
from service.jobs.store import ACTIVE, Job, JobError, JobStore, new_job_id

log = logging.getLogger(__name__)

TICK_S = 0.2
# What a worker that hit RLIMIT_DATA in native code (no Python exception) leaves on stderr.
_OUT_OF_MEMORY = ("bad_alloc", "Cannot allocate memory", "Memory allocation", "MemoryError",
                  "can't allocate memory", "out of memory")  # fmt: skip
DAY_S = 24 * 3600
SUFFIX_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
_SUFFIX_CHARS = re.compile(r"[^a-z0-9_-]+")


class JobRequestError(ValueError):
    """A create/cancel/pause/resume the service refuses: status, code, param, Retry-After."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.retry_after_s = retry_after_s


class PublishError(Exception):
    """The trained adapter was refused by the store (code, message)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class NotReady(Exception):
    """The engine cannot publish yet (it is loading): try again at the next tick."""


@dataclass(frozen=True)
class JobsConfig:
    """The supervisor's settings (from `Settings`, see service.jobs.service)."""

    backbone: str  # what the worker loads (a saved backbone folder)
    model_names: tuple[str, ...]  # what `model` may be: the served backbone's names
    device: str = "cpu"
    max_running: int = 1
    tenant_max_running: int = 1
    tenant_max_queued: int = 4
    tenant_tokens_per_day: int = 0
    max_restarts: int = 3
    metrics_every: int = 10
    limits: WorkerLimits = field(default_factory=WorkerLimits)
    data_limits: DataLimits = field(default_factory=DataLimits)
    shutdown_grace_s: float = 10.0
    cancel_grace_s: float = 10.0


@dataclass(frozen=True)
class CreateJob:
    """A validated `POST /v1/fine_tuning/jobs` body."""

    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: int | None = None
    metadata: dict[str, str] | None = None
    n_epochs: int | str = "auto"
    batch_size: int | str = "auto"
    learning_rate_multiplier: float | str = "auto"
    adapter: dict[str, Any] = field(default_factory=dict)  # method, contexts, rank, ...


# Publishes a trained version: (tenant, name, config bytes, weights bytes) -> version label.
Publisher = Callable[[str, str, bytes, bytes], str]
# The fingerprint of the served backbone (None while it loads): the worker checks its own.
FingerprintSource = Callable[[], str | None]


def adapter_name(suffix: str | None, short_id: str) -> str:
    """The fine-tuned model's name: `ft-<suffix>-<8 hex of the job id>` (or `ft-<8 hex>`), a
    valid adapter name, so `/caption`, `/v1/chat/completions` and `/v1/models` use it as is."""
    return f"ft-{suffix}-{short_id}" if suffix else f"ft-{short_id}"


def normalise_suffix(suffix: str | None) -> str | None:
    """Lower case; refuse what an adapter name cannot hold (JobRequestError)."""
    if suffix is None or not suffix.strip():
        return None
    value = suffix.strip().lower()
    if not SUFFIX_PATTERN.fullmatch(value):
        bad = sorted(set(_SUFFIX_CHARS.findall(value)))
        detail = f" (not allowed: {bad})" if bad else ""
        raise JobRequestError(
            400,
            "invalid_suffix",
            f"suffix {suffix!r} must be 1-40 characters of a-z, 0-9, '_' and '-' starting with "
            f"a letter or digit{detail}: it becomes part of the model name",
            "suffix",
        )
    return value


class JobManager:
    def __init__(
        self,
        db: Database,
        files: FileStore,
        root: Path,
        config: JobsConfig,
        runner: JobRunner,
        publisher: Publisher,
        fingerprint: FingerprintSource = lambda: None,
    ) -> None:
        self.db = db
        self.files = files
        self.jobs = JobStore(db)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.runner = runner
        self.publisher = publisher
        self.fingerprint = fingerprint
        self._lock = threading.RLock()
        self._launches: dict[str, Launch] = {}
        self._cancel_asked: dict[str, float] = {}
        # job id -> (total steps, tokens per epoch, first step of this attempt, its start time)
        self._plans: dict[str, tuple[int, int, int, float]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            self._recover()
        self._thread = threading.Thread(target=self._loop, name="ctxpeft-jobs", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop supervising: running workers are asked to stop at their next step (their
        checkpoint resumes them at the next start), then killed after `shutdown_grace_s`.
        The supervisor thread does it: the kernel kills a worker whose parent *thread* exits
        (PR_SET_PDEATHSIG), so the thread that started the workers outlives them."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.config.shutdown_grace_s + 30)
        self.runner.close()

    def _shutdown(self) -> None:
        running = dict(self._launches)
        for job_id in running:
            self.jobs.update(job_id, control="shutdown")
            self._write_control(job_id, "pause")
        deadline = time.monotonic() + self.config.shutdown_grace_s
        while running and time.monotonic() < deadline:
            for job_id, launch in list(running.items()):
                ended = launch.poll()
                if ended is not None:
                    self._ended(self.jobs.get_any(job_id), ended)
                    del running[job_id]
            time.sleep(0.05)
        for job_id, launch in running.items():
            launch.kill()
            ended = _wait(launch, 5.0)
            self._ingest(self.jobs.get_any(job_id))
            self._requeue(
                self.jobs.get_any(job_id),
                "The service stopped before the training process could pause; the job "
                "resumes from its last checkpoint when the service starts again",
                count=False,
            )
            self._launches.pop(job_id, None)
            log.info("job worker killed at shutdown", extra={"job": job_id, "exit": str(ended)})

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    self._tick()
            except Exception:  # the supervisor never dies of one job's problem
                log.exception("fine-tuning supervisor tick failed")
            self._wake.wait(TICK_S)
            self._wake.clear()
        with self._lock:
            self._shutdown()

    def wake(self) -> None:
        self._wake.set()

    # --- requests -----------------------------------------------------------------------------
    def create(self, tenant: str, request: CreateJob) -> Job:
        if request.model not in self.config.model_names:
            raise JobRequestError(
                400,
                "model_not_available",
                f"model {request.model!r} cannot be fine-tuned here: the service serves the "
                f"backbone {self.config.model_names[0]!r}, give it as `model`",
                "model",
            )
        suffix = normalise_suffix(request.suffix)
        training = self._file(tenant, request.training_file, "training_file")
        validation = (
            self._file(tenant, request.validation_file, "validation_file")
            if request.validation_file
            else None
        )
        examples = training.summary.examples
        try:
            chosen = resolve(
                examples,
                request.n_epochs,  # type: ignore[arg-type]  # int or "auto", checked by the route
                request.batch_size,  # type: ignore[arg-type]
                request.learning_rate_multiplier,  # type: ignore[arg-type]
            )
        except ValueError as error:
            raise JobRequestError(400, "invalid_file", str(error), "training_file") from None
        per_epoch = training.summary.tokens_per_epoch or 0
        estimated = per_epoch * chosen.n_epochs
        seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(3), "big")
        with self._lock:
            self._check_limits(tenant, estimated)
            names = self.jobs.names_in_use(tenant)
            for _ in range(16):
                job_id = new_job_id()
                name = adapter_name(suffix, job_id.removeprefix("ftjob-")[:8])
                if name not in names:
                    break
            now = int(time.time())
            job = Job(
                id=job_id,
                tenant=tenant,
                seq=0,
                model=request.model,
                training_file=training.id,
                validation_file=validation.id if validation else None,
                training_sha256=training.sha256,
                validation_sha256=validation.sha256 if validation else None,
                status="validating_files",
                created_at=now,
                started_at=None,
                finished_at=None,
                error=None,
                adapter_name=name,
                fine_tuned_model=None,
                suffix=suffix,
                seed=seed,
                metadata=request.metadata,
                hyperparameters=_chosen_json(chosen),
                requested={
                    "n_epochs": request.n_epochs,
                    "batch_size": request.batch_size,
                    "learning_rate_multiplier": request.learning_rate_multiplier,
                },
                adapter=request.adapter,
                estimated_tokens=estimated,
                trained_tokens=None,
                tokens_so_far=0,
                control=None,
                paused_at=None,
                attempts=0,
                events_offset=0,
                estimated_finish=None,
            )
            job = self.jobs.insert(job)
            self.jobs.event(job.id, f"Validating training file: {training.id}")
            auto = [k for k, v in job.requested.items() if v == "auto"]
            if auto:
                self.jobs.event(
                    job.id,
                    f"auto hyperparameters for {examples} examples: n_epochs {chosen.n_epochs}, "
                    f"batch_size {chosen.batch_size}, learning_rate_multiplier "
                    f"{chosen.learning_rate_multiplier:g} (learning rate {chosen.lr:g}, "
                    f"{chosen.steps(examples)} steps)",
                    data={"auto": auto, **_chosen_json(chosen)},
                )
            for warning in training.summary.warnings:
                self.jobs.event(job.id, f"training_file: {warning}", level="warn")
        self.wake()
        return job

    def _file(self, tenant: str, file_id: str, param: str) -> FileRecord:
        try:
            record = self.files.get(tenant, file_id)
        except FileNotFound:
            raise JobRequestError(
                400, "invalid_file", f"{param}: no file {file_id!r} (upload it first)", param
            ) from None
        if record.purpose != "fine-tune":
            raise JobRequestError(
                400,
                "invalid_file",
                f"{param}: file {file_id!r} has purpose {record.purpose!r}, not 'fine-tune'",
                param,
            )
        return record

    def _check_limits(self, tenant: str, estimated: int) -> None:
        config = self.config
        waiting = [j for j in self.jobs.with_status(*ACTIVE) if j.tenant == tenant]
        if len(waiting) >= config.tenant_max_running + config.tenant_max_queued:
            raise JobRequestError(
                429,
                "too_many_jobs",
                f"this tenant already has {len(waiting)} jobs validating, queued or running; "
                f"the limit is {config.tenant_max_running + config.tenant_max_queued} "
                "(jobs_tenant_max_running + jobs_tenant_max_queued): wait for one to finish, "
                "or cancel one",
                retry_after_s=self._retry_after(waiting),
            )
        budget = config.tenant_tokens_per_day
        if not budget:
            return
        if estimated > budget:
            raise JobRequestError(
                400,
                "too_many_tokens",
                f"this job would train {estimated} tokens, more than the tenant's daily budget "
                f"of {budget} (jobs_tenant_tokens_per_day): use fewer examples or epochs",
                "training_file",
            )
        now = int(time.time())
        spent = self.jobs.tokens_since(tenant, now - DAY_S)
        used = sum(tokens for _, tokens in spent)
        if used + estimated <= budget:
            return
        # The oldest jobs leave the 24-hour window first: wait until enough have left.
        freed, wait = 0, DAY_S
        for created, tokens in spent:
            freed += tokens
            if used - freed + estimated <= budget:
                wait = created + DAY_S - now
                break
        raise JobRequestError(
            429,
            "token_budget_exceeded",
            f"this job would train {estimated} tokens; the tenant has trained or queued {used} "
            f"of its {budget} in the last 24 hours (jobs_tenant_tokens_per_day)",
            retry_after_s=max(1, wait),
        )

    def _retry_after(self, waiting: list[Job]) -> float:
        """When a place is likely to free: the soonest estimated finish, else a minute."""
        finishes = [j.estimated_finish for j in waiting if j.estimated_finish]
        if finishes:
            return max(1.0, min(finishes) - time.time())
        return 60.0

    def cancel(self, tenant: str, job_id: str) -> Job:
        with self._lock:
            job = self.jobs.get(tenant, job_id)
            if job.final:
                raise JobRequestError(
                    409, "job_not_cancellable", f"job {job_id} has already {job.status}"
                )
            if job.id in self._launches:
                self._cancel_asked[job.id] = time.monotonic()
                self._write_control(job.id, "cancel")
                job = self.jobs.update(job.id, control="cancel")
                self.jobs.event(job.id, "Cancellation requested: the job stops at its next step")
            else:
                job = self._finish(job, "cancelled", None, "Job cancelled")
        self.wake()
        return job

    def pause(self, tenant: str, job_id: str) -> Job:
        with self._lock:
            job = self.jobs.get(tenant, job_id)
            if job.final or job.paused_at is not None:
                state = "paused" if job.paused_at is not None else job.status
                raise JobRequestError(409, "job_not_pausable", f"job {job_id} is {state}")
            if job.id in self._launches:
                self._write_control(job.id, "pause")
                job = self.jobs.update(job.id, control="pause")
                self.jobs.event(job.id, "Pause requested: the job pauses at its next step")
            else:
                job = self.jobs.update(job.id, paused_at=int(time.time()))
                self.jobs.event(job.id, "Job paused before it started; resume it to start it")
        self.wake()
        return job

    def resume(self, tenant: str, job_id: str) -> Job:
        with self._lock:
            job = self.jobs.get(tenant, job_id)
            if job.paused_at is None or job.final:
                raise JobRequestError(
                    409, "job_not_paused", f"job {job_id} is {job.status}, not paused"
                )
            job = self.jobs.update(job.id, paused_at=None, control=None)
            self.jobs.event(job.id, "Job resumed: it is queued and goes on where it paused")
        self.wake()
        return job

    def get(self, tenant: str, job_id: str) -> Job:
        return self.jobs.get(tenant, job_id)

    # --- the supervisor's work ----------------------------------------------------------------
    def _tick(self) -> None:
        for job in self.jobs.with_status("validating_files"):
            self._validate(job)
        for job_id, launch in list(self._launches.items()):
            job = self.jobs.get_any(job_id)
            self._ingest(job)
            ended = launch.poll()
            if ended is not None:
                self._ended(self.jobs.get_any(job_id), ended)
                continue
            asked = self._cancel_asked.get(job_id)
            if asked is not None and time.monotonic() - asked > self.config.cancel_grace_s:
                launch.kill()  # not at a step boundary in time (e.g. still encoding)
        self._publish_pending()
        self._dispatch()

    def _validate(self, job: Job) -> None:
        for param, sha in (("training_file", job.training_sha256), ("validation_file", job.validation_sha256)):  # fmt: skip
            if sha is None:
                continue
            if _sha256(self.files.blob(sha)) != sha:
                self._finish(
                    job,
                    "failed",
                    JobError(
                        "invalid_file",
                        f"the {param} was deleted or changed before the job started",
                        param,
                    ),
                    "Job failed: its file is gone",
                )
                return
        self.jobs.update(job.id, status="queued")
        self.jobs.event(job.id, "Files validated, moving job to queued state")

    def _dispatch(self) -> None:
        if self._stop.is_set():
            return
        running = {job_id: self.jobs.get_any(job_id).tenant for job_id in self._launches}
        for job in self.jobs.with_status("queued"):
            if len(running) >= self.config.max_running:
                return
            if job.paused_at is not None or job.id in self._launches:
                continue
            if list(running.values()).count(job.tenant) >= self.config.tenant_max_running:
                continue
            self._start(job)
            running[job.id] = job.tenant

    def _start(self, job: Job) -> None:
        folder = self.job_dir(job.id)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / w.CONTROL).unlink(missing_ok=True)
        spec = {
            "job_id": job.id,
            "backbone": self.config.backbone,
            "fingerprint": self.fingerprint(),
            "device": self.config.device,
            "training_file": str(self.files.blob(job.training_sha256)),
            "validation_file": (
                str(self.files.blob(job.validation_sha256)) if job.validation_sha256 else None
            ),
            "options": _train_options(job),
            "metrics_every": self.config.metrics_every,
            "limits": {
                "max_examples": self.config.data_limits.max_examples,
                "max_image_pixels": self.config.data_limits.max_image_pixels,
                "max_image_side": self.config.data_limits.max_image_side,
                "formats": sorted(self.config.data_limits.formats),
                "max_unzipped_bytes": self.config.data_limits.max_unzipped_bytes,
                "max_zip_members": self.config.data_limits.max_zip_members,
            },
        }
        (folder / w.SPEC).write_text(json.dumps(spec, indent=2))
        try:
            launch = self.runner.start(folder, self.config.limits)
        except Exception as error:
            log.exception("cannot start a training process", extra={"job": job.id})
            self._finish(
                job,
                "failed",
                JobError("worker_start_failed", f"the training process did not start: {error}"),
                "Job failed: the training process did not start",
            )
            return
        self._launches[job.id] = launch

    def job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    def _write_control(self, job_id: str, action: str) -> None:
        folder = self.job_dir(job_id)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{w.CONTROL}.tmp"
        tmp.write_text(action)
        os.replace(tmp, folder / w.CONTROL)

    # --- events -------------------------------------------------------------------------------
    def _ingest(self, job: Job) -> list[dict[str, Any]]:
        """Read the new complete lines of the job's events.jsonl into the database; returns
        the records read (the worker's final record, if any, is the last)."""
        path = self.job_dir(job.id) / w.EVENTS
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
        events: list[tuple[Any, str, str, dict[str, Any] | None]] = []
        changes: dict[str, Any] = {"events_offset": job.events_offset + end}
        for record in records:
            self._apply(job, record, events, changes)
        self.jobs.add_events(job.id, events, **changes)
        return records

    def _apply(
        self,
        job: Job,
        record: dict[str, Any],
        events: list[tuple[Any, str, str, dict[str, Any] | None]],
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

    # --- a worker's end -----------------------------------------------------------------------
    def _ended(self, job: Job, ended: Exit) -> None:
        self._ingest(job)
        self._launches.pop(job.id, None)
        self._plans.pop(job.id, None)
        asked_cancel = self._cancel_asked.pop(job.id, None) is not None
        job = self.jobs.get_any(job.id)
        last = _last_final(self.job_dir(job.id)) or {}
        kind = last.get("kind")
        if kind == "trained" and ended.returncode == 0 and job.control != "cancel":
            self._publish(job)
        elif asked_cancel or job.control == "cancel":
            self._finish(job, "cancelled", None, "Job cancelled")
        elif kind == "stopped" and job.control == "shutdown":
            self._requeue(
                job,
                f"The service is stopping: the job paused at step {last['step']} and resumes "
                "there when the service starts again",
                count=False,
            )
        elif kind == "stopped":
            self.jobs.update(job.id, status="queued", paused_at=int(time.time()), control=None)
            self.jobs.event(
                job.id, f"Job paused at step {last['step']}; resume it to go on from there"
            )
        elif kind == "error" and not ended.killed_for:
            error = JobError(last["code"], last["message"], last.get("param"))
            self._finish(job, "failed", error, f"Job failed: {error.message}", level="error")
        else:
            tail = _log_tail(self.job_dir(job.id) / "worker.log") if not ended.killed_for else ""
            out_of_memory = bool(ended.killed_for) or any(m in tail for m in _OUT_OF_MEMORY)
            code = "memory_limit" if out_of_memory else "worker_crashed"
            message = ended.describe()
            if out_of_memory and not ended.killed_for:
                limit = self.config.limits.memory_bytes >> 20
                message = (
                    f"the training process ran out of memory under the job memory bound of "
                    f"{limit} MiB (jobs_memory_limit_mb) and {message.removeprefix('the training process ')}"
                )
            if tail:
                message += f"; its last output: {tail}"
            self._finish(
                job, "failed", JobError(code, message), f"Job failed: {message}", level="error"
            )

    def _requeue(self, job: Job, message: str, count: bool = True) -> None:
        """Back to the queue; `count`: an interruption (a restart while it ran), of which a
        job survives `max_restarts`."""
        attempts = job.attempts + (1 if count else 0)
        if attempts > self.config.max_restarts:
            self._finish(
                job,
                "failed",
                JobError(
                    "restart_limit",
                    f"the service restarted {attempts} times while this job ran; it is not "
                    f"started again (jobs_max_restarts = {self.config.max_restarts})",
                ),
                "Job failed: interrupted by too many restarts",
                level="error",
            )
            return
        self.jobs.update(
            job.id, status="queued", control=None, estimated_finish=None, attempts=attempts
        )
        self.jobs.event(job.id, message, level="warn")

    def _publish_pending(self) -> None:
        """Jobs whose worker finished but whose adapter could not be published yet (the
        engine was loading): publish them now."""
        for job in self.jobs.with_status("running"):
            if job.id in self._launches:
                continue
            last = _last_final(self.job_dir(job.id))
            if last is not None and last.get("kind") == "trained":
                self._publish(job)

    def _publish(self, job: Job) -> None:
        folder = self.job_dir(job.id) / w.RESULT
        try:
            config = (folder / "adapter_config.json").read_bytes()
            weights = (folder / "adapter.safetensors").read_bytes()
        except OSError as error:
            self._finish(
                job,
                "failed",
                JobError("result_missing", f"the trained adapter cannot be read: {error}"),
                "Job failed: the trained adapter is missing",
                level="error",
            )
            return
        try:
            label = self.publisher(job.tenant, job.adapter_name, config, weights)
        except NotReady:
            if job.status != "running":
                self.jobs.update(job.id, status="running")
            return
        except PublishError as error:
            self._finish(
                job,
                "failed",
                JobError(error.code, f"the trained adapter was not published: {error.message}"),
                f"Job failed: the trained adapter was refused ({error.message})",
                level="error",
            )
            return
        name = job.adapter_name
        self.jobs.event(job.id, f"New fine-tuned model created: {name} ({label})")
        self._finish(
            job,
            "succeeded",
            None,
            f"The job has successfully completed: {name} is served now (POST /caption with "
            f"adapter={name}, or /v1/chat/completions with model={name})",
            fine_tuned_model=name,
        )

    def _finish(
        self,
        job: Job,
        status: str,
        error: JobError | None,
        message: str,
        level: Any = "info",
        **changes: Any,
    ) -> Job:
        self.jobs.add_events(
            job.id,
            [(level, message, "message", None)],
            status=status,
            error=error,
            finished_at=int(time.time()),
            control=None,
            paused_at=None,
            estimated_finish=None,
            **changes,
        )
        folder = self.job_dir(job.id)
        (folder / w.CHECKPOINT).unlink(missing_ok=True)
        shutil.rmtree(folder / w.RESULT, ignore_errors=True)
        try:
            self.files.collect(self.jobs.active_shas())
        except OSError:
            log.exception("removing unused training files failed")
        return self.jobs.get_any(job.id)

    # --- restart ------------------------------------------------------------------------------
    def _recover(self) -> None:
        for job in self.jobs.with_status("running"):
            _stop_orphan(self.job_dir(job.id))
            self._ingest(job)
            job = self.jobs.get_any(job.id)
            last = _last_final(self.job_dir(job.id)) or {}
            kind = last.get("kind")
            if job.control == "cancel":
                self._finish(job, "cancelled", None, "Job cancelled")
            elif kind == "trained":
                continue  # published by the first tick (_publish_pending)
            elif kind == "error":
                error = JobError(last["code"], last["message"], last.get("param"))
                self._finish(job, "failed", error, f"Job failed: {error.message}", level="error")
            elif job.control == "pause" or (kind == "stopped" and job.control != "shutdown"):
                self.jobs.update(job.id, status="queued", paused_at=int(time.time()), control=None)
                self.jobs.event(job.id, "Job paused; resume it to go on from its checkpoint")
            elif kind == "stopped":
                self._requeue(
                    job, "The service restarted; the job resumes where it paused", count=False
                )
            else:
                has_checkpoint = (self.job_dir(job.id) / w.CHECKPOINT).is_file()
                where = "from its last checkpoint" if has_checkpoint else "from the start"
                self._requeue(
                    job,
                    f"The service restarted while this job ran; it resumes {where}",
                )


def _wait(launch: Launch, timeout_s: float) -> Exit | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ended = launch.poll()
        if ended is not None:
            return ended
        time.sleep(0.05)
    return None


def _stop_orphan(folder: Path) -> None:
    """Kill a worker of this job that outlived its service (found by its held lock)."""
    lock_path = folder / w.LOCK
    if not lock_path.exists():
        return
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        with contextlib.suppress(OSError, ValueError):
            os.kill(int((folder / w.PID).read_text()), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                time.sleep(0.05)


def _last_final(folder: Path) -> dict[str, Any] | None:
    """The worker's last record if it is a final one (trained, stopped, error)."""
    try:
        with open(folder / w.EVENTS, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 65536))
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("kind") in ("started",):
            return None
        if record.get("kind") in ("trained", "stopped", "error"):
            return dict(record)
    return None


def _log_tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _sha256(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


def _chosen_json(chosen: Chosen) -> dict[str, Any]:
    return {
        "n_epochs": chosen.n_epochs,
        "batch_size": chosen.batch_size,
        "learning_rate_multiplier": chosen.learning_rate_multiplier,
    }


def _train_options(job: Job) -> dict[str, Any]:
    from service.jobs.auto import BASE_LEARNING_RATE

    hp = job.hyperparameters
    adapter = job.adapter
    options: dict[str, Any] = {
        "method": adapter.get("method", "lora"),
        "contexts": adapter.get("contexts", "specific"),
        "rank": int(adapter.get("rank", 8)),
        "alpha": adapter.get("alpha"),
        "targets": adapter.get("targets", "all"),
        "epochs": int(hp["n_epochs"]),
        "batch_size": int(hp["batch_size"]),
        "lr": BASE_LEARNING_RATE * float(hp["learning_rate_multiplier"]),
        "schedule": "cosine",
        "seed": job.seed,
        "description": f"fine-tuning job {job.id}",
    }
    return options
