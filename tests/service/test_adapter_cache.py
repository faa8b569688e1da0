"""AdapterCache faults and hygiene: a slot binds only once its weights are completely in place
(any exception in the copy fails that version alone, leaves the slot cleared and unmapped,
leaks no pin); transient disk failures are retried with backoff and counted by reason while
validation failures stay final; uploads never evict hot entries ahead of colder ones."""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

from adapters.adapter_set import AdapterSet
from adapters.backbone import connector_spec
from adapters.bank import AdapterBank, BankError
from adapters.format import CONFIG_FILE
from service.adapter_cache import AdapterCache, failure_reason, set_nbytes
from service.engine import CaptionRequest, Engine, EngineConfig
from service.events import EngineEvents
from service.exceptions import AdapterLoadError
from service.metrics import ServiceMetrics
from service.registry import AdapterRegistry, AdapterVersion, VersionGone, open_adapters
from service.store import AdapterStore
from tests.service.adapter_fixtures import (
    LOADER_SAFETY_S,
    LoaderChanges,
    noise_image,
    put,
    random_adapter,
    tiers,
    tiny_backbone,
)


class FaultyBank(AdapterBank):
    """A real bank whose copy into a slot raises for chosen adapters, after writing part of
    the weights (the worst case: the slot holds a mix of old and new)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.fail_for: dict[int, BaseException] = {}  # id(adapter) -> what to raise
        self.clear_fails_after_a_failed_load = False
        self._failed_load = False

    def clear(self, slot: int) -> None:
        if self._failed_load and self.clear_fails_after_a_failed_load:
            self._failed_load = False
            raise RuntimeError("clear failed too")
        super().clear(slot)

    def load(self, slot: int, adapter: AdapterSet) -> None:
        error = self.fail_for.get(id(adapter))
        if error is None:
            super().load(slot, adapter)
            return
        super().load(slot, adapter)  # completely written ...
        self._failed_load = True
        raise error  # ... and still failed (e.g. a device error on the last copy)


def make_bank(slots: int) -> FaultyBank:
    backbone = tiny_backbone()
    return FaultyBank(backbone.dims, connector_spec(backbone), slots, max_rank=8)


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "store")


@pytest.fixture
def changes() -> LoaderChanges:
    """Every disk load that finished or failed in the test's registries (tests wait on it)."""
    return LoaderChanges()


@pytest.fixture
def registries(
    store: AdapterStore, changes: LoaderChanges
) -> Iterator[Callable[..., AdapterRegistry]]:
    made: list[AdapterRegistry] = []

    def make(
        slots: int = 2,
        budget: int = 1 << 30,
        metrics: ServiceMetrics | None = None,
        bank: AdapterBank | None = None,
    ) -> AdapterRegistry:
        registry, _ = open_adapters(
            store,
            tiny_backbone(),
            bank or make_bank(slots),
            budget,
            EngineEvents(metrics),
            0.2,
            on_change=changes,
        )
        made.append(registry)
        return registry

    yield make
    for registry in made:
        tiers(registry).close()


def loaded(
    registry: AdapterRegistry, store: AdapterStore, count: int, changes: LoaderChanges
) -> list[AdapterVersion]:
    """`count` adapters a0.. on the CPU tier (from disk, through the loader)."""
    versions = loaded_without_waiting(registry, store, count)
    changes.until(lambda: all(tiers(registry).is_ready(v) for v in versions), "all loaded")
    return versions


def cpu_copy(cache: AdapterCache[AdapterVersion], key: AdapterVersion) -> AdapterSet:
    return cache._cpu[key].adapter


def failures(metrics: ServiceMetrics, tier: str, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "ctxpeft_adapter_load_failures_total", {"tier": tier, "reason": reason}
    )
    assert value is not None
    return value


