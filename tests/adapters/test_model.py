"""Tests for adapters.model (ContextPEFTModel): the sequence layout, a mixed batch of 24 rows
over 8 adapter sets giving each row what it gets alone with its set (every method, ranks 2..16,
and methods mixed in one bank), greedy generation identical alone and mixed, and the training
loss reaching only the adapter's parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from adapters.adapter_set import AdapterSet
from adapters.bank import AdapterBank
from adapters.config import IMAGE, TEXT
from adapters.decoding import generate
from adapters.model import ContextPEFTModel
from adapters.reference import Grouping, grouped
from adapters.routing import Routing
from tests.adapters.conftest import bank_of, lm_forward

ROWS, SETS = 24, 8
RANKS = (2, 4, 6, 8, 10, 12, 14, 16)


def _sets(factory: Callable[..., AdapterSet], kind: str) -> list[AdapterSet]:
    """Eight adapter sets of one method (LoRA with ranks 2..16), or of mixed methods."""
    if kind == "lora":
        return [
            factory("lora", rank=r, agnostic=i % 3 == 2, fuse_gate_up=i % 2 == 0, seed=20 + i)
            for i, r in enumerate(RANKS)
        ]
    if kind == "mixed":
        methods = ("lora", "ia3", "bitfit", "lora", "ia3", "bitfit", "lora", "lora")
        return [
            factory(m, rank=RANKS[i], agnostic=i in (3, 4), seed=40 + i)
            for i, m in enumerate(methods)
        ]
    return [
        factory(kind, agnostic=i % 4 == 3, targets="all" if i % 2 else "attn", seed=60 + i)
        for i in range(SETS)
    ]


def _bank(model: ContextPEFTModel, sets: list[AdapterSet]) -> AdapterBank:
    return bank_of(model.backbone, sets, max_rank=max(RANKS))


def _features(model: ContextPEFTModel, rows: int, seed: int = 0) -> torch.Tensor:
    backbone = model.backbone
    pixels = torch.randn(rows, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    return backbone.encode_images(pixels)


def _inputs(
    model: ContextPEFTModel,
    source: AdapterBank | AdapterSet,
    slots: torch.Tensor,
    features: torch.Tensor,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[BOS] + connector(image) + 5 caption tokens, with their contexts."""
    with torch.no_grad():
        embeds, contexts = model.prefix(source.connect(features, slots))
    ids = torch.randint(4, 37, (len(slots), 5), generator=torch.Generator().manual_seed(seed + 1))
    text = model.embed_tokens(ids)
    return torch.cat([embeds, text], 1), torch.cat([contexts, torch.full_like(ids, TEXT)], 1)


def test_prefix_layout(model: ContextPEFTModel) -> None:
    image = torch.randn(2, 4, model.backbone.dims.hidden_size)
    embeds, contexts = model.prefix(image)
    assert embeds.shape == (2, 5, model.backbone.dims.hidden_size)
    assert contexts.tolist() == [[TEXT] + [IMAGE] * 4] * 2
    bos = model.embed_tokens(torch.tensor([[1]]))
    assert torch.equal(embeds[:, 0], bos[0].expand(2, -1))
    assert torch.equal(embeds[:, 1:], image)


@pytest.mark.parametrize("kind", ["lora", "ia3", "bitfit", "mixed"])
@pytest.mark.parametrize("path", ["row", "row/per-row", "segment", "token"])
def test_mixed_batch_row_equals_row_alone(
    model: ContextPEFTModel,
    adapter_factory: Callable[..., AdapterSet],
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    path: str,
) -> None:
    """Every grouping; "row/per-row" is the fast path with no column range grouped by unit."""
    if path == "row/per-row":
        monkeypatch.setattr("adapters.routing.GRID_MAX_TOKENS", 0)
    grouping: Grouping = "row" if path.startswith("row") else path  # type: ignore[assignment]
    sets = _sets(adapter_factory, kind)
    bank = _bank(model, sets)
    slots = torch.tensor([(5 * r + 3) % SETS for r in range(ROWS)])
    features = _features(model, ROWS, seed=1)
    embeds, contexts = _inputs(model, bank, slots, features, seed=1)
    with torch.no_grad():
        mixed = lm_forward(model, grouping, embeds, Routing(bank, slots, contexts))
        base = model.lm_forward(embeds, None)
    one = torch.zeros(1, dtype=torch.long)
    worst, changed = 0.0, 0.0
    for row in range(ROWS):
        adapter = sets[int(slots[row])]
        # Alone, with its own set as the only weight source (no bank, no padding).
        own_embeds = embeds[row : row + 1].clone()
        with torch.no_grad():
            own_embeds[:, 1:5] = adapter.connect(features[row : row + 1], one)
            alone = lm_forward(
                model, grouping, own_embeds, Routing(adapter, one, contexts[row : row + 1])
            )
        worst = max(worst, float((alone - mixed[row : row + 1]).abs().max()))
        changed = min(changed or 1e9, float((base[row] - mixed[row]).abs().max()))
    assert worst <= 1e-5
    assert changed > 1e-3  # every row's adapter changes its output


