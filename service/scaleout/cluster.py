"""A local Ray cluster on loopback for `ctxpeft serve --ray` and the tests.

    env = loopback_environment()      # before ray.init: in os.environ, inherited by Ray's processes
    start_local(num_cpus=2, http_host="127.0.0.1", http_port=8000)
    ...
    stop()

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
"""

from __future__ import annotations

import math
import os
import secrets
import sys
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


def start_local(
    num_cpus: float | None = None,
    http_host: str = "127.0.0.1",
    http_port: int = 8000,
    **init_kwargs: Any,
) -> None:
    """Start a Ray cluster on this machine, on loopback, and Serve's HTTP proxy."""
    loopback_environment()
    import ray
    from ray import serve

    ray.init(
        # "local": always a new cluster of our own, never one found on the machine (another
        # user's `ray start`, RAY_ADDRESS).
        address="local",
        num_cpus=None if num_cpus is None else math.ceil(num_cpus),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        namespace="ctxpeft",
        log_to_driver=False,
        **init_kwargs,
    )
    serve.start(http_options={"host": http_host, "port": http_port})


def stop() -> None:
    """Shut Serve and the cluster down (Serve first: its replicas drain gracefully)."""
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