def assert_slot_is_empty(bank: AdapterBank, slot: int) -> None:
    assert not bank.occupied[slot] and bank.ranks[slot] == 0
    features = torch.randn(1, 3, tiny_backbone().vision_dim)
    assert torch.count_nonzero(bank.connect(features, torch.tensor([slot]))) == 0
    for layer in range(tiny_backbone().dims.num_layers):
        weights = bank.stacked(layer, "q_proj")
        assert weights is not None and weights.lora_B is not None
        assert torch.count_nonzero(weights.lora_B[slot]) == 0


def assert_slot_holds(bank: AdapterBank, slot: int, adapter: AdapterSet) -> None:
    features = torch.randn(2, 3, tiny_backbone().vision_dim)
    adapter.eval()
    expected = adapter.connect(features)
    got = bank.connect(features, torch.tensor([slot, slot]))
    torch.testing.assert_close(got, expected)


# --- atomic binding ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "error",
    [RuntimeError("CUDA error: an illegal memory access"), MemoryError(), BankError("too big")],
    ids=["runtime", "memory", "bank"],
)
def test_a_failing_copy_fails_that_version_alone_and_leaves_its_slot_empty(
    registries: Callable[..., AdapterRegistry],
    store: AdapterStore,
    error: BaseException,
    changes: LoaderChanges,
) -> None:
    metrics = ServiceMetrics()
    registry = registries(slots=3, metrics=metrics)
    cache, bank = tiers(registry), tiers(registry).bank
    assert isinstance(bank, FaultyBank)
    a0, a1, a2, a3, a4 = loaded(registry, store, 5, changes)
    # Earlier steps: a0 in slot 0, then a2 and a3 in slots 1 and 2; nothing pins them now.
    first, _, _ = cache.bind([a0])
    cache.release(first, [a0])
    second, _, _ = cache.bind([a2, a3])
    cache.release(second, [a2, a3])
    assert (first[a0], second[a2], second[a3]) == (0, 1, 2)

    # The next step: a2 is resident; a1 (whose copy raises) takes the least recently used
    # slot, a0's; a4, after the failure, takes a3's.
    bank.fail_for[id(cpu_copy(cache, a1))] = error
    slots, failed, missing = cache.bind([a1, a2, a2, a4, a1])

    assert set(failed) == {a1}
    assert isinstance(failed[a1], AdapterLoadError)
    assert slots == {a2: 1, a4: 2} and missing == []
    assert cache.slot_of(a1) is None  # never mapped
    assert cache.slot_of(a0) is None  # unmapped before its slot was overwritten
    assert cache.slot_of(a3) is None
    assert_slot_is_empty(bank, 0)  # a1's written-then-failed slot: cleared, not stale
    assert_slot_holds(bank, 1, cpu_copy(cache, a2))
    assert_slot_holds(bank, 2, cpu_copy(cache, a4))
    assert [cache.pins(s) for s in range(3)] == [0, 2, 1]
    cache.release(slots, [a2, a2, a4])
    assert [cache.pins(s) for s in range(3)] == [0, 0, 0]  # no pin leaked
    reason = "invalid" if isinstance(error, BankError) else failure_reason(error)
    assert failures(metrics, "device", reason) == 1

    # A BankError is final (the set cannot fit this bank); anything else is not remembered:
    # once the fault is gone, the version binds and serves its own weights.
    del bank.fail_for[id(cpu_copy(cache, a1))]
    if isinstance(error, BankError):
        assert cache.failure(a1) is failed[a1]
        return
    assert cache.failure(a1) is None
    slots, failed, missing = cache.bind([a1, a3])
    assert failed == {} and missing == [] and set(slots) == {a1, a3}
    assert_slot_holds(bank, slots[a1], cpu_copy(cache, a1))
    assert_slot_holds(bank, slots[a3], cpu_copy(cache, a3))
    cache.release(slots, [a1, a3])


