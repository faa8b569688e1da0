"""`ctxpeft serve --ray [--replicas N] [--cpus-per-replica C] [--address A]`: the service on Ray
Serve, started, served and stopped by one command.

Start. The replicas' share of the cluster's CPUs is planned first (`sizing.place`): for a
local cluster from this machine's CPUs before anything starts, for a joined one (`--address`)
from its nodes' free CPUs right after connecting; a plan that cannot be placed ends start-up
with one line naming what was asked and what the cluster has (StartupError: status 2), never
an application Ray cannot schedule. Then the cluster starts (or is joined), the application
is deployed without blocking, and we wait for it: a stop signal ends the wait, a deployment
that fails ends start-up with Serve's reason (status 1), and a slow one logs what Serve says
about it every PROGRESS_EVERY_S.

Stop. The first SIGTERM or SIGINT drains as the single-process service does ("drain
started", logged once): the ingress answers 503 `draining` to new requests and /readyz,
requests in flight finish within the drain budget (the ones still running then answer 503),
then Serve stops the replicas (each has nothing left to drain) and Ray its processes. Exit
status 0, within `drain_timeout_s + STOP_GRACE_S` of the signal whatever Ray does: the stop
runs beside a watchdog, and past that bound (or on a second signal) the process leaves at
once, taking the local cluster's processes with it (they share its fate). A signal sent to
the whole process group stops Ray's own processes too: nothing is left to drain, which is
logged, and the process leaves within STOP_GRACE_S.

Every stderr line is JSON (json_stderr.py): Ray's Python loggers go through ours, its native
output through a pipe that wraps each line.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from types import FrameType
from typing import Any

from service.scaleout.json_stderr import JsonStderr, route_ray_loggers
from service.scaleout.sizing import DEFAULT_REPLICAS, Plan, Unplaceable, describe, place
from service.settings import ANSWER_GRACE_S, Settings
from service.startup_checks import StartupError

log = logging.getLogger("service.serve")
# Beyond drain_timeout_s: Serve stops the drained replicas and Ray its processes (about 5 s
# measured on 2 loaded cores, docs/OPERATIONS.md); past it the process leaves regardless.
STOP_GRACE_S = 15.0
PROGRESS_EVERY_S = 30.0  # a slow start-up says what Serve reports this often
POLL_S = 0.25  # how often waits look at the stop signals
DEPLOY_FAILED = 1  # exit status of an application Serve could not deploy


@dataclass(frozen=True)
class ScaleOut:
    """The launcher's flags (None: derived or default)."""

    replicas: int = DEFAULT_REPLICAS
    cpus_per_replica: float | None = None
    address: str | None = None
    jobs_cpus: float = 0.0  # kept free beside the ingress (ray_runner.reserved_cpus)

    @property
    def own_cluster(self) -> bool:
        return self.address is None


