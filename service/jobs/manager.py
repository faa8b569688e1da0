"""Fine-tuning jobs as the API sees them: create (with its limits), cancel, pause, resume,
and the thread that supervises them.

    manager = JobManager(db, files, root, config, runner, publisher)
    manager.start()                       # recover what a previous run left, then supervise
    job = manager.create(tenant, request) # validating_files
    manager.cancel(tenant, job.id)        # cancelled now, or within one step if it runs
    manager.close()                       # running jobs stop at their next step, resumable

One thread (`ctxpeft-jobs`) runs the supervisor (`service.jobs.supervisor`) every `TICK_S`,
under the manager's lock, which the requests that change a job take too: a transition is
never decided by two threads at once. Reads (a job, its events) take no lock. None of this
runs on the engine's worker thread, and training itself runs in other processes.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.database import Database
from service.jobs.auto import Chosen, resolve
from service.jobs.files import FileNotFound, FileRecord, FileStore
from service.jobs.progress import TrainedHook
from service.jobs.runner import JobRunner
from service.jobs.store import ACTIVE, Job, JobStore, new_job_id
from service.jobs.supervisor import TICK_S, FingerprintSource, JobsConfig, Publisher, Supervisor

log = logging.getLogger(__name__)

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
        model_names: Callable[[], tuple[str, ...]] | None = None,
        on_trained: TrainedHook | None = None,
    ) -> None:
        self.files = files
        self.jobs = JobStore(db)
        self.config = config
        self.runner = runner
        self.supervisor = Supervisor(
            self.jobs, files, root, config, runner, publisher, fingerprint, on_trained
        )
        # What `model` may be: asked at each create (the served backbone's name is known only
        # once the engine has loaded it).
        self.model_names = model_names or (lambda: config.model_names)
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def job_dir(self, job_id: str) -> Path:
        return self.supervisor.job_dir(job_id)

    # --- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            self.supervisor.recover()
        self._thread = threading.Thread(target=self._loop, name="ctxpeft-jobs", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop supervising: running workers are asked to stop at their next step (their
        checkpoint resumes them at the next start), then killed after `shutdown_grace_s`.
        The supervisor's thread does it: the kernel kills a worker whose parent *thread*
        exits (PR_SET_PDEATHSIG), so the thread that started the workers outlives them."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.config.shutdown_grace_s + 30)
        self.runner.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    self.supervisor.tick()
            except Exception:  # the supervisor never dies of one job's problem
                log.exception("fine-tuning supervisor tick failed")
            self._wake.wait(TICK_S)
            self._wake.clear()
        with self._lock:
            self.supervisor.shutdown()

    def wake(self) -> None:
        self._wake.set()

    # --- requests -----------------------------------------------------------------------------
    def create(self, tenant: str, request: CreateJob) -> Job:
        names = self.model_names()
        if request.model not in names:
            raise JobRequestError(
                400,
                "model_not_available",
                f"model {request.model!r} cannot be fine-tuned here: the service serves the "
                f"backbone {names[0]!r}, give it as `model`",
                "model",
            )
        suffix = normalise_suffix(request.suffix)
        training = self._file(tenant, request.training_file, "training_file")
        validation = (
            self._file(tenant, request.validation_file, "validation_file")
            if request.validation_file
            else None
        )
        # What the worker will train on: without a validation file, 10% of the images are
        # held out (service.jobs.worker), and `auto` counts the examples left.
        share = 1.0 if validation else _train_share(training.summary.images)
        examples = max(1, round(training.summary.examples * share))
        try:
            chosen = resolve(
                examples,
                request.n_epochs,  # type: ignore[arg-type]  # int or "auto", checked by the route
                request.batch_size,  # type: ignore[arg-type]
                request.learning_rate_multiplier,  # type: ignore[arg-type]
            )
        except ValueError as error:
            raise JobRequestError(400, "invalid_file", str(error), "training_file") from None
        per_epoch = round((training.summary.tokens_per_epoch or 0) * share)
        estimated = per_epoch * chosen.n_epochs
        seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(3), "big")
        with self._lock:
            self._check_limits(tenant, estimated)
            taken = self.jobs.names_in_use(tenant)
            for _ in range(16):
                job_id = new_job_id()
                name = adapter_name(suffix, job_id.removeprefix("ftjob-")[:8])
                if name not in taken:
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
            if self.supervisor.running(job.id):
                self.supervisor.ask(job.id, "cancel")
                job = self.jobs.update(job.id, control="cancel")
                self.jobs.event(job.id, "Cancellation requested: the job stops at its next step")
            else:
                job = self.supervisor.finish(job, "cancelled", None, "Job cancelled")
        self.wake()
        return job

    def pause(self, tenant: str, job_id: str) -> Job:
        with self._lock:
            job = self.jobs.get(tenant, job_id)
            if job.final or job.paused_at is not None:
                state = "paused" if job.paused_at is not None else job.status
                raise JobRequestError(409, "job_not_pausable", f"job {job_id} is {state}")
            if self.supervisor.running(job.id):
                self.supervisor.ask(job.id, "pause")
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


def _chosen_json(chosen: Chosen) -> dict[str, Any]:
    return {
        "n_epochs": chosen.n_epochs,
        "batch_size": chosen.batch_size,
        "learning_rate_multiplier": chosen.learning_rate_multiplier,
    }


def _train_share(images: int) -> float:
    """The share of a training file's images a job trains on when it holds out its own
    validation images (as service.jobs.worker does: 10%, at least one)."""
    if images < 2:
        return 1.0
    held = min(images - 1, max(1, round(0.1 * images)))
    return (images - held) / images