def test_a_slot_whose_clear_also_fails_is_never_mapped(
    registries: Callable[..., AdapterRegistry], store: AdapterStore, changes: LoaderChanges
) -> None:
    registry = registries(slots=2)
    cache, bank = tiers(registry), tiers(registry).bank
    assert isinstance(bank, FaultyBank)
    a0, a1 = loaded(registry, store, 2, changes)
    bank.fail_for[id(cpu_copy(cache, a0))] = RuntimeError("copy failed")
    bank.clear_fails_after_a_failed_load = True
    slots, failed, _ = cache.bind([a0, a1])
    assert set(failed) == {a0} and set(slots) == {a1}
    assert cache.slot_of(a0) is None  # its slot still holds a0's weights, but nobody maps it
    assert bank.occupied[0]  # (what the test injected: the clear did not happen)
    cache.release(slots, [a1])
    del bank.fail_for[id(cpu_copy(cache, a0))]
    again, failed, _ = cache.bind([a0])  # the next copy into that slot clears it first
    assert failed == {}
    assert_slot_holds(bank, again[a0], cpu_copy(cache, a0))
    cache.release(again, [a0])


def test_a_resident_key_is_never_the_victim_of_another_key_of_the_same_call(
    registries: Callable[..., AdapterRegistry], store: AdapterStore, changes: LoaderChanges
) -> None:
    registry = registries(slots=2)
    cache = tiers(registry)
    a0, a1, a2 = loaded(registry, store, 3, changes)
    for keys in ([a0], [a1]):  # a0 is the least recently used slot
        slots, _, _ = cache.bind(keys)
        cache.release(slots, keys)
    loads = cache.stats().device_loads
    slots, _, missing = cache.bind([a2, a0])  # a2 comes first, but a0 is resident
    assert slots == {a0: 0, a2: 1} and missing == []
    assert cache.stats().device_loads == loads + 1  # a0 was not evicted and copied back
    cache.release(slots, [a2, a0])


def test_no_free_slot_sends_the_key_back_instead_of_raising(
    registries: Callable[..., AdapterRegistry], store: AdapterStore, changes: LoaderChanges
) -> None:
    registry = registries(slots=1)
    cache = tiers(registry)
    a0, a1 = loaded(registry, store, 2, changes)
    slots, _, _ = cache.bind([a0])  # a running row pins the only slot
    second, failed, missing = cache.bind([a1])
    assert second == {} and failed == {} and missing == [a1]
    assert cache.slot_of(a0) == slots[a0] and cache.pins(slots[a0]) == 1
    cache.release(slots, [a0])
    third, _, missing = cache.bind([a1])
    assert missing == [] and cache.slot_of(a1) == third[a1]
    cache.release(third, [a1])


def test_rows_of_a_failing_copy_answer_503_and_the_others_their_own_tokens(
    store: AdapterStore,
) -> None:
    """Through the engine: the failing adapter's rows get adapter_unavailable; the rows of the
    other adapters in the same batch generate exactly what they generate alone."""
    backbone = tiny_backbone()
    adapters = {f"a{i}": random_adapter(backbone, i) for i in range(3)}
    for name, adapter in adapters.items():
        put(store, "acme", name, adapter)
    bank = make_bank(slots=3)
    config = EngineConfig(default_max_new_tokens=5, max_wait_ms=50.0)
    images = [noise_image(i) for i in range(6)]

    async def run(engine: Engine, names: list[str]) -> list[object]:
        requests = [
            CaptionRequest(image, adapters=(name,), tenant="acme")
            for image, name in zip(images, names, strict=True)
        ]
        return await asyncio.gather(*(engine.caption(r) for r in requests), return_exceptions=True)

    names = ["a0", "a1", "a2", "a1", "a0", "a2"]
    alone = Engine(backbone, store, config, bank=make_bank(slots=3))
    try:
        expected = asyncio.run(run(alone, names))
    finally:
        alone.close()
    engine = Engine(backbone, store, config, bank=bank)
    try:
        versions = {n: engine.registry.resolve("acme", n) for n in adapters}
        for v in versions.values():
            engine.cache.want(v)
        LoaderChanges.chained_onto(engine.cache).until(
            lambda: all(engine.cache.is_ready(v) for v in versions.values()), "all loaded"
        )
        for v in versions.values():
            engine.cache.unwant(v)
        bank.fail_for[id(engine.cache._cpu[versions["a1"]].adapter)] = RuntimeError(
            "device copy failed"
        )
        got = asyncio.run(run(engine, names))
    finally:
        engine.close()
    for name, want, result in zip(names, expected, got, strict=True):
        if name == "a1":
            assert isinstance(result, AdapterLoadError), result
            assert "could not be placed on the device (RuntimeError)" in result.message
        else:
            assert not isinstance(result, BaseException), result
            assert [r.token_ids for r in result] == [r.token_ids for r in want]  # type: ignore[attr-defined]


