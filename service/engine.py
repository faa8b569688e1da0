"""The serving engine: one worker thread owns the model and the device; the asyncio side
only admits, enqueues and awaits. The HTTP layer uses this API and nothing below it.

    engine = Engine.from_settings(settings, metrics=ServiceMetrics())   # or Engine(backbone, store)
    results = await engine.caption(CaptionRequest(image, adapters=("news",), tenant="acme"))
    r = results[0]   # one CaptionResult per requested adapter, in order
    r.caption, r.token_ids, r.tokens, r.adapter, r.ref.version, r.timings.total_ms
    engine.cancel(request_id)        # client gone: the awaiting caption() raises Cancelled
    engine.registry                  # resolve / list_adapters / describe / add_version / delete
    engine.ready                     # backbone loaded, worker running, not draining
    engine.drain(timeout_s) -> bool  # admit nothing new, wait for in-flight work (blocking)
    engine.close()                   # stop the worker; whatever is left fails with Draining
    engine.stats() -> EngineStats    # counters for tests and benchmarks

`caption()` raises the typed errors of `service.exceptions` (AdapterNotFound 404,
InvalidRequest 422, TenantLimit 429, QueueFull / Draining / AdapterLoadError 503,
DeadlineExceeded 504, Cancelled 499; QueueFull and TenantLimit carry `retry_after_s`).
`image` is a PIL image (e.g. service.api.images.DecodedImage.rgb) or encoded bytes;
decoding and resizing run in a small thread pool, never on the event loop.

Per request: every adapter name is resolved at admission (the tenant's own, then public;
newest version) and the request keeps that version to the end. If that version is deleted
before its weights were ever read, the request moves to the adapter's newest version (its
result names it) or fails with AdapterNotFound when the adapter is gone.

Per batch (worker thread): bind adapter versions to bank slots (between batches, pinned for
the batch), vision encoder through a content-keyed cache shared by all adapters, each row's
connector, prefill with per-token (slot, context) routing, greedy decoding with a KV cache
where finished rows leave the batch.

Metrics (when a `ServiceMetrics` is given): batch size and distinct adapters per batch,
queue wait, queue depth, adapter loads and residency by tier, encoder cache hits / misses /
runs, generated tokens, and rejections the engine decides (queue_full, tenant_limit,
draining at admission; deadline and cancelled per row). The HTTP layer counts the rest
(requests by status, not_found, bad input, in-flight gauge).
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from adapters.backbone import Backbone, resolve_device
from adapters.bank import AdapterBank
from adapters.model import ContextPEFTModel
from adapters.presets import PRESETS
from service.adapter_cache import TierStats
from service.encoder_cache import EncoderCache, content_key
from service.exceptions import (
    AdapterNotFound,
    Cancelled,
    DeadlineExceeded,
    Draining,
    EngineError,
    InvalidRequest,
)
from service.metrics import ServiceMetrics
from service.registry import AdapterRegistry, AdapterVersion, VersionGone, connector_spec
from service.scheduler import Scheduler
from service.settings import Settings
from service.store import AdapterRef, AdapterStore

log = logging.getLogger(__name__)
DEFAULT_TENANT = "default"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --- public types --------------------------------------------------------------------------
@dataclass(frozen=True)
class CaptionRequest:
    """One image and one or more adapter names (one encoder pass, one result per name)."""

    image: Image.Image | bytes
    adapters: tuple[str, ...]
    tenant: str = DEFAULT_TENANT
    max_new_tokens: int | None = None  # None: EngineConfig.default_max_new_tokens
    timeout_s: float | None = None  # deadline from admission; None: request_timeout_s
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class Timings:
    queue_ms: float  # admission to the start of the row's batch
    encode_ms: float  # vision encoder of the batch (0 when every image was cached)
    generate_ms: float  # connector + prefill + decoding of the batch
    total_ms: float  # admission to answer


@dataclass(frozen=True)
class CaptionResult:
    caption: str
    token_ids: tuple[int, ...]
    adapter: str  # the name as requested
    ref: AdapterRef  # the version that produced it (tenant may be "public")
    timings: Timings
    request_id: str

    @property
    def tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class EngineConfig:
    """Engine knobs; `from_settings` maps the service settings of the same names."""

    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    device_slots: int = 16
    max_rank: int = 64
    cpu_cache_bytes: int = 256 << 20
    encoder_cache_entries: int = 512
    queue_size: int = 256
    tenant_max_inflight: int = 32
    request_timeout_s: float = 30.0
    default_max_new_tokens: int = 32
    max_new_tokens_limit: int = 64
    max_adapters_per_batch: int | None = None  # None: up to device_slots (1: grouping only)
    refresh_s: float = 2.0  # store rescan period
    preprocess_threads: int = 2

    @classmethod
    def from_settings(cls, settings: Settings) -> EngineConfig:
        return cls(
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            device_slots=settings.device_slots,
            max_rank=settings.max_rank,
            cpu_cache_bytes=settings.cpu_cache_bytes,
            encoder_cache_entries=settings.encoder_cache_entries,
            queue_size=settings.queue_size,
            tenant_max_inflight=settings.tenant_max_inflight,
            request_timeout_s=settings.request_timeout_s,
            default_max_new_tokens=settings.default_max_new_tokens,
            max_new_tokens_limit=settings.max_new_tokens_limit,
        )


@dataclass(frozen=True)
class EngineStats:
    batches: int
    rows: int  # rows run in batches
    adapters_in_batches: int  # sum over batches of distinct adapters
    completed: int  # rows answered with a caption
    failed: int  # rows answered with an error after admission (load errors, drops, ...)
    generated_tokens: int
    encoder_runs: int
    encoder_hits: int
    encoder_misses: int
    dropped: dict[str, int]  # rows dropped before compute or abandoned: deadline, cancelled
    rejected: dict[str, int]  # admissions refused: queue_full, tenant_limit, draining
    tiers: TierStats

    @property
    def mean_batch_size(self) -> float:
        return self.rows / self.batches if self.batches else 0.0

    @property
    def mean_adapters_per_batch(self) -> float:
        return self.adapters_in_batches / self.batches if self.batches else 0.0


# --- rows: one (request, adapter) pair ---------------------------------------------------------
@dataclass(eq=False)
class _Image:
    pixels: torch.Tensor  # [3, S, S], preprocessed
    key: str  # content hash of the pixels
    features: torch.Tensor | None = None  # set by the first batch that encodes it


@dataclass(eq=False)
class _Row:
    key: AdapterVersion
    tenant: str
    arrival: float
    deadline: float
    name: str
    image: _Image
    max_new_tokens: int
    request_id: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[CaptionResult]
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _done: bool = False

    def settled(self) -> bool:
        return self._done

    def claim(self) -> bool:
        """Take the right to answer the row; False if it was answered already. Any thread."""
        with self._lock:
            if self._done:
                return False
            self._done = True
            return True

    def deliver(
        self, outcome: CaptionResult | BaseException, before: Callable[[], None] | None = None
    ) -> None:
        """Resolve the awaiting future (after a successful `claim`), on its event loop.
        `before` runs there first, e.g. ending the row's flight: whoever awaits the answer
        then sees the tenant's in-flight count already lowered."""
        try:
            self.loop.call_soon_threadsafe(_resolve, self.future, outcome, before)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            if before is not None:
                before()


