"""Engine: identical captions alone and in mixed batches, hot swap under load, many adapters
through few slots, one encoder pass per image, deadlines, cancellation, full queues, drain."""

from __future__ import annotations

import asyncio
import functools
import io
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from adapters.adapter_set import AdapterSet
from adapters.backbone import connector_spec
from adapters.bank import AdapterBank
from adapters.decoding import generate
from adapters.format import save_adapter
from adapters.model import ContextPEFTModel
from service.adapter_cache import set_nbytes
from service.engine import CaptionRequest, CaptionResult, Engine, EngineConfig
from service.exceptions import (
    AdapterLoadError,
    AdapterNotFound,
    DeadlineExceeded,
    Draining,
    InvalidRequest,
    QueueFull,
    TenantLimit,
    UnsupportedImage,
)
from service.images import ImageDecoder, ImageLimits
from service.metrics import ServiceMetrics
from service.registry import AdapterVersion
from service.settings import Settings
from service.store import AdapterStore
from tests.service.adapter_fixtures import noise_image, put, random_adapter, tiny_backbone

TOKENS = 6


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "store")


@pytest.fixture
def make_engine(store: AdapterStore) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(start: bool = True, bank: AdapterBank | None = None, **config: Any) -> Engine:
        config.setdefault("default_max_new_tokens", TOKENS)
        metrics = config.pop("metrics", None)
        engine = Engine(
            tiny_backbone(), store, EngineConfig(**config), metrics, start=start, bank=bank
        )
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


SAFETY_S = 60.0  # a safety net for waits on events the test caused; never what is checked


async def until(check: Callable[[], bool]) -> None:
    """Wait for a state the test caused (rows queued by its own requests, loads the engine
    started for them), yielding to the event loop between looks; fails only after the
    safety net."""
    deadline = time.monotonic() + SAFETY_S
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached within the safety net")
        await asyncio.sleep(0.002)


def references(
    adapter: AdapterSet, images: list[Image.Image], tokens: int = TOKENS
) -> list[tuple[int, ...]]:
    """What `adapter` generates for each image outside the engine: the adapter set itself as
    a one-slot weight source (no bank, no scheduler)."""
    backbone = tiny_backbone()
    model = ContextPEFTModel(backbone)
    adapter.eval()
    features = backbone.encode_images(backbone.preprocess(images))
    slots = torch.zeros(len(images), dtype=torch.long)
    return [tuple(ids) for ids in generate(model, features, adapter, slots, tokens)]


def reference(adapter: AdapterSet, image: Image.Image, tokens: int = TOKENS) -> tuple[int, ...]:
    return references(adapter, [image], tokens)[0]


def ask(image: Image.Image | ImageDecoder, *names: str, **kwargs: Any) -> CaptionRequest:
    return CaptionRequest(image, adapters=names, tenant=kwargs.pop("tenant", "acme"), **kwargs)


def rejections(metrics: ServiceMetrics, reason: str) -> float | None:
    return metrics.registry.get_sample_value("ctxpeft_rejections_total", {"reason": reason})


def rows_ended(metrics: ServiceMetrics, outcome: str) -> float | None:
    return metrics.registry.get_sample_value("ctxpeft_rows_total", {"outcome": outcome})


