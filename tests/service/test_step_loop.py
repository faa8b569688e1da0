"""The engine's step loop, driven one iteration at a time from the test (no worker thread, no
timing): rows join a running batch k steps late and leave at any step with the tokens they
get alone; cancellation and deadlines stop a row within one step and release everything it
held; the prefill budget keeps running rows advancing every step under a burst; streaming
delivers tokens as steps produce them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.engine import CaptionRequest, CaptionResult, Engine, EngineConfig
from service.engine.answers import results_task
from service.exceptions import DeadlineExceeded
from service.store import AdapterStore
from tests.service.adapter_fixtures import noise_image, put, random_adapter, tiny_backbone
from tests.service.test_engine import references

LIMIT = 16
METHODS = [("lora", 2), ("ia3", 4), ("bitfit", 4), ("lora", 16)]


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    store = AdapterStore(tmp_path / "store")
    for i, (method, rank) in enumerate(METHODS):
        put(store, "acme", f"a{i}", random_adapter(tiny_backbone(), i, rank, method))
    return store


@pytest.fixture
def engine(store: AdapterStore) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(**config: Any) -> Engine:
        config.setdefault("max_new_tokens_limit", LIMIT)
        config.setdefault("default_max_new_tokens", LIMIT)
        engine = Engine(tiny_backbone(), store, EngineConfig(**config), start=False)
        engines.append(engine)
        return engine

    yield make
    for e in engines:
        e.close()


def expected(adapter: int, image: int, tokens: int = LIMIT) -> tuple[int, ...]:
    method, rank = METHODS[adapter]
    set_ = random_adapter(tiny_backbone(), adapter, rank, method)
    return references(set_, [noise_image(image)], tokens)[0]


async def settle() -> None:
    """Let the event loop run the deliveries a step scheduled, and the awaiting tasks."""
    for _ in range(5):
        await asyncio.sleep(0)


async def step(engine: Engine, times: int = 1) -> None:
    for _ in range(times):
        engine.loop.iterate()
        await settle()


async def until_ready(engine: Engine, adapters: int) -> None:
    deadline = time.monotonic() + 30
    while engine.cache.stats().cpu_loads < adapters:
        assert time.monotonic() < deadline, "adapters did not load"
        await asyncio.sleep(0.01)


async def queued(engine: Engine, rows: int) -> None:
    """Wait until `rows` rows are in the queue (their images are prepared in a thread pool)."""
    deadline = time.monotonic() + 30
    while engine.scheduler.queued < rows:
        assert time.monotonic() < deadline, "rows never reached the queue"
        await asyncio.sleep(0.005)


def ask(image: int, *names: str, **kwargs: Any) -> CaptionRequest:
    return CaptionRequest(noise_image(image), names, "acme", **kwargs)


@pytest.mark.parametrize("late", [1, 3, 7])
def test_rows_joining_k_steps_late_get_their_tokens_alone_while_others_leave(
    engine: Callable[..., Engine], late: int
) -> None:
    e = engine()
    joined_beside: set[str] = set()

    async def run() -> tuple[list[CaptionResult], list[CaptionResult]]:
        first = asyncio.create_task(e.caption(ask(1, "a0", "a1")))
        await settle()
        await until_ready(e, 2)
        await step(e)  # both rows join and take their first steps
        assert e.stats().running == 2
        await step(e, late)
        second = asyncio.create_task(e.caption(ask(2, "a2", "a3", max_new_tokens=9)))
        await settle()
        await until_ready(e, 4)
        while e.stats().batches < 2:
            await step(e)
        joined_beside.update(row.name for row in e.loop.batch.rows)
        while not (first.done() and second.done()):
            await step(e)
        return await first, await second

    long_rows, late_rows = asyncio.run(run())
    assert [r.token_ids for r in long_rows] == [expected(0, 1), expected(1, 1)]
    assert [r.token_ids for r in late_rows] == [expected(2, 2, 9), expected(3, 2, 9)]
    assert {"a0", "a1"} & joined_beside  # the late rows joined while earlier rows ran
    stats = e.stats()
    assert stats.batches == 2 and stats.running == 0
    assert stats.steps < max(r.tokens for r in long_rows) + late + 2  # no batch-to-batch wait
    assert e.admission.inflight == 0
    assert all(e.cache.pins(s) == 0 for s in range(e.bank.num_slots))


def test_a_cancelled_row_stops_at_the_next_step_and_releases_everything(
    engine: Callable[..., Engine],
) -> None:
    e = engine()
    streamed: list[int] = []

    async def run() -> None:
        cancelled = asyncio.create_task(
            e.caption(ask(3, "a0", on_token=lambda _, t: streamed.append(t)))
        )
        kept = asyncio.create_task(e.caption(ask(4, "a1")))
        await settle()
        await until_ready(e, 2)
        await step(e, 2)
        assert e.stats().running == 2 and len(streamed) == 3  # first token + 2 steps
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        slot = e.cache.slot_of(next(r.key for r in e.loop.batch.rows if r.name == "a0"))
        await step(e)  # the row leaves before this step computes anything for it
        assert e.stats().running == 1 and len(streamed) == 3
        assert slot is not None and e.cache.pins(slot) == 0
        assert e.admission.inflight == 1  # only the kept row's
        while not kept.done():
            await step(e)
        assert (await kept)[0].token_ids == expected(1, 4)

    asyncio.run(run())
    stats = e.stats()
    assert stats.dropped == {"cancelled": 1} and stats.completed == 1
    assert e.admission.inflight == 0


def test_a_row_past_its_deadline_stops_at_the_next_step(engine: Callable[..., Engine]) -> None:
    e = engine()

    async def run() -> None:
        task = asyncio.create_task(e.caption(ask(5, "a0", timeout_s=60)))
        await settle()
        await until_ready(e, 1)
        await step(e)
        row = e.loop.batch.rows[0]
        row.deadline = time.monotonic()  # the deadline passes while the row runs
        steps = e.stats().steps
        await step(e)
        assert e.stats().running == 0 and e.stats().steps == steps  # no compute for it
        with pytest.raises(DeadlineExceeded):
            await task

    asyncio.run(run())
    assert e.stats().dropped == {"deadline": 1}
    assert e.admission.inflight == 0


def test_a_burst_never_stalls_running_rows_beyond_the_prefill_budget(
    engine: Callable[..., Engine],
) -> None:
    """4 rows running, a burst of 24 arrives, at most 3 join per step: every running row still
    gets a token at every step (K = 1), and the burst joins 3 rows per step."""
    e = engine(max_batch_size=32, max_prefill_rows=3)
    counts: dict[int, int] = {}

    def counter(request: int) -> Callable[[int, int], None]:
        def on_token(_: int, token: int) -> None:
            counts[request] = counts.get(request, 0) + 1

        return on_token

    async def run() -> None:
        running = [
            asyncio.create_task(e.caption(ask(10 + i, f"a{i}", on_token=counter(i))))
            for i in range(4)
        ]
        await settle()
        await until_ready(e, 4)
        while e.stats().running < 4:
            await step(e)
        burst = [
            asyncio.create_task(e.caption(ask(20 + i, f"a{i % 4}", on_token=counter(100 + i))))
            for i in range(24)
        ]
        await settle()
        for _ in range(8):
            live = [i for i in range(4) if not running[i].done()]
            before = {i: counts.get(i, 0) for i in live}
            rows = e.stats().rows
            await step(e)
            for i in live:
                assert counts.get(i, 0) == before[i] + 1 or running[i].done()
            assert e.stats().rows - rows <= 3
        while not all(t.done() for t in running + burst):
            await step(e)
        results = [(await t)[0] for t in burst]
        assert [r.token_ids for r in results[:4]] == [expected(i, 20 + i) for i in range(4)]

    asyncio.run(run())
    assert e.stats().completed == 28


def test_no_slot_is_evicted_while_a_running_row_uses_it(engine: Callable[..., Engine]) -> None:
    """One device slot, four adapters: a0's row runs, rows of a1..a3 wait. At every step a0
    keeps its slot, pinned; the others take the slot one after another only once the row
    that used it has left; every row gets its adapter's tokens alone."""
    e = engine(device_slots=1)

    async def run() -> list[CaptionResult]:
        first = asyncio.create_task(e.caption(ask(30, "a0")))
        await settle()
        await until_ready(e, 1)
        await step(e)
        assert e.stats().running == 1
        key = e.loop.batch.rows[0].key
        slot = e.cache.slot_of(key)
        assert slot is not None
        others = [asyncio.create_task(e.caption(ask(30 + i, f"a{i}"))) for i in (1, 2, 3)]
        await settle()
        await until_ready(e, 4)
        tasks = [first, *others]
        holders: list[str] = []
        while not all(t.done() for t in tasks):
            names = {row.name for row in e.loop.batch.rows}
            assert len(names) <= 1, names  # one slot: never two adapters running together
            if names:
                (name,) = names
                holder = e.loop.batch.rows[0].key
                assert e.cache.slot_of(holder) == slot
                assert e.cache.pins(slot) == len(e.loop.batch.rows)
                if not holders or holders[-1] != name:
                    holders.append(name)
            await step(e)
        # a0 first; then each other adapter once, in the order its row reached the queue
        # (images are prepared in a thread pool, so that order is not a1, a2, a3 by design).
        assert holders[0] == "a0" and sorted(holders[1:]) == ["a1", "a2", "a3"]
        return [(await t)[0] for t in tasks]

    results = asyncio.run(run())
    assert [r.token_ids for r in results] == [expected(i, 30 + i) for i in range(4)]
    assert e.cache.pins(0) == 0 and e.admission.inflight == 0


