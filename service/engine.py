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

The types (CaptionRequest, CaptionResult, Timings, EngineConfig, EngineStats) live in
`service.engine_types` and are re-exported here.

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
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from adapters.backbone import Backbone, resolve_device
from adapters.bank import AdapterBank
from adapters.model import ContextPEFTModel
from adapters.presets import PRESETS
from service.encoder_cache import EncoderCache, content_key
from service.engine_types import (
    DEFAULT_TENANT,
    CaptionRequest,
    CaptionResult,
    EngineConfig,
    EngineStats,
    Timings,
)
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
from service.rows import PreparedImage, Row, retrieve_error
from service.scheduler import Scheduler
from service.settings import Settings
from service.store import AdapterStore

__all__ = [
    "DEFAULT_TENANT",
    "CaptionRequest",
    "CaptionResult",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "Timings",
]

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
        self.scheduler: Scheduler[Row] = Scheduler(
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
        self._requests: dict[str, list[Row]] = {}
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
            Row(
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
                index,
                request.on_token,
            )
            for index, (v, name) in enumerate(zip(versions, names, strict=True))
        ]
        for row in rows:
            row.future.add_done_callback(retrieve_error)
        with self._requests_lock:
            self._requests.setdefault(request.request_id, []).extend(rows)
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
            self._forget(request.request_id, rows)
        for future in futures:  # the first error in the order of the names
            error = future.exception() if future in done else None
            if error is not None:
                raise error
        if pending:
            self._abandon(rows, "deadline")
            raise DeadlineExceeded(f"no answer within {timeout:g} s (request_timeout_s)")
        return [future.result() for future in futures]

    def cancel(self, request_id: str) -> bool:
        """Cancel the requests with this id (e.g. the client went away); their caption()
        raises Cancelled. Rows not yet in a batch are dropped before any compute. Any thread."""
        with self._requests_lock:
            rows = list(self._requests.get(request_id, ()))
        cancelled = self._abandon(rows, "cancelled")
        return cancelled > 0

    def _forget(self, request_id: str, rows: list[Row]) -> None:
        # Several requests may share an id (clients choose X-Request-ID): remove only these.
        with self._requests_lock:
            left = [r for r in self._requests.get(request_id, ()) if r not in rows]
            if left:
                self._requests[request_id] = left
            else:
                self._requests.pop(request_id, None)

    def _abandon(self, rows: Sequence[Row], reason: str) -> int:
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

    def _prepare(self, image: Image.Image | bytes) -> PreparedImage:
        """Decode (bytes) and preprocess one image; runs in the preprocessing pool."""
        try:
            if isinstance(image, bytes | bytearray):
                with Image.open(io.BytesIO(image)) as opened:
                    image = opened.convert("RGB")
            pixels = self.backbone.preprocess([image])[0]
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise InvalidRequest(f"the image could not be decoded: {exc}") from None
        return PreparedImage(pixels, content_key(pixels))

    # --- bookkeeping shared by both sides ----------------------------------------------------
    def _count(self, **counts: int) -> None:
        with self._counts_lock:
            self._counts.update(counts)

    def _count_drop(self, reason: str, rows: int = 1) -> None:
        self._count(**{f"dropped_{reason}": rows, "failed": rows})
        if self.metrics is not None:
            for _ in range(rows):
                self.metrics.reject(reason)

    def _on_drop(self, row: Row, reason: str | None) -> None:
        # Called by the scheduler (its lock held) for a row leaving the queue unrun.
        self.registry.cache.unwant(row.key)
        if reason is not None and row.claim():
            self._count_drop(reason)
            row.deliver(DeadlineExceeded("the deadline passed while the request was queued"))

    def _fail(self, row: Row, error: BaseException) -> None:
        """Answer a row taken out of the queue with an error and end its flight."""
        self._answer(row, error)

    def _answer(self, row: Row, outcome: CaptionResult | BaseException) -> None:
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
            row.emit(outcome.token_ids)  # this engine streams a row's tokens when it ends
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
            back: list[tuple[int, Row]] = []
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

    def _run_batch(self, batch: list[tuple[int, Row]]) -> None:
        cache = self.registry.cache
        live: list[Row] = []
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

    def _generate(self, rows: list[Row], slots: dict[AdapterVersion, int]) -> list[CaptionResult]:
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
        prompt_tokens = 1 + features.shape[1]  # BOS + image tokens
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
                finish_reason="length" if len(ids) >= row.max_new_tokens else "stop",
                prompt_tokens=prompt_tokens,
            )
            for row, ids in zip(rows, tokens, strict=True)
        ]

    def _encode(self, rows: list[Row]) -> torch.Tensor:
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