# --- correctness of mixed batches --------------------------------------------------------------
def test_caption_is_identical_alone_and_in_a_mixed_batch_of_32_rows_over_16_adapters(
    make_engine: Callable[..., Engine], store: AdapterStore
) -> None:
    backbone = tiny_backbone()
    for i in range(16):
        put(store, "acme", f"a{i}", random_adapter(backbone, i))
    requests = [ask(noise_image(j), f"a{j % 16}") for j in range(32)]

    async def run() -> tuple[list[CaptionResult], list[CaptionResult], Engine]:
        alone_engine = make_engine(max_batch_size=1)
        alone = [(await alone_engine.caption(r))[0] for r in requests]
        engine = make_engine(start=False, max_batch_size=32, max_prefill_rows=32, device_slots=16)
        tasks = [asyncio.create_task(engine.caption(r)) for r in requests]
        await until(lambda: engine.scheduler.queued == 32)
        await until(lambda: engine.cache.stats().cpu_loads == 16)
        engine.start()
        mixed = [(await t)[0] for t in tasks]
        return alone, mixed, engine

    alone, mixed, engine = asyncio.run(run())
    stats = engine.stats()
    assert (stats.batches, stats.rows, stats.adapters_in_batches) == (1, 32, 16)
    assert [r.token_ids for r in mixed] == [r.token_ids for r in alone]
    assert [r.caption for r in mixed] == [r.caption for r in alone]
    assert len({r.token_ids for r in alone}) > 16  # adapters and images really differ
    # And both equal the adapter set run on its own, outside the engine and its bank.
    first = random_adapter(backbone, 0)
    assert alone[0].token_ids == reference(first, noise_image(0))
    # Some rows stop early and leave the batch; the rest still match token for token.
    assert min(r.tokens for r in alone) < TOKENS == max(r.tokens for r in alone)


def test_one_image_for_k_adapters_runs_the_vision_encoder_once(
    make_engine: Callable[..., Engine], store: AdapterStore
) -> None:
    backbone = tiny_backbone()
    for i in range(5):
        put(store, "acme", f"a{i}", random_adapter(backbone, i))
    metrics = ServiceMetrics()
    engine = make_engine(encoder_cache_entries=0, device_slots=2, metrics=metrics)
    image = noise_image(7)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    names = [f"a{i}" for i in range(5)]

    # Five adapters through two slots: at least three groups join one after another as
    # slots free up, and one encoder pass even with no cache.
    decoder = ImageDecoder(buffer.getvalue(), ImageLimits())
    results = asyncio.run(engine.caption(ask(decoder, *names)))
    stats = engine.stats()
    assert [r.adapter for r in results] == names
    assert [r.ref.name for r in results] == names
    assert stats.batches >= 3 and stats.encoder_runs == 1
    assert stats.encoder_hits == 4 and stats.encoder_misses == 1
    assert metrics.registry.get_sample_value("ctxpeft_encoder_runs_total") == 1.0
    assert results[3].token_ids == reference(random_adapter(backbone, 3), image)

    # With the cache, the same image sent again does not run the encoder at all.
    cached = make_engine(encoder_cache_entries=8)
    asyncio.run(cached.caption(ask(image, "a0")))
    asyncio.run(cached.caption(ask(image, "a1", "a2")))
    assert (cached.stats().encoder_runs, cached.stats().encoder_hits) == (1, 2)


def test_on_token_streams_each_adapters_tokens_in_order_before_its_result(
    make_engine: Callable[..., Engine], store: AdapterStore
) -> None:
    backbone = tiny_backbone()
    for i in range(3):
        put(store, "acme", f"a{i}", random_adapter(backbone, i))
    engine = make_engine(max_new_tokens_limit=16)
    seen: list[tuple[int, int]] = []
    at_result: list[int] = []

    async def run() -> list[CaptionResult]:
        request = ask(noise_image(3), "a0", "a1", "a2", max_new_tokens=12, on_token=record)
        results = await engine.caption(request)
        at_result.append(len(seen))
        return results

    def record(index: int, token: int) -> None:
        seen.append((index, token))

    results = asyncio.run(run())
    assert at_result == [sum(r.tokens for r in results)]  # every token came before caption()
    for index, result in enumerate(results):
        assert tuple(t for i, t in seen if i == index) == result.token_ids
        assert result.finish_reason == ("length" if result.tokens == 12 else "stop")
        assert result.prompt_tokens == 1 + backbone.num_image_tokens
    assert results[1].token_ids == reference(random_adapter(backbone, 1), noise_image(3), 12)