def test_static_scheduling_runs_a_batch_to_its_end_before_the_next(
    engine: Callable[..., Engine],
) -> None:
    e = engine(scheduling="static", max_wait_ms=0)

    async def run() -> list[CaptionResult]:
        first = asyncio.create_task(e.caption(ask(1, "a0", "a1")))
        await settle()
        await until_ready(e, 2)
        await step(e)
        second = asyncio.create_task(e.caption(ask(2, "a2")))
        await settle()
        await until_ready(e, 3)
        while not first.done():
            await step(e)
            assert e.stats().batches == 1  # nobody joins a running static batch
        while not second.done():
            await step(e)
        return [*(await first), *(await second)]

    results = asyncio.run(run())
    assert [r.token_ids for r in results] == [expected(0, 1), expected(1, 1), expected(2, 2)]
    assert e.stats().batches == 2


def test_a_full_batch_refills_in_groups_and_an_empty_one_all_at_once(
    engine: Callable[..., Engine],
) -> None:
    """An empty batch takes up to max_batch_size rows in one prefill (no running row to
    stall, so max_prefill_rows does not apply). When more rows wait than there is room for,
    a place freed by one row is not filled by a one-row prefill: they join once
    prefill_min_rows places are free, even with no wait bound (prefill_max_wait_steps=0)."""
    e = engine(max_batch_size=4, max_prefill_rows=2, prefill_min_rows=2, prefill_max_wait_steps=0)
    e.loop.eos = -1000  # rows end at their token limits, at known steps
    joins: list[int] = []

    async def run() -> list[list[CaptionResult]]:
        # Each row gets two tokens at its first step (the prefill's and the decode's), then
        # one per step: limits 3 and 4 end at the second and third steps, 8 at the seventh.
        first = [e.caption(ask(50 + i, "a0", max_new_tokens=n)) for i, n in enumerate((3, 4, 8, 8))]
        tasks = [asyncio.create_task(c) for c in first]
        await until_ready(e, 1)
        await queued(e, 4)
        await step(e)
        assert e.stats().batches == 1 and e.stats().running == 4  # all four at once
        tasks += [
            asyncio.create_task(e.caption(ask(60 + i, "a0", max_new_tokens=2))) for i in range(4)
        ]
        await queued(e, 4)
        while not all(t.done() for t in tasks):
            rows = e.stats().rows
            await step(e)
            if e.stats().rows > rows:
                joins.append(e.stats().rows - rows)
            assert e.stats().running <= 4
        return [await t for t in tasks]

    results = asyncio.run(run())
    # Step 2 frees one place (4 rows waiting): no join; step 3 frees a second: two join.
    assert joins == [2, 2]
    assert [len(r[0].token_ids) for r in results] == [3, 4, 8, 8, 2, 2, 2, 2]


