"""`EngineReplica`: one Ray Serve replica owning one `Engine` over the shared adapter store.

    caption(row)        a streaming call: Admitted | RemoteError, then Token*, then the result
    describe_backbone() ReplicaInfo for the ingress (backbone config, device, tokenizer)
    list_adapters / describe / add_version / delete   the registry's, run here
    resolve(tenant, name), stats()                     for tests, benchmarks and operators
    check_health()      Ray Serve's health check: raises once the engine cannot serve

Routing: every caption row arrives with a multiplexed model id, the tenant-qualified adapter
id (`public/pub`); the replica registers it with Ray Serve's multiplexing (an LRU of
`adapters_per_replica` ids per replica), and Ray's router then sends that adapter's rows to
the replicas that hold it. The weights themselves stay the engine's business (its CPU tier and
device slots, loaded on demand by the version the row resolves to): the multiplexed "model" is
only the routing claim. The routing hit rate counts rows that found their adapter's weights
already in this replica's memory (device slot or CPU tier) when they arrived:
`ctxpeft_routing_requests_total{result="hit"|"miss"}`.

Health: the constructor returns once the backbone is loaded and the engine's worker runs (Ray
sends no traffic before: that is readiness); `check_health` raises when the worker stopped, so
Ray replaces the replica (liveness). On a graceful stop Ray first waits for the replica's
ongoing calls (graceful_shutdown_timeout_s), then `__del__` drains and closes the engine.

Metrics: each replica serves its own registry (every `ctxpeft_*` family of the single-process
service, plus the routing counter) on a Prometheus endpoint at the node's address, and writes
a file_sd target file `<targets_dir>/<replica>.json` for Prometheus' `file_sd_configs`
(removed on a graceful stop; a killed replica's stays, and Prometheus shows it down: `up 0`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import ray
import torch
from PIL import Image
from prometheus_client import start_http_server
from ray import serve

from adapters.format import AdapterFormatError
from service import __version__
from service.auth import KeyStore, metrics_token
from service.engine import CaptionRequest, CaptionResult, Engine
from service.engine.answers import pump, results_task
from service.exceptions import EngineError
from service.metrics import ServiceMetrics, private_labels_allowed
from service.scaleout.loopback import bind_replica_grpc_to_node_ip
from service.scaleout.messages import (
    Admitted,
    RemoteError,
    ReplicaInfo,
    Resolved,
    RowCall,
    SharedImage,
    Token,
)
from service.settings import Settings
from service.store import QuotaExceeded, StoreQuota

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class ReplicaOptions:
    """How each engine replica runs (besides the service settings)."""

    adapters_per_replica: int = 64  # multiplexed ids one replica holds (Ray's LRU)
    torch_threads: int = 1
    metrics_dir: str | None = None  # file_sd targets; None: <runtime_dir>/scaleout/targets
    drain_timeout_s: float = 20.0


class EngineReplica:
    """One engine per replica (decorated with `serve.deployment` by application.py)."""

    def __init__(self, settings_values: dict[str, Any], options: dict[str, Any]) -> None:
        bind_replica_grpc_to_node_ip()
        self.options = ReplicaOptions(**options)
        torch.set_num_threads(self.options.torch_threads)
        settings = Settings(**settings_values)
        self.settings = settings
        self.metrics = ServiceMetrics(
            adapter_labels=settings.metrics_adapter_labels,
            backbone=settings.backbone,
            scaleout=True,
            private_labels=private_labels_allowed(
                has_keys=not KeyStore.from_settings(settings).empty,
                scrape_token=metrics_token(settings) is not None,
            ),
        )
        self.engine = Engine.from_settings(settings, metrics=self.metrics)
        self.metrics.set_build_info(
            __version__, settings.backbone, str(self.engine.backbone.device)
        )
        self.replica = serve.get_replica_context().replica_id.unique_id

        async def hold(model_id: str) -> str:
            return model_id  # the routing claim; the engine loads weights on demand

        # Wired per instance (Ray Serve detects it) so that the LRU size is a setting.
        self.hold: Callable[[str], Any] = serve.multiplexed(
            max_num_models_per_replica=self.options.adapters_per_replica
        )(hold)
        self._target: Path | None = None
        self._metrics_server: Any = None
        self._publish_metrics_target()

    # --- captioning ---------------------------------------------------------------------
    def _holds(self, call: RowCall) -> bool:
        try:
            version = self.engine.registry.resolve(call.tenant, call.name)
        except EngineError:
            return False
        return self.engine.cache.is_ready(version)

    async def caption(self, call: RowCall) -> AsyncIterator[Any]:
        """One row: its admission answer, its tokens (when streamed), then its result."""
        model_id = serve.get_multiplexed_model_id()
        hit = self._holds(call)
        if model_id:
            await self.hold(model_id)
        self.engine.events.routed("hit" if hit else "miss")
        tokens: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        request = CaptionRequest(
            functools.partial(self._read_image, call.image, call.timeout_s),
            (call.name,),
            call.tenant,
            call.max_new_tokens,
            call.timeout_s,
            call.request_id,
            on_token=(lambda i, token: tokens.put_nowait((i, token)))
            if call.stream_tokens
            else None,
        )
        try:
            submission = await self.engine.submit(request)
        except EngineError as exc:
            yield RemoteError.of(exc)
            return
        yield Admitted(self.replica, hit)
        task = results_task(submission)
        try:
            async for event in pump(task, tokens):
                assert event is not None  # no idle_s: the pump never idles
                yield Token(event.token_id)
            try:
                results: list[CaptionResult] = task.result()
            except EngineError as exc:
                yield RemoteError.of(exc)
                return
            yield results[0]
        finally:
            if not task.done():
                task.cancel()  # the caller went away: the engine drops the row at its next step

    def _read_image(self, shared: SharedImage, timeout_s: float | None) -> Image.Image:
        """The row's image from the object store: called by the engine after admitting the
        row, in its preprocessing pool (a refused row never fetches the pixels). No decode:
        the ingress decoded them once for every row of the request."""
        pixels = ray.get(shared.ref, timeout=timeout_s)
        self.engine.events.image("read")
        return Image.fromarray(pixels)

    # --- management and introspection ---------------------------------------------------
    async def _manage(self, fn: Callable[..., T], *args: Any) -> T | RemoteError:
        try:
            return await asyncio.to_thread(fn, *args)
        except AdapterFormatError as exc:
            return RemoteError("format", "AdapterFormatError", str(exc))
        except QuotaExceeded as exc:
            return RemoteError("quota", "QuotaExceeded", str(exc))
        except EngineError as exc:
            return RemoteError.of(exc)

    async def list_adapters(self, tenant: str) -> Any:
        return await self._manage(self.engine.registry.list_adapters, tenant)

    async def describe(self, tenant: str, name: str) -> Any:
        return await self._manage(self.engine.registry.describe, tenant, name)

    async def add_version(
        self,
        tenant: str,
        name: str,
        config_bytes: bytes,
        weights_bytes: bytes,
        quota: StoreQuota | None = None,
    ) -> Any:
        self.engine.events.upload()
        ref = await self._manage(
            self.engine.registry.add_version, tenant, name, config_bytes, weights_bytes, quota
        )
        model_id = serve.get_multiplexed_model_id()
        if model_id and not isinstance(ref, RemoteError):
            await self.hold(model_id)  # validated here and on this CPU tier: route it here
        return ref

    async def delete(self, tenant: str, name: str) -> Any:
        return await self._manage(self.engine.registry.delete, tenant, name)

    def describe_backbone(self) -> ReplicaInfo:
        backbone = self.engine.backbone
        return ReplicaInfo(backbone.config, str(backbone.device), backbone.tokenizer)

    def resolve(self, tenant: str, name: str) -> Resolved:
        try:
            ref = self.engine.registry.resolve(tenant, name).ref
        except EngineError as exc:
            return Resolved(self.replica, tenant, name, None, type(exc).__name__)
        return Resolved(self.replica, ref.tenant, ref.name, ref.version)

    def stats(self) -> dict[str, Any]:
        stats = self.engine.stats()
        return {
            "replica": self.replica,
            "pid": os.getpid(),
            "hits": self.engine.events.count("routed_hit"),
            "misses": self.engine.events.count("routed_miss"),
            "completed": stats.completed,
            "dropped": dict(stats.dropped),
            "rejected": dict(stats.rejected),
            "images_read": self.engine.events.count("images_read"),
            "uploads": self.engine.events.count("uploads"),
            "tiers": asdict(stats.tiers),
        }

    # --- health, metrics and shutdown ---------------------------------------------------
    def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError(f"the engine stopped: {self.engine.stopped}")
        if not self.engine.ready:
            raise RuntimeError("the engine is closed")

    def _publish_metrics_target(self) -> None:
        host = ray.util.get_node_ip_address()
        server, _ = start_http_server(0, addr=host, registry=self.metrics.registry)
        self._metrics_server = server
        folder = Path(
            self.options.metrics_dir or self.settings.runtime_dir / "scaleout" / "targets"
        )
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{self.replica}.json"
        groups = [
            {
                "targets": [f"{host}:{server.server_port}"],
                "labels": {"replica": self.replica, "pid": str(os.getpid())},
            }
        ]
        tmp = folder / f".{self.replica}.json.tmp"
        tmp.write_text(json.dumps(groups) + "\n")
        os.replace(tmp, target)  # Prometheus never reads a half-written file
        self._target = target

    def __del__(self) -> None:
        engine: Engine | None = getattr(self, "engine", None)
        if engine is None:
            return
        engine.drain(self.options.drain_timeout_s)
        engine.close()
        if self._target is not None:
            self._target.unlink(missing_ok=True)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
