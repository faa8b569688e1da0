"""Tests for adapters.layers (ContextLinear), held to the references of adapters.reference.

- Context-agnostic LoRA equals Hugging Face PEFT LoRA on the same tiny Llama, all seven
  projections as separate targets, and a PEFT folder imported with `import_peft_lora` gives
  PEFT's own outputs.
- Context-specific LoRA, IA3 and BitFit equal a float64 token-by-token reference written here
  from PAPER.md's formulas (the frozen Hugging Face modules run in float64).
- The row (production), segment and token groupings of the product agree on mixed batches.
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
from adapters.reference import GROUPINGS, Grouping, grouped, segments, token_keys
from adapters.routing import Routing
from tests.adapters.conftest import bank_of, lm_forward

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


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_agnostic_lora_equals_peft_on_all_seven_projections(
    tiny_backbone: Backbone, model: ContextPEFTModel, grouping: Grouping
) -> None:
    peft_model = _peft_model(tiny_backbone, rank=4, alpha=8)
    adapter = _set_from_peft(peft_model, tiny_backbone, rank=4, alpha=8)
    x = _embeds(3, 9, tiny_backbone.dims.hidden_size)
    with torch.no_grad():
        expected = peft_model(inputs_embeds=x).logits
        base = model.lm_forward(x, None)
        ours = lm_forward(
            model, grouping, x, Routing(adapter, torch.zeros(3, dtype=torch.long), _text(3, 9))
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


# Each method with non-default options (LoRA scaling, unfused gate/up), for the reference tests.
METHOD_CASES = [
    ("lora", {"rank": 4, "alpha": 6.0}),
    ("lora", {"rank": 3, "fuse_gate_up": False}),
    ("ia3", {}),
    ("bitfit", {}),
]


@pytest.mark.parametrize(("method", "kwargs"), METHOD_CASES)
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
    for grouping in GROUPINGS:
        with torch.no_grad():
            ours = lm_forward(model, grouping, x, Routing(adapter, slots, MIXED_CONTEXTS))
        assert _max_diff(ours, expected) <= 1e-5, grouping


# --- the three groupings on mixed batches ----------------------------------------------------
@pytest.fixture(scope="module")
def mixed_bank(model: ContextPEFTModel, adapter_factory: Callable[..., AdapterSet]) -> AdapterBank:
    """Six slots mixing methods, ranks and agnostic/context-specific sets."""
    sets = [
        adapter_factory("lora", rank=2, seed=10),
        adapter_factory("ia3", seed=11),
        adapter_factory("lora", rank=8, agnostic=True, seed=12),
        adapter_factory("bitfit", seed=13),
        adapter_factory("lora", rank=5, fuse_gate_up=False, seed=14),
        adapter_factory("ia3", agnostic=True, targets="attn", seed=15),
    ]
    return bank_of(model.backbone, sets, max_rank=8)


def test_paths_agree_on_a_mixed_batch(model: ContextPEFTModel, mixed_bank: AdapterBank) -> None:
    gen = torch.Generator().manual_seed(9)
    batch, tokens = 12, 10
    x = torch.randn(batch, tokens, model.backbone.dims.hidden_size, generator=gen)
    contexts = torch.randint(0, 2, (batch, tokens), generator=gen)
    slots = torch.tensor([0, 1, 2, 3, 4, 5, 5, 4, 3, 2, 1, 0])
    with torch.no_grad():
        outs = {p: lm_forward(model, p, x, Routing(mixed_bank, slots, contexts)) for p in GROUPINGS}
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
    for grouping in GROUPINGS:
        cache = DynamicCache(config=model.backbone.lm.config)
        routing = Routing(mixed_bank, slots, contexts)
        with torch.no_grad(), grouped(model, grouping):
            out = [model.lm_forward(prefill, routing, cache=cache)]
            step = routing.step(_text(batch, 1))
            for x in steps:
                out.append(model.lm_forward(x, step, cache=cache))
        logits[grouping] = torch.cat(out, dim=1)
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
    routing = Routing(mixed_bank, torch.tensor([3, 1]), contexts)
    found = segments(routing, 4)
    keys = token_keys(routing, 4)
    assert keys.tolist() == [7, 6, 6, 7, 3, 2, 3, 3]  # slot * 2 + context
    assert found.bounds == [(2, 0, 1), (3, 1, 4), (6, 4, 6), (7, 6, 8)]
    assert keys[found.order].tolist() == [2, 3, 3, 3, 6, 6, 7, 7]
    assert segments(routing, 4) is found  # once per call, shared by every layer


def test_grouped_runs_the_reference_only_inside_the_block(
    model: ContextPEFTModel, mixed_bank: AdapterBank, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The oracle tests above are only as good as `grouped`: inside the block every context
    layer computes the reference product (per phase: decode steps are calls of one token per
    row), outside it the production layer runs again."""
    import adapters.reference as reference

    calls: list[tuple[int, bool]] = []
    original = reference.gathered_forward

    def counting(base: Any, x: torch.Tensor, *args: Any, segmented: bool) -> Any:
        calls.append((x.shape[1], segmented))
        return original(base, x, *args, segmented=segmented)

    monkeypatch.setattr(reference, "gathered_forward", counting)
    layers = [m for m in model.modules() if isinstance(m, ContextLinear)]
    slots, width = torch.tensor([0, 3]), model.backbone.dims.hidden_size
    with torch.no_grad():
        with grouped(model, "segment", "token"):
            model.lm_forward(_embeds(2, 5, width), Routing(mixed_bank, slots, _text(2, 5)))
            model.lm_forward(_embeds(2, 1, width), Routing(mixed_bank, slots, _text(2, 1)))
        assert sorted(set(calls)) == [(1, False), (5, True)]
        assert len(calls) == 2 * len(layers)
        assert all("forward" not in vars(m) for m in layers)
        calls.clear()
        model.lm_forward(_embeds(2, 5, width), Routing(mixed_bank, slots, _text(2, 5)))
    assert calls == []
    with pytest.raises(ValueError, match="no context layers"), grouped(nn.Linear(2, 2), "token"):
        pass