# --- load failures: final, or retried -----------------------------------------------------------
class FlakyLoad:
    """Wraps the registry's disk load: raises `error` for the first `times` calls."""

    def __init__(
        self, load: Callable[[AdapterVersion], AdapterSet], error: BaseException, times: int
    ):
        self.load, self.error, self.left, self.calls = load, error, times, 0

    def __call__(self, version: AdapterVersion) -> AdapterSet:
        self.calls += 1
        if self.left > 0:
            self.left -= 1
            raise self.error
        return self.load(version)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (OSError(errno.EIO, "Input/output error"), "io"),
        (OSError(errno.EMFILE, "Too many open files"), "resource"),
        (MemoryError(), "resource"),
    ],
)
def test_a_transient_read_failure_is_retried_and_the_version_serves_afterwards(
    registries: Callable[..., AdapterRegistry],
    store: AdapterStore,
    error: BaseException,
    reason: str,
    changes: LoaderChanges,
) -> None:
    metrics = ServiceMetrics()
    registry = registries(metrics=metrics)
    cache = tiers(registry)
    cache.retry_base_s = 0.01
    flaky = FlakyLoad(cache._load, error, times=2)
    cache._load = flaky
    put(store, "acme", "news", random_adapter(tiny_backbone(), 1))
    version = registry.resolve("acme", "news")
    cache.want(version)
    changes.until(lambda: cache.is_ready(version), "read after two failures")
    assert flaky.calls == 3  # two failures, then the read that worked
    assert cache.failure(version) is None
    assert failures(metrics, "cpu", reason) == 2
    slots, failed, _ = cache.bind([version])
    assert failed == {}
    assert_slot_holds(cache.bank, slots[version], cpu_copy(cache, version))
    cache.release(slots, [version])


def test_a_persistent_read_failure_is_reported_for_a_cool_down_then_retried(
    registries: Callable[..., AdapterRegistry], store: AdapterStore, changes: LoaderChanges
) -> None:
    metrics = ServiceMetrics()
    registry = registries(metrics=metrics)
    cache = tiers(registry)
    cache.retry_base_s, cache.load_retries, cache.cool_down_s = 0.01, 2, 0.3
    flaky = FlakyLoad(cache._load, OSError(errno.EIO, "Input/output error: '/srv/x'"), times=3)
    cache._load = flaky
    put(store, "acme", "news", random_adapter(tiny_backbone(), 1))
    version = registry.resolve("acme", "news")
    cache.want(version)
    changes.until(lambda: cache.failure(version) is not None, "the retries spent")
    error = cache.failure(version)
    assert isinstance(error, AdapterLoadError) and error.retry_after_s == 0.3
    assert error.message == "the adapter could not be read (OSError EIO); try again later"
    assert flaky.calls == 3 and failures(metrics, "cpu", "io") == 3  # 1 try + 2 retries
    assert not cache.is_ready(version)  # reported, not retried, during the cool-down
    assert flaky.calls == 3
    # The cool-down is a span of time by design: wait for it to end (a safety net bounds
    # the wait; it is not what is checked), then the next request reads it (the disk healed).
    deadline = time.monotonic() + LOADER_SAFETY_S
    while cache.failure(version) is not None:
        assert time.monotonic() < deadline, "the cool-down never ended"
        time.sleep(0.05)
    changes.until(lambda: cache.is_ready(version), "read after the cool-down")
    assert flaky.calls == 4