# --- hot swap --------------------------------------------------------------------------------------
def test_hot_swap_under_concurrent_load_fails_no_request_for_an_existing_adapter(
    make_engine: Callable[..., Engine], store: AdapterStore
) -> None:
    backbone = tiny_backbone()
    images = [noise_image(100 + i) for i in range(3)]
    # Every content ever written under a (name, version): re-adding restarts at v1.
    written: dict[tuple[str, int], list[AdapterSet]] = {}

    def write(name: str, seed: int, via_engine: Engine | None = None) -> None:
        adapter = random_adapter(backbone, seed)
        if via_engine is None:
            ref = put(store, "acme", name, adapter)  # like `ctxpeft train` in another process
        else:
            folder = store.root / f"upload-{seed}"
            save_adapter(adapter, folder)
            config = (folder / "adapter_config.json").read_bytes()
            weights = (folder / "adapter.safetensors").read_bytes()
            ref = via_engine.registry.add_version("acme", name, config, weights)
        written.setdefault((name, ref.version), []).append(adapter)

    for i, name in enumerate(["stable", "swapped", "recreated"]):
        write(name, i)
    engine = make_engine(max_batch_size=8, device_slots=4, cpu_cache_bytes=1 << 30)
    results: list[tuple[str, int, CaptionResult]] = []
    errors: list[tuple[str, BaseException]] = []
    swapping = threading.Event()
    answered = threading.Condition()  # notified at each result

    def served(name: str) -> int:
        return sum(1 for n, _, _ in list(results) if n == name)

    def served_at_least(count: int) -> bool:
        return served("swapped") >= count

    def mutate() -> None:
        try:
            for step in range(6):
                write("swapped", 10 + step, via_engine=engine if step % 2 else None)
                if step == 2:
                    engine.registry.delete("acme", "recreated")
                    time.sleep(0.02)
                    write("recreated", 20)
                # Let a few requests run on this state, however fast the machine is.
                enough = functools.partial(served_at_least, served("swapped") + 3)
                with answered:
                    if not answered.wait_for(enough, SAFETY_S):
                        errors.append(("swapped", AssertionError("no request ran on a state")))
        finally:
            swapping.set()

    async def client(name: str, seed: int) -> None:
        rng = random.Random(seed)
        while not swapping.is_set():
            k = rng.randrange(len(images))
            try:
                result = (await engine.caption(ask(images[k], name)))[0]
                with answered:
                    results.append((name, k, result))
                    answered.notify_all()
            except AdapterNotFound as exc:
                if name != "recreated":  # only it is ever absent (between delete and re-add)
                    errors.append((name, exc))
            except Exception as exc:
                errors.append((name, exc))

    async def run() -> None:
        mutator = threading.Thread(target=mutate)
        mutator.start()
        names = ["stable", "swapped", "recreated"] * 3
        await asyncio.gather(*(client(n, s) for s, n in enumerate(names)))
        mutator.join()

    asyncio.run(run())
    assert errors == []
    versions_seen = Counter((name, r.ref.version) for name, _, r in results)
    assert len({v for (n, v) in versions_seen if n == "swapped"}) >= 3  # swaps were served
    assert len(results) >= 30
    refs: dict[tuple[str, int], list[list[tuple[int, ...]]]] = {}
    for name, k, result in results:
        key = (name, result.ref.version)
        if key not in refs:
            refs[key] = [references(a, images) for a in written[key]]
        # Each result is what the version it names produces (a recreated v1 may be either).
        assert result.ref.tenant == "acme"
        assert result.token_ids in {per_image[k] for per_image in refs[key]}


