"""The Ray Serve application: one `Ingress` in front of `replicas` `EngineReplica`s.

    app = build_app(settings, replicas=2)              # a bound application for serve.run
    serve.run(app, name=APP_NAME, route_prefix="/")

or, from a shell with a Ray cluster running (settings from CTXPEFT_* variables):

    serve run service.scaleout.application:app_builder replicas=2

Replica sizing (see sizing.py and docs/OPERATIONS.md, "Scaling out"): each engine replica
takes `cpus_per_replica` Ray CPUs (and `gpus_per_replica` GPUs) and that many torch threads
(rounded to the nearest whole, at least 1), the ingress `ingress_cpus`; `ctxpeft serve --ray` and `app_builder` derive the replicas'
share from the cluster unless told. `max_ongoing_requests` is what one replica's engine can hold (queue + running batch), so Ray's
router spills a hot adapter to another replica only when its replicas are full, and
`max_queued_requests` bounds what waits in the router beyond that (503 queue_full).
"""

from __future__ import annotations

from dataclasses import asdict

import ray
from ray import serve
from ray.serve import Application

from service.jobs.ray_runner import reserved_cpus
from service.scaleout import cluster
from service.scaleout.ingress import Ingress
from service.scaleout.replica import EngineReplica, ReplicaOptions
from service.scaleout.sizing import DEFAULT_REPLICAS, INGRESS_CPUS, place, threads_for
from service.settings import Settings

APP_NAME = "ctxpeft"
HEALTH_CHECK_PERIOD_S = 2.0
HEALTH_CHECK_TIMEOUT_S = 10.0


def build_app(
    settings: Settings,
    replicas: int = DEFAULT_REPLICAS,
    *,
    affinity: bool = True,
    cpus_per_replica: float = 1.0,
    gpus_per_replica: float = 0.0,
    ingress_cpus: float = INGRESS_CPUS,
    options: ReplicaOptions | None = None,
    replica_class: type[EngineReplica] = EngineReplica,
) -> Application:
    """The bound application. `affinity=False` sends rows without a multiplexed id (Ray's
    default power-of-two-choices routing: the adapter-oblivious baseline of the benchmark).
    `replica_class`: EngineReplica, or a subclass (the tests' fault injection)."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    options = options or ReplicaOptions(
        torch_threads=threads_for(cpus_per_replica),
        drain_timeout_s=settings.drain_timeout_s,
    )
    values = settings.model_dump(mode="json")
    capacity = settings.queue_size + settings.max_batch_size
    engine_replica = serve.deployment(
        name="EngineReplica",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        max_ongoing_requests=capacity,
        max_queued_requests=settings.queue_size,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
        graceful_shutdown_timeout_s=settings.drain_timeout_s,
        graceful_shutdown_wait_loop_s=0.5,
    )(replica_class)
    ingress = serve.deployment(
        name="Ingress",
        num_replicas=1,
        ray_actor_options={"num_cpus": ingress_cpus},
        # Every HTTP request is one ongoing call of the ingress while its rows run.
        max_ongoing_requests=replicas * capacity,
        graceful_shutdown_timeout_s=settings.drain_timeout_s,
    )(serve.ingress()(Ingress))
    return ingress.bind(values, engine_replica.bind(values, asdict(options)), affinity)


def app_builder(args: dict[str, str]) -> Application:
    """`serve run service.scaleout.application:app_builder replicas=2 [cpus_per_replica=1]`:
    without cpus_per_replica, the share is derived from the connected cluster's free CPUs
    (this machine's when Ray is not initialised yet), as `ctxpeft serve --ray` does; a plan
    that cannot be placed raises sizing.Unplaceable, naming what to pass."""
    settings = Settings()
    nodes = cluster.node_cpus() if ray.is_initialized() else [float(cluster.local_cpus())]
    asked = args.get("cpus_per_replica")
    plan = place(
        nodes,
        int(args.get("replicas", DEFAULT_REPLICAS)),
        None if asked is None else float(asked),
        reserved_cpus=reserved_cpus(settings),
    )
    return build_app(
        settings,
        plan.replicas,
        cpus_per_replica=plan.cpus_per_replica,
        gpus_per_replica=float(args.get("gpus_per_replica", 0.0)),
        ingress_cpus=plan.ingress_cpus,
    )
