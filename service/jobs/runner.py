"""Where a job's training process runs: a `JobRunner` starts one worker process per job
(`python -m service.jobs.worker <job folder>`) and reports how it ended.

    runner = ProcessRunner()
    launch = runner.start(job_dir, limits)
    exit = launch.poll()          # None while it runs; then how it ended (Exit)
    launch.kill()                 # SIGKILL (a cancel that could not wait for the next step)

The worker lowers its own CPU priority, bounds its threads and its memory (RLIMIT_DATA,
enforced by the kernel: an allocation beyond it fails inside torch and the worker reports
`memory_limit`), and asks the kernel to kill it if its parent dies (PR_SET_PDEATHSIG), all
before it imports torch: see `service.jobs.worker`. The supervisor also watches the worker's
resident set (`poll`): a worker over the bound is killed and the job fails with that reason.

`service.jobs.ray_runner.RayRunner` runs the same worker from a Ray task with a CPU budget
(`ctxpeft serve --ray`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

MiB = 1 << 20
WORKER_LOG = "worker.log"


@dataclass(frozen=True)
class WorkerLimits:
    """How a worker may use the machine (settings jobs_threads, jobs_nice, jobs_sched_idle,
    jobs_memory_limit_mb)."""

    threads: int = 1
    nice: int = 10
    sched_idle: bool = False
    memory_bytes: int = 6144 * MiB


@dataclass(frozen=True)
class Exit:
    """How a worker process ended."""

    returncode: int | None  # None: killed before it could say
    killed_for: str | None = None  # why the supervisor killed it (e.g. the memory bound)

    def describe(self) -> str:
        if self.killed_for:
            return self.killed_for
        code = self.returncode
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            hint = " (the kernel's out-of-memory killer sends it)" if -code == 9 else ""
            return f"the training process was killed by {name}{hint}"
        return f"the training process exited with status {code}"


class Launch(Protocol):
    """One started worker."""

    def poll(self) -> Exit | None: ...

    def kill(self) -> None: ...


class JobRunner(Protocol):
    def start(self, job_dir: Path, limits: WorkerLimits) -> Launch: ...

    def close(self) -> None: ...


def worker_command(job_dir: Path) -> list[str]:
    return [sys.executable, "-m", "service.jobs.worker", str(job_dir), "--parent", str(os.getpid())]


def worker_environment(limits: WorkerLimits) -> dict[str, str]:
    """The worker's environment: ours, with every thread pool bounded to `limits.threads`."""
    env = dict(os.environ)
    threads = str(limits.threads)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = threads
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["CTXPEFT_WORKER_NICE"] = str(limits.nice)
    env["CTXPEFT_WORKER_SCHED_IDLE"] = "1" if limits.sched_idle else "0"
    env["CTXPEFT_WORKER_MEMORY_BYTES"] = str(limits.memory_bytes)
    env["CTXPEFT_WORKER_THREADS"] = threads
    return env


def spawn(job_dir: Path, limits: WorkerLimits) -> subprocess.Popen[bytes]:
    """Start the worker; its stderr goes to <job folder>/worker.log (a crash's traceback)."""
    with open(job_dir / WORKER_LOG, "ab") as log:
        return subprocess.Popen(
            worker_command(job_dir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=worker_environment(limits),
            # Its own process group, so a terminal's Ctrl-C reaches the service (which stops
            # the worker in order: a pause at its next step), not the worker. Not its own
            # session: Linux's autogroup scheduling shares the CPU fairly between sessions
            # whatever their niceness, which gave a job in a session of its own as much CPU
            # as the whole service (caption p99 doubled; docs/BENCHMARKS.md).
            process_group=0,
            close_fds=True,
        )


def resident_bytes(pid: int) -> int | None:
    """The process's resident set size (Linux /proc), None when unknown or gone."""
    try:
        with open(f"/proc/{pid}/statm") as handle:
            pages = int(handle.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


class ProcessLaunch:
    """A worker started by this process, watched for its memory at every poll."""

    def __init__(self, process: subprocess.Popen[bytes], limits: WorkerLimits) -> None:
        self.process = process
        self.limits = limits
        self.killed_for: str | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> Exit | None:
        code = self.process.poll()
        if code is not None:
            return Exit(code, self.killed_for)
        rss = resident_bytes(self.process.pid)
        if rss is not None and rss > self.limits.memory_bytes:
            self.killed_for = (
                f"the training process used {rss // MiB} MiB, over the job memory bound of "
                f"{self.limits.memory_bytes // MiB} MiB (jobs_memory_limit_mb)"
            )
            self.kill()
        return None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()

    def wait(self, timeout_s: float) -> Exit | None:
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None
        return Exit(code, self.killed_for)


class ProcessRunner:
    """Workers as child processes of the service (the default runner)."""

    def start(self, job_dir: Path, limits: WorkerLimits) -> ProcessLaunch:
        return ProcessLaunch(spawn(job_dir, limits), limits)

    def close(self) -> None:
        pass


def supervise(job_dir: Path, limits: WorkerLimits, poll_s: float = 0.25) -> Exit:
    """Start a worker and wait for it, watching its memory: what a Ray task runs."""
    import time

    launch = ProcessRunner().start(job_dir, limits)
    try:
        while True:
            ended = launch.poll()
            if ended is not None:
                return ended
            time.sleep(poll_s)
    finally:
        launch.kill()
