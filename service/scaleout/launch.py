"""`ctxpeft serve --ray --replicas N`: the service on a local Ray cluster, on loopback.

Starts the cluster (`cluster.start_local`), runs the application (`application.build_app`)
with Serve's HTTP proxy on the service's host and port, and waits. On the first SIGTERM or
SIGINT it drains as the single-process service does: the ingress answers 503 `draining` to
new requests and /readyz, requests in flight finish within `drain_timeout_s` (the ones still
running then answer 503), then Serve stops (each engine replica drains what it still holds)
and the cluster with it. Exit status 0.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

from service.settings import Settings

log = logging.getLogger("service.serve")
ANSWER_GRACE_S = 0.5  # after an expired drain, for waiting handlers to answer 503
SHUTDOWN_MARGIN_S = 2.0  # of drain_timeout_s, kept for Serve's own stop


def serve_on_ray(settings: Settings, replicas: int, cpus_per_replica: float) -> int:
    stop = threading.Event()

    def request_stop(sig: int, frame: FrameType | None) -> None:
        log.info("drain started", extra={"signal": sig})
        stop.set()

    from service.scaleout import cluster

    cluster.loopback_environment()  # before Ray is imported: it reads them at import
    from ray import serve

    from service.scaleout.application import APP_NAME, build_app

    started = time.monotonic()
    cluster.start_local(http_host=settings.host, http_port=settings.port)
    # After ray.init, which installs its own SIGTERM handler in this process (a stop before
    # this point ends start-up at once: nothing is admitted yet).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)
    try:
        if not stop.is_set():
            serve.run(
                build_app(settings, replicas, cpus_per_replica=cpus_per_replica),
                name=APP_NAME,
                route_prefix="/",
                blocking=False,
            )
            log.info(
                "serving on Ray",
                extra={
                    "url": f"http://{settings.host}:{settings.port}",
                    "replicas": replicas,
                    "startup_s": round(time.monotonic() - started, 1),
                },
            )
        stop.wait()
        budget = max(0.5, settings.drain_timeout_s - ANSWER_GRACE_S - SHUTDOWN_MARGIN_S)
        try:
            ingress = serve.get_deployment_handle("Ingress", APP_NAME)
            finished = ingress.drain.remote(budget).result(timeout_s=budget + 5)
        except Exception as exc:  # the application never started, or the ingress is gone
            log.warning("no drain: %s", exc)
            finished = True
        log.info("drain finished", extra={"all_finished": finished})
        if not finished:
            time.sleep(ANSWER_GRACE_S)
    finally:
        cluster.stop()
    return 0
