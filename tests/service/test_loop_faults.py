"""Fault injection for the defects of the issue-20 review, one test each: every row taken
out of the queue is answered or put back whatever the store raises; a row put back in line is
not failed with the rows that joined; encoder-cache entries own their memory; a contained
fault tells the client an incident id, not the exception; resolving adapters never blocks the
event loop. The engine is driven one step at a time (no worker thread) where order matters."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from service.engine import CaptionRequest, Engine, EngineConfig
from service.engine.counters import EngineCounters
from service.engine.encoder_cache import EncoderCache
from service.exceptions import AdapterLoadError, EngineFault
from service.registry import AdapterVersion, VersionGone
from service.store import AdapterStore
from tests.service.adapter_fixtures import noise_image, put, random_adapter, tiny_backbone
from tests.service.test_engine import reference

TOKENS = 4


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    store = AdapterStore(tmp_path / "store")
    for i in range(2):
        put(store, "acme", f"a{i}", random_adapter(tiny_backbone(), i))
    return store


@pytest.fixture
def engine(store: AdapterStore) -> Iterator[Callable[..., Engine]]:
    made: list[Engine] = []

    def make(start: bool = False, **config: Any) -> Engine:
        config.setdefault("default_max_new_tokens", TOKENS)
        e = Engine(tiny_backbone(), store, EngineConfig(**config), start=start)
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


async def settle() -> None:
    for _ in range(6):
        await asyncio.sleep(0)


async def loaded(e: Engine, *names: str) -> None:
    for name in names:
        version = e.registry.resolve("acme", name)
        while not e.registry.cache.is_ready(version):
            await asyncio.sleep(0.005)


def ask(image: int, name: str) -> CaptionRequest:
    return CaptionRequest(noise_image(image), (name,), "acme")


def test_a_store_error_while_re_resolving_a_deleted_version_answers_the_row(
    engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: the rows taken from the queue were neither put back nor answered; the tenant's
    in-flight count never came down (429 for good) and every drain ran to its timeout."""
    e = engine()

    async def run() -> BaseException:
        task = asyncio.create_task(e.caption(ask(1, "a0")))
        await settle()
        while e.scheduler.queued < 1:
            await asyncio.sleep(0.005)
        version: AdapterVersion = e.registry.resolve("acme", "a0")
        e.registry.cache.fail(version, VersionGone("acme/a0@v1 was deleted"))

        def unreadable(tenant: str, name: str) -> AdapterVersion:
            raise PermissionError(13, "Permission denied", "/store/acme/a0")

        monkeypatch.setattr(e.registry, "resolve", unreadable)
        e.loop.iterate()
        await settle()
        assert task.done()
        return task.exception() or AssertionError("no error")

    error = asyncio.run(run())
    assert isinstance(error, AdapterLoadError)
    assert "could not be read now" in error.message and "/store" not in error.message
    assert e.scheduler.inflight == 0 and e.scheduler.waiting == 0
    assert e.registry.cache.wanted() == 0