class StopSignals:
    """SIGTERM/SIGINT: the first asks for a drain, a second for an immediate stop. The handler
    only records: the worker thread logs the drain (once) and runs it, the watchdog acts on a
    second signal."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.now = threading.Event()
        self.signal: int | None = None
        self.at: float | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, sig: int, frame: FrameType | None) -> None:
        if self.stop.is_set():
            self.now.set()
            return
        self.signal, self.at = sig, time.monotonic()
        self.stop.set()


def local_plan(scale: ScaleOut) -> Plan:
    """The plan for a local cluster, from the CPUs Ray would give it on this machine: checked
    first thing (ray imports in a second; the backbone checks take longer), so that flags
    this machine cannot place fail in seconds. Raises StartupError naming what to pass."""
    from service.scaleout import cluster

    cluster.loopback_environment()  # before Ray is imported: it reads them at import
    return _plan([float(cluster.local_cpus())], scale)


def serve_on_ray(settings: Settings, scale: ScaleOut, plan: Plan | None = None) -> int:
    """Run the scaled-out service until stopped, then leave the process with its exit status
    (os._exit, see below). `plan`: local_plan's, for a local cluster (made here if None).
    Raises StartupError for a plan the cluster cannot place (nothing deployed, nothing
    started but a joined cluster's connection, closed)."""
    with JsonStderr() if settings.log_json else nullcontext():
        code = _Launch(settings, scale, plan).run()
    # Leave without the interpreter's own exit: once Ray is stopped, what is left of it is
    # Ray's native teardown (3 s measured on 2 cores) with nothing of ours to flush, and
    # after an abandoned stop its atexit ray.shutdown could wait on what the stop waited on.
    # Ray's local processes end with this one (they were started to share its fate).
    _exit_now(code)
    return code  # not reached


class _Launch:
    """The main thread starts the cluster, then watches (`_watch`) while a worker thread does
    the rest with Ray (`_serve`: deploy, wait for the signal, drain, stop): a Ray call that
    blocks (its GCS gone, say) blocks only the worker, never the signal handling or the
    bound on the stop."""

    def __init__(self, settings: Settings, scale: ScaleOut, plan: Plan | None) -> None:
        self.settings = settings
        self.scale = scale
        self.plan = plan
        self.signals = StopSignals()
        # Set once the application is handed to Serve: from then on its ingress may take
        # requests (it answers /readyz as soon as one engine replica runs), so a stop drains.
        self.deployed = False
        self.code: int | None = None  # the worker's exit status, once it is done
        self.done = threading.Event()

    def run(self) -> int:
        self.signals.install()  # before Ray starts: a stop during start-up is remembered
        from service.scaleout import cluster

        if self.scale.own_cluster:
            cluster.loopback_environment()  # before Ray is imported: it reads them at import
        started = time.monotonic()
        plan = self._start_cluster()
        self.signals.install()  # after ray.init (cluster.py keeps SIGTERM's; SIGINT's too)
        worker = threading.Thread(
            target=self._serve, args=(plan, started), name="ctxpeft-ray", daemon=True
        )
        worker.start()
        return self._watch()

    def _watch(self) -> int:
        """Wait for the worker; leave without it when the stop outlives its bound, on a second
        signal, or when our local cluster's processes are gone (then Ray calls could wait a
        minute for a GCS that will not come back)."""
        from service.scaleout import cluster

        signals = self.signals
        while not self.done.wait(POLL_S):
            lost = self.scale.own_cluster and not cluster.local_alive()
            if lost and signals.stop.is_set():
                log.warning(
                    "leaving without waiting for Ray",
                    extra={
                        "reason": "the signal also stopped Ray's own processes (it was sent to "
                        "the whole process group): nothing is left to drain or stop. Send it "
                        "to this process alone for a drain",
                    },
                )
                return 0
            if lost:
                log.error(
                    "the local Ray cluster stopped",
                    extra={"reason": "one of Ray's own processes (GCS, raylet) exited"},
                )
                return 1
            if signals.now.is_set():
                log.warning("leaving without waiting for Ray", extra={"reason": "second signal"})
                return 0
            if signals.at is not None and time.monotonic() >= signals.at + self._stop_bound():
                log.warning(
                    "leaving without waiting for Ray",
                    extra={"reason": f"the stop took over {self._stop_bound():g} s"},
                )
                return 0
        assert self.code is not None
        return self.code

    def _stop_bound(self) -> float:
        """The longest a stop may take from the signal: the drain, then Serve's and Ray's."""
        return (self.settings.drain_timeout_s if self.deployed else 0.0) + STOP_GRACE_S

    def _serve(self, plan: Plan, started: float) -> None:
        """The worker: deploy, serve until the first signal, drain, stop Ray."""
        code = 0
        try:
            self._deploy(plan, started)
        except _DeployFailed as exc:
            log.error(
                "the application could not be deployed",
                extra={"serve_status": str(exc), "exit_code": DEPLOY_FAILED},
            )
            code = DEPLOY_FAILED
        except Exception:
            log.exception("the application could not be deployed")
            code = DEPLOY_FAILED
        try:
            if code == 0:
                self.signals.stop.wait()
                self._drain_on_stop()
            self._stop_ray()
        finally:
            self.code = code
            self.done.set()

    # --- start ------------------------------------------------------------------------------
    def _start_cluster(self) -> Plan:
        from service.scaleout import cluster

        settings, scale = self.settings, self.scale
        import ray  # its loggers exist from here on: route them through ours
        from ray import serve  # noqa: F401

        route_ray_loggers()
        if scale.own_cluster:
            plan = self.plan or local_plan(scale)  # before anything starts
            cluster.start_local(
                num_cpus=plan.cluster_cpus, http_host=settings.host, http_port=settings.port
            )
        else:
            assert scale.address is not None
            try:
                listening = cluster.connect(
                    scale.address, http_host=settings.host, http_port=settings.port
                )
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise StartupError(
                    f"cannot join the Ray cluster at {scale.address!r}: {exc}. Start it with "
                    "`ray start --head` (and `ray start --address <head>` on each other node), "
                    "or leave --address out for a local cluster"
                ) from None
            try:
                if listening is not None:
                    host, port = listening
                    raise StartupError(
                        f"Ray Serve on the cluster at {scale.address!r} already listens on "
                        f"{host}:{port}, not {settings.host}:{settings.port} (another "
                        f"application started it): pass --host {host} --port {port}, or shut "
                        "that Serve down first (`serve shutdown -a http://<head>:8265`)"
                    )
                plan = _plan(cluster.node_cpus(), scale)
            except StartupError:
                ray.shutdown()  # disconnect: the cluster is the operator's
                raise
        route_ray_loggers()
        log.info(
            "Ray cluster started" if scale.own_cluster else "Ray cluster joined",
            extra={
                "address": scale.address or "local",
                "cluster_cpus": describe(plan.nodes),
                "replicas": plan.replicas,
                "cpus_per_replica": plan.cpus_per_replica,
                "cpus_per_replica_derived": plan.derived,
                "ingress_cpus": plan.ingress_cpus,
                "jobs_cpus": plan.reserved_cpus,
                "torch_threads_per_replica": plan.torch_threads,
            },
        )
        return plan

    def _deploy(self, plan: Plan, started: float) -> None:
        """Deploy, then wait until the application runs or a stop signal comes. Raises
        _DeployFailed with Serve's reason."""
        from ray import serve

        from service.scaleout.application import APP_NAME, build_app

        if self.signals.stop.is_set():
            return
        app = build_app(
            self.settings,
            plan.replicas,
            cpus_per_replica=plan.cpus_per_replica,
            ingress_cpus=plan.ingress_cpus,
        )
        serve.run_many(
            [serve.RunTarget(app, name=APP_NAME, route_prefix="/")],
            wait_for_ingress_deployment_creation=False,
            wait_for_applications_running=False,
        )
        self.deployed = True
        said = time.monotonic()
        while not self.signals.stop.wait(POLL_S):
            status = serve.status().applications.get(APP_NAME)
            if status is None:
                continue
            if status.status == "RUNNING":
                log.info(
                    "serving on Ray",
                    extra={
                        "url": f"http://{self.settings.host}:{self.settings.port}",
                        "replicas": plan.replicas,
                        "cpus_per_replica": plan.cpus_per_replica,
                        "startup_s": round(time.monotonic() - started, 1),
                    },
                )
                return
            if status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise _DeployFailed(_status_line(status))
            if time.monotonic() - said >= PROGRESS_EVERY_S:
                said = time.monotonic()
                log.warning("still starting", extra={"serve_status": _status_line(status)})

    # --- stop -------------------------------------------------------------------------------
    def _drain_on_stop(self) -> None:
        """After the first signal: the ingress's drain, like the single-process service's."""
        signals, settings = self.signals, self.settings
        if not self.deployed:
            log.info("stopped during start-up", extra={"signal": signals.signal})
            return
        budget = max(0.5, settings.drain_timeout_s - ANSWER_GRACE_S)
        log.info("drain started", extra={"signal": signals.signal, "timeout_s": budget})
        finished = self._drain(budget)
        log.info("drain finished", extra={"all_finished": finished})
        if not finished:
            time.sleep(ANSWER_GRACE_S)  # waiting handlers notice the expired drain: 503

    def _drain(self, budget_s: float) -> bool:
        """The ingress's drain: True when every request in flight finished in time."""
        from ray import serve

        from service.scaleout.application import APP_NAME

        try:
            ingress = serve.get_deployment_handle("Ingress", APP_NAME)
            return bool(ingress.drain.remote(budget_s).result(timeout_s=budget_s + 2.0))
        except Exception as exc:  # the ingress is gone, or did not answer in time
            log.warning("no drain: %s", exc)
            return False

    def _stop_ray(self) -> None:
        from service.scaleout import cluster

        began = time.monotonic()
        try:
            cluster.stop(own=self.scale.own_cluster)
        except Exception as exc:
            log.warning("Ray stopped with an error: %s", exc)
        since = self.signals.at if self.signals.at is not None else began
        log.info("stopped", extra={"stop_s": round(time.monotonic() - since, 1)})


class _DeployFailed(Exception):
    pass


def _plan(nodes: list[float], scale: ScaleOut) -> Plan:
    try:
        return place(nodes, scale.replicas, scale.cpus_per_replica, reserved_cpus=scale.jobs_cpus)
    except Unplaceable as exc:
        raise StartupError(str(exc)) from None


def _status_line(status: Any) -> str:
    """Serve's application status in one line: its state, message and each deployment's."""
    parts = [f"{status.status}: {status.message}" if status.message else str(status.status)]
    for name, deployment in status.deployments.items():
        line = f"{name} {deployment.status}"
        if deployment.message:
            line += f": {deployment.message}"
        parts.append(line)
    return "; ".join(" ".join(part.split()) for part in parts)


def _exit_now(code: int) -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    os._exit(code)
