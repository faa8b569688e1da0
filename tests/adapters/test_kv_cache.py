"""RowCache against a plain reference: under random joins, steps and leaves (with small
buffers, so they grow and move), every row's last `length` columns are exactly its keys and
values, the padding before them is finite, and nothing is copied that did not change."""

from __future__ import annotations

import random

import pytest
import torch

from adapters.kv_cache import RowCache

LAYERS, HEADS, DIM = 2, 2, 3


def fresh(rows: int, width: int, gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (
            torch.randn(rows, HEADS, width, DIM, generator=gen),
            torch.randn(rows, HEADS, width, DIM, generator=gen),
        )
        for _ in range(LAYERS)
    ]


def check(cache: RowCache, reference: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
    """reference[row][layer] = (keys [H, len, D], values [H, len, D])."""
    assert cache.rows == len(reference)
    if not reference:
        return
    longest = max(r[0][0].shape[1] for r in reference)
    assert cache.width == longest  # leading columns that every row pads are not in view
    for layer_index, layer in enumerate(cache.row_layers):
        keys, values = layer.view()
        assert keys.shape == (len(reference), HEADS, longest, DIM)
        assert torch.isfinite(keys).all() and torch.isfinite(values).all()
        for row, per_layer in enumerate(reference):
            k, v = per_layer[layer_index]
            n = k.shape[1]
            assert torch.equal(keys[row, :, longest - n :], k)
            assert torch.equal(values[row, :, longest - n :], v)


@pytest.mark.parametrize("seed", range(6))
def test_random_joins_steps_and_leaves_match_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    cache = RowCache(LAYERS)
    reference: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    grew = 0
    for _ in range(60):
        op = rng.random()
        if op < 0.3 or not reference:  # rows join, with a prefix of their own length
            rows, width = rng.randint(1, 3), rng.randint(2, 9)
            tensors = fresh(rows, width, gen)
            before = cache.row_layers[0].k_buf
            cache.append_tensors(tensors, headroom=2)
            grew += before is not None and cache.row_layers[0].k_buf is not before
            for r in range(rows):
                reference.append([(k[r], v[r]) for k, v in tensors])
        elif op < 0.8:  # a step: one column per row, written in place
            column = fresh(len(reference), 1, gen)
            cache.reserve_column(headroom=2)
            for layer, (k, v) in zip(cache.row_layers, column, strict=True):
                keys, _ = layer.update(k, v)
                assert keys.shape[2] == cache.width + 1
            cache.advance()
            for r, per_layer in enumerate(reference):
                reference[r] = [
                    (torch.cat([pk, k[r]], dim=1), torch.cat([pv, v[r]], dim=1))
                    for (pk, pv), (k, v) in zip(per_layer, column, strict=True)
                ]
        else:  # some rows leave
            gone = rng.sample(range(len(reference)), rng.randint(1, len(reference)))
            order = cache.remove(gone)
            assert sorted(order) == sorted(set(range(len(reference))) - set(gone))
            reference = [reference[i] for i in order]
            if reference:
                cache.trim(max(r[0][0].shape[1] for r in reference))
        check(cache, reference)
    assert grew > 0  # the small buffers had to grow (or move) along the way


def test_a_leave_moves_only_the_rows_that_fill_the_holes() -> None:
    gen = torch.Generator().manual_seed(0)
    cache = RowCache(LAYERS)
    cache.append_tensors(fresh(6, 4, gen))
    assert cache.remove([1, 4]) == [0, 5, 2, 3]  # row 5 fills hole 1; hole 4 is past the end
    assert cache.remove([0]) == [3, 1, 2]
    assert cache.rows == 3
