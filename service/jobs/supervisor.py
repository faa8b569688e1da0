"""The fine-tuning supervisor: runs each job in a training process of its own, follows its
events, publishes what it trains, and recovers what a previous service left.

    supervisor = Supervisor(jobs, files, root, config, runner, publisher)
    supervisor.recover()        # at start-up: jobs a stopped or killed service left running
    supervisor.tick()           # every TICK_S, on the manager's thread (service.jobs.manager)
    supervisor.shutdown()       # running jobs pause at their next step, resumable

A tick checks the files of jobs in `validating_files`, reads the new lines of each running
job's `events.jsonl` into the database (`service.jobs.progress`), handles a worker's end
(publish, cancel, pause, fail), and starts queued jobs while fewer than `max_running` run
(oldest first, at most `tenant_max_running` per tenant). Training runs in a separate process
(`service.jobs.runner`), so a worker that crashes, is killed or runs out of memory fails its
job and nothing else.

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
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.jobs import worker as w
from service.jobs.data import DataLimits
from service.jobs.files import FileStore
from service.jobs.progress import EventReader, TrainedHook
from service.jobs.runner import Exit, JobRunner, Launch, WorkerLimits
from service.jobs.store import Job, JobError, JobStore

log = logging.getLogger(__name__)

TICK_S = 0.2
NOT_STARTED_S = 60.0
# What a worker that hit RLIMIT_DATA in native code (no Python exception) leaves on stderr.
_OUT_OF_MEMORY = ("bad_alloc", "Cannot allocate memory", "Memory allocation", "MemoryError",
                  "can't allocate memory", "out of memory")  # fmt: skip


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


# Publishes a trained version: (tenant, name, config bytes, weights bytes) -> version label.
Publisher = Callable[[str, str, bytes, bytes], str]
# The fingerprint of the served backbone (None while it loads): the worker checks its own.
FingerprintSource = Callable[[], str | None]


class Supervisor:
    """Owns the running workers; every method runs on the manager's thread under its lock."""

    def __init__(
        self,
        jobs: JobStore,
        files: FileStore,
        root: Path,
        config: JobsConfig,
        runner: JobRunner,
        publisher: Publisher,
        fingerprint: FingerprintSource,
        on_trained: TrainedHook | None = None,
    ) -> None:
        self.jobs = jobs
        self.files = files
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.runner = runner
        self.publisher = publisher
        self.fingerprint = fingerprint
        self.events = EventReader(jobs, self.root, on_trained)
        self.stopping = False
        self._launches: dict[str, Launch] = {}
        self._cancel_asked: dict[str, float] = {}
        self._launched_at: dict[str, float] = {}  # until the worker says it started

    def running(self, job_id: str) -> bool:
        """Whether a worker of this job is alive (started by this supervisor)."""
        return job_id in self._launches

    def ask(self, job_id: str, action: str) -> None:
        """Tell a running job's worker to "cancel" or "pause" at its next step; a cancel it
        does not honour within `cancel_grace_s` (still loading or encoding) is a kill."""
        if action == "cancel":
            self._cancel_asked[job_id] = time.monotonic()
        self.write_control(job_id, action)

    def tick(self) -> None:
        for job in self.jobs.with_status("validating_files"):
            self._validate(job)
        for job_id, launch in list(self._launches.items()):
            job = self.jobs.get_any(job_id)
            self.events.ingest(job)
            ended = launch.poll()
            if ended is not None:
                self._ended(self.jobs.get_any(job_id), ended)
                continue
            asked = self._cancel_asked.get(job_id)
            if asked is not None and time.monotonic() - asked > self.config.cancel_grace_s:
                launch.kill()  # not at a step boundary in time (e.g. still encoding)
            self._say_if_not_started(self.jobs.get_any(job_id))
        self._publish_pending()
        self._dispatch()

    def _say_if_not_started(self, job: Job) -> None:
        """One warning when a started worker has not said so within NOT_STARTED_S: under Ray
        its task may wait for free CPUs (jobs_ray_cpus), which nothing else would show."""
        launched = self._launched_at.get(job.id)
        if launched is None:
            return
        if job.status != "queued":
            del self._launched_at[job.id]
        elif time.monotonic() - launched > NOT_STARTED_S:
            del self._launched_at[job.id]
            self.jobs.event(
                job.id,
                f"The training process has not started after {NOT_STARTED_S:.0f} s; under "
                "Ray its task waits until the cluster has jobs_ray_cpus CPUs free",
                level="warn",
            )

    def _validate(self, job: Job) -> None:
        for param, sha in (("training_file", job.training_sha256), ("validation_file", job.validation_sha256)):  # fmt: skip
            if sha is None:
                continue
            if _sha256(self.files.blob(sha)) != sha:
                self.finish(
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
        if self.stopping:
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
            self.finish(
                job,
                "failed",
                JobError("worker_start_failed", f"the training process did not start: {error}"),
                "Job failed: the training process did not start",
            )
            return
        self._launches[job.id] = launch
        self._launched_at[job.id] = time.monotonic()

    def job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    def write_control(self, job_id: str, action: str) -> None:
        folder = self.job_dir(job_id)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{w.CONTROL}.tmp"
        tmp.write_text(action)
        os.replace(tmp, folder / w.CONTROL)

    # --- a worker's end -----------------------------------------------------------------------
    def _ended(self, job: Job, ended: Exit) -> None:
        self.events.ingest(job)
        self._launches.pop(job.id, None)
        self.events.forget(job.id)
        self._launched_at.pop(job.id, None)
        asked_cancel = self._cancel_asked.pop(job.id, None) is not None
        job = self.jobs.get_any(job.id)
        last = _last_final(self.job_dir(job.id)) or {}
        kind = last.get("kind")
        if kind == "trained" and ended.returncode == 0 and job.control != "cancel":
            self._publish(job)
        elif asked_cancel or job.control == "cancel":
            self.finish(job, "cancelled", None, "Job cancelled")
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
            self.finish(job, "failed", error, f"Job failed: {error.message}", level="error")
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
            self.finish(
                job, "failed", JobError(code, message), f"Job failed: {message}", level="error"
            )

    def _requeue(self, job: Job, message: str, count: bool = True) -> None:
        """Back to the queue; `count`: an interruption (a restart while it ran), of which a
        job survives `max_restarts`."""
        attempts = job.attempts + (1 if count else 0)
        if attempts > self.config.max_restarts:
            self.finish(
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
            self.finish(
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
            self.finish(
                job,
                "failed",
                JobError(error.code, f"the trained adapter was not published: {error.message}"),
                f"Job failed: the trained adapter was refused ({error.message})",
                level="error",
            )
            return
        name = job.adapter_name
        self.jobs.event(job.id, f"New fine-tuned model created: {name} ({label})")
        self.finish(
            job,
            "succeeded",
            None,
            f"The job has successfully completed: {name} is served now (POST /caption with "
            f"adapter={name}, or /v1/chat/completions with model={name})",
            fine_tuned_model=name,
        )

    def finish(
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

    # --- restart and shutdown -------------------------------------------------------------
    def recover(self) -> None:
        for job in self.jobs.with_status("running"):
            _stop_orphan(self.job_dir(job.id))
            self.events.ingest(job)
            job = self.jobs.get_any(job.id)
            last = _last_final(self.job_dir(job.id)) or {}
            kind = last.get("kind")
            if job.control == "cancel":
                self.finish(job, "cancelled", None, "Job cancelled")
            elif kind == "trained":
                continue  # published by the first tick (_publish_pending)
            elif kind == "error":
                error = JobError(last["code"], last["message"], last.get("param"))
                self.finish(job, "failed", error, f"Job failed: {error.message}", level="error")
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

    def shutdown(self) -> None:
        """Ask running workers to pause at their next step, wait `shutdown_grace_s`, kill
        the rest; every job they ran goes back to the queue (resumable)."""
        self.stopping = True
        running = dict(self._launches)
        for job_id in running:
            self.jobs.update(job_id, control="shutdown")
            self.write_control(job_id, "pause")
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
            self.events.ingest(self.jobs.get_any(job_id))
            self._requeue(
                self.jobs.get_any(job_id),
                "The service stopped before the training process could pause; the job "
                "resumes from its last checkpoint when the service starts again",
                count=False,
            )
            self._launches.pop(job_id, None)
            log.info("job worker killed at shutdown", extra={"job": job_id, "exit": str(ended)})


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