def test_a_validation_failure_stays_final(
    registries: Callable[..., AdapterRegistry], store: AdapterStore, changes: LoaderChanges
) -> None:
    metrics = ServiceMetrics()
    registry = registries(metrics=metrics)
    cache = tiers(registry)
    cache.cool_down_s = 0.0  # a failure with a cool-down would be forgotten at the next look
    flaky = FlakyLoad(cache._load, OSError(errno.EIO, "unused"), times=0)
    cache._load = flaky

    def broken(folder: Path) -> None:
        adapter = random_adapter(tiny_backbone(), 1)
        data = adapter.config.to_dict() | {"alpha": "x"}
        (folder / CONFIG_FILE).write_text(json.dumps(data))

    store.write_version("acme", "broken", broken)
    version = registry.resolve("acme", "broken")
    cache.want(version)
    changes.until(lambda: cache.failure(version) is not None, "the validation failed")
    error = cache.failure(version)
    assert isinstance(error, AdapterLoadError)
    assert "acme/broken@v1 is invalid: invalid adapter_config.json: alpha:" in error.message
    assert cache.failure(version) is error and not cache.is_ready(version)
    assert flaky.calls == 1 and failures(metrics, "cpu", "invalid") == 1
    assert failures(metrics, "cpu", "io") == 0


def test_a_version_deleted_while_reading_is_gone_not_retried(
    registries: Callable[..., AdapterRegistry], store: AdapterStore, changes: LoaderChanges
) -> None:
    metrics = ServiceMetrics()
    registry = registries(metrics=metrics)
    cache = tiers(registry)
    put(store, "acme", "news", random_adapter(tiny_backbone(), 1))
    version = registry.resolve("acme", "news")

    def delete_then_read(v: AdapterVersion) -> AdapterSet:
        store.delete("acme", "news")
        return AdapterRegistry.load(registry, v)

    cache._load = delete_then_read
    cache.want(version)
    changes.until(lambda: cache.failure(version) is not None, "the read found it gone")
    assert isinstance(cache.failure(version), VersionGone)
    assert failures(metrics, "cpu", "gone") == 1 and failures(metrics, "cpu", "io") == 0


def test_failure_reasons_are_bounded() -> None:
    assert failure_reason(OSError(errno.EIO, "x")) == "io"
    assert failure_reason(FileNotFoundError(errno.ENOENT, "x")) == "io"
    assert failure_reason(OSError(errno.ENFILE, "x")) == "resource"
    assert failure_reason(torch.OutOfMemoryError("x")) == "resource"
    assert failure_reason(AdapterLoadError("x")) == "invalid"
    assert failure_reason(VersionGone("x")) == "gone"
    assert failure_reason(KeyError("x")) == "other"