def test_a_version_deleted_before_its_weights_were_read_moves_to_the_newest(
    make_engine: Callable[..., Engine], store: AdapterStore
) -> None:
    backbone = tiny_backbone()
    hold = random_adapter(backbone, 0)
    put(store, "acme", "hold", hold)
    put(store, "acme", "news", random_adapter(backbone, 1))
    # Room on the CPU tier for one set: while "hold" waits there, "news" cannot be read.
    engine = make_engine(start=False, cpu_cache_bytes=set_nbytes(hold))

    async def run() -> CaptionResult:
        first = asyncio.create_task(engine.caption(ask(noise_image(1), "hold")))
        await until(lambda: engine.cache.stats().cpu_loads == 1)
        news = asyncio.create_task(engine.caption(ask(noise_image(2), "news")))
        await until(lambda: engine.scheduler.queued == 2)
        engine.registry.delete("acme", "news")  # v1 goes before anyone read it ...
        put(store, "acme", "news", random_adapter(backbone, 2))  # ... a new v1,
        put(store, "acme", "news", random_adapter(backbone, 3))  # and a v2
        engine.start()
        await first
        return (await news)[0]

    result = asyncio.run(run())
    assert result.ref.version == 2
    assert result.token_ids == reference(random_adapter(backbone, 3), noise_image(2))


# --- tiers -----------------------------------------------------------------------------------------
class CheckedBank(AdapterBank):
    """A real bank that records every slot write and fails if the slot is pinned."""

    engine: Engine | None = None
    writes: int = 0
    violations: int = 0

    def load(self, slot: int, adapter: AdapterSet) -> None:
        if self.engine is not None and self.engine.cache.pins(slot) > 0:
            self.violations += 1
        self.writes += 1
        super().load(slot, adapter)


def test_64_adapters_through_8_slots_under_skewed_traffic(
    make_engine: Callable[..., Engine], store: AdapterStore
) -> None:
    backbone = tiny_backbone()
    adapters = [random_adapter(backbone, i) for i in range(64)]
    for i, adapter in enumerate(adapters):
        put(store, "acme", f"a{i}", adapter)
    budget = 12 * set_nbytes(adapters[0])
    bank = CheckedBank(backbone.dims, connector_spec(backbone), num_slots=8, max_rank=8)
    metrics = ServiceMetrics()
    engine = make_engine(
        bank=bank,
        max_batch_size=8,
        device_slots=8,
        cpu_cache_bytes=budget,
        queue_size=256,
        tenant_max_inflight=256,
        default_max_new_tokens=3,
        metrics=metrics,
    )
    bank.engine = engine
    rng = random.Random(0)
    weights = [1 / (k + 1) for k in range(64)]  # Zipf, alpha = 1
    picks = rng.choices(range(64), weights=weights, k=240)
    picks[-64:] = range(64)  # and every adapter at least once
    images = [noise_image(k) for k in range(4)]

    async def run() -> list[CaptionResult]:
        requests = [ask(images[j % 4], f"a{k}") for j, k in enumerate(picks)]
        out = await asyncio.gather(*(engine.caption(r) for r in requests))
        return [r[0] for r in out]

    results = asyncio.run(run())
    stats = engine.stats()
    assert [r.adapter for r in results] == [f"a{k}" for k in picks]
    assert stats.completed == 240 and stats.failed == 0
    assert bank.violations == 0 and bank.writes == stats.tiers.device_loads > 64
    assert stats.tiers.cpu_peak_bytes <= budget
    assert stats.tiers.cpu_loads >= 64  # every adapter came from disk at least once
    assert stats.mean_adapters_per_batch > 1  # batches mixed adapters
    for j in (0, 100, 239):  # spot checks against each adapter run alone
        expected = reference(adapters[picks[j]], images[j % 4], tokens=3)
        assert results[j].token_ids == expected
    loads = metrics.registry.get_sample_value("ctxpeft_adapter_loads_total", {"tier": "cpu"})
    assert loads == stats.tiers.cpu_loads


