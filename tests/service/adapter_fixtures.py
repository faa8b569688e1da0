"""Tiny in-process backbones, random adapter sets and images for the serving-engine tests."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from adapters.adapter_set import AdapterSet
from adapters.backbone import Backbone, connector_spec
from adapters.config import AdapterConfig, BackboneConfig, resolve_targets
from adapters.format import save_adapter
from service.adapter_cache import AdapterCache
from service.registry import AdapterRegistry, AdapterVersion
from service.store import AdapterRef, AdapterStore

TINY = BackboneConfig(
    name="tiny",
    vision={
        "model_type": "vit",
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    },
    lm={
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    image_size=32,
)


@functools.cache
def tiny_backbone() -> Backbone:
    """One seeded tiny backbone per test process (read-only: the engine never trains it)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Backbone.build(TINY)


def adapter_config(backbone: Backbone, rank: int = 4, method: str = "lora") -> AdapterConfig:
    return AdapterConfig(
        method=method,  # type: ignore[arg-type]
        connector=connector_spec(backbone),
        base_fingerprint=backbone.fingerprint(),
        rank=rank,
        targets=resolve_targets(method, "all"),
        num_layers=backbone.dims.num_layers,
    )


def random_adapter(
    backbone: Backbone, seed: int, rank: int = 4, method: str = "lora"
) -> AdapterSet:
    """An initialised set whose LoRA B / IA3 / bias are perturbed, so it changes captions."""
    adapter = AdapterSet.initialise(adapter_config(backbone, rank, method), backbone.dims, seed)
    generator = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for name, param in adapter.params.items():
            if name.endswith(("lora_B", "bias", "ia3")) and name.startswith("lm"):
                noise = torch.randn(param.shape, generator=generator) * 0.3
                param.add_(noise)
    return adapter


def put(store: AdapterStore, tenant: str, name: str, adapter: AdapterSet) -> AdapterRef:
    return store.write_version(tenant, name, lambda folder: save_adapter(adapter, folder))


def noise_image(seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def tiers(registry: AdapterRegistry) -> AdapterCache[AdapterVersion]:
    """The tiers `open_adapters` attached to a registry."""
    assert registry.tiers is not None
    return registry.tiers


LOADER_SAFETY_S = 60.0  # a safety net for a wait on the loader; no test relies on reaching it


class LoaderChanges:
    """An adapter cache's `on_change` (`open_adapters(..., on_change=changes)`): the loader
    thread calls it each time a disk load finished or failed. Tests wait on it (`until`)
    instead of polling the clock."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._count = 0

    def __call__(self) -> None:
        with self._cond:
            self._count += 1
            self._cond.notify_all()

    @classmethod
    def chained_onto(cls, cache: AdapterCache[AdapterVersion]) -> LoaderChanges:
        """Watch an existing cache (an engine's): called after its own `on_change`."""
        changes = cls()
        own = cache._on_change

        def both() -> None:
            if own is not None:
                own()
            changes()

        cache._on_change = both
        return changes

    def _since(self, seen: int) -> bool:
        return self._count != seen

    def until(self, check: Callable[[], bool], what: str) -> None:
        """Return once `check()` holds, re-checking it after every finished or failed load."""
        while True:
            with self._cond:
                seen = self._count
            if check():  # outside the lock: a check may start a load, which calls back
                return
            with self._cond:
                changed = self._cond.wait_for(functools.partial(self._since, seen), LOADER_SAFETY_S)
            assert changed, f"no load finished or failed while waiting for: {what}"
