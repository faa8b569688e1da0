"""Tiny shared fixtures for the method package's tests: a backbone small enough to build in
milliseconds (ViT encoder with 4 image tokens, 2-layer Llama LM with grouped-query attention so
k/v projections have their own width) and helpers that make adapter sets with non-trivial
weights (LoRA B non-zero, IA3 away from one, BitFit biases away from zero), so that every
equivalence test actually exercises the adapter delta.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from adapters.adapter_set import AdapterSet
from adapters.backbone import Backbone, LMDims
from adapters.bank import AdapterBank
from adapters.config import AGNOSTIC, CONTEXTS, AdapterConfig, BackboneConfig, ConnectorSpec
from adapters.config import resolve_targets as _resolve
from adapters.format import save_adapter
from adapters.model import ContextPEFTModel
from adapters.reference import Grouping, grouped
from adapters.routing import Routing

TINY_LM: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 48,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
TINY_VIT: dict[str, Any] = {
    "model_type": "vit",
    "image_size": 16,
    "patch_size": 8,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
}
TINY = BackboneConfig(name="tiny", vision=TINY_VIT, lm=TINY_LM, image_size=16)


def build_tiny(seed: int = 0, config: BackboneConfig = TINY) -> Backbone:
    """A tiny random-init backbone; the same seed gives the same weights."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Backbone.build(config)


def make_set(
    dims: LMDims,
    vision_dim: int,
    method: str,
    *,
    rank: int = 4,
    agnostic: bool = False,
    targets: str | tuple[str, ...] = "all",
    fuse_gate_up: bool = True,
    alpha: float | None = None,
    seed: int = 0,
    fingerprint: str = "test",
) -> AdapterSet:
    """An adapter set whose every tensor is random and non-neutral."""
    names = _resolve(method, targets, fuse_gate_up) if isinstance(targets, str) else tuple(targets)
    config = AdapterConfig(
        method=method,  # type: ignore[arg-type]
        connector=ConnectorSpec("linear", vision_dim, dims.hidden_size),
        base_fingerprint=fingerprint,
        contexts=AGNOSTIC if agnostic else CONTEXTS,
        rank=rank,
        alpha=alpha,
        targets=names,
        num_layers=dims.num_layers,
        connector_dropout=0.0,
    )
    adapter = AdapterSet.initialise(config, dims, seed=seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, p in adapter.params.items():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("ia3"):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith(("lora_B", "bias")) and name.startswith("lm"):
                p.copy_(0.2 * noise)
            elif name.endswith("lora_A"):
                p.copy_(0.3 * noise)
    return adapter.eval()


def bank_of(
    backbone: Backbone, sets: list[AdapterSet], max_rank: int, dtype: torch.dtype = torch.float32
) -> AdapterBank:
    """A bank with a linear connector and set i loaded into slot i."""
    spec = ConnectorSpec("linear", backbone.vision_dim, backbone.dims.hidden_size)
    bank = AdapterBank(backbone.dims, spec, len(sets), max_rank=max_rank, dtype=dtype)
    for slot, adapter in enumerate(sets):
        bank.load(slot, adapter)
    return bank


def lm_forward(
    model: ContextPEFTModel,
    grouping: Grouping,
    inputs_embeds: torch.Tensor,
    routing: Routing | None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`model.lm_forward` with the adapter product grouped by `grouping`: "row" is the
    production layer, "segment" and "token" the references of `adapters.reference`."""
    with grouped(model, grouping):
        return model.lm_forward(inputs_embeds, routing, attention_mask=attention_mask)


@pytest.fixture(scope="session")
def tiny_backbone() -> Backbone:
    """The raw (not injected) tiny backbone. Do not inject it: copy it first."""
    return build_tiny(0)


@pytest.fixture(scope="session")
def model(tiny_backbone: Backbone) -> ContextPEFTModel:
    """The tiny backbone with context layers injected (holds no adapter weights)."""
    return ContextPEFTModel(copy.deepcopy(tiny_backbone)).eval()


@pytest.fixture(scope="session")
def adapter_factory(model: ContextPEFTModel) -> Callable[..., AdapterSet]:
    backbone = model.backbone

    def factory(method: str, **kwargs: Any) -> AdapterSet:
        kwargs.setdefault("fingerprint", backbone.fingerprint())
        return make_set(backbone.dims, backbone.vision_dim, method, **kwargs)

    return factory


@pytest.fixture
def saved(tmp_path: Path, adapter_factory: Callable[..., AdapterSet]) -> tuple[Path, AdapterSet]:
    """A rank-4 LoRA set saved to `tmp_path/v1` (the folder, the set)."""
    adapter = adapter_factory("lora", rank=4, seed=8)
    folder = tmp_path / "v1"
    save_adapter(adapter, folder)
    return folder, adapter