# --- admission control and drops -------------------------------------------------------------
def test_deadline_expiry_drops_before_compute_and_is_counted(
    make_engine: Callable[..., Engine], store: AdapterStore
) -> None:
    put(store, "acme", "news", random_adapter(tiny_backbone(), 1))
    metrics = ServiceMetrics()
    engine = make_engine(start=False, metrics=metrics)

    async def run() -> None:
        with pytest.raises(DeadlineExceeded):
            await engine.caption(ask(noise_image(1), "news", timeout_s=0.05))
        engine.start()
        await until(lambda: engine.admission.inflight == 0)

    asyncio.run(run())
    stats = engine.stats()
    assert stats.dropped == {"deadline": 1}
    # A row that ended is not a refused admission: counted by its outcome, once.
    assert rows_ended(metrics, "deadline") == 1.0
    assert rejections(metrics, "deadline") is None
    assert stats.batches == 0 and stats.encoder_runs == 0


def test_cancellation_drops_before_compute_and_is_counted(
    make_engine: Callable[..., Engine], store: AdapterStore
) -> None:
    put(store, "acme", "news", random_adapter(tiny_backbone(), 1))
    metrics = ServiceMetrics()
    engine = make_engine(start=False, metrics=metrics)

    async def run() -> CaptionResult:
        # Three requests with the same client-chosen id: ids are only for correlation.
        first = asyncio.create_task(engine.caption(ask(noise_image(1), "news", request_id="x")))
        second = asyncio.create_task(engine.caption(ask(noise_image(2), "news", request_id="x")))
        kept = asyncio.create_task(engine.caption(ask(noise_image(3), "news", request_id="x")))
        await until(lambda: engine.scheduler.queued == 3)
        first.cancel()  # the client went away: its handler cancels the task awaiting it
        second.cancel()
        for task in (first, second):
            with pytest.raises(asyncio.CancelledError):
                await task
        engine.start()
        return (await kept)[0]

    result = asyncio.run(run())
    stats = engine.stats()
    assert result.tokens == TOKENS
    assert stats.dropped == {"cancelled": 2}
    assert rows_ended(metrics, "cancelled") == 2.0
    assert rejections(metrics, "cancelled") is None
    assert (stats.rows, stats.encoder_runs) == (1, 1)  # only the kept request ran
    assert engine.admission.inflight == 0


def test_full_queue_rejects_with_retry_after_and_is_counted(
    make_engine: Callable[..., Engine], store: AdapterStore
) -> None:
    put(store, "acme", "news", random_adapter(tiny_backbone(), 1))
    metrics = ServiceMetrics()
    engine = make_engine(start=False, queue_size=2, metrics=metrics)

    async def run() -> list[list[CaptionResult]]:
        tasks = [asyncio.create_task(engine.caption(ask(noise_image(i), "news"))) for i in (1, 2)]
        await until(lambda: engine.scheduler.queued == 2)
        with pytest.raises(QueueFull) as full:
            await engine.caption(ask(noise_image(3), "news"))
        assert full.value.retry_after_s is not None and full.value.retry_after_s >= 1
        engine.start()
        return list(await asyncio.gather(*tasks))

    results = asyncio.run(run())
    assert [len(r) for r in results] == [1, 1]
    assert engine.stats().rejected == {"queue_full": 1}
    assert rejections(metrics, "queue_full") == 1.0


