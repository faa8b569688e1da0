"""Jobs as Ray tasks (`ctxpeft serve --ray`): each job's worker runs under a Ray task that
reserves `jobs_ray_cpus` of the cluster's CPUs on the ingress's node (where the runtime folder
with the job folders is), and the launcher keeps `reserved_cpus(settings)` free there beside
the ingress when it sizes the replicas (sizing.place), so a job's task always finds room.

    runner = RayRunner(cpus=0.5)              # create_app(job_runner=ray_job_runner)
    launch = runner.start(job_dir, limits)     # a Ray task: supervise(job_dir, limits)
    launch.poll(); launch.kill()               # ray.wait / ray.cancel(force=True)

The task runs `service.jobs.runner.supervise`: the same worker process, bounds and memory
watchdog as the single-process service, started from the task's process (so it dies with it:
PR_SET_PDEATHSIG) and talking to the supervisor through the job folder, which is on the
machine's runtime folder like the store (Ray's local cluster: one machine). The task's
process exits after it (`max_calls=1`), so a worker's niceness and memory never stay in a
process Ray reuses.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from service.jobs.runner import Exit, WorkerLimits, supervise
from service.settings import Settings

_remote: Any = None


def _supervise_task(job_dir: str, limits: dict[str, Any], cpus: float) -> dict[str, Any]:
    import os

    os.environ["CTXPEFT_WORKER_WHERE"] = f"in a Ray task with {cpus:g} CPUs"
    ended = supervise(Path(job_dir), WorkerLimits(**limits))
    return {"returncode": ended.returncode, "killed_for": ended.killed_for}


def _task() -> Any:
    global _remote
    if _remote is None:
        import ray

        _remote = ray.remote(max_calls=1, max_retries=0)(_supervise_task)
    return _remote


class RayLaunch:
    def __init__(self, ref: Any) -> None:
        self.ref = ref

    def poll(self) -> Exit | None:
        import ray

        ready, _ = ray.wait([self.ref], timeout=0)
        if not ready:
            return None
        try:
            value = ray.get(self.ref)
        except Exception as error:  # the task was cancelled, or its process died
            return Exit(None, f"the Ray task running the job ended: {type(error).__name__}")
        return Exit(value["returncode"], value["killed_for"])

    def kill(self) -> None:
        import ray

        ray.cancel(self.ref, force=True)


class RayRunner:
    def __init__(self, cpus: float) -> None:
        self.cpus = cpus

    def start(self, job_dir: Path, limits: WorkerLimits) -> RayLaunch:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # This node: the job folder is on its disk, and its CPUs were kept free for jobs.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        task = _task().options(num_cpus=self.cpus, scheduling_strategy=here)
        return RayLaunch(task.remote(str(job_dir), dataclasses.asdict(limits), self.cpus))

    def close(self) -> None:
        pass


def reserved_cpus(settings: Settings) -> float:
    """Ray CPUs kept free beside the ingress for training tasks (0 with jobs off)."""
    return settings.jobs_max_running * settings.jobs_ray_cpus if settings.jobs_enabled else 0.0


def ray_job_runner(settings: Settings) -> RayRunner:
    """What the Ray ingress passes to create_app: jobs as Ray tasks of jobs_ray_cpus."""
    return RayRunner(settings.jobs_ray_cpus)