# --- the fast path: column ranges, fused shrink, grid decode, host facts ---------------------
# Rows whose image prefixes differ from each other and from the preset's count (a future
# encoder), some of them left-padded: (left padding, image tokens) per row. A row is
# padding (text), [BOS] (text), its image tokens, then text up to the common width.
RAGGED = [(0, 4), (2, 4), (0, 2), (1, 5), (0, 0), (3, 1)]
WIDTH = 10


def _ragged() -> tuple[torch.Tensor, list[tuple[int, int]]]:
    spans = [(pad + 1, pad + 1 + n) if n else (0, 0) for pad, n in RAGGED]
    contexts = torch.full((len(RAGGED), WIDTH), TEXT)
    for row, (start, end) in enumerate(spans):
        contexts[row, start:end] = IMAGE
    return contexts, spans


def test_column_segments_split_ranges_and_mark_where_rows_disagree() -> None:
    from adapters.routing import column_segments
    from adapters.weights import MIXED

    # Every row [BOS] + 4 image + text: three ranges of one context each.
    assert column_segments([(1, 5)] * 3, 9) == ((0, 1, TEXT), (1, 5, IMAGE), (5, 9, TEXT))
    # Left padding by 2 in one row: the columns where rows disagree are mixed.
    assert column_segments([(1, 5), (3, 7)], 9) == (
        (0, 1, TEXT),
        (1, 3, MIXED),
        (3, 5, IMAGE),
        (5, 7, MIXED),
        (7, 9, TEXT),
    )
    # A row without image tokens makes the image columns mixed; all-text rows are one range.
    assert column_segments([(1, 5), (0, 0)], 6) == ((0, 1, TEXT), (1, 5, MIXED), (5, 6, TEXT))
    assert column_segments([(0, 0), (0, 0)], 4) == ((0, 4, TEXT),)
    assert column_segments([(0, 4)], 4) == ((0, 4, IMAGE),)
    # Image ranges that do not overlap alternate mixed and text columns; past five ranges
    # the call is leading text, one masked range, trailing text.
    assert column_segments([(1, 2), (3, 4)], 6) == (
        (0, 1, TEXT),
        (1, 2, MIXED),
        (2, 3, TEXT),
        (3, 4, MIXED),
        (4, 6, TEXT),
    )
    spans = [(1, 2), (3, 4), (5, 6)]
    assert column_segments(spans, 8) == ((0, 1, TEXT), (1, 6, MIXED), (6, 8, TEXT))


