"""Tests for adapters.layers (ContextLinear and its three gathered-product paths).

- Context-agnostic LoRA equals Hugging Face PEFT LoRA on the same tiny Llama, all seven
  projections as separate targets, and a PEFT folder imported with `import_peft_lora` gives
  PEFT's own outputs.
- Context-specific LoRA, IA3 and BitFit equal a float64 token-by-token reference written here
  from PAPER.md's formulas (the frozen Hugging Face modules run in float64).
- The row, segment and token paths agree on mixed batches.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from torch import nn
from transformers import PreTrainedModel

from adapters.adapter_set import AdapterSet
from adapters.backbone import Backbone, decoder_layers
from adapters.bank import AdapterBank
from adapters.config import (
    FUSED_GATE_UP,
    IA3_INPUT_SIDE,
    IMAGE,
    LM_MODULES,
    TEXT,
    AdapterConfig,
    ConnectorSpec,
)
from adapters.format import import_peft_lora
from adapters.layers import ContextLinear
from adapters.model import ContextPEFTModel
from adapters.routing import Path as RoutePath
from adapters.routing import Routing
from tests.adapters.conftest import PATHS

PARENT = {
    name: "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
    for name in LM_MODULES
}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def _embeds(batch: int, tokens: int, width: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(batch, tokens, width, generator=torch.Generator().manual_seed(seed))


def _text(batch: int, tokens: int) -> torch.Tensor:
    return torch.full((batch, tokens), TEXT, dtype=torch.long)


# Mixed image/text contexts: a realistic row (BOS, image tokens, caption), and two rows whose
# contexts interleave, which only the general formula (not the layout) can handle.
MIXED_CONTEXTS = torch.tensor(
    [
        [TEXT, IMAGE, IMAGE, IMAGE, IMAGE, TEXT, TEXT, TEXT, TEXT],
        [TEXT, IMAGE, TEXT, IMAGE, IMAGE, TEXT, IMAGE, TEXT, TEXT],
        [IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, TEXT],
    ]
)


# --- PEFT ------------------------------------------------------------------------------
def _peft_model(raw: Backbone, rank: int, alpha: int, rslora: bool = False) -> Any:
    lm = copy.deepcopy(raw.lm)
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(LM_MODULES),
        lora_dropout=0.0,
        use_rslora=rslora,
        init_lora_weights=False,
    )
    model = peft.get_peft_model(lm, config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _set_from_peft(peft_model: nn.Module, raw: Backbone, rank: int, alpha: float) -> AdapterSet:
    """The same LoRA weights, written by hand into our layout (A [1, d_in, r], B [1, r, d_out])."""
    dims = raw.dims
    config = AdapterConfig(
        method="lora",
        connector=ConnectorSpec("linear", raw.vision_dim, dims.hidden_size),
        base_fingerprint=raw.fingerprint(),
        contexts=("all",),
        rank=rank,
        alpha=alpha,
        targets=LM_MODULES,
        num_layers=dims.num_layers,
    )
    tensors = AdapterSet.initialise(config, dims).tensors()
    state = peft_model.state_dict()
    for layer in range(dims.num_layers):
        for name in LM_MODULES:
            key = f"base_model.model.model.layers.{layer}.{PARENT[name]}.{name}.lora_"
            tensors[f"lm.layers.{layer}.{name}.lora_A"] = state[key + "A.default.weight"].t()[None]
            tensors[f"lm.layers.{layer}.{name}.lora_B"] = state[key + "B.default.weight"].t()[None]
    return AdapterSet(config, dims, tensors)


@pytest.mark.parametrize("path", PATHS)
def test_agnostic_lora_equals_peft_on_all_seven_projections(
    tiny_backbone: Backbone, model: ContextPEFTModel, path: RoutePath
) -> None:
    peft_model = _peft_model(tiny_backbone, rank=4, alpha=8)
    adapter = _set_from_peft(peft_model, tiny_backbone, rank=4, alpha=8)
    x = _embeds(3, 9, tiny_backbone.dims.hidden_size)
    with torch.no_grad():
        expected = peft_model(inputs_embeds=x).logits
        base = model.lm_forward(x, None)
        ours = model.lm_forward(
            x, Routing(adapter, torch.zeros(3, dtype=torch.long), _text(3, 9), path)
        )
    assert _max_diff(base, expected) > 1e-2  # the adapter really changes the output
    assert _max_diff(ours, expected) <= 1e-5


@pytest.mark.parametrize("rslora", [False, True])
def test_imported_peft_folder_gives_peft_outputs(
    tiny_backbone: Backbone, model: ContextPEFTModel, tmp_path: Path, rslora: bool
) -> None:
    peft_model = _peft_model(tiny_backbone, rank=4, alpha=6, rslora=rslora)
    peft_model.save_pretrained(tmp_path / "peft")
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    adapter = import_peft_lora(
        tmp_path / "peft", tiny_backbone.dims, tiny_backbone.fingerprint(), tiny_backbone.vision_dim
    )
    assert adapter.config.agnostic and adapter.config.rank == 4
    assert sorted(adapter.config.targets) == sorted(LM_MODULES)
    x = _embeds(2, 6, tiny_backbone.dims.hidden_size, seed=11)
    with torch.no_grad():
        expected = peft_model(inputs_embeds=x).logits
        ours = model.lm_forward(x, Routing(adapter, torch.zeros(2, dtype=torch.long), _text(2, 6)))
    assert _max_diff(ours, expected) <= 1e-5


def test_fused_gate_up_is_gate_and_up_side_by_side(
    tiny_backbone: Backbone, model: ContextPEFTModel, adapter_factory: Callable[..., AdapterSet]
) -> None:
    """A fused gate_up LoRA equals separate gate and up LoRAs sharing A, B split by columns."""
    fused = adapter_factory("lora", rank=3, targets=(FUSED_GATE_UP,), seed=5)
    inter = tiny_backbone.dims.intermediate_size
    split_config = dataclasses.replace(fused.config, targets=("gate_proj", "up_proj"))
    tensors = {n: t for n, t in fused.tensors().items() if n.startswith("connector.")}
    for layer in range(tiny_backbone.dims.num_layers):
        a = fused.tensors()[f"lm.layers.{layer}.{FUSED_GATE_UP}.lora_A"]
        b = fused.tensors()[f"lm.layers.{layer}.{FUSED_GATE_UP}.lora_B"]
        for name, cols in (("gate_proj", slice(0, inter)), ("up_proj", slice(inter, 2 * inter))):
            tensors[f"lm.layers.{layer}.{name}.lora_A"] = a
            tensors[f"lm.layers.{layer}.{name}.lora_B"] = b[..., cols]
    split = AdapterSet(split_config, tiny_backbone.dims, tensors)
    x = _embeds(3, 9, tiny_backbone.dims.hidden_size)
    slots = torch.zeros(3, dtype=torch.long)
    with torch.no_grad():
        a_out = model.lm_forward(x, Routing(fused, slots, MIXED_CONTEXTS))
        b_out = model.lm_forward(x, Routing(split, slots, MIXED_CONTEXTS))
    assert _max_diff(a_out, b_out) <= 1e-6


# --- float64 token-by-token reference ----------------------------------------------------
class _ReferenceLinear(nn.Module):
    """PAPER.md's per-token formula, one token at a time, in float64:
    y_t = (W (x_t * l_in_c) + b + (x_t A_c) B_c * scaling + b'_c) * l_out_c,  c = ctx(t)."""

    def __init__(
        self, base: nn.Linear, layer: int, name: str, adapter: AdapterSet, contexts: torch.Tensor
    ) -> None:
        super().__init__()
        self.base = base
        self.contexts = contexts
        self.scaling = adapter.config.scaling
        self.agnostic = adapter.config.agnostic
        self.lora_a = self.lora_b = self.bias = self.ia3 = None
        self.ia3_in = name in IA3_INPUT_SIDE
        tensors = {n: t.double() for n, t in adapter.tensors().items()}
        prefix = f"lm.layers.{layer}.{name}"
        cols = slice(None)
        if FUSED_GATE_UP in adapter.config.targets and name in ("gate_proj", "up_proj"):
            prefix = f"lm.layers.{layer}.{FUSED_GATE_UP}"
            inter = base.out_features
            cols = slice(0, inter) if name == "gate_proj" else slice(inter, 2 * inter)
        self.lora_a = tensors.get(f"{prefix}.lora_A")
        b = tensors.get(f"{prefix}.lora_B")
        self.lora_b = None if b is None else b[..., cols]
        self.bias = tensors.get(f"{prefix}.bias")
        self.ia3 = tensors.get(f"{prefix}.ia3")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = []
        for b in range(x.shape[0]):
            tokens = []
            for t in range(x.shape[1]):
                c = 0 if self.agnostic else int(self.contexts[b, t])
                xt = x[b, t]
                if self.ia3 is not None and self.ia3_in:
                    xt = xt * self.ia3[c]
                y = self.base.weight @ xt
                if self.base.bias is not None:
                    y = y + self.base.bias
                if self.lora_a is not None and self.lora_b is not None:
                    y = y + (xt @ self.lora_a[c]) @ self.lora_b[c] * self.scaling
                if self.bias is not None:
                    y = y + self.bias[c]
                if self.ia3 is not None and not self.ia3_in:
                    y = y * self.ia3[c]
                tokens.append(y)
            rows.append(torch.stack(tokens))
        return torch.stack(rows)


def _reference_logits(
    raw_lm: PreTrainedModel, adapter: AdapterSet, x: torch.Tensor, contexts: torch.Tensor
) -> torch.Tensor:
    lm = copy.deepcopy(raw_lm).double()
    for index, layer in enumerate(decoder_layers(lm)):
        for name in LM_MODULES:
            parent = getattr(layer, PARENT[name])
            ref = _ReferenceLinear(getattr(parent, name), index, name, adapter, contexts)
            setattr(parent, name, ref)
    with torch.no_grad():
        return lm(inputs_embeds=x.double()).logits


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        ("lora", {"rank": 4, "alpha": 6.0}),
        ("lora", {"rank": 3, "fuse_gate_up": False}),
        ("ia3", {}),
        ("bitfit", {}),
    ],
)
def test_context_specific_equals_float64_token_reference(
    tiny_backbone: Backbone,
    model: ContextPEFTModel,
    adapter_factory: Callable[..., AdapterSet],
    method: str,
    kwargs: dict[str, object],
) -> None:
    adapter = adapter_factory(method, seed=2, **kwargs)
    x = _embeds(3, 9, tiny_backbone.dims.hidden_size, seed=5)
    expected = _reference_logits(tiny_backbone.lm, adapter, x, MIXED_CONTEXTS)
    slots = torch.zeros(3, dtype=torch.long)
    # The context really matters: all-text routing gives a different answer.
    with torch.no_grad():
        all_text = model.lm_forward(x, Routing(adapter, slots, _text(3, 9)))
    assert _max_diff(all_text, expected) > 1e-3
    for path in PATHS:
        with torch.no_grad():
            ours = model.lm_forward(x, Routing(adapter, slots, MIXED_CONTEXTS, path))
        assert _max_diff(ours, expected) <= 1e-5, path


