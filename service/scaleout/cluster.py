"""The Ray cluster of `ctxpeft serve --ray` and the tests: a local one on loopback, started and
stopped by us, or a running one joined with `--address`.

    env = loopback_environment()      # before ray.init: in os.environ, inherited by Ray's processes
    start_local(num_cpus=local_cpus(), http_host="127.0.0.1", http_port=8000)
    ...
    stop()

    connect("10.0.0.5:6379", http_host="0.0.0.0", http_port=8000)   # `ray start` on each node
    node_cpus()                       # CPUs free on each live node, for sizing.place
    stop(own=False)                   # our application goes; the cluster stays

What it sets (each only where the operator has not set it already):
- RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray's single-machine mode, in which the node address is
  127.0.0.1, so its servers (GCS, raylet, object manager, workers, dashboard agent) listen on
  loopback only; `loopback.bind_replica_grpc_to_node_ip` covers the one Serve listener left.
- RAY_AUTH_MODE=token with RAY_AUTH_TOKEN, a fresh random token held in the environment of
  this process and Ray's children: another local user cannot drive the cluster, and no token
  file is written (Ray's default would be ~/.ray/auth_token; never anything in the working
  tree). Ray's session files go to its temp folder (/tmp/ray unless RAY_TMPDIR says).
- RAY_USAGE_STATS_ENABLED=0: no usage report leaves the machine.
- RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH: the proxy's request-id middleware (request_ids.py).
The dashboard is not started; Serve's HTTP proxy listens on `http_host` (the service's `host`
setting: loopback unless the operator binds another address, with keys).

A cluster joined with `--address` is the operator's: its nodes' addresses, authentication and
environment are what `ray start` gave them (docs/OPERATIONS.md, "Scaling out"); we set only
RAY_USAGE_STATS_ENABLED=0 in this process.
"""

from __future__ import annotations

import math
import os
import secrets
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

RAY_ENV_DEFAULTS = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "token",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Serve's HTTP proxy takes its extra middlewares from this callback (request_ids.py).
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "service.scaleout.request_ids:proxy_middlewares",
}


def loopback_environment() -> dict[str, str]:
    """Put the settings above into os.environ (before ray.init); returns what it set."""
    changed = {}
    for key, value in RAY_ENV_DEFAULTS.items():
        if key not in os.environ:
            os.environ[key] = changed[key] = value
    if os.environ["RAY_AUTH_MODE"] == "token" and not (
        os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    ):
        os.environ["RAY_AUTH_TOKEN"] = changed["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    if "ray._raylet" in sys.modules:
        _reread_environment()
    return changed


def _reread_environment() -> None:
    """Ray reads these variables when it is imported; a process that imported it earlier
    (a test module, a check) re-reads them here, before it starts a cluster: the node address
    (`ray_constants.ENABLE_RAY_CLUSTER`, looked up at call time) and the authentication mode
    (re-initialised as Ray's own token set-up does), so this process speaks the cluster's."""
    from ray._private import ray_constants
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] not in (
        "0",
        "false",
        "False",
    )
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def local_cpus() -> int:
    """The CPUs Ray gives a cluster it starts on this machine (cgroup limits included)."""
    from ray._private.utils import get_num_cpus

    return int(get_num_cpus())


def start_local(
    num_cpus: float | None = None,
    http_host: str = "127.0.0.1",
    http_port: int = 8000,
    **init_kwargs: Any,
) -> None:
    """Start a Ray cluster on this machine, on loopback, and Serve's HTTP proxy. The calling
    process keeps its own SIGTERM handler (ray.init installs one that exits at once)."""
    loopback_environment()
    import ray
    from ray import serve

    with _own_sigterm_handler():
        ray.init(
            # "local": always a new cluster of our own, never one found on the machine
            # (another user's `ray start`, RAY_ADDRESS).
            address="local",
            num_cpus=None if num_cpus is None else math.ceil(num_cpus),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            namespace="ctxpeft",
            log_to_driver=False,
            **init_kwargs,
        )
    serve.start(http_options={"host": http_host, "port": http_port})


def connect(
    address: str, http_host: str = "127.0.0.1", http_port: int = 8000
) -> tuple[str, int] | None:
    """Join a running cluster (`ray start --head` / `ray start --address` on each node) and
    start Serve's HTTP proxy there. Returns the (host, port) Serve's proxies listen on when
    that is not what was asked (a Serve already running there keeps its own), else None."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    with _own_sigterm_handler():
        ray.init(address=address, namespace="ctxpeft", log_to_driver=False)
    serve.start(http_options={"host": http_host, "port": http_port})
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client()
        if client is None:
            return None
        config = client.http_config
        actual = (str(config.host), int(config.port))
    except Exception:  # a Ray without this helper: trust the request
        return None
    return None if actual == (http_host, http_port) else actual


def node_cpus() -> list[float]:
    """The CPUs free on each live node of the connected cluster (what sizing.place divides)."""
    from ray._private.state import available_resources_per_node

    return [float(r.get("CPU", 0.0)) for r in available_resources_per_node().values()]


def local_alive() -> bool:
    """Whether the processes of the cluster this process started (GCS, raylet, ...) all still
    run: a signal sent to the whole process group (`timeout`, some service managers) stops
    them together with us. True when we started none."""
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    try:
        return node is None or bool(node.remaining_processes_alive())
    except Exception:  # a Ray without this helper: assume alive (the stop is bounded anyway)
        return True


def stop(own: bool = True) -> None:
    """Our cluster: shut Serve down (its replicas stop gracefully) and the cluster with it.
    A joined cluster (`own=False`): delete our application, and Serve itself (its controller
    and HTTP proxies) when no other application is left, so that the next `ctxpeft serve
    --ray --address` starts the proxy with its own host and port; then disconnect."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        if own:
            serve.shutdown()
        else:
            from service.scaleout.application import APP_NAME

            serve.delete(APP_NAME)
            if not serve.status().applications:
                serve.shutdown()
    finally:
        ray.shutdown()


@contextmanager
def _own_sigterm_handler() -> Iterator[None]:
    """ray.init replaces this process's SIGTERM handler with one that exits at once (status
    15 or 1, in the middle of start-up) through `ray._private.utils.set_sigterm_handler`.
    Keep ours: the launcher then ends a start-up it was asked to stop cleanly. (Should a Ray
    upgrade move that helper, ours is put back right after ray.init all the same.)"""
    from ray._private import utils as ray_utils

    ours = signal.getsignal(signal.SIGTERM)
    theirs = getattr(ray_utils, "set_sigterm_handler", None)
    if theirs is not None:
        ray_utils.set_sigterm_handler = _keep_handler
    try:
        yield
    finally:
        if theirs is not None:
            ray_utils.set_sigterm_handler = theirs
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, ours)


def _keep_handler(handler: Any) -> None:
    """Ray's set_sigterm_handler, while ours is kept: installs nothing."""
