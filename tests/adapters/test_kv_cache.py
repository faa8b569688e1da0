"""RowCache against a plain reference: under random joins, steps and leaves (with small
buffers, so they grow and move), every row's last `length` columns are exactly its keys and
values, the padding before them is exactly zero whatever other rows held or hold (NaN and
infinities included), and nothing is copied that did not change."""

from __future__ import annotations

import random

import pytest
import torch

from adapters.kv_cache import RowCache

LAYERS, HEADS, DIM = 2, 2, 3


def fresh(
    rows: int, width: int, gen: torch.Generator, poison: float | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random keys and values; with `poison` (NaN, inf, a huge finite value) every value is
    that instead: what a broken adapter's row writes."""
    out = []
    for _ in range(LAYERS):
        k = torch.randn(rows, HEADS, width, DIM, generator=gen)
        v = torch.randn(rows, HEADS, width, DIM, generator=gen)
        if poison is not None:
            k, v = torch.full_like(k, poison), torch.full_like(v, poison)
        out.append((k, v))
    return out


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, NaN equal to NaN."""
    return torch.equal(torch.nan_to_num(a, nan=7.0), torch.nan_to_num(b, nan=7.0))


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
        for row, per_layer in enumerate(reference):
            k, v = per_layer[layer_index]
            n = k.shape[1]
            assert same(keys[row, :, longest - n :], k)
            assert same(values[row, :, longest - n :], v)
            assert not keys[row, :, : longest - n].any()  # padding: zeros, nothing stale
            assert not values[row, :, : longest - n].any()


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
            poison = rng.choice([None, None, float("nan"), float("inf"), 3e38])
            tensors = fresh(rows, width, gen, poison)
            before = cache.row_layers[0].k_buf
            cache.append_tensors(tensors, headroom=2)
            grew += before is not None and cache.row_layers[0].k_buf is not before
            for r in range(rows):
                reference.append([(k[r], v[r]) for k, v in tensors])
        elif op < 0.8:  # a step: one column per row, written in place
            column = fresh(len(reference), 1, gen, rng.choice([None] * 5 + [float("nan")]))
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


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf"), 3e38])
def test_a_row_joining_where_a_poisoned_row_was_sees_only_zeros_as_padding(
    poison: float,
) -> None:
    """The issue-20 defect: a long row of non-finite values leaves, a short row joins into its
    buffer row; the short row's padding must not be the old row's values."""
    gen = torch.Generator().manual_seed(1)
    cache = RowCache(LAYERS)
    cache.append_tensors(fresh(1, 8, gen))  # a healthy long row keeps the columns in use
    cache.append_tensors(fresh(1, 8, gen, poison))  # the poisoned row: buffer row 1
    cache.remove([1])
    for layer in cache.row_layers:  # the freed buffer row was cleared at once
        assert all(not buf[1].any() for buf in layer.buffers())
    cache.append_tensors(fresh(1, 3, gen))  # joins into buffer row 1, 5 columns of padding
    for layer in cache.row_layers:
        keys, values = layer.view()
        assert keys.shape[2] == 8
        assert not keys[1, :, :5].any() and not values[1, :, :5].any()
        assert torch.isfinite(keys).all() and torch.isfinite(values).all()


def test_a_row_moved_into_a_hole_leaves_nothing_behind() -> None:
    gen = torch.Generator().manual_seed(2)
    cache = RowCache(LAYERS)
    cache.append_tensors(fresh(2, 4, gen))
    cache.append_tensors(fresh(1, 4, gen, float("nan")))  # row 2, moved into hole 0 below
    assert cache.remove([0]) == [2, 1]
    keys, _ = cache.row_layers[0].view()
    assert keys[0].isnan().all()  # the poisoned row's own data moved with it
    k_buf, v_buf = cache.row_layers[0].buffers()
    assert not k_buf[2].any() and not v_buf[2].any()  # its old buffer row is clear


def test_a_cache_emptied_and_filled_again_keeps_its_buffers_and_shows_nothing_old() -> None:
    """A running batch that empties keeps its buffers for the next rows (no allocation);
    what the rows before wrote (NaN here) is nowhere in what the new rows show."""
    gen = torch.Generator().manual_seed(3)
    cache = RowCache(LAYERS)
    cache.append_tensors(fresh(3, 8, gen, float("nan")), headroom=4)
    for _ in range(3):  # steps write NaN columns as well
        cache.reserve_column(headroom=4)
        for layer, (k, v) in zip(cache.row_layers, fresh(3, 1, gen, float("nan")), strict=True):
            layer.update(k, v)
        cache.advance()
    buffers = cache.row_layers[0].buffers()
    cache.clear()
    assert cache.rows == 0 and cache.width == 0
    long_row, short_row = fresh(1, 7, gen), fresh(1, 3, gen)
    cache.append_tensors(long_row, headroom=4)
    cache.append_tensors(short_row, headroom=4)  # 4 columns of padding over old NaN
    assert cache.row_layers[0].buffers()[0] is buffers[0]  # the same buffers, no new ones
    check(cache, [[(k[0], v[0]) for k, v in row] for row in (long_row, short_row)])


def test_a_batch_in_steady_state_allocates_nothing_and_moves_leave_no_copies() -> None:
    """Rows of bounded length join, step and leave for many steps: after the buffers have
    grown to fit, no step, join or leave allocates (the used columns move back to column 0 in
    the same buffers, at most once per `width` steps), every row still reads exactly its own
    keys and values, and a move leaves nothing behind beyond the columns in use."""
    rng = random.Random(7)
    gen = torch.Generator().manual_seed(7)
    cache = RowCache(LAYERS)
    reference: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    buffers: set[int] = set()
    moves = 0
    for step in range(400):
        if len(reference) < 6 and rng.random() < 0.5:  # a row joins with a short prefix
            tensors = fresh(1, rng.randint(2, 5), gen)
            cache.append_tensors(tensors, headroom=4)
            reference.append([(k[0], v[0]) for k, v in tensors])
        if not reference:
            continue
        start = cache.start
        cache.reserve_column(headroom=4)
        moved = cache.start < start
        column = fresh(len(reference), 1, gen)
        for layer, (k, v) in zip(cache.row_layers, column, strict=True):
            layer.update(k, v)
        cache.advance()
        for r, per_layer in enumerate(reference):
            reference[r] = [
                (torch.cat([pk, k[r]], dim=1), torch.cat([pv, v[r]], dim=1))
                for (pk, pv), (k, v) in zip(per_layer, column, strict=True)
            ]
        if moved:
            moves += 1
            for layer in cache.row_layers:  # nothing of the rows outside their columns
                for buf in layer.buffers():
                    assert not buf[: cache.rows, :, cache.end :].any()
        gone = [r for r, row in enumerate(reference) if row[0][0].shape[1] >= 12]
        if gone:  # rows leave at 12 tokens: widths stay bounded
            order = cache.remove(gone)
            reference = [reference[i] for i in order]
            if reference:
                cache.trim(max(r[0][0].shape[1] for r in reference))
        check(cache, reference)
        if step >= 100:  # grown to fit by then
            buffers.add(id(cache.row_layers[0].buffers()[0]))
    assert len(buffers) == 1  # the same buffers for the last 300 steps
    assert moves >= 10  # and the used columns moved back many times within them