def test_routing_derives_the_layout_from_a_contexts_tensor(mixed_bank: AdapterBank) -> None:
    contexts, spans = _ragged()
    slots = torch.arange(len(RAGGED)) % 6
    assert Routing(mixed_bank, slots, contexts).layout is None
    routing = Routing(mixed_bank, slots, contexts)
    assert routing.uniform_context() is None
    assert routing.layout is not None and routing.layout.image_spans == tuple(spans)
    prefill = Routing.prefill(mixed_bank, slots.tolist(), spans, WIDTH)
    assert torch.equal(prefill.contexts, contexts)
    assert prefill.plan(WIDTH) == routing.plan(WIDTH)
    # Short one-context ranges group rows by unit; mixed ranges multiply per row.
    plan = Routing.prefill(mixed_bank, [0, 1], [(1, 13), (1, 13)], 16).plan(16)
    assert plan.segments == ((0, 1, TEXT), (1, 13, IMAGE), (13, 16, TEXT))
    assert plan.grid == (True, False, True)
    assert routing.plan(WIDTH).grid == tuple(
        kind != -1 and end - start <= 8 for start, end, kind in routing.plan(WIDTH).segments
    )
    # Interleaved contexts are not ranges: the whole call is one masked range.
    interleaved = Routing(mixed_bank, torch.tensor([0, 1, 2]), MIXED_CONTEXTS)
    assert interleaved.plan(9).segments == ((0, 9, -1),)
    decode = Routing.decode(mixed_bank, [3, 1])
    assert decode.uniform_context() == TEXT and decode.contexts.tolist() == [[TEXT], [TEXT]]
    with pytest.raises(ValueError, match=r"image span \(2, 12\) outside 0\.\.10"):
        Routing.prefill(mixed_bank, [0], [(2, 12)], WIDTH)
    with pytest.raises(ValueError, match="2 image spans for 1 rows"):
        Routing.prefill(mixed_bank, [0], [(1, 2), (1, 2)], WIDTH)


@pytest.mark.parametrize(("method", "kwargs"), METHOD_CASES)
def test_unequal_image_prefixes_equal_float64_token_reference(
    tiny_backbone: Backbone,
    model: ContextPEFTModel,
    adapter_factory: Callable[..., AdapterSet],
    method: str,
    kwargs: dict[str, object],
) -> None:
    """Image prefixes of 0..5 tokens at different offsets in one batch: the range split must
    follow each row's own layout (mixed columns fall back to the masked product)."""
    adapter = adapter_factory(method, seed=4, **kwargs)
    contexts, spans = _ragged()
    x = _embeds(len(RAGGED), WIDTH, tiny_backbone.dims.hidden_size, seed=8)
    expected = _reference_logits(tiny_backbone.lm, adapter, x, contexts)
    slots = torch.zeros(len(RAGGED), dtype=torch.long)
    routings: dict[str, tuple[Grouping, Routing]] = {
        "row (contexts)": ("row", Routing(adapter, slots, contexts)),
        "row (prefill layout)": (
            "row",
            Routing.prefill(adapter, [0] * len(RAGGED), spans, WIDTH),
        ),
        "segment": ("segment", Routing(adapter, slots, contexts)),
        "token": ("token", Routing(adapter, slots, contexts)),
    }
    for name, (grouping, routing) in routings.items():
        with torch.no_grad():
            ours = lm_forward(model, grouping, x, routing)
        assert _max_diff(ours, expected) <= 1e-5, name
    # The layout really is ragged: some columns mix contexts.
    assert -1 in {kind for _, _, kind in routings["row (contexts)"][1].plan(WIDTH).segments}


@pytest.mark.parametrize("grid_max", [0, 8, 64])
def test_unequal_image_prefixes_in_a_mixed_batch_with_left_padding(
    model: ContextPEFTModel, mixed_bank: AdapterBank, monkeypatch: pytest.MonkeyPatch, grid_max: int
) -> None:
    """Also with every one-context range multiplied per row (grid_max 0) and every one
    grouped by unit (64)."""
    monkeypatch.setattr("adapters.routing.GRID_MAX_TOKENS", grid_max)
    contexts, spans = _ragged()
    x = _embeds(len(RAGGED), WIDTH, model.backbone.dims.hidden_size, seed=12)
    slots = torch.tensor([5, 0, 4, 2, 1, 3])
    attention = torch.ones(len(RAGGED), WIDTH, dtype=torch.long)
    for row, (pad, _) in enumerate(RAGGED):
        attention[row, :pad] = 0
    with torch.no_grad():
        token = lm_forward(model, "token", x, Routing(mixed_bank, slots, contexts), attention)
        cases: tuple[tuple[Grouping, Routing], ...] = (
            ("row", Routing(mixed_bank, slots, contexts)),
            ("row", Routing.prefill(mixed_bank, slots.tolist(), spans, WIDTH)),
            ("segment", Routing(mixed_bank, slots, contexts)),
        )
        for grouping, routing in cases:
            ours = lm_forward(model, grouping, x, routing, attention_mask=attention)
            assert bool(torch.isfinite(ours).all())
            assert _max_diff(ours, token) <= 1e-5, grouping
    assert _max_diff(token, model.lm_forward(x, None, attention)) > 1e-2


