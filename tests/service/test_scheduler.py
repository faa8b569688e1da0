"""Scheduler: oldest-first seeding, grouping, mixing up to the free slots, fairness, waiting to
fill, rows leaving the line (expired, discarded, taken). Pure data structure: no model
involved. Admission (tenant limits, the queue bound, the drain) is tests/service/test_admission.py."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import pytest

from service.exceptions import Draining
from service.scheduler import Scheduler, SlotBudget


@dataclass(eq=False)
class Row:
    key: str
    tenant: str = "t"
    arrival: float = field(default_factory=time.monotonic)
    deadline: float = math.inf
    label: str = ""
    priority: str = "interactive"


class Static:
    """A scheduler used the way static scheduling uses it: whole batches of up to
    `max_batch` rows over at most `slots` adapters (and the `adapters` cap), waiting to fill."""

    def __init__(self, max_batch: int = 8, wait_s: float = 0.0, adapters: int | None = None):
        self.scheduler: Scheduler[Row] = Scheduler(wait_s)
        self.max_batch = max_batch
        self.adapters = adapters

    def next_batch(self, is_ready: object, slots: int, timeout: float) -> list[tuple[int, Row]]:
        budget = SlotBudget(slots, self.adapters)
        return self.scheduler.next_rows(is_ready, budget, self.max_batch, timeout, fill=True)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        return getattr(self.scheduler, name)


def make(max_batch: int = 8, wait_s: float = 0.0, adapters: int | None = None) -> Static:
    return Static(max_batch, wait_s, adapters)


def submit(s: Static | Scheduler[Row], rows: list[Row]) -> None:
    s.enqueue(rows)  # type: ignore[union-attr]


def always(_key: object) -> bool:
    return True


def keys(batch: list[tuple[int, Row]]) -> list[str]:
    return [row.key for _, row in batch]


def test_one_tenants_rows_join_oldest_first_over_the_adapters_that_get_a_slot() -> None:
    s = make(max_batch=6)
    submit(s, [Row(k) for k in ["b", "a", "b", "c", "a", "b", "c", "d"]])
    batch = s.next_batch(always, slots=3, timeout=0)
    # Oldest first; d, the fourth adapter, finds no slot (3): the rows of placed adapters
    # still join, d waits.
    assert keys(batch) == ["b", "a", "b", "c", "a", "b"]
    assert [seq for seq, _ in batch] == [1, 2, 3, 4, 5, 6]
    assert keys(s.next_batch(always, slots=3, timeout=0)) == ["c", "d"]
    assert s.queued == 0


def test_distinct_adapters_per_batch_never_exceed_slots_or_the_cap() -> None:
    s = make(max_batch=32)
    submit(s, [Row(f"a{i % 10}") for i in range(40)])
    batch = s.next_batch(always, slots=4, timeout=0)
    assert len(set(keys(batch))) == 4 and len(batch) == 16
    grouping_only = make(max_batch=32, adapters=1)
    submit(grouping_only, [Row(f"a{i % 10}") for i in range(40)])
    assert keys(grouping_only.next_batch(always, slots=4, timeout=0)) == ["a0"] * 4


def test_hot_adapter_cannot_starve_a_cold_one() -> None:
    s = make(max_batch=8, adapters=1)  # grouping only: the hardest case for fairness
    submit(s, [Row("hot") for _ in range(100)])
    submit(s, [Row("cold")])
    submit(s, [Row("hot") for _ in range(100)])
    order = []
    while s.queued:
        order.append(keys(s.next_batch(always, slots=16, timeout=0)))
    cold_batch = next(i for i, b in enumerate(order) if "cold" in b)
    # 100 older hot rows fill 12.5 batches; batch 13 (index 12) tops up with younger hot
    # rows (grouping), and the cold row is then the oldest: it seeds batch index 13.
    assert cold_batch == 13
    assert sum(len(b) for b in order[cold_batch + 1 :]) == 200 - 13 * 8


@pytest.mark.parametrize(("adapters", "slots"), [(1, 2), (None, 1)])  # capped, or slot-bound
def test_hot_adapter_cannot_starve_a_cold_one_in_the_step_loop(
    adapters: int | None, slots: int
) -> None:
    """The same bound, re-proved for per-step joins (`next_rows` as the step loop calls it:
    room = free running places, the running rows' adapters present in the slot budget), with
    rows of different lengths leaving at different steps. Counted in steps."""
    max_batch = 8
    s = make(max_batch=max_batch, adapters=adapters).scheduler
    submit(s, [Row("hot") for _ in range(40)])
    submit(s, [Row("cold")])
    submit(s, [Row("hot") for _ in range(40)])
    cold_seq = 41  # sequence numbers start at 1
    lengths = [3, 7, 4, 9, 5, 2, 8, 6]  # steps a row runs, by its sequence number
    running: list[tuple[str, int]] = []  # (adapter, steps left)
    joined: list[tuple[int, int, int]] = []  # (step, take, seq)
    last_older_joined = cold_joined = None
    for step in range(10_000):
        running = [(key, left - 1) for key, left in running if left > 1]
        present = {key for key, _ in running}
        budget = SlotBudget(slots - len(present), adapters, present)
        taken = s.next_rows(always, budget, max_batch - len(running), timeout=0)
        for seq, row in taken:
            joined.append((step, len(joined), seq))
            running.append((row.key, lengths[seq % len(lengths)]))
            if seq == cold_seq:
                cold_joined = step
        if any(seq < cold_seq for seq, _ in taken) and not any(seq == cold_seq for seq, _ in taken):
            last_older_joined = step
        if not s.queued and not running:
            break
    assert cold_joined is not None and last_older_joined is not None
    # No younger hot row joins at a later step than the last older one while the cold row
    # waits (the take that seats the last older rows may top up with younger ones: grouping).
    assert all(seq < cold_seq for step, _, seq in joined if last_older_joined < step < cold_joined)
    # ...so the cold row joins at the latest once the rows running then have ended.
    assert cold_joined <= last_older_joined + max(lengths)
    assert sorted(seq for _, _, seq in joined) == list(range(1, 82))  # every row ran once


def test_rows_of_adapters_not_ready_wait_and_trigger_nothing_else() -> None:
    s = make(max_batch=8)
    submit(s, [Row("cold"), Row("warm"), Row("warm")])
    batch = s.next_batch(lambda k: k == "warm", slots=4, timeout=0)
    assert keys(batch) == ["warm", "warm"]
    assert s.queued == 1
    assert s.next_batch(lambda k: k == "warm", slots=4, timeout=0.01) == []
    assert keys(s.next_batch(always, slots=4, timeout=0)) == ["cold"]


def test_waits_up_to_max_wait_to_fill_but_not_when_full() -> None:
    """Static batches wait for `max_wait_s` after the oldest row's arrival unless full. Time is
    moved by editing arrivals, not by sleeping, so the test never depends on the clock."""
    s = make(max_batch=4, wait_s=3600)
    submit(s, [Row("a") for _ in range(4)])
    assert len(s.next_batch(always, slots=4, timeout=0)) == 4  # full: taken at once

    first, second = Row("a"), Row("b")
    submit(s, [first])
    assert s.next_batch(always, slots=4, timeout=0) == []  # not full, still within max_wait
    submit(s, [second])
    assert s.next_batch(always, slots=4, timeout=0) == []
    first.arrival -= 3600  # the oldest row has now waited max_wait_s
    batch = s.next_batch(always, slots=4, timeout=0)
    assert keys(batch) == ["a", "b"]  # the row that came within max_wait joined
    assert s.queued == 0

    submit(s, [Row("c")])
    assert s.next_batch(always, slots=4, timeout=0) == []
    s.drain()  # draining: no more waiting to fill
    assert keys(s.next_batch(always, slots=4, timeout=0)) == ["c"]


def test_expired_rows_and_discarded_rows_leave_the_line() -> None:
    s = make()
    now = time.monotonic()
    expired = Row("a", deadline=now - 1, label="expired")
    cancelled = Row("a", label="cancelled")
    submit(s, [expired, cancelled, Row("a", label="ok")])
    assert [row.label for row in s.expired(now)] == ["expired"]
    assert s.discard(cancelled) is True
    assert s.discard(cancelled) is False  # once
    batch = s.next_batch(always, slots=1, timeout=0)
    assert [row.label for _, row in batch] == ["ok"]
    assert s.discard(batch[0][1]) is False  # taken rows are not in line
    assert s.queued == 0


def test_requeue_keeps_the_place_in_line() -> None:
    s = make(max_batch=2)
    submit(s, [Row("a", label=str(i)) for i in range(4)])
    first = s.next_batch(always, slots=1, timeout=0)
    s.requeue(first)
    assert [row.label for _, row in s.next_batch(always, slots=1, timeout=0)] == ["0", "1"]


def test_take_removes_an_adapters_rows_and_close_returns_the_rest() -> None:
    s = make()
    submit(s, [Row("bad"), Row("good"), Row("bad")])
    assert len(s.take("bad")) == 2
    assert s.queued == 1
    left = s.close()
    assert keys(left) == ["good"]
    assert s.next_batch(always, slots=1, timeout=0) == []
    with pytest.raises(Draining):
        submit(s, [Row("late")])


# --- step admission (continuous batching) ------------------------------------------------------
def test_rows_join_within_room_and_only_adapters_that_get_a_slot() -> None:
    s = make(max_batch=32).scheduler
    submit(s, [Row(k) for k in ["a", "b", "a", "c", "a", "d"]])
    # "a" holds a pinned slot, one slot is free: a's rows and b's join, c must wait for a slot
    # (and d, which would need one too, does not overtake it).
    taken = s.next_rows(always, SlotBudget(free=1, present={"a"}), room=8, timeout=0)
    assert keys(taken) == ["a", "b", "a", "a"]
    # No free slot: c (now the oldest) is refused, and d, younger, does not overtake it.
    assert s.next_rows(always, SlotBudget(free=0, present={"a"}), room=8, timeout=0) == []
    assert keys(s.next_rows(always, SlotBudget(free=2), room=1, timeout=0)) == ["c"]
    # The cap on distinct adapters holds with slots to spare.
    assert s.next_rows(always, SlotBudget(free=5, cap=1, present={"a"}), room=8, timeout=0) == []


def test_a_cold_adapter_joins_within_the_bound_while_a_hot_one_keeps_arriving() -> None:
    """One slot, pinned by a hot adapter whose rows keep arriving and each run 3 steps: once
    the cold row is the oldest, no more hot rows join, the hot rows drain and the cold one
    gets the slot: it waits for the hot rows older than it plus one row lifetime."""
    s = make(max_batch=32).scheduler
    lifetime = 3
    running: list[tuple[str, int]] = []  # (key, steps left)
    submit(s, [Row("hot") for _ in range(4)])
    submit(s, [Row("cold")])
    joined_at: dict[str, int] = {}
    for step in range(30):
        submit(s, [Row("hot")])  # the hot adapter never stops arriving
        pinned = {key for key, _ in running}
        budget = SlotBudget(free=1 - len(pinned), present=pinned)
        for _, row in s.next_rows(always, budget, room=2, timeout=0):
            running.append((row.key, lifetime))
            joined_at.setdefault(row.key, step)
        running = [(k, left - 1) for k, left in running if left > 1]
        if "cold" in joined_at:
            break
    # 4 older hot rows at 2 per step take 2 steps; then the hot rows drain (3 steps).
    assert joined_at["cold"] <= 2 + lifetime