def test_tenant_limit_and_invalid_requests(
    make_engine: Callable[..., Engine], store: AdapterStore
) -> None:
    put(store, "public", "news", random_adapter(tiny_backbone(), 1))
    engine = make_engine(start=False, tenant_max_inflight=2, max_new_tokens_limit=8)

    async def run() -> None:
        tasks = [asyncio.create_task(engine.caption(ask(noise_image(i), "news"))) for i in (1, 2)]
        await until(lambda: engine.scheduler.queued == 2)
        with pytest.raises(TenantLimit):
            await engine.caption(ask(noise_image(3), "news"))
        # Another tenant is not limited by acme's rows.
        tasks.append(asyncio.create_task(engine.caption(ask(noise_image(3), "news", tenant="b"))))
        await until(lambda: engine.scheduler.queued == 3)
        with pytest.raises(AdapterNotFound):
            await engine.caption(ask(noise_image(3), "sports", tenant="b"))
        with pytest.raises(InvalidRequest):
            await engine.caption(ask(noise_image(3), "news", tenant="b", max_new_tokens=9))
        with pytest.raises(InvalidRequest):
            await engine.caption(ask(noise_image(3), tenant="b"))
        with pytest.raises(UnsupportedImage):
            await engine.caption(
                ask(ImageDecoder(b"not an image", ImageLimits()), "news", tenant="b")
            )
        engine.start()
        assert [len(r) for r in await asyncio.gather(*tasks)] == [1, 1, 1]

    asyncio.run(run())
    assert engine.stats().rejected == {"tenant_limit": 1}
    assert engine.admission.inflight == 0 and engine.admission.waiting == 0


def test_an_invalid_adapter_version_fails_only_its_requests(
    make_engine: Callable[..., Engine], store: AdapterStore
) -> None:
    put(store, "acme", "good", random_adapter(tiny_backbone(), 1))

    def broken(folder: Path) -> None:
        save_adapter(random_adapter(tiny_backbone(), 2), folder)
        (folder / "adapter.safetensors").write_bytes(b"truncated")

    store.write_version("acme", "bad", broken)
    engine = make_engine()

    async def run() -> tuple[BaseException | list[CaptionResult], ...]:
        return tuple(
            await asyncio.gather(
                engine.caption(ask(noise_image(1), "bad")),
                engine.caption(ask(noise_image(1), "good")),
                return_exceptions=True,
            )
        )

    bad, good = asyncio.run(run())
    assert isinstance(bad, AdapterLoadError) and "acme/bad@v1 is invalid" in str(bad)
    assert isinstance(good, list) and good[0].ref.name == "good"


def test_drain_waits_for_in_flight_work_then_rejects(
    make_engine: Callable[..., Engine], store: AdapterStore
) -> None:
    put(store, "acme", "news", random_adapter(tiny_backbone(), 1))
    engine = make_engine(start=False)

    async def run() -> None:
        tasks = [asyncio.create_task(engine.caption(ask(noise_image(i), "news"))) for i in range(3)]
        await until(lambda: engine.scheduler.queued == 3)
        engine.start()
        drained = await asyncio.to_thread(engine.drain, 30)
        assert drained is True and not engine.ready
        assert engine.stats().completed == 3  # all answered before drain returned
        assert [len(r) for r in await asyncio.gather(*tasks)] == [1, 1, 1]
        with pytest.raises(Draining):
            await engine.caption(ask(noise_image(9), "news"))

    asyncio.run(run())
    assert engine.stats().completed == 3 and engine.stats().rejected == {"draining": 1}


def test_from_settings_loads_a_saved_backbone_and_the_store(tmp_path: Path) -> None:
    backbone = tiny_backbone()
    backbone.save(tmp_path / "backbone")
    store = AdapterStore(tmp_path / "adapters")
    put(store, "public", "news", random_adapter(backbone, 1))
    settings = Settings(
        runtime_dir=tmp_path,
        backbone=str(tmp_path / "backbone"),
        device="cpu",
        device_slots=3,
        max_rank=8,
        default_max_new_tokens=4,
    )
    engine = Engine.from_settings(settings, ServiceMetrics())
    try:
        assert engine.bank.num_slots == 3 and engine.config.max_rank == 8
        assert isinstance(engine.registry.resolve("acme", "news"), AdapterVersion)
        result = asyncio.run(engine.caption(ask(noise_image(1), "news")))[0]
        assert result.ref.tenant == "public" and result.tokens == 4
        assert result.token_ids == reference(random_adapter(backbone, 1), noise_image(1), 4)
    finally:
        engine.close()
