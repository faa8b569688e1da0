"""`Ingress`: the Ray Serve ingress deployment, our FastAPI app with a `RemoteEngine`.

The app is `service.api.app.create_app` unchanged (auth, validation, limits, the same routes,
/v1 included, one error shape, /metrics of the ingress itself); it is built when the replica
starts (`__serve_build_asgi_app__`), after one engine replica described its backbone. `drain`
is what `ctxpeft serve --ray` calls on SIGTERM: readiness goes 503, new requests get 503
`draining`, requests in flight finish (or answer 503 when the time runs out).
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray
from fastapi import FastAPI

from service.api.app import create_app
from service.auth import KeyStore
from service.jobs.ray_runner import ray_job_runner
from service.metrics import ServiceMetrics
from service.scaleout.loopback import bind_replica_grpc_to_node_ip
from service.scaleout.messages import ReplicaInfo
from service.scaleout.remote_engine import RemoteEngine
from service.scaleout.request_ids import WithoutAppRequestId
from service.settings import EngineConfig, Settings
from service.store import AdapterStore


class Ingress:
    """The HTTP front of the scaled-out service (decorated by application.py)."""

    def __init__(
        self, settings_values: dict[str, Any], replicas: Any, affinity: bool = True
    ) -> None:
        bind_replica_grpc_to_node_ip()
        self.settings = Settings(**settings_values)
        self.replicas = replicas
        self.affinity = affinity
        self._service_app: FastAPI | None = None
        self._remote_engine: RemoteEngine | None = None

    async def __serve_build_asgi_app__(self) -> FastAPI:
        settings = self.settings
        info: ReplicaInfo = await self.replicas.describe_backbone.remote()
        metrics = ServiceMetrics(
            adapter_labels=settings.metrics_adapter_labels, backbone=settings.backbone
        )
        keys = KeyStore.from_settings(settings)
        self._remote_engine = RemoteEngine(
            self.replicas,
            info,
            EngineConfig.from_settings(settings),
            AdapterStore(settings.resolved_store_dir()),
            metrics,
            self.affinity,
            put=ray.put,
            tenants=keys.policies,
        )
        self._service_app = create_app(
            settings,
            engine=self._remote_engine,
            keys=keys,
            metrics=metrics,
            job_runner=ray_job_runner,  # fine-tuning jobs as Ray tasks (service.jobs)
        )
        # Serve's proxy appends the request id to every answer (request_ids.py).
        self._service_app.add_middleware(WithoutAppRequestId)
        return self._service_app

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new requests (503 draining) and wait for those in flight; True if all
        finished in time (else the waiting ones answer 503 at once)."""
        if self._service_app is None:
            return True  # the app is not built yet: nothing was admitted
        return bool(await asyncio.to_thread(self._service_app.state.service.drain, timeout_s))

    def inflight(self) -> int:
        return 0 if self._remote_engine is None else self._remote_engine.inflight

    def stats(self) -> dict[str, int]:
        """Rows in flight and what was done with request images (tests, operators)."""
        engine = self._remote_engine
        if engine is None:
            return {"inflight": 0, "images_decoded": 0, "images_shared": 0}
        return {
            "inflight": engine.inflight,
            "images_decoded": engine.events.count("images_decoded"),
            "images_shared": engine.events.count("images_shared"),
        }
