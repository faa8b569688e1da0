"""The servability probe (issue 20): a version that cannot serve is refused before anyone's
request depends on it, whether it was uploaded or appeared in the store from elsewhere; a
version that serves is probed once, not at every reload."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save as safetensors_bytes

from adapters.adapter_set import AdapterSet
from adapters.model import ContextPEFTModel
from service.engine import CaptionRequest, Engine, EngineConfig
from service.engine.probe import ServabilityProbe
from service.exceptions import AdapterUnservable
from service.metrics import ServiceMetrics
from service.registry import connector_spec
from service.store import AdapterStore
from tests.service.adapter_fixtures import noise_image, put, random_adapter, tiny_backbone


def overflowing() -> AdapterSet:
    """Finite weights (validation accepts them) whose activations overflow: two 3e38 biases
    in one residual sum are infinite."""
    adapter = random_adapter(tiny_backbone(), 40, method="bitfit")
    with torch.no_grad():
        for module in ("o_proj", "down_proj"):
            adapter.params[f"lm__layers__0__{module}__bias"].fill_(3e38)
    return adapter


@pytest.fixture
def probe() -> ServabilityProbe:
    backbone = tiny_backbone()
    return ServabilityProbe(ContextPEFTModel(backbone), connector_spec(backbone), max_rank=16)


@pytest.mark.parametrize(("method", "rank"), [("lora", 4), ("ia3", 0), ("bitfit", 0), ("ia3", 7)])
def test_healthy_sets_pass_whatever_rank_ia3_and_bitfit_say(
    probe: ServabilityProbe, method: str, rank: int
) -> None:
    probe(random_adapter(tiny_backbone(), 41, rank, method), "acme/x@v1")


def test_a_set_whose_activations_overflow_is_refused_naming_the_cause(
    probe: ServabilityProbe,
) -> None:
    with pytest.raises(AdapterUnservable) as refused:
        probe(overflowing(), "beta/overflow@v1")
    message = refused.value.message
    assert "beta/overflow@v1" in message and "the prefill" in message
    assert "non-finite" in message


def test_an_exception_in_the_probe_forward_is_the_refusal_and_the_scratch_slot_is_cleared(
    probe: ServabilityProbe, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe(random_adapter(tiny_backbone(), 42), "acme/first@v1")  # allocates the scratch bank
    assert probe._bank is not None
    load = probe._bank.load

    def broken(slot: int, adapter: AdapterSet) -> None:
        load(slot, adapter)
        raise ZeroDivisionError("float division by zero")

    monkeypatch.setattr(probe._bank, "load", broken)
    with pytest.raises(AdapterUnservable, match="raised ZeroDivisionError: float division by zero"):
        probe(random_adapter(tiny_backbone(), 43), "acme/broken@v1")
    assert not probe._bank.occupied[0]  # nothing of the refused set stays in the slot


def files(adapter: AdapterSet, **config: Any) -> tuple[bytes, bytes]:
    tensors = {name: t.detach().contiguous() for name, t in adapter.tensors().items()}
    return json.dumps(adapter.config.to_dict() | config).encode(), safetensors_bytes(tensors)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Callable[..., Engine]]:
    made: list[Engine] = []

    def make(store: AdapterStore, **config: Any) -> Engine:
        engine = Engine(
            tiny_backbone(),
            store,
            EngineConfig(default_max_new_tokens=4, **config),
            ServiceMetrics(),
        )
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


def test_an_upload_that_fails_the_probe_leaves_nothing_in_the_store(
    tmp_path: Path, engine: Callable[..., Engine]
) -> None:
    store = AdapterStore(tmp_path / "store")
    e = engine(store)
    config, weights = files(overflowing())
    with pytest.raises(AdapterUnservable, match="servability probe"):
        e.registry.add_version("beta", "overflow", config, weights)
    assert store.versions("beta", "overflow") == []
    # A BitFit set saying "rank": 0 once divided by zero at every caption; it serves now.
    config, weights = files(random_adapter(tiny_backbone(), 44, method="bitfit"), rank=0)
    ref = e.registry.add_version("beta", "rankless", config, weights)
    result = asyncio.run(e.caption(CaptionRequest(noise_image(1), ("rankless",), "beta")))
    assert result[0].ref == ref


def test_a_version_placed_in_the_store_from_elsewhere_is_probed_before_it_first_serves(
    tmp_path: Path, engine: Callable[..., Engine]
) -> None:
    store = AdapterStore(tmp_path / "store")
    put(store, "beta", "overflow", overflowing())  # as `ctxpeft train` or a copy would
    e = engine(store)
    with pytest.raises(AdapterUnservable, match="beta/overflow@v1 failed the servability probe"):
        asyncio.run(e.caption(CaptionRequest(noise_image(1), ("overflow",), "beta")))
    failures = e.metrics.registry.get_sample_value(  # type: ignore[union-attr]
        "ctxpeft_adapter_load_failures_total", {"tier": "cpu", "reason": "invalid"}
    )
    assert failures == 1
    assert e.scheduler.inflight == 0


def test_a_version_is_probed_once_however_often_it_is_read_from_disk(
    tmp_path: Path, engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = AdapterStore(tmp_path / "store")
    for i in range(3):
        put(store, "acme", f"a{i}", random_adapter(tiny_backbone(), 50 + i))
    # A CPU tier that holds one set: every switch of adapter reads the next one from disk.
    e = engine(store, cpu_cache_bytes=1, device_slots=1)
    assert e.registry.probe is not None
    probed: list[str] = []
    probe = e.registry.probe

    def counted(adapter: AdapterSet, label: str) -> None:
        probed.append(label)
        probe(adapter, label)

    monkeypatch.setattr(e.registry, "probe", counted)

    async def run() -> None:
        for _ in range(2):
            for i in range(3):
                await e.caption(CaptionRequest(noise_image(i), (f"a{i}",), "acme"))

    asyncio.run(run())
    assert e.stats().tiers.cpu_loads == 6  # each read from disk twice
    assert sorted(probed) == ["acme/a0@v1", "acme/a1@v1", "acme/a2@v1"]
