"""What the HTTP layer needs from an engine: `EnginePort`, a structural type (Protocol).

Two classes satisfy it: `service.engine.Engine` (one process: the backbone, the step loop and
the adapter tiers are here) and `service.scaleout.remote_engine.RemoteEngine` (the Ray Serve
ingress: every caption row goes to an engine replica). The routes, the drain and the health
checks are written against this port only, so the same FastAPI app serves in both places with
the same contract, limits and error shape.

    submission = await engine.submit(request)     # admission errors raise here
    results = await submission.results()           # or submission.cancel()
    engine.registry.list_adapters(tenant)          # describe / add_version / delete; .store
    engine.backbone.config.name, engine.model.decode(token_ids)
    engine.ready, engine.alive, engine.stopped, engine.begin_drain(), engine.drain(t), close()
    engine.samples                                  # sample pictures (demo backbone) or None
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from adapters.config import BackboneConfig
from adapters.data.samples import SceneSamples
from service.engine.types import CaptionRequest, CaptionResult
from service.registry import AdapterInfo
from service.store import AdapterRef, AdapterStore, StoreQuota


class RegistryPort(Protocol):
    """Listing and management of a tenant's adapters (blocking: call from a thread)."""

    @property
    def store(self) -> AdapterStore: ...

    def list_adapters(self, tenant: str) -> list[AdapterInfo]: ...

    def describe(self, tenant: str, name: str) -> AdapterInfo: ...

    def add_version(
        self,
        tenant: str,
        name: str,
        config_bytes: bytes,
        weights_bytes: bytes,
        quota: StoreQuota | None = None,
    ) -> AdapterRef: ...

    def delete(self, tenant: str, name: str) -> int: ...


class BackbonePort(Protocol):
    """What the routes show about the backbone."""

    @property
    def config(self) -> BackboneConfig: ...

    @property
    def device(self) -> object: ...


class DecoderPort(Protocol):
    """Token ids to text (streaming turns tokens into text pieces with it)."""

    def decode(self, ids: Sequence[int]) -> str: ...


class SubmissionPort(Protocol):
    """An admitted request: its results, or the first error among its adapters; `refs`, the
    adapters it resolved to (what the metrics may label)."""

    @property
    def refs(self) -> tuple[AdapterRef, ...]: ...

    async def results(self) -> list[CaptionResult]: ...

    def cancel(self) -> None: ...


class EnginePort(Protocol):
    @property
    def registry(self) -> RegistryPort: ...

    @property
    def backbone(self) -> BackbonePort: ...

    @property
    def model(self) -> DecoderPort: ...

    @property
    def ready(self) -> bool: ...

    @property
    def alive(self) -> bool: ...

    @property
    def stopped(self) -> str | None: ...

    @property
    def samples(self) -> SceneSamples | None:
        """Sample pictures for this backbone (`adapters.data.samples`: the demo's scenes)."""
        ...

    async def submit(self, request: CaptionRequest) -> SubmissionPort: ...

    def begin_drain(self) -> None: ...

    def drain(self, timeout_s: float) -> bool: ...

    def close(self) -> None: ...