# --- the CPU tier: uploads never evict hot entries ahead of colder ones --------------------------
def test_an_upload_evicts_the_coldest_unpinned_entry_not_a_hot_one(
    registries: Callable[..., AdapterRegistry], store: AdapterStore, changes: LoaderChanges
) -> None:
    backbone = tiny_backbone()
    size = set_nbytes(random_adapter(backbone, 0))
    registry = registries(slots=2, budget=3 * size + size // 2)
    cache = tiers(registry)
    # beta/cold loaded first, then acme/hot and gamma/pinned.
    for seed, tenant in enumerate(["beta", "acme", "gamma"]):
        put(store, tenant, "x", random_adapter(backbone, seed))
    cold, hot, pinned = (registry.resolve(t, "x") for t in ("beta", "acme", "gamma"))
    for version in (cold, hot, pinned):
        cache.want(version)
        changes.until(functools.partial(cache.is_ready, version), f"{version} loaded")
    # cold and hot are no longer wanted; pinned still is (a queued request waits for it).
    cache.unwant(cold)
    cache.unwant(hot)
    # hot serves from its device slot: every use makes it hot, also while it is resident.
    slots, _, _ = cache.bind([hot])
    cache.release(slots, [hot])
    slots, _, _ = cache.bind([hot])
    cache.release(slots, [hot])
    assert list(cache._cpu) == [cold, pinned, hot]  # least recently used first

    config, weights = _upload_bytes(seed=7)
    registry.add_version("delta", "fresh", config, weights)
    fresh = registry.resolve("delta", "fresh")
    # Only the coldest went; the upload has served nobody, so it is the next to go.
    assert list(cache._cpu) == [fresh, pinned, hot]
    # Another upload: the previous upload goes first, never the hot or the pinned entry.
    config, weights = _upload_bytes(seed=8)
    registry.add_version("delta", "fresher", config, weights)
    assert set(cache._cpu) == {registry.resolve("delta", "fresher"), pinned, hot}
    cache.unwant(pinned)


def _upload_bytes(seed: int) -> tuple[bytes, bytes]:
    adapter = random_adapter(tiny_backbone(), seed)
    weights = save_safetensors({k: v.contiguous() for k, v in adapter.tensors().items()})
    return json.dumps(adapter.config.to_dict()).encode(), weights


def test_want_and_ready_checks_touch_the_entry(
    registries: Callable[..., AdapterRegistry], store: AdapterStore, changes: LoaderChanges
) -> None:
    registry = registries()
    cache = tiers(registry)
    a0, a1, a2 = loaded(registry, store, 3, changes)
    assert list(cache._cpu) == [a0, a1, a2]
    assert cache.is_ready(a0)
    assert list(cache._cpu) == [a1, a2, a0]
    cache.want(a1)
    assert list(cache._cpu) == [a2, a0, a1]
    for v in (a0, a1, a1, a2):
        cache.unwant(v)


def test_the_loader_survives_a_burst_of_failures(
    registries: Callable[..., AdapterRegistry], store: AdapterStore, changes: LoaderChanges
) -> None:
    """Many versions failing at once, differently, never stop the loader thread."""
    registry = registries()
    cache = tiers(registry)
    cache.retry_base_s, cache.load_retries, cache.cool_down_s = 0.001, 1, 60.0
    real = cache._load
    calls: list[str] = []
    lock = threading.Lock()

    def chaos(version: AdapterVersion) -> AdapterSet:
        with lock:
            calls.append(version.ref.name)
        kind = int(version.ref.name[1:]) % 4
        if kind == 0:
            raise OSError(errno.EIO, "x")
        if kind == 1:
            raise MemoryError()
        if kind == 2:
            raise KeyError("bug")
        return real(version)

    cache._load = chaos
    versions = loaded_without_waiting(registry, store, 8)
    changes.until(
        lambda: all(cache.failure(v) or cache.is_ready(v) for v in versions), "all settled"
    )
    assert [cache.is_ready(v) for v in versions] == [i % 4 == 3 for i in range(8)]
    assert calls.count("a0") == 2 and calls.count("a2") == 1  # retried once; a bug is not


def loaded_without_waiting(
    registry: AdapterRegistry, store: AdapterStore, count: int
) -> list[AdapterVersion]:
    """`count` adapters a0.. stored and wanted; their loads may still be running."""
    backbone = tiny_backbone()
    for i in range(count):
        put(store, "acme", f"a{i}", random_adapter(backbone, i))
    versions = [registry.resolve("acme", f"a{i}") for i in range(count)]
    for version in versions:
        tiers(registry).want(version)
    return versions
