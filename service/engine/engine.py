"""The engine's front end: builds the pieces, admits requests on the asyncio side, and owns
the worker thread's life. The HTTP layer uses this API and nothing below it.

    engine = Engine.from_settings(settings, metrics=ServiceMetrics())   # or Engine(backbone, store)
    results = await engine.caption(CaptionRequest(image, adapters=("news",), tenant="acme"))
    r = results[0]   # one CaptionResult per requested adapter, in order
    r.caption, r.token_ids, r.finish_reason, r.ref.version, r.timings.first_token_ms
    submission = await engine.submit(request)   # admission errors raise here (streaming)
    results = await submission.results()        # caption() is these two steps
    task.cancel()                    # cancelling the caption() task cancels its rows
    engine.registry                  # resolve / list_adapters / describe / add_version / delete
    engine.ready                     # backbone loaded, worker running, not draining
    engine.alive                     # the worker thread has not stopped on its own
    engine.begin_drain()             # admit nothing new (503 draining); in-flight work goes on
    engine.drain(timeout_s) -> bool  # admit nothing new, wait for in-flight work (blocking)
    engine.close()                   # stop the worker; whatever is left fails with Draining
    engine.stats() -> EngineStats    # counters for tests and benchmarks

`caption()` raises the typed errors of `service.exceptions` (AdapterNotFound 404,
InvalidRequest 422, TenantLimit 429, QueueFull / Draining / AdapterLoadError / EngineFault /
EngineStopped 503, DeadlineExceeded 504, Cancelled 499; QueueFull and TenantLimit carry
`retry_after_s`). `image` is a decoded PIL image or a function that decodes (the HTTP layer's
`ImageDecoder`): it runs after admission, in a small thread pool (`preprocess_threads`), so a
refused request never decodes its image and at most that many decode at once.

Per request: every adapter name is resolved at admission (the tenant's own, then public;
newest version) and the request keeps that version to the end. If that version is deleted
before its weights were ever read, the request moves to the adapter's newest version (its
result names it) or fails with AdapterNotFound when the adapter is gone. A request that names
K adapters is K rows sharing one image (one encoder pass); if one of them fails, the others
are cancelled at once and the first error is raised.

Cancellation has no id: cancelling the task that awaits `caption()` (a client that went away)
cancels exactly that request's rows, wherever they are; the client's request id is only a
correlation id. Every row's life is the row ledger's (`service.engine.ledger`): it ends
exactly once, whichever path ends it.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from adapters.backbone import DTYPES, Backbone, connector_spec, resolve_device
from adapters.backbone_build import resolve_backbone
from adapters.bank import AdapterBank
from adapters.data.samples import SceneSamples, samples_for
from adapters.model import ContextPEFTModel
from service.admission import Admission
from service.auth import KeyStore
from service.engine.answers import gather_answers
from service.engine.encoder_cache import EncoderCache, content_key
from service.engine.join import Joiner
from service.engine.ledger import RowLedger
from service.engine.loop import StepLoop
from service.engine.probe import ServabilityProbe
from service.engine.rows import PreparedImage, Row, retrieve_error
from service.engine.types import CaptionRequest, CaptionResult, EngineStats
from service.events import EngineEvents
from service.exceptions import (
    DeadlineExceeded,
    Draining,
    EngineError,
    EngineStopped,
    InvalidRequest,
    RequestError,
)
from service.metrics import ServiceMetrics
from service.registry import AdapterVersion, open_adapters
from service.scheduler import Scheduler
from service.settings import EngineConfig, Settings
from service.store import AdapterRef, AdapterStore
from service.tenancy import TenantPolicies

log = logging.getLogger(__name__)
_JOIN_S = 30.0  # how long close() waits for the worker to finish its step


def check_request(request: CaptionRequest, config: EngineConfig) -> tuple[int, float]:
    """The request's (max_new_tokens, timeout_s) with the defaults filled in; InvalidRequest
    (422) when it names no adapter, too many, or a length out of bounds."""
    if not request.adapters:
        raise InvalidRequest("name at least one adapter")
    if len(request.adapters) > config.max_batch_size:
        raise InvalidRequest(f"at most {config.max_batch_size} adapters per request")
    max_new = request.max_new_tokens or config.default_max_new_tokens
    if not 1 <= max_new <= config.max_new_tokens_limit:
        raise InvalidRequest(f"max_new_tokens must be in 1..{config.max_new_tokens_limit}")
    timeout = request.timeout_s if request.timeout_s is not None else config.request_timeout_s
    return max_new, timeout


class Submission:
    """An admitted request whose rows are queued or running. `await results()` waits for
    them (until the request's deadline); cancelling that wait, or `cancel()`, cancels exactly
    these rows: queued ones are dropped before any compute, running ones leave at the
    worker's next step."""

    def __init__(self, engine: Engine, rows: list[Row], timeout_s: float) -> None:
        self._engine = engine
        self.rows = rows
        self.timeout_s = timeout_s

    async def results(self) -> list[CaptionResult]:
        """The results in the order of the names, or the first error among them (its
        siblings are cancelled at once)."""
        rows = self.rows
        try:
            return await gather_answers(
                [row.future for row in rows], rows[0].deadline, self.timeout_s
            )
        except asyncio.CancelledError:  # the caller cancelled this request
            self._engine.ledger.abandon(rows, "cancelled")
            raise
        except DeadlineExceeded as late:
            self._engine.ledger.abandon(rows, "deadline")
            late.refs = self.refs
            raise
        except EngineError as error:
            self._engine.ledger.abandon(rows, "cancelled")  # its siblings stop at once
            error.refs = self.refs
            raise

    @property
    def refs(self) -> tuple[AdapterRef, ...]:
        """The adapter versions the request resolved to (for the metrics' labels)."""
        return tuple(row.key.ref for row in self.rows)

    def cancel(self) -> None:
        """Cancel the rows that have not been answered yet (on the event loop's thread)."""
        self._engine.ledger.abandon(self.rows, "cancelled")


class Engine:
    """Captioning engine over one backbone and one adapter store."""

    def __init__(
        self,
        backbone: Backbone,
        store: AdapterStore,
        config: EngineConfig | None = None,
        metrics: ServiceMetrics | None = None,
        start: bool = True,
        bank: AdapterBank | None = None,
        tenants: TenantPolicies | None = None,
    ) -> None:
        self.config = config = config or EngineConfig()
        self.backbone = backbone
        self.model = ContextPEFTModel(backbone)
        self.metrics = metrics
        self.events = EngineEvents(metrics)
        self.bank = bank or AdapterBank(
            backbone.dims,
            connector_spec(backbone),
            config.device_slots,
            config.max_rank,
            device=backbone.device,
            dtype=backbone.dtype,
        )
        probe = (
            ServabilityProbe(self.model, self.bank.connector_spec, config.max_rank)
            if config.adapter_probe
            else None
        )
        self.registry, self.cache = open_adapters(
            store,
            backbone,
            self.bank,
            config.cpu_cache_bytes,
            self.events,
            config.refresh_s,
            on_change=self._wake,
            probe=probe,
        )
        self.scheduler: Scheduler[Row] = Scheduler(
            config.max_wait_ms / 1000.0, config.batch_aging_steps
        )
        self.admission = Admission(
            config.tenant_max_inflight,
            config.queue_size,
            self.events,
            config.max_batch_size,
            tenants,
            config.batch_queue_share,
        )
        self.ledger = RowLedger(self.admission, self.scheduler, self.cache, self.events)
        self.encoder_cache = EncoderCache(config.encoder_cache_entries, self.events)
        joiner = Joiner(
            self.model,
            self.bank,
            self.cache,
            self.ledger,
            self.encoder_cache,
            self.events,
            config,
        )
        self.loop = StepLoop(joiner, self.registry, self.cache, self.ledger, self.events, config)
        self._prep = ThreadPoolExecutor(config.preprocess_threads, "ctxpeft-preprocess")
        self._worker: threading.Thread | None = None
        self._closed = False
        self.stopped: str | None = None  # why the worker stopped on its own, if it did
        if start:
            self.start()

    @classmethod
    def from_settings(cls, settings: Settings, metrics: ServiceMetrics | None = None) -> Engine:
        """Load the backbone named by the settings (`resolve_backbone`: a name built under
        <runtime_dir>/backbones/ loads that folder; an unbuilt random-init preset is refused)
        and open the adapter store."""
        source = resolve_backbone(settings.backbone, settings.runtime_dir).source
        backbone = Backbone.load(source, device=str(resolve_device(settings.device)))
        backbone.fingerprint()  # of the stored weights, before any cast: adapters name it
        if DTYPES[settings.dtype] != backbone.dtype:
            backbone.to(DTYPES[settings.dtype])
        store = AdapterStore(settings.resolved_store_dir())
        store.clean_temporaries()
        tenants = KeyStore.from_settings(settings).policies
        return cls(backbone, store, EngineConfig.from_settings(settings), metrics, tenants=tenants)

    # --- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(
                target=self.loop.run, args=(self._on_stop,), name="ctxpeft-engine", daemon=True
            )
            self._worker.start()

    @property
    def alive(self) -> bool:
        """False once the worker stopped on its own: liveness fails, the process must go."""
        return self.stopped is None

    @property
    def ready(self) -> bool:
        return (
            self._worker is not None
            and not self._closed
            and self.alive
            and not self.admission.draining
        )

    def begin_drain(self) -> None:
        """Stop admitting: new requests get Draining (503); in-flight rows go on."""
        self.admission.drain()
        self.scheduler.drain()

    def drain(self, timeout_s: float) -> bool:
        """Stop admitting and wait for in-flight rows; True if all finished in time.
        Blocking: from async code use `await asyncio.to_thread(engine.drain, t)`."""
        self.begin_drain()
        return self.admission.wait_idle(timeout_s)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.loop.stopping = True
        self.admission.drain()
        # The worker's next_rows returns at once; what is queued ends now.
        self.ledger.close(Draining("the service shut down before this request ran"))
        worker = self._worker
        if worker is not None and threading.current_thread() is not worker:
            worker.join(timeout=_JOIN_S)
            if not worker.is_alive():
                self.loop.fail_all(Draining("the service shut down before this request ended"))
        self.cache.close()
        self._prep.shutdown(wait=False, cancel_futures=True)

    def _on_stop(self, reason: BaseException | None) -> None:
        """The worker thread ended. On its own (a bug the loop could not contain): readiness
        and liveness turn off, and everything queued or running fails at once."""
        if reason is None:
            return
        self.stopped = f"{type(reason).__name__}: {reason}"
        log.critical("the engine's worker stopped: %s", self.stopped)
        self.begin_drain()
        self.loop.fail_all(EngineStopped(f"the engine stopped ({self.stopped}); retry later"))

    # --- sample pictures (the port's `samples`, for GET /samples/random) ---------------
    @property
    def samples(self) -> SceneSamples | None:
        """The demo backbone's synthetic scenes at its image size; None on another backbone."""
        return samples_for(self.backbone.config)

    # --- the asyncio side ---------------------------------------------------------------
    async def caption(self, request: CaptionRequest) -> list[CaptionResult]:
        """Caption `request.image` with each adapter; results in the order of the names."""
        submission = await self.submit(request)
        return await submission.results()

    async def submit(self, request: CaptionRequest) -> Submission:
        """Admit a request: resolve its adapters, reserve room (tenant limit, queue), decode
        and preprocess its image, queue its rows. Raises the request's admission errors
        (404, 422, 429, 503, and whatever the image decoder raises); the returned
        `Submission` then delivers the results (or the error of a row)."""
        names = request.adapters
        max_new, timeout = check_request(request, self.config)
        if not self.alive:
            raise EngineStopped(f"the engine stopped ({self.stopped}); retry later")
        arrival = time.monotonic()
        # Off the event loop: resolving stats the store (a slow shared file system must not
        # stall every other request).
        versions = await asyncio.to_thread(self._resolve, request.tenant, names)
        try:
            return await self._admit(request, versions, max_new, timeout, arrival)
        except RequestError as exc:  # ours, or the caller's image decoder's
            exc.refs = tuple(v.ref for v in versions)
            raise

    async def _admit(
        self,
        request: CaptionRequest,
        versions: list[AdapterVersion],
        max_new: int,
        timeout: float,
        arrival: float,
    ) -> Submission:
        names = request.adapters
        loop = asyncio.get_running_loop()
        # Admission before any image work: a refused request never decodes its image.
        self.ledger.admit(request.tenant, len(names), request.priority)
        # In the caller's context: what the decoder logs (a Pillow warning) names its request.
        prepare = functools.partial(
            contextvars.copy_context().run, self._prepare, request.image, request.tenant
        )
        try:
            image = await loop.run_in_executor(self._prep, prepare)
        except BaseException:
            self.ledger.withdraw(request.tenant, len(names))
            raise
        rows = [
            Row(
                version,
                request.tenant,
                arrival,
                arrival + timeout,
                name,
                image,
                max_new,
                request.request_id,
                loop,
                loop.create_future(),
                index,
                request.on_token,
                request.priority,
            )
            for index, (version, name) in enumerate(zip(versions, names, strict=True))
        ]
        for row in rows:
            row.future.add_done_callback(retrieve_error)
        try:
            self.ledger.open(rows)
        except Draining:  # closed meanwhile: shutting down, or the worker stopped
            if not self.alive:
                raise EngineStopped(f"the engine stopped ({self.stopped}); retry later") from None
            raise
        return Submission(self, rows, timeout)

    def _resolve(self, tenant: str, names: Sequence[str]) -> list[AdapterVersion]:
        return [self.registry.resolve(tenant, name) for name in names]

    def _prepare(
        self, image: Image.Image | Callable[[], Image.Image], tenant: str
    ) -> PreparedImage:
        """Decode (the caller's decoder) and preprocess one image; runs in the preprocessing
        pool. The content key is scoped by tenant unless the encoder cache is shared."""
        if callable(image):
            image = image()  # the decoder's typed errors pass through unchanged
        try:
            pixels = self.backbone.preprocess([image])[0]
        except (OSError, ValueError) as exc:
            raise InvalidRequest(f"the image could not be preprocessed: {exc}") from None
        key = content_key(pixels)
        return PreparedImage(pixels, key if self.config.encoder_cache_shared else f"{tenant}/{key}")

    def _wake(self) -> None:
        self.scheduler.notify()

    def stats(self) -> EngineStats:
        return EngineStats.of(self.events, running=len(self.loop.batch), tiers=self.cache.stats())

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
