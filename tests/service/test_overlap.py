"""Overlap scheduling (issue 24): a decode step is launched before the previous step's tokens
are read. Driven one iteration at a time from the test (no worker thread, no timing), on the
CPU where `overlap="on"` runs the same code path as on CUDA: every row gets exactly the tokens
it gets alone, the price is exactly one more decode step for the rows that end last, and a
decode step that fails for a row that had already ended does not turn its caption into a
fault. (The stateful differential test of the step loop runs with overlap on as well.) On a
CUDA device (skipped without one; `benchmarks/gpu_check.sh` runs it) the engine gives the CPU
reference's tokens with overlap on, its default there, and off."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

from adapters.layers import ContextLinear
from adapters.routing import current_routing
from service.engine import CaptionResult, Engine, EngineConfig
from service.store import AdapterStore
from tests.service import test_step_loop as step_loop
from tests.service.adapter_fixtures import tiny_backbone
from tests.service.test_step_loop import LIMIT, ask, expected, settle, step, until_ready

# The step loop tests' fixtures: a store of four adapters, and engines built on it.
store = step_loop.store
engine = step_loop.engine


def test_auto_is_off_on_a_cpu_and_on_is_on(engine: Callable[..., Engine]) -> None:
    assert engine().loop.overlap is False  # auto: the tiny backbone is on the CPU
    assert engine(overlap="on").loop.overlap is True
    assert engine(overlap="off").loop.overlap is False


def run_to_end(e: Engine, *requests: Any) -> list[list[CaptionResult]]:
    """Submit `requests` together, then iterate until every one is answered."""

    async def run() -> list[list[CaptionResult]]:
        tasks = [asyncio.create_task(e.caption(r)) for r in requests]
        await settle()
        await until_ready(e, len({n for r in requests for n in r.adapters}))
        while not all(t.done() for t in tasks):
            await step(e)
        return [await t for t in tasks]

    return asyncio.run(run())


@pytest.mark.parametrize("limits", [(LIMIT, LIMIT), (3, LIMIT), (1, 5)])
def test_overlap_gives_each_row_its_own_tokens_for_one_more_step(
    engine: Callable[..., Engine], limits: tuple[int, int]
) -> None:
    requests = [ask(1, "a0", "a1", max_new_tokens=limits[0]), ask(2, "a2", "a3")]
    results = {}
    steps = {}
    for mode in ("off", "on"):
        e = engine(overlap=mode, max_batch_size=4)
        results[mode] = run_to_end(e, *requests)
        steps[mode] = e.stats().steps
        assert e.loop.batch.pending is None and e.loop.batch.state is None
    want = [
        [expected(0, 1, limits[0]), expected(1, 1, limits[0])],
        [expected(2, 2), expected(3, 2)],
    ]
    for mode in ("off", "on"):
        assert [[r.token_ids for r in rs] for rs in results[mode]] == want, mode
        finish = [[r.finish_reason for r in rs] for rs in results[mode]]
        assert finish == [[r.finish_reason for r in rs] for rs in results["off"]]
    # The rows that end last ran one step past their end (its tokens were never read).
    assert steps["on"] == steps["off"] + 1


def test_a_decode_fault_after_a_row_ended_does_not_fault_that_row(
    engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With overlap a row that took its last token at step N is in step N + 1 (whose tokens
    nobody reads for it). If that step raises for its adapter, the row still gets its caption:
    the tokens due are read before the fault is attributed."""
    e = engine(overlap="on", max_batch_size=4)
    want_short, want_long = expected(0, 1, 2), expected(1, 2)
    decodes: dict[int, int] = {}
    forward = ContextLinear.forward

    def faulty(self: ContextLinear, x: torch.Tensor) -> torch.Tensor:
        routing = current_routing()
        if routing is None or routing.source is not e.bank or x.shape[1] != 1:
            return forward(self, x)
        slot = e.cache.slot_of(e.registry.resolve("acme", "a0"))
        if slot in set(routing.slots.tolist()):
            if self.layer == 0 and self.name == "q_proj":
                decodes[slot] = decodes.get(slot, 0) + 1
            if decodes[slot] >= 2:  # a0's second decode step: its row ended at the first
                raise RuntimeError("injected decode fault")
        return forward(self, x)

    monkeypatch.setattr(ContextLinear, "forward", faulty)
    short, long = run_to_end(e, ask(1, "a0", max_new_tokens=2), ask(2, "a1"))
    assert short[0].token_ids == want_short and short[0].finish_reason == "length"
    assert long[0].token_ids == want_long
    stats = e.stats()
    assert stats.faults.get("decode") == 1 and stats.failed == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("overlap", ["auto", "off"])
def test_on_cuda_the_engine_gives_the_cpu_tokens_with_overlap_on_and_off(
    store: AdapterStore, overlap: str
) -> None:
    """The engine on the GPU (float32), with overlap (the default there) and without: every
    row gets the tokens the CPU reference gives it alone."""
    backbone = copy.deepcopy(tiny_backbone()).to("cuda")
    config = EngineConfig(overlap=overlap, max_new_tokens_limit=LIMIT, default_max_new_tokens=LIMIT)
    with Engine(backbone, store, config, start=False) as e:
        assert e.loop.overlap is (overlap == "auto")
        results = run_to_end(e, ask(1, "a0", "a1", max_new_tokens=5), ask(2, "a2", "a3"))
    assert [[r.token_ids for r in rs] for rs in results] == [
        [expected(0, 1, 5), expected(1, 1, 5)],
        [expected(2, 2), expected(3, 2)],
    ]
