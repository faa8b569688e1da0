"""The job supervisor's edges, with real processes and a real database: the memory
watchdog, a worker that outlived its service, the restart limit."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from service.database import Database
from service.jobs import worker as w
from service.jobs.files import FileStore
from service.jobs.manager import JobManager, adapter_name, normalise_suffix
from service.jobs.runner import MiB, ProcessLaunch, ProcessRunner, WorkerLimits
from service.jobs.store import Job, JobStore, new_job_id
from service.jobs.supervisor import JobsConfig

HOG = "import time; x = bytearray({mb} << 20); x[::4096] = b'1' * len(x[::4096]); time.sleep(60)"


def test_a_worker_over_the_memory_bound_is_killed_with_the_reason() -> None:
    process = subprocess.Popen([sys.executable, "-c", HOG.format(mb=300)])
    launch = ProcessLaunch(process, WorkerLimits(memory_bytes=100 * MiB))
    deadline = time.monotonic() + 60
    ended = None
    while ended is None and time.monotonic() < deadline:
        ended = launch.poll()
        time.sleep(0.05)
    assert ended is not None and ended.returncode == -9
    assert ended.killed_for and "over the job memory bound of 100 MiB" in ended.killed_for
    assert ended.describe() == ended.killed_for


def test_exit_statuses_are_described() -> None:
    from service.jobs.runner import Exit

    assert "SIGKILL" in Exit(-9).describe() and "out-of-memory killer" in Exit(-9).describe()
    assert Exit(-6).describe() == "the training process was killed by SIGABRT"
    assert Exit(3).describe() == "the training process exited with status 3"


def _manager(tmp_path: Path, **config: object) -> JobManager:
    db = Database(tmp_path / "db.sqlite")
    files = FileStore(db, tmp_path / "files")
    settings = JobsConfig(backbone="unused", model_names=("demo",), **config)  # type: ignore[arg-type]
    return JobManager(db, files, tmp_path / "jobs", settings, ProcessRunner(), lambda *a: "x")


def _running_job(store: JobStore, attempts: int) -> Job:
    job_id = new_job_id()
    job = Job(
        id=job_id, tenant="acme", seq=0, model="demo", training_file="file-x",
        validation_file=None, training_sha256="0" * 64, validation_sha256=None,
        status="running", created_at=int(time.time()), started_at=int(time.time()),
        finished_at=None, error=None, adapter_name=adapter_name(None, job_id[6:14]),
        fine_tuned_model=None, suffix=None, seed=0, metadata=None,
        hyperparameters={"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 2.0},
        requested={}, adapter={}, estimated_tokens=10, trained_tokens=None, tokens_so_far=0,
        control=None, paused_at=None, attempts=attempts, events_offset=0, estimated_finish=None,
    )  # fmt: skip
    return store.insert(job)


def test_a_job_interrupted_too_often_fails_and_others_are_queued_again(tmp_path: Path) -> None:
    manager = _manager(tmp_path, max_restarts=2)
    store = manager.jobs
    spent, again = _running_job(store, attempts=2), _running_job(store, attempts=0)
    manager.supervisor.recover()  # what start() does before supervising
    spent, again = store.get_any(spent.id), store.get_any(again.id)
    assert spent.status == "failed" and spent.error is not None
    assert spent.error.code == "restart_limit" and "jobs_max_restarts = 2" in spent.error.message
    assert again.status == "queued" and again.attempts == 1
    messages = [e.message for e in store.events(again.id, None, 10)[0]]
    assert messages[0] == "The service restarted while this job ran; it resumes from the start"


def test_a_worker_that_outlived_its_service_is_killed_before_the_job_restarts(
    tmp_path: Path,
) -> None:
    manager = _manager(tmp_path)
    job = _running_job(manager.jobs, attempts=0)
    folder = manager.job_dir(job.id)
    folder.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('locked', flush=True); time.sleep(120)", str(folder / w.LOCK)],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
    (folder / w.PID).write_text(str(holder.pid))
    manager.supervisor.recover()
    assert holder.wait(timeout=30) == -9  # killed, so two trainers never run one job
    assert manager.jobs.get_any(job.id).status == "queued"


def test_suffixes_become_part_of_an_adapter_name() -> None:
    assert normalise_suffix("  My-Model_2 ") == "my-model_2"
    assert normalise_suffix("") is None and normalise_suffix(None) is None
    assert adapter_name("count", "1a2b3c4d") == "ft-count-1a2b3c4d"
    assert adapter_name(None, "1a2b3c4d") == "ft-1a2b3c4d"
    for bad in ("a b", "x" * 41, "-lead", "ü"):
        try:
            normalise_suffix(bad)
        except ValueError as error:
            assert "suffix" in str(error)
        else:
            raise AssertionError(bad)