# --- the three paths on mixed batches --------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_bank(model: ContextPEFTModel, adapter_factory: Callable[..., AdapterSet]) -> AdapterBank:
    """Six slots mixing methods, ranks and agnostic/context-specific sets."""
    backbone = model.backbone
    bank = AdapterBank(
        backbone.dims,
        ConnectorSpec("linear", backbone.vision_dim, backbone.dims.hidden_size),
        6,
        max_rank=8,
    )
    sets = [
        adapter_factory("lora", rank=2, seed=10),
        adapter_factory("ia3", seed=11),
        adapter_factory("lora", rank=8, agnostic=True, seed=12),
        adapter_factory("bitfit", seed=13),
        adapter_factory("lora", rank=5, fuse_gate_up=False, seed=14),
        adapter_factory("ia3", agnostic=True, targets="attn", seed=15),
    ]
    for slot, adapter in enumerate(sets):
        bank.load(slot, adapter)
    return bank


def test_paths_agree_on_a_mixed_batch(model: ContextPEFTModel, mixed_bank: AdapterBank) -> None:
    gen = torch.Generator().manual_seed(9)
    batch, tokens = 12, 10
    x = torch.randn(batch, tokens, model.backbone.dims.hidden_size, generator=gen)
    contexts = torch.randint(0, 2, (batch, tokens), generator=gen)
    slots = torch.tensor([0, 1, 2, 3, 4, 5, 5, 4, 3, 2, 1, 0])
    with torch.no_grad():
        outs = {p: model.lm_forward(x, Routing(mixed_bank, slots, contexts, p)) for p in PATHS}
        base = model.lm_forward(x, None)
    assert _max_diff(outs["token"], base) > 1e-2
    assert _max_diff(outs["row"], outs["token"]) <= 1e-5
    assert _max_diff(outs["segment"], outs["token"]) <= 1e-5