def _resolve(
    future: asyncio.Future[CaptionResult],
    outcome: CaptionResult | BaseException,
    before: Callable[[], None] | None,
) -> None:
    if before is not None:
        before()
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _retrieve(future: asyncio.Future[CaptionResult]) -> None:
    if not future.cancelled():
        future.exception()


# --- the engine --------------------------------------------------------------------------------
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
    ) -> None:
        self.config = config = config or EngineConfig()
        self.backbone = backbone
        self.model = ContextPEFTModel(backbone)
        self.metrics = metrics
        self.bank = bank or AdapterBank(
            backbone.dims,
            connector_spec(backbone),
            config.device_slots,
            config.max_rank,
            device=backbone.device,
            dtype=backbone.dtype,
        )
        self.registry = AdapterRegistry(
            store,
            backbone,
            self.bank,
            config.cpu_cache_bytes,
            metrics,
            config.refresh_s,
            on_change=self._wake,
        )
        self.scheduler: Scheduler[_Row] = Scheduler(
            config.max_batch_size,
            config.max_wait_ms / 1000.0,
            config.queue_size,
            config.tenant_max_inflight,
            config.max_adapters_per_batch,
            metrics,
            on_drop=self._on_drop,
        )
        self.encoder_cache = EncoderCache(config.encoder_cache_entries, metrics)
        self._prep = ThreadPoolExecutor(config.preprocess_threads, "ctxpeft-preprocess")
        self._requests: dict[str, list[_Row]] = {}
        self._requests_lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._closed = False
        if start:
            self.start()

    @classmethod
    def from_settings(cls, settings: Settings, metrics: ServiceMetrics | None = None) -> Engine:
        """Load the backbone named by the settings and open the adapter store. A preset name
        whose built folder exists under <runtime_dir>/backbones/ loads that folder (random
        init would give a different fingerprint every start)."""
        source: str | Path = settings.backbone
        built = settings.runtime_dir / "backbones" / settings.backbone
        if settings.backbone in PRESETS and (built / "backbone.json").is_file():
            source = built
        backbone = Backbone.load(source, device=str(resolve_device(settings.device)))
        backbone.fingerprint()  # of the stored weights, before any cast: adapters name it
        if _DTYPES[settings.dtype] != backbone.dtype:
            backbone.to(_DTYPES[settings.dtype])
        store = AdapterStore(settings.resolved_store_dir())
        store.clean_temporaries()
        return cls(backbone, store, EngineConfig.from_settings(settings), metrics)

    # --- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="ctxpeft-engine", daemon=True)
            self._worker.start()

    @property
    def ready(self) -> bool:
        return self._worker is not None and not self._closed and not self.scheduler.draining

    def drain(self, timeout_s: float) -> bool:
        """Stop admitting and wait for in-flight rows; True if all finished in time.
        Blocking: from async code use `await asyncio.to_thread(engine.drain, t)`."""
        self.scheduler.drain()
        return self.scheduler.wait_idle(timeout_s)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for _, row in self.scheduler.close():
            self._fail(row, Draining("the service shut down before this request ran"))
        if self._worker is not None and threading.current_thread() is not self._worker:
            self._worker.join(timeout=30)
        self.registry.close()
        self._prep.shutdown(wait=False, cancel_futures=True)

    # --- the asyncio side ---------------------------------------------------------------
    async def caption(self, request: CaptionRequest) -> list[CaptionResult]:
        """Caption `request.image` with each adapter; results in the order of the names."""
        cfg = self.config
        names = request.adapters
        if not names:
            raise InvalidRequest("name at least one adapter")
        if len(names) > cfg.max_batch_size:
            raise InvalidRequest(f"at most {cfg.max_batch_size} adapters per request")
        max_new = request.max_new_tokens or cfg.default_max_new_tokens
        if not 1 <= max_new <= cfg.max_new_tokens_limit:
            raise InvalidRequest(f"max_new_tokens must be in 1..{cfg.max_new_tokens_limit}")
        timeout = request.timeout_s if request.timeout_s is not None else cfg.request_timeout_s
        loop = asyncio.get_running_loop()
        arrival = time.monotonic()
        versions = [self.registry.resolve(request.tenant, name) for name in names]
        self.scheduler.admit(request.tenant, len(names))
        try:
            image = await loop.run_in_executor(self._prep, self._prepare, request.image)
        except BaseException:
            self.scheduler.withdraw(request.tenant, len(names))
            raise
        rows = [
            _Row(
                v,
                request.tenant,
                arrival,
                arrival + timeout,
                name,
                image,
                max_new,
                request.request_id,
                loop,
                loop.create_future(),
            )
            for v, name in zip(versions, names, strict=True)
        ]
        for row in rows:
            # A sibling's error ends the gather; retrieve the others' so none is "never retrieved".
            row.future.add_done_callback(_retrieve)
        with self._requests_lock:
            self._requests[request.request_id] = rows
        for row in rows:
            self.registry.cache.want(row.key)
        self.scheduler.enqueue(rows)
        futures = [row.future for row in rows]
        try:
            left = arrival + timeout - time.monotonic()
            done, pending = await asyncio.wait(
                futures, timeout=max(0.0, left), return_when=asyncio.FIRST_EXCEPTION
            )
        except asyncio.CancelledError:
            self._abandon(rows, "cancelled")
            raise
        finally:
            with self._requests_lock:
                self._requests.pop(request.request_id, None)
        for future in futures:  # the first error in the order of the names
            error = future.exception() if future in done else None
            if error is not None:
                raise error
        if pending:
            self._abandon(rows, "deadline")
            raise DeadlineExceeded(f"no answer within {timeout:g} s (request_timeout_s)")
        return [future.result() for future in futures]

    def cancel(self, request_id: str) -> bool:
        """Cancel a request (e.g. its client went away); its caption() raises Cancelled.
        Rows not yet in a batch are dropped before any compute. Any thread."""
        with self._requests_lock:
            rows = self._requests.get(request_id, [])
        cancelled = self._abandon(rows, "cancelled")
        return cancelled > 0

    def _abandon(self, rows: Sequence[_Row], reason: str) -> int:
        """Answer rows that are still open with Cancelled / DeadlineExceeded (counted)."""
        error: EngineError = (
            Cancelled("the request was cancelled")
            if reason == "cancelled"
            else DeadlineExceeded("the request's deadline passed")
        )
        # Count before delivering: whoever awaits the answer then sees the counters updated.
        claimed = [row for row in rows if row.claim()]
        if claimed:
            self._count_drop(reason, len(claimed))
            self.scheduler.notify()
        for row in claimed:
            row.deliver(error)
        return len(claimed)

    def _prepare(self, image: Image.Image | bytes) -> _Image:
        """Decode (bytes) and preprocess one image; runs in the preprocessing pool."""
        try:
            if isinstance(image, bytes | bytearray):
                with Image.open(io.BytesIO(image)) as opened:
                    image = opened.convert("RGB")
            pixels = self.backbone.preprocess([image])[0]
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise InvalidRequest(f"the image could not be decoded: {exc}") from None
        return _Image(pixels, content_key(pixels))

    # --- bookkeeping shared by both sides ----------------------------------------------------
    def _count(self, **counts: int) -> None:
        with self._counts_lock:
            self._counts.update(counts)

    def _count_drop(self, reason: str, rows: int = 1) -> None:
        self._count(**{f"dropped_{reason}": rows, "failed": rows})
        if self.metrics is not None:
            for _ in range(rows):
                self.metrics.reject(reason)

    def _on_drop(self, row: _Row, reason: str | None) -> None:
        # Called by the scheduler (its lock held) for a row leaving the queue unrun.
        self.registry.cache.unwant(row.key)
        if reason is not None and row.claim():
            self._count_drop(reason)
            row.deliver(DeadlineExceeded("the deadline passed while the request was queued"))

    def _fail(self, row: _Row, error: BaseException) -> None:
        """Answer a row taken out of the queue with an error and end its flight."""
        self._answer(row, error)

    def _answer(self, row: _Row, outcome: CaptionResult | BaseException) -> None:
        """Answer a row that left the queue (batch, failed load, shutdown), count it, and end
        its flight; a row answered meanwhile (deadline, cancel) only ends its flight."""
        finish = functools.partial(self.scheduler.finished, row.tenant)
        if not row.claim():
            finish()
            return
        if isinstance(outcome, CaptionResult):
            self._count(completed=1, tokens=outcome.tokens)
            if self.metrics is not None:
                self.metrics.add_generated_tokens(row.name, outcome.tokens)
        else:
            self._count(failed=1)
        row.deliver(outcome, before=finish)

    def _wake(self) -> None:
        self.scheduler.notify()

    def stats(self) -> EngineStats:
        with self._counts_lock:
            c = Counter(self._counts)
        return EngineStats(
            batches=c["batches"],
            rows=c["rows"],
            adapters_in_batches=c["adapters"],
            completed=c["completed"],
            failed=c["failed"],
            generated_tokens=c["tokens"],
            encoder_runs=self.encoder_cache.runs,
            encoder_hits=self.encoder_cache.hits,
            encoder_misses=self.encoder_cache.misses,
            dropped={k[8:]: v for k, v in c.items() if k.startswith("dropped_")},
            rejected=dict(self.scheduler.rejected),
            tiers=self.registry.cache.stats(),
        )

    # --- the worker thread ------------------------------------------------------------------
    def _work(self) -> None:
        torch.set_grad_enabled(False)
        cache = self.registry.cache
        while not self._closed:
            self._sweep_failed_loads()
            batch = self.scheduler.next_batch(cache.is_ready, self.bank.num_slots, timeout=0.05)
            if not batch:
                continue
            try:
                self._run_batch(batch)
            except Exception as exc:  # a bug outside generation; keep serving the others
                log.exception("batch of %d rows failed before generation", len(batch))
                for _, row in batch:
                    if not row.settled():
                        self._fail(row, exc)

    def _sweep_failed_loads(self) -> None:
        """Rows whose adapter version failed to load: re-resolve those whose version was
        deleted before it was read; fail the others with the load error."""
        cache = self.registry.cache
        for key in self.scheduler.waiting_keys():
            assert isinstance(key, AdapterVersion)
            error = cache.failure(key)
            if error is None:
                continue
            back: list[tuple[int, _Row]] = []
            for seq, row in self.scheduler.take(key):
                cache.unwant(row.key)
                if not isinstance(error, VersionGone):
                    self._fail(row, error)
                    continue
                try:
                    row.key = self.registry.resolve(row.tenant, row.name)
                except AdapterNotFound as exc:
                    self._fail(row, exc)
                    continue
                cache.want(row.key)
                back.append((seq, row))
            self.scheduler.requeue(back)

    def _run_batch(self, batch: list[tuple[int, _Row]]) -> None:
        cache = self.registry.cache
        live: list[_Row] = []
        for _, row in batch:
            if row.settled():  # cancelled or timed out after it was picked: no compute
                cache.unwant(row.key)
                self.scheduler.finished(row.tenant)
            else:
                live.append(row)
        slots, failed, missing = cache.bind(row.key for row in live)
        # A CPU copy evicted since the readiness check: back in line, still wanted.
        self.scheduler.requeue((seq, r) for seq, r in batch if r.key in missing and r in live)
        rows = [row for row in live if row.key in slots]
        for row in live:
            if row.key in failed:
                cache.unwant(row.key)
                self._fail(row, failed[row.key])
        for row in rows:
            cache.unwant(row.key)
        if not rows:
            return
        outcomes: Sequence[CaptionResult | BaseException]
        try:
            outcomes = self._generate(rows, slots)
        except Exception as exc:  # a failed batch fails its rows, never the worker
            log.exception("batch of %d rows failed", len(rows))
            outcomes = [exc] * len(rows)
        finally:
            cache.release(slots, [row.key for row in rows])
        for row, outcome in zip(rows, outcomes, strict=True):
            self._answer(row, outcome)

    def _generate(self, rows: list[_Row], slots: dict[AdapterVersion, int]) -> list[CaptionResult]:
        started = time.monotonic()
        if self.metrics is not None:
            for row in rows:
                self.metrics.queue_wait.observe(started - row.arrival)
        features = self._encode(rows)
        encoded = time.monotonic()
        slot_ids = torch.tensor([slots[row.key] for row in rows], dtype=torch.long)
        tokens = self.model.generate(
            features, self.bank, slot_ids, [row.max_new_tokens for row in rows]
        )
        generated = time.monotonic()
        adapters = len({row.key for row in rows})
        self.scheduler.record_batch(generated - started)
        self._count(batches=1, rows=len(rows), adapters=adapters)
        if self.metrics is not None:
            self.metrics.observe_batch(len(rows), adapters)
        return [
            CaptionResult(
                caption=self.model.decode(ids),
                token_ids=tuple(ids),
                adapter=row.name,
                ref=row.key.ref,
                timings=Timings(
                    queue_ms=(started - row.arrival) * 1000,
                    encode_ms=(encoded - started) * 1000,
                    generate_ms=(generated - encoded) * 1000,
                    total_ms=(time.monotonic() - row.arrival) * 1000,
                ),
                request_id=row.request_id,
            )
            for row, ids in zip(rows, tokens, strict=True)
        ]

    def _encode(self, rows: list[_Row]) -> torch.Tensor:
        """Features per row [B, n_img, d_vis]; an image shared by rows is encoded once."""
        todo = [row.image for row in rows if row.image.features is None]
        if todo:
            found = self.encoder_cache.encode(
                [i.key for i in todo], [i.pixels for i in todo], self.backbone.encode_images
            )
            for image, feature in zip(todo, found, strict=True):
                image.features = feature
        memo = len(rows) - len(todo)
        if memo:
            self.encoder_cache.count_hits(memo)
        return torch.stack([row.image.features for row in rows if row.image.features is not None])

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
