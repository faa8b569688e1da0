"""`ctxpeft serve`: run the HTTP service (uvicorn) with a graceful drain on SIGTERM/SIGINT.

Usage:
    ctxpeft serve                          # settings from CTXPEFT_* env, defaults otherwise
    ctxpeft serve --host 0.0.0.0 --port 8000 --keys-file keys.json
    ctxpeft serve --ray --replicas 2       # on a local Ray cluster: N engine replicas behind
                                           # one ingress, sized to the machine (needs the
                                           # `ray` extra; see service.scaleout.launch and
                                           # docs/OPERATIONS.md, "Scaling out")
    ctxpeft serve --ray --replicas 8 --address 10.0.0.5:6379   # on a cluster of `ray start`s

On the first SIGTERM (or Ctrl-C): /readyz turns 503 and new requests get 503 while the
listening socket stays open (load balancers see the 503s and move away); requests already
admitted finish; then uvicorn stops, within `drain_timeout_s`. Requests still unfinished when
that time runs out are answered 503 "draining" (retry elsewhere). A second signal exits at once.

Start-up: a signal that arrives before the server listens (while torch loads, say) exits at
once with status 0: there is nothing to drain yet. A configuration the service cannot run
with (settings, keys file, folders it cannot write, a backbone that cannot be the store's;
see service.startup_checks) ends start-up with one log line naming the problem and its fix,
and status 2, before the port is bound.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from service.scaleout.sizing import DEFAULT_REPLICAS, INGRESS_CPUS

if TYPE_CHECKING:
    from pydantic import ValidationError

    from service.auth import KeyStore
    from service.settings import Settings

log = logging.getLogger("service.serve")
GRACEFUL_S = 1  # uvicorn's own shutdown: close connections once their answers are out
CONFIG_ERROR = 2  # exit status of a start-up the configuration makes impossible


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="bind address (CTXPEFT_HOST)")
    parser.add_argument("--port", type=int, help="port (CTXPEFT_PORT)")
    parser.add_argument(
        "--backbone", help="preset name, saved backbone folder or config JSON (CTXPEFT_BACKBONE)"
    )
    parser.add_argument("--runtime-dir", help="runtime data folder (CTXPEFT_RUNTIME_DIR)")
    parser.add_argument("--store-dir", help="adapter store (CTXPEFT_STORE_DIR)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N (CTXPEFT_DEVICE)")
    parser.add_argument("--keys-file", help="API keys JSON (CTXPEFT_KEYS_FILE)")
    parser.add_argument("--default-adapter", help="adapter used when a request names none")
    parser.add_argument(
        "--drain-timeout-s", type=float, help="graceful drain limit (CTXPEFT_DRAIN_TIMEOUT_S)"
    )
    parser.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        default=None,
        help="allow binding a non-loopback address with no keys (CTXPEFT_ALLOW_UNAUTHENTICATED)",
    )
    scale = parser.add_argument_group("scaling out on Ray Serve (pip install 'ctxpeft[ray]')")
    scale.add_argument(
        "--ray",
        action="store_true",
        default=None,
        help="serve on a local Ray cluster: one ingress and --replicas engine replicas",
    )
    scale.add_argument(
        "--replicas", type=int, help=f"engine replicas with --ray (default {DEFAULT_REPLICAS})"
    )
    scale.add_argument(
        "--cpus-per-replica",
        type=float,
        help="Ray CPUs of each engine replica (default: the cluster's CPUs less the ingress's "
        f"{INGRESS_CPUS:g}, shared by the replicas); a size that cannot be placed exits 2",
    )
    scale.add_argument(
        "--address",
        help="join a running Ray cluster (`ray start` on each node) at this address, or "
        "'auto', instead of starting a local one",
    )


# Flags of the launcher, not settings.
_RAY_OPTIONS = ("ray", "replicas", "cpus_per_replica", "address")


def run(args: argparse.Namespace) -> int:
    # First, before the slow imports: a stop now has nothing to drain (uvicorn's handlers,
    # which drain, replace these once it serves).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop_during_startup)

    from pydantic import ValidationError

    from service.logging import configure_logging
    from service.settings import Settings
    from service.startup_checks import StartupError, check_backbone, check_files

    configure_logging()  # JSON lines until the settings say otherwise (a settings error too)
    overrides = {
        key: value
        for key, value in vars(args).items()
        if value is not None
        and not key.startswith("_")
        and key != "command"
        and key not in _RAY_OPTIONS
    }
    scale = {key: getattr(args, key, None) for key in _RAY_OPTIONS}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        log.error("%s", _settings_error(exc), extra={"exit_code": CONFIG_ERROR})
        return CONFIG_ERROR
    configure_logging(settings.log_level, settings.log_json)
    log.info("starting", extra={"pid": os.getpid(), "uid": os.getuid()})
    plan = None
    try:
        ray_problem = _check_ray_options(**scale)
        if ray_problem:
            raise StartupError(ray_problem)
        if scale["ray"]:
            from service.jobs.ray_runner import reserved_cpus
            from service.scaleout.launch import ScaleOut, local_plan

            scale_out = ScaleOut(
                scale["replicas"] or DEFAULT_REPLICAS,
                scale["cpus_per_replica"],
                scale["address"],
                reserved_cpus(settings),
            )
            if scale_out.own_cluster:  # first: this machine's CPUs say in a second
                plan = local_plan(scale_out)
        check_files(settings)
        keys = _load_keys(settings)
        check_backbone(settings)
    except StartupError as exc:
        log.error("%s", exc, extra={"exit_code": CONFIG_ERROR})
        return CONFIG_ERROR
    if scale["ray"]:
        from service.scaleout.launch import serve_on_ray

        try:
            return serve_on_ray(settings, scale_out, plan)
        except StartupError as exc:  # a plan the joined cluster cannot place: nothing deployed
            log.error("%s", exc, extra={"exit_code": CONFIG_ERROR})
            return CONFIG_ERROR

    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils.logging import disable_progress_bar

    from service.api.app import create_app
    from service.settings import ANSWER_GRACE_S, CLOSE_GRACE_S

    # Weight-loading progress bars would break the one-JSON-object-per-line log stream.
    disable_progress_bar()
    disable_progress_bars()
    app = create_app(settings, keys=keys)
    state = app.state.service
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        # The engine drains first (in-flight requests finish, or answer 503 when the drain
        # time runs out); uvicorn then only has to close connections, so the whole shutdown
        # stays within drain_timeout_s.
        timeout_graceful_shutdown=GRACEFUL_S,
    )
    # Waiting for the engine gets what is left of drain_timeout_s after the answer grace,
    # uvicorn's shutdown and the wait for the engine to close (ServiceState.close).
    budget = max(0.5, settings.drain_timeout_s - GRACEFUL_S - ANSWER_GRACE_S - CLOSE_GRACE_S)
    DrainingServer(config, state.drain, budget).run()
    if state.loading:
        # Stopped before the backbone finished loading: the loading thread is inside torch's
        # native code, and tearing the interpreter down beside it can abort the process.
        # Nothing was admitted, so there is nothing left to finish: leave now, status 0.
        _exit_now(0)
    return 0


def _check_ray_options(
    ray: bool | None,
    replicas: int | None,
    cpus_per_replica: float | None,
    address: str | None = None,
) -> str | None:
    """Why the scale-out flags cannot be used as given, or None (whether the cluster can
    place them is the launcher's check: service.scaleout.sizing)."""
    if not ray:
        if replicas is not None or cpus_per_replica is not None or address is not None:
            return "--replicas, --cpus-per-replica and --address need --ray"
        return None
    if replicas is not None and replicas < 1:
        return f"--replicas must be at least 1, got {replicas}"
    if cpus_per_replica is not None and cpus_per_replica <= 0:
        return f"--cpus-per-replica must be positive, got {cpus_per_replica}"
    import importlib.util

    if importlib.util.find_spec("ray") is None:  # not imported: Ray reads its env at import
        return "--ray needs Ray Serve: pip install 'ctxpeft[ray]'"
    return None


def _stop_during_startup(sig: int, frame: FrameType | None) -> None:
    """SIGTERM/SIGINT before uvicorn serves: nothing is admitted yet, so exit now, status 0
    (a container stopped while it starts must not wait for its kill timeout)."""
    log.info("stopped during start-up", extra={"signal": sig})
    _exit_now(0)  # not SystemExit: it could be raised inside an import and caught there


def _exit_now(code: int) -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(code)


def _settings_error(exc: ValidationError) -> str:
    """A pydantic ValidationError of Settings as one line naming each setting's variable."""
    problems = []
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"]) or "settings"
        problems.append(f"{name} (CTXPEFT_{name.upper()}): {error['msg']}")
    return "invalid settings: " + "; ".join(problems)


def _load_keys(settings: Settings) -> KeyStore:
    """The API keys, or StartupError naming the problem (bad JSON, a binding refused without
    keys)."""
    from service.auth import KeyStore
    from service.settings import assert_safe_binding
    from service.startup_checks import StartupError

    try:
        keys = KeyStore.from_settings(settings)
        assert_safe_binding(settings, has_keys=not keys.empty)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    return keys


class DrainingServer(uvicorn.Server):
    """A uvicorn Server whose first exit signal drains before shutting down."""

    def __init__(
        self, config: uvicorn.Config, drain: Callable[[float], bool], timeout_s: float
    ) -> None:
        super().__init__(config)
        self._drain = drain
        self._timeout_s = timeout_s
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining:
            super().handle_exit(sig, frame)  # a second signal: stop now
            return
        self._draining = True
        log.info("drain started", extra={"signal": sig, "timeout_s": self._timeout_s})
        threading.Thread(target=self._drain_then_exit, name="ctxpeft-drain", daemon=True).start()

    def _drain_then_exit(self) -> None:
        finished = self._drain(self._timeout_s)
        log.info("drain finished", extra={"all_finished": finished})
        if not finished:
            from service.settings import ANSWER_GRACE_S

            # Handlers still waiting notice the expired drain within a poll and answer 503;
            # give them that long before uvicorn starts closing connections.
            time.sleep(ANSWER_GRACE_S)
        self.should_exit = True
