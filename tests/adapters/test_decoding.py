"""DecodeState: rows that join a running batch k steps late, or leave early, generate exactly
the tokens they generate alone or in a static batch, for every method mix."""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Sequence

import pytest
import torch

from adapters.adapter_set import AdapterSet
from adapters.bank import AdapterBank
from adapters.decoding import DecodeState, generate
from adapters.model import ContextPEFTModel
from tests.adapters.conftest import bank_of

ROWS = 10
LIMIT = 12


def _bank(
    model: ContextPEFTModel, factory: Callable[..., AdapterSet], dtype: torch.dtype
) -> AdapterBank:
    """Eight slots: LoRA ranks 2..16 (fused and separate gate/up), IA3 and BitFit, each
    context-specific and agnostic."""
    backbone = model.backbone
    sets = [
        factory("lora", rank=2, seed=20),
        factory("lora", rank=16, seed=21),
        factory("lora", rank=4, agnostic=True, seed=22),
        factory("lora", rank=8, fuse_gate_up=False, seed=23),
        factory("ia3", seed=24),
        factory("ia3", agnostic=True, seed=25),
        factory("bitfit", seed=26),
        factory("bitfit", agnostic=True, seed=27),
    ]
    return bank_of(backbone, sets, max_rank=16, dtype=dtype)


def _features(model: ContextPEFTModel, rows: int, tokens: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(rows, tokens, model.backbone.vision_dim, generator=gen)


SLOTS = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 1, 4])
# Different limits so that rows leave at different steps, before and after others join.
LIMITS = [LIMIT, 3, LIMIT, 5, LIMIT, 2, 9, LIMIT, 7, LIMIT]


def _alone(
    model: ContextPEFTModel, bank: AdapterBank, features: torch.Tensor
) -> list[tuple[int, ...]]:
    return [
        tuple(generate(model, features[i : i + 1], bank, SLOTS[i : i + 1], LIMITS[i])[0])
        for i in range(features.shape[0])
    ]


def _drive(
    model: ContextPEFTModel,
    bank: AdapterBank,
    features: torch.Tensor | Sequence[torch.Tensor],
    joins: dict[int, list[int]],
) -> tuple[dict[int, tuple[int, ...]], list[int]]:
    """Run rows as the engine's step loop does: at step s the rows `joins[s]` are prefilled
    together and merged into the running batch, then every running row takes one decode
    step; a row leaves at EOS or at its limit. Returns tokens per row and the cache width
    after every step."""
    eos = model.backbone.tokenizer.eos_token_id
    outputs: dict[int, list[int]] = defaultdict(list)
    state: DecodeState | None = None
    order: list[int] = []  # row id of each position in the running batch
    widths: list[int] = []

    def take(rows: list[int], tokens: list[int]) -> list[int]:
        keep = []
        for pos, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            if token != eos and len(outputs[row]) < LIMITS[row]:
                outputs[row].append(token)
                if len(outputs[row]) < LIMITS[row]:
                    keep.append(pos)
        return keep

    for step in range(40):
        new = joins.get(step, [])
        if new:
            feats = (
                features[new]
                if isinstance(features, torch.Tensor)
                else torch.stack([features[i] for i in new])
            )
            joined, first = DecodeState.prefill(model, bank, feats, SLOTS[new])
            kept = [new[k] for k in joined.keep(take(new, first.tolist()))]
            if state is None or not state.rows:
                state, order = joined, kept
            elif kept:
                state.merge(joined)
                order += kept
        if state is not None and state.rows:
            keep = take(order, state.step().tolist())
            order = [order[k] for k in state.keep(keep)]  # rows may move into holes
            widths.append(state.width)
            if state.rows:
                assert state.width == max(state.lengths)  # leading padding of all rows trimmed
    return {row: tuple(ids) for row, ids in outputs.items()}, widths


@pytest.fixture(scope="module")
def bank(model: ContextPEFTModel, adapter_factory: Callable[..., AdapterSet]) -> AdapterBank:
    return _bank(model, adapter_factory, torch.float32)