def test_paths_agree_on_decode_steps_with_cache(
    model: ContextPEFTModel, mixed_bank: AdapterBank
) -> None:
    """Prefill with image+text contexts, then single text tokens through the KV cache: the
    per-batch gathered weights of the row path are reused by every step."""
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(4)
    batch, width = 6, model.backbone.dims.hidden_size
    prefill = torch.randn(batch, 7, width, generator=gen)
    contexts = torch.tensor([[TEXT] + [IMAGE] * 4 + [TEXT] * 2] * batch)
    steps = [torch.randn(batch, 1, width, generator=gen) for _ in range(3)]
    slots = torch.tensor([5, 4, 3, 2, 1, 0])
    logits = {}
    for path in PATHS:
        cache = DynamicCache(config=model.backbone.lm.config)
        routing = Routing(mixed_bank, slots, contexts, path)
        with torch.no_grad():
            out = [model.lm_forward(prefill, routing, cache=cache)]
            step = routing.step(_text(batch, 1))
            for x in steps:
                out.append(model.lm_forward(x, step, cache=cache))
        logits[path] = torch.cat(out, dim=1)
    assert _max_diff(logits["row"], logits["token"]) <= 1e-5
    assert _max_diff(logits["segment"], logits["token"]) <= 1e-5


def test_no_routing_or_fresh_set_is_the_base_model(
    model: ContextPEFTModel, adapter_factory: Callable[..., AdapterSet]
) -> None:
    """Without routing the layers are the frozen linears; a freshly initialised set (B = 0,
    IA3 = 1, bias = 0) starts as the identity."""
    backbone = model.backbone
    x = _embeds(2, 9, backbone.dims.hidden_size)
    layer = decoder_layers(backbone.lm)[0]
    assert isinstance(layer.get_submodule("self_attn.q_proj"), ContextLinear)
    for method in ("lora", "ia3", "bitfit"):
        fresh = AdapterSet.initialise(adapter_factory(method).config, backbone.dims, seed=1)
        with torch.no_grad():
            base = model.lm_forward(x, None)
            out = model.lm_forward(
                x, Routing(fresh, torch.zeros(2, dtype=torch.long), MIXED_CONTEXTS[:2])
            )
        assert _max_diff(out, base) == 0.0, method


def test_segments_group_tokens_by_slot_and_context(mixed_bank: AdapterBank) -> None:
    contexts = torch.tensor([[TEXT, IMAGE, IMAGE, TEXT], [TEXT, IMAGE, TEXT, TEXT]])
    routing = Routing(mixed_bank, torch.tensor([3, 1]), contexts, "segment")
    segments = routing.segments(4)
    keys = routing.token_keys(4)
    assert keys.tolist() == [7, 6, 6, 7, 3, 2, 3, 3]  # slot * 2 + context
    assert segments.bounds == [(2, 0, 1), (3, 1, 4), (6, 4, 6), (7, 6, 8)]
    assert keys[segments.order].tolist() == [2, 3, 3, 3, 6, 6, 7, 7]
    assert routing.segments(4) is segments  # once per call, shared by every layer