def test_shared_input_projections_share_one_shrink_product(
    model: ContextPEFTModel,
    adapter_factory: Callable[..., AdapterSet],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """q, k, v (k and v narrower than q: grouped-query attention) read one input, as gate
    and up do: one shrink product per group and layer, for fused and separate gate/up."""
    import adapters.layers as layers

    dims = model.backbone.dims
    assert dims.out_features["k_proj"] < dims.out_features["q_proj"]  # GQA
    calls: list[int] = []
    original = layers._shrink

    def counting(x: torch.Tensor, *args: Any) -> Any:
        calls.append(x.shape[-1])
        return original(x, *args)

    monkeypatch.setattr(layers, "_shrink", counting)
    x = _embeds(3, 9, dims.hidden_size, seed=2)
    contexts = torch.tensor([[TEXT] + [IMAGE] * 4 + [TEXT] * 4] * 3)
    for fuse in (True, False):
        adapter = adapter_factory("lora", rank=4, fuse_gate_up=fuse, seed=7)
        slots = torch.zeros(3, dtype=torch.long)
        calls.clear()
        with torch.no_grad():
            ours = model.lm_forward(x, Routing(adapter, slots, contexts))
            token = lm_forward(model, "token", x, Routing(adapter, slots, contexts))
        # Per layer: q/k/v, o, gate/up, down.
        assert len(calls) == 4 * dims.num_layers, fuse
        assert _max_diff(ours, token) <= 1e-5


@pytest.mark.parametrize("grid_max", [0, 8])
@pytest.mark.parametrize(
    "slots",
    [
        [0, 3, 3, 5, 1, 0, 2, 3],  # rows scattered over units: gathers into the grid
        [2, 2, 4, 4, 1, 1, 0, 0],  # each unit's rows adjacent, equal counts: no gather
        [3] * 8,  # one unit: every weight a stride-0 view
        [5, 4, 3, 2, 1, 0, 0, 1],  # mixed
    ],
)
def test_decode_steps_need_no_host_sync_and_follow_leaving_rows(
    model: ContextPEFTModel,
    mixed_bank: AdapterBank,
    monkeypatch: pytest.MonkeyPatch,
    slots: list[int],
    grid_max: int,
) -> None:
    """A prefill and decode steps built from host facts (`Routing.prefill`, `step()`) run the
    adapter layers without one device-to-host read; rows leave (units left without any row
    included) and the grid of the remaining rows still gives the reference's logits (also
    with per-row weights everywhere: grid_max 0)."""
    monkeypatch.setattr("adapters.routing.GRID_MAX_TOKENS", grid_max)
    import sys

    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(21)
    width, batch = model.backbone.dims.hidden_size, 8
    spans = [(1, 5)] * batch
    prefill = torch.randn(batch, 7, width, generator=gen)
    steps = [torch.randn(batch, 1, width, generator=gen) for _ in range(4)]
    leave: list[list[int]] = [[], [0, 1, 2, 4, 5, 6, 7], [], [1, 2, 3, 4, 5]]

    syncs: list[str] = []

    def guard(name: str) -> Any:
        original = getattr(torch.Tensor, name)

        def checked(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("adapters."):
                syncs.append(f"{caller}: Tensor.{name}")
            return original(self, *args, **kwargs)

        return checked

    logits = {}
    groupings: tuple[Grouping, ...] = ("row", "token")
    for grouping in groupings:
        cache = DynamicCache(config=model.backbone.lm.config)
        routing: Routing = Routing.prefill(mixed_bank, slots, spans, 7)
        out = []
        with monkeypatch.context() as patch, grouped(model, grouping):
            if grouping == "row":
                for name in ("tolist", "item", "__bool__", "__int__"):
                    patch.setattr(torch.Tensor, name, guard(name))
            with torch.no_grad():
                out.append(model.lm_forward(prefill, routing, cache=cache)[:, -1])
                step = routing.step()
                rows = list(range(batch))
                for x, keep in zip(steps, leave, strict=True):
                    if keep:
                        cache.batch_select_indices(torch.tensor(keep))
                        step = step.select_rows(keep)
                        rows = [rows[k] for k in keep]
                    x = x[rows]
                    logits_step = model.lm_forward(x, step, cache=cache)[:, -1]
                    full = torch.zeros(batch, logits_step.shape[-1])
                    full[rows] = logits_step
                    out.append(full)
        logits[grouping] = torch.stack(out)
    assert syncs == []
    assert _max_diff(logits["row"], logits["token"]) <= 1e-5


def test_ranks_1_to_64_in_one_batch(
    tiny_backbone: Backbone, model: ContextPEFTModel, adapter_factory: Callable[..., AdapterSet]
) -> None:
    backbone = model.backbone
    sets = [
        adapter_factory("lora", rank=1, seed=31),
        adapter_factory("lora", rank=64, seed=32),
        adapter_factory("lora", rank=17, agnostic=True, fuse_gate_up=False, seed=33),
        adapter_factory("ia3", seed=34),
        adapter_factory("lora", rank=5, targets="ffn", seed=35),
    ]
    bank = bank_of(backbone, sets, max_rank=64)
    contexts, _ = _ragged()
    contexts = torch.cat([contexts, torch.tensor([[TEXT] + [IMAGE] * 4 + [TEXT] * 5] * 4)])
    slots = torch.tensor([1, 0, 2, 3, 4, 1, 4, 0, 3, 2])
    x = _embeds(len(slots), WIDTH, backbone.dims.hidden_size, seed=14)
    with torch.no_grad():
        outs = {p: lm_forward(model, p, x, Routing(bank, slots, contexts)) for p in GROUPINGS}
    # Rows of the rank-64 and the rank-1 set against the float64 reference of their own set.
    for row in (0, 1):
        adapter = sets[int(slots[row])]
        one = slice(row, row + 1)
        reference = _reference_logits(tiny_backbone.lm, adapter, x[one], contexts[one])
        assert _max_diff(outs["row"][one], reference) <= 1e-5, adapter.config.rank
    assert _max_diff(outs["row"], outs["token"]) <= 1e-5
    assert _max_diff(outs["segment"], outs["token"]) <= 1e-5


def test_autograd_row_path_equals_the_fast_path(
    model: ContextPEFTModel, adapter_factory: Callable[..., AdapterSet]
) -> None:
    """Training runs the masked, differentiable row path; inference the fast one."""
    contexts, _ = _ragged()
    x = _embeds(len(RAGGED), WIDTH, model.backbone.dims.hidden_size, seed=3)
    slots = torch.zeros(len(RAGGED), dtype=torch.long)
    for method in ("lora", "ia3", "bitfit"):
        adapter = adapter_factory(method, seed=9)
        with torch.enable_grad():
            trained = model.lm_forward(x, Routing(adapter, slots, contexts))
        assert trained.requires_grad
        with torch.no_grad():
            fast = model.lm_forward(x, Routing(adapter, slots, contexts))
        assert _max_diff(trained.detach(), fast) <= 1e-5, method


def test_decode_batches_gather_text_weights_once_per_unit(
    model: ContextPEFTModel, mixed_bank: AdapterBank
) -> None:
    """A batch that only decodes copies its units' text-context weights, once per unit (not
    per row, not the image context); when its units are the bank's slots in order, it copies
    nothing and reads the bank's tensors in place."""
    x = _embeds(8, 1, model.backbone.dims.hidden_size, seed=30)
    for slots, copies in (([4, 1, 1, 4, 2, 4, 1, 2], True), ([0, 1, 2, 3, 4, 5, 0, 1], False)):
        routing = Routing.decode(mixed_bank, slots)
        with torch.no_grad():
            ours = model.lm_forward(x, routing)
            token = lm_forward(
                model, "token", x, Routing(mixed_bank, torch.tensor(slots), _text(8, 1))
            )
        assert _max_diff(ours, token) <= 1e-5
        group = routing.weights.group(0, "o_proj")
        assert group is not None and set(group._a) == {TEXT} and set(group._b) == {("o_proj", TEXT)}
        units = len(set(slots))
        assert group.a(TEXT).shape[0] == units
        bank_b = mixed_bank.stacked(0, "o_proj")
        assert bank_b is not None and bank_b.lora_B is not None
        shares = group.b("o_proj", TEXT).data_ptr() == bank_b.lora_B[:, TEXT].data_ptr()
        assert shares is not copies