@pytest.mark.parametrize("late", [1, 3, 7])
def test_rows_joining_k_steps_late_generate_what_they_generate_alone(
    model: ContextPEFTModel, bank: AdapterBank, late: int
) -> None:
    features = _features(model, ROWS)
    with torch.no_grad():
        alone = _alone(model, bank, features)
        static = [tuple(ids) for ids in generate(model, features, bank, SLOTS, LIMITS)]
        early, late_rows = [0, 1, 2, 3, 4, 5], [6, 7, 8, 9]
        joined, widths = _drive(model, bank, features, {0: early, late: late_rows})
    assert static == alone
    assert [joined.get(i, ()) for i in range(ROWS)] == alone
    assert len({ids for ids in alone}) > ROWS // 2  # the adapters really differ
    assert min(len(ids) for ids in alone) < 4 and max(len(ids) for ids in alone) == LIMIT
    # The late rows sat beside longer rows (padding) and the cache shrank as rows left.
    assert max(widths) > min(widths)


def test_rows_joining_one_by_one_every_step_match_alone(
    model: ContextPEFTModel, bank: AdapterBank
) -> None:
    features = _features(model, ROWS)
    with torch.no_grad():
        alone = _alone(model, bank, features)
        joined, _ = _drive(model, bank, features, {i: [i] for i in range(ROWS)})
    assert [joined.get(i, ()) for i in range(ROWS)] == alone


def test_rows_with_different_image_prefix_lengths_share_a_batch(
    model: ContextPEFTModel, bank: AdapterBank
) -> None:
    """A future encoder may give another number of image tokens: rows whose prefixes differ
    in length are prefilled apart and merged; each still matches its own run alone."""
    full = _features(model, ROWS)
    features = [full[i, : 2 + i % 3] for i in range(ROWS)]  # 2, 3 or 4 image tokens
    with torch.no_grad():
        alone = [
            tuple(generate(model, features[i][None], bank, SLOTS[i : i + 1], LIMITS[i])[0])
            for i in range(ROWS)
        ]
        by_length: dict[int, list[int]] = defaultdict(list)
        for i in range(ROWS):
            by_length[features[i].shape[0]].append(i)
        joins = {step: rows for step, rows in enumerate(by_length.values())}
        joined, _ = _drive(model, bank, features, joins)
    assert [joined.get(i, ()) for i in range(ROWS)] == alone
    assert len({len(f) for f in features}) == 3


def test_bfloat16_decoding_matches_float32_logits_and_joins_like_alone(
    model: ContextPEFTModel, adapter_factory: Callable[..., AdapterSet]
) -> None:
    """bf16 on CPU: the cache and activations really are bf16, the first tokens agree with
    float32 for at least 80% of rows (bf16 keeps 8 bits of mantissa, so near-ties of random
    logits may flip; the tolerance we state), and rows joining late generate exactly what
    they generate alone in bf16."""
    half = copy.deepcopy(model).to(torch.bfloat16)
    bank32 = _bank(model, adapter_factory, torch.float32)
    bank16 = _bank(half, adapter_factory, torch.bfloat16)
    features = _features(model, ROWS)
    with torch.no_grad():
        _, first32 = DecodeState.prefill(model, bank32, features, SLOTS)
        state16, first16 = DecodeState.prefill(half, bank16, features, SLOTS)
        embeds = half.prefix(bank16.connect(features, SLOTS))[0]
        assert embeds.dtype == torch.bfloat16 and state16.cache.layers[0].keys.dtype == (
            torch.bfloat16
        )
        assert (first16 == first32).float().mean() >= 0.8
        alone = _alone(half, bank16, features)
        joined, _ = _drive(half, bank16, features, {0: [0, 1, 2, 3, 4], 3: [5, 6, 7, 8, 9]})
    assert [joined.get(i, ()) for i in range(ROWS)] == alone