def test_waiting_rows_join_in_groups_or_after_the_wait_bound(
    engine: Callable[..., Engine],
) -> None:
    """While rows run, ready rows join once prefill_min_rows of them wait, or when the first
    has waited prefill_max_wait_steps steps; with nothing running they join at once."""
    e = engine(prefill_min_rows=3, prefill_max_wait_steps=2, max_prefill_rows=8)

    async def run() -> None:
        first = asyncio.create_task(e.caption(ask(30, "a0")))
        await settle()
        await until_ready(e, 1)
        await step(e)
        assert e.stats().batches == 1  # nothing was running: it joined at once
        pair = asyncio.create_task(e.caption(ask(31, "a0", "a0")))  # two rows: fewer than 3
        await queued(e, 2)
        await step(e)  # the first step with them waiting starts their wait
        await step(e)
        assert e.stats().batches == 1 and e.scheduler.queued == 2
        await step(e)  # waited 2 steps: they join
        assert e.stats().batches == 2 and e.scheduler.queued == 0
        group = [asyncio.create_task(e.caption(ask(40 + i, "a0"))) for i in range(3)]
        await queued(e, 3)
        await step(e)  # three ready rows: they join at the first step
        assert e.stats().batches == 3
        while not all(t.done() for t in [first, pair, *group]):
            await step(e)

    asyncio.run(run())
    assert e.stats().completed == 6


def test_a_request_cancelled_before_its_results_task_ran_leaves_the_queue_at_once(
    engine: Callable[..., Engine],
) -> None:
    """A caller that leaves right after admission cancels the results task before its first
    step (the HTTP handler and the replica create it, then await other things): the rows must
    still leave the queue and give the tenant's count back, not run for nobody."""
    e = engine()

    async def run() -> None:
        submission = await e.submit(ask(1, "a0", "a1"))
        await queued(e, 2)
        task = results_task(submission)
        task.cancel()  # before the task ever ran
        await settle()
        assert task.cancelled()
        assert e.scheduler.queued == 0 and e.admission.inflight == 0
        await step(e, 3)

    asyncio.run(run())
    stats = e.stats()
    assert stats.rows == 0 and stats.steps == 0  # nothing joined, nothing ran
    assert stats.dropped.get("cancelled") == 2