def test_generate_identical_alone_and_mixed(
    model: ContextPEFTModel, adapter_factory: Callable[..., AdapterSet]
) -> None:
    sets = _sets(adapter_factory, "mixed")
    bank = _bank(model, sets)
    slots = torch.tensor([(3 * r + 1) % SETS for r in range(ROWS)])
    features = _features(model, ROWS, seed=2)
    # Different per-row limits make rows leave the batch at different steps.
    limits = [3 + r % 6 for r in range(ROWS)]
    mixed = generate(model, features, bank, slots, limits)
    assert [len(ids) for ids in mixed] != [0] * ROWS
    for row in range(ROWS):
        alone = generate(
            model,
            features[row : row + 1],
            sets[int(slots[row])],
            torch.zeros(1, dtype=torch.long),
            limits[row],
        )
        assert alone[0] == mixed[row], row
        assert len(mixed[row]) <= limits[row]
    # The references, also with a cache prefilled by one grouping and decoded by another.
    others: tuple[tuple[Grouping, Grouping], ...] = (("segment", "token"), ("token", "row"))
    for prefill, decode in others:
        with grouped(model, prefill, decode):
            assert generate(model, features, bank, slots, limits) == mixed


def test_generate_stops_at_eos_and_limit(
    model: ContextPEFTModel, adapter_factory: Callable[..., AdapterSet]
) -> None:
    adapter = adapter_factory("lora", rank=4, seed=3)
    # One image four times: the rows differ only by their token limits.
    features = _features(model, 1, seed=3).expand(4, -1, -1)
    slots = torch.zeros(4, dtype=torch.long)
    out = generate(model, features, adapter, slots, max_new_tokens=[0, 1, 5, 12])
    eos = model.tokenizer.eos_token_id
    assert all(eos not in ids for ids in out)
    assert [len(ids) for ids in out[:3]] == [0, 1, 5]
    assert 5 <= len(out[3]) <= 12
    # The longer run extends the shorter one (greedy and deterministic).
    assert out[3][: len(out[2])] == out[2]


def test_caption_loss_trains_only_the_adapter(
    model: ContextPEFTModel, adapter_factory: Callable[..., AdapterSet]
) -> None:
    adapter = AdapterSet.initialise(adapter_factory("lora", rank=4).config, model.backbone.dims)
    adapter.train()
    features = _features(model, 3, seed=4)
    captions = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    loss, tokens = model.caption_loss(features, captions, adapter)
    assert tokens == 3 + 2 + 4 + 3  # caption tokens + one EOS per row
    assert 2.0 < float(loss.detach()) < 6.0  # near log(37) = 3.6 for a random tiny LM
    loss.backward()
    grads = {n: p.grad for n, p in adapter.named_parameters()}
    # B starts at zero: B and the connector get gradients, A none yet.
    assert all(
        g is not None and float(g.abs().sum()) > 0 for n, g in grads.items() if "lora_B" in n
    )
    assert all(
        g is not None and float(g.abs().sum()) == 0 for n, g in grads.items() if "lora_A" in n
    )
    connector_grad = grads["params.connector__weight"]
    assert connector_grad is not None and float(connector_grad.abs().sum()) > 0
    assert all(p.grad is None for p in model.parameters())