def test_a_row_put_back_in_line_is_not_failed_with_the_rows_that_joined(
    engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: when joining raised after `_bind` put a row back in line, that row was failed too,
    then dropped from the queue again: its tenant's count was given back twice."""
    e = engine(max_prefill_rows=2, prefill_min_rows=1)
    cache = e.registry.cache
    bind = cache.bind
    deferred = e.registry.resolve("acme", "a1")

    def bind_all_but_a1(keys: Any) -> Any:
        keys = list(keys)
        slots, failed, missing = bind([k for k in keys if k != deferred])
        return slots, failed, missing + [k for k in keys if k == deferred]

    encode = e.loop._encode

    def failing_encode(rows: Any) -> Any:
        raise RuntimeError("injected: joining fails after the bind")

    async def run() -> tuple[Any, Any]:
        first = asyncio.create_task(e.caption(ask(1, "a0")))
        second = asyncio.create_task(e.caption(ask(2, "a1")))
        await settle()
        while e.scheduler.queued < 2:
            await asyncio.sleep(0.005)
        await loaded(e, "a0", "a1")
        monkeypatch.setattr(cache, "bind", bind_all_but_a1)
        monkeypatch.setattr(e.loop, "_encode", failing_encode)
        e.loop.iterate()
        await settle()
        assert first.done() and isinstance(first.exception(), EngineFault)
        assert not second.done()  # back in line, still its own to finish
        assert e.scheduler.inflight_of("acme") == 1 and e.scheduler.queued == 1
        monkeypatch.setattr(cache, "bind", bind)
        monkeypatch.setattr(e.loop, "_encode", encode)
        while not second.done():
            e.loop.iterate()
            await settle()
        return first.exception(), second.result()

    _, results = asyncio.run(run())
    assert results[0].token_ids == reference(
        random_adapter(tiny_backbone(), 1), noise_image(2), TOKENS
    )
    assert e.scheduler.inflight == 0 and e.scheduler.waiting == 0


def test_encoder_cache_entries_hold_their_own_features_not_the_batch() -> None:
    """Was: each entry was a view into the batch's output, so one entry kept the whole batch
    alive and the entry bound did not bound memory."""
    cache = EncoderCache(entries=8, counters=EngineCounters())
    backbone = tiny_backbone()
    pixels = backbone.preprocess([noise_image(i) for i in range(6)])
    found = cache.encode([f"k{i}" for i in range(6)], list(pixels), backbone.encode_images)
    for features in found:
        own = features.numel() * features.element_size()
        assert features.untyped_storage().nbytes() == own
    assert torch.equal(torch.stack(found), backbone.encode_images(pixels))


def test_a_contained_fault_tells_the_client_an_incident_id_not_the_exception(
    engine: Callable[..., Engine],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    e = engine(start=True)
    asyncio.run(e.caption(ask(3, "a0")))  # loaded (and probed) before the encoder breaks
    secret = "/srv/secret/weights.bin: CUDA out of memory (21.3 GiB reserved) shape [3, 224]"

    def encode_images(pixels: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(secret)

    monkeypatch.setattr(e.backbone, "encode_images", encode_images)
    with (
        caplog.at_level(logging.ERROR, logger="service.engine.loop"),
        pytest.raises(EngineFault) as failed,
    ):
        asyncio.run(e.caption(ask(1, "a0")))
    message = failed.value.message
    assert "/srv" not in message and "GiB" not in message and "shape" not in message
    assert "the vision encoder failed for this request (incident " in message
    incident = message.split("(incident ", 1)[1].split(")", 1)[0]
    logged = [r for r in caplog.records if incident in r.getMessage()]
    assert logged and logged[0].exc_info is not None and secret in str(logged[0].exc_info[1])


def test_resolving_adapters_does_not_block_the_event_loop(
    engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow shared store (a stat that hangs) stalls only the requests that wait on it."""
    e = engine(start=True)
    resolve = e.registry.resolve
    release = threading.Event()
    stalled = threading.Event()

    def slow(tenant: str, name: str) -> AdapterVersion:
        if name == "a1":
            stalled.set()
            assert release.wait(timeout=30), "never released"
        return resolve(tenant, name)

    monkeypatch.setattr(e.registry, "resolve", slow)

    async def run() -> tuple[tuple[int, ...], tuple[int, ...]]:
        blocked = asyncio.create_task(e.caption(ask(1, "a1")))
        while not stalled.is_set():
            await asyncio.sleep(0.005)
        # The loop keeps serving: another request is admitted and answered meanwhile.
        other = await asyncio.wait_for(e.caption(ask(2, "a0")), timeout=60)
        assert not blocked.done()
        release.set()
        return other[0].token_ids, (await blocked)[0].token_ids

    try:
        other, blocked = asyncio.run(run())
    finally:
        release.set()
    backbone = tiny_backbone()
    assert other == reference(random_adapter(backbone, 0), noise_image(2), TOKENS)
    assert blocked == reference(random_adapter(backbone, 1), noise_image(1), TOKENS)
