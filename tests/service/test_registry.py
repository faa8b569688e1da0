"""Registry: resolution (own, then public, newest), changes made on disk by another process,
validated uploads, listing, delete, and the device <- CPU <- disk tiers."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from safetensors.torch import save as save_safetensors

from adapters.backbone import connector_spec
from adapters.bank import AdapterBank
from adapters.format import CONFIG_FILE, AdapterFormatError
from service.adapter_cache import set_nbytes
from service.events import EngineEvents
from service.exceptions import AdapterLoadError, AdapterNotFound, InvalidRequest
from service.metrics import ServiceMetrics
from service.registry import AdapterRegistry, AdapterVersion, open_adapters
from service.store import AdapterRef, AdapterStore
from tests.service.adapter_fixtures import (
    LoaderChanges,
    put,
    random_adapter,
    tiers,
    tiny_backbone,
)


def upload_bytes(seed: int, **changes: object) -> tuple[bytes, bytes]:
    """adapter_config.json and adapter.safetensors bytes of a random set, as uploaded."""
    adapter = random_adapter(tiny_backbone(), seed)
    config = dataclasses.replace(adapter.config, **changes)  # type: ignore[arg-type]
    weights = save_safetensors({k: v.contiguous() for k, v in adapter.tensors().items()})
    return json.dumps(config.to_dict()).encode(), weights


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "store")


def make_registry(
    store: AdapterStore,
    budget: int = 1 << 30,
    slots: int = 4,
    metrics: ServiceMetrics | None = None,
    on_change: Callable[[], None] | None = None,
) -> AdapterRegistry:
    backbone = tiny_backbone()
    bank = AdapterBank(backbone.dims, connector_spec(backbone), slots, max_rank=8)
    registry, _ = open_adapters(
        store, backbone, bank, budget, EngineEvents(metrics), 0.2, on_change=on_change
    )
    return registry


@pytest.fixture
def changes() -> LoaderChanges:
    return LoaderChanges()


@pytest.fixture
def registry(store: AdapterStore, changes: LoaderChanges) -> Iterator[AdapterRegistry]:
    reg = make_registry(store, on_change=changes)
    yield reg
    tiers(reg).close()


def test_resolves_own_adapter_before_public_and_the_newest_version(
    registry: AdapterRegistry, store: AdapterStore
) -> None:
    backbone = tiny_backbone()
    put(store, "public", "news", random_adapter(backbone, 1))
    assert registry.resolve("acme", "news").ref == AdapterRef("public", "news", 1)
    put(store, "acme", "news", random_adapter(backbone, 2))
    put(store, "acme", "news", random_adapter(backbone, 3))
    assert registry.resolve("acme", "news").ref == AdapterRef("acme", "news", 2)
    assert registry.resolve("other", "news").ref == AdapterRef("public", "news", 1)
    with pytest.raises(AdapterNotFound):
        registry.resolve("acme", "sports")
    for bad in ("../public/news", "News", "", "a" * 65):
        with pytest.raises(AdapterNotFound):
            registry.resolve("acme", bad)


def test_versions_written_and_deleted_by_another_process_are_seen_without_restart(
    registry: AdapterRegistry, store: AdapterStore, tmp_path: Path
) -> None:
    backbone = tiny_backbone()
    put(store, "acme", "news", random_adapter(backbone, 1))
    assert registry.resolve("acme", "news").ref.version == 1
    other = AdapterStore(tmp_path / "store")  # e.g. `ctxpeft train` in another process
    put(other, "acme", "news", random_adapter(backbone, 2))
    assert registry.resolve("acme", "news").ref.version == 2
    other.delete("acme", "news")
    with pytest.raises(AdapterNotFound):
        registry.resolve("acme", "news")


def test_a_re_added_version_has_a_new_identity(
    registry: AdapterRegistry, store: AdapterStore
) -> None:
    backbone = tiny_backbone()
    put(store, "acme", "news", random_adapter(backbone, 1))
    first = registry.resolve("acme", "news")
    registry.delete("acme", "news")
    put(store, "acme", "news", random_adapter(backbone, 2))
    second = registry.resolve("acme", "news")
    assert first.ref == second.ref == AdapterRef("acme", "news", 1)
    assert first != second  # cached weights of the old v1 can never serve the new one


def test_add_version_validates_before_the_version_becomes_visible(
    registry: AdapterRegistry, store: AdapterStore
) -> None:
    config, weights = upload_bytes(1)
    ref = registry.add_version("acme", "news", config, weights)
    assert ref == AdapterRef("acme", "news", 1)
    # Straight to the CPU tier: no disk load needed to serve it.
    assert tiers(registry).is_ready(registry.resolve("acme", "news"))
    assert tiers(registry).stats().cpu_loads == 0

    bad_uploads = {
        "fingerprint": upload_bytes(2, base_fingerprint="0" * 32),
        "rank": upload_bytes(3, rank=16),  # config says 16, tensors are rank 4
        "weights": (config, b"not a safetensors file"),
        "config": (b"{not json", weights),
    }
    messages = {}
    for what, (cfg, wts) in bad_uploads.items():
        with pytest.raises(AdapterFormatError) as error:
            registry.add_version("acme", "news", cfg, wts)
        messages[what] = str(error.value)
    assert "fingerprint mismatch" in messages["fingerprint"]
    assert "greater than max_rank 8" in messages["rank"]
    assert "not a valid safetensors" in messages["weights"]
    assert "adapter_config.json" in messages["config"]
    assert store.versions("acme", "news") == [1]  # nothing half-written became visible
    adapter_dir = store.root / "acme" / "news"
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["v1"]
    with pytest.raises(InvalidRequest):
        registry.add_version("acme", "../x", config, weights)


def test_listing_shows_own_and_public_with_latest_version_and_config(
    registry: AdapterRegistry, store: AdapterStore
) -> None:
    backbone = tiny_backbone()
    put(store, "public", "news", random_adapter(backbone, 1))
    put(store, "acme", "colors", random_adapter(backbone, 2))
    put(store, "acme", "colors", random_adapter(backbone, 3))
    put(store, "other", "secret", random_adapter(backbone, 4))
    listed = {(i.tenant, i.name): i for i in registry.list_adapters("acme")}
    assert set(listed) == {("acme", "colors"), ("public", "news")}
    colors = listed[("acme", "colors")]
    assert colors.versions == (1, 2) and colors.latest.version == 2 and not colors.public
    assert colors.config is not None and colors.config.rank == 4
    assert listed[("public", "news")].public
    assert registry.describe("acme", "news").tenant == "public"


def test_delete_removes_every_version_and_unknown_deletes_raise(
    registry: AdapterRegistry, store: AdapterStore
) -> None:
    backbone = tiny_backbone()
    put(store, "acme", "news", random_adapter(backbone, 1))
    put(store, "acme", "news", random_adapter(backbone, 2))
    assert registry.delete("acme", "news") == 2
    with pytest.raises(AdapterNotFound):
        registry.resolve("acme", "news")
    with pytest.raises(AdapterNotFound):
        registry.delete("acme", "news")


def test_disk_loads_run_on_the_loader_and_bind_pins_slots(
    registry: AdapterRegistry, store: AdapterStore, changes: LoaderChanges
) -> None:
    backbone = tiny_backbone()
    for i in range(3):
        put(store, "acme", f"a{i}", random_adapter(backbone, i))
    versions = [registry.resolve("acme", f"a{i}") for i in range(3)]
    cache = tiers(registry)
    for v in versions:
        cache.want(v)
    changes.until(lambda: all(cache.is_ready(v) for v in versions), "all three loaded")
    assert cache.stats().cpu_loads == 3
    keys = [versions[0], versions[0], versions[2]]
    slots, failed, missing = cache.bind(keys)
    assert failed == {} and missing == []
    assert cache.pins(slots[versions[0]]) == 2 and cache.pins(slots[versions[2]]) == 1
    cache.release(slots, keys)
    assert cache.pins(slots[versions[0]]) == 0
    assert tiers(registry).stats().device_loads == 2


def test_cpu_tier_stays_within_its_byte_budget(store: AdapterStore) -> None:
    backbone = tiny_backbone()
    size = set_nbytes(random_adapter(backbone, 0))
    changes = LoaderChanges()
    registry = make_registry(store, budget=2 * size + size // 2, slots=2, on_change=changes)
    try:
        for i in range(6):
            put(store, "acme", f"a{i}", random_adapter(backbone, i))
        versions = [registry.resolve("acme", f"a{i}") for i in range(6)]
        cache = tiers(registry)
        for v in versions:
            cache.want(v)
        served: list[AdapterVersion] = []
        ready: list[AdapterVersion] = []

        def some_ready() -> bool:
            ready[:] = [v for v in versions if v not in served and cache.is_ready(v)][:2]
            return bool(ready)

        # Serve like the engine: bind what is ready (two slots), then let go of it; between
        # rounds, wait for the loader to finish a load (as the engine is woken by it).
        while len(served) < 6:
            changes.until(some_ready, f"a load after {len(served)} of 6 served")
            slots, failed, missing = cache.bind(ready)
            assert failed == {} and missing == []
            cache.release(slots, ready)
            for v in ready:
                cache.unwant(v)
            served.extend(ready)
        stats = cache.stats()
        assert sorted(served) == sorted(versions)
        assert stats.cpu_peak_bytes <= 2 * size + size // 2
        assert stats.cpu_resident <= 2
    finally:
        tiers(registry).close()


def test_an_invalid_version_on_disk_fails_its_load_with_the_reason(
    registry: AdapterRegistry, store: AdapterStore, changes: LoaderChanges
) -> None:
    def corrupt(folder: Path) -> None:
        config, _ = upload_bytes(1)
        (folder / CONFIG_FILE).write_bytes(config)
        (folder / "adapter.safetensors").write_bytes(b"garbage")

    store.write_version("acme", "broken", corrupt)
    version = registry.resolve("acme", "broken")
    tiers(registry).want(version)
    changes.until(lambda: tiers(registry).failure(version) is not None, "the load failed")
    error = tiers(registry).failure(version)
    assert isinstance(error, AdapterLoadError)
    assert "acme/broken@v1 is invalid" in str(error)
    assert not tiers(registry).is_ready(version)


def test_rescan_publishes_the_adapters_on_disk(store: AdapterStore) -> None:
    metrics = ServiceMetrics()
    registry = make_registry(store, metrics=metrics)
    try:
        backbone = tiny_backbone()
        put(store, "acme", "a", random_adapter(backbone, 1))
        put(store, "public", "b", random_adapter(backbone, 2))
        assert registry.rescan() == 2
        value = metrics.registry.get_sample_value("ctxpeft_adapters_resident", {"tier": "disk"})
        assert value == 2.0
    finally:
        tiers(registry).close()


def test_adapter_version_orders_and_hashes_by_ref_and_identity() -> None:
    a = AdapterVersion(AdapterRef("t", "n", 1), (1, 2))
    assert a == AdapterVersion(AdapterRef("t", "n", 1), (1, 2))
    assert len({a, AdapterVersion(AdapterRef("t", "n", 1), (1, 3))}) == 2


def test_a_version_stored_by_an_older_build_keeps_serving_and_listing(
    registry: AdapterRegistry, store: AdapterStore, changes: LoaderChanges
) -> None:
    """Metadata that older builds did not check (a non-string description made the tenant's
    listing answer 500) is read leniently from the store; the same bytes as an upload get
    a 422-style AdapterFormatError naming the field."""
    config, weights = upload_bytes(1)
    data = json.loads(config) | {"description": {"note": 5}, "connector_dropout": 5}
    legacy = json.dumps(data).encode()

    def older_build(folder: Path) -> None:
        (folder / CONFIG_FILE).write_bytes(legacy)
        (folder / "adapter.safetensors").write_bytes(weights)

    store.write_version("acme", "old", older_build)
    info = registry.describe("acme", "old")
    assert info.config is not None and info.config.description == '{"note": 5}'
    version = registry.resolve("acme", "old")
    tiers(registry).want(version)
    changes.until(lambda: tiers(registry).is_ready(version), "the older build's set loaded")
    slots, failed, _ = tiers(registry).bind([version])
    assert failed == {} and version in slots
    tiers(registry).release(slots, [version])
    tiers(registry).unwant(version)
    with pytest.raises(AdapterFormatError) as error:
        registry.add_version("acme", "old", legacy, weights)
    assert error.value.field == "connector_dropout"  # the first of the two, in field order
    assert str(error.value) == (
        "invalid adapter_config.json: connector_dropout: Input should be less than 1 "
        "(and 1 more problem)"
    )
    assert store.versions("acme", "old") == [1]
