"""TokenBuckets on a manual clock: tokens are counted, never slept for."""

from __future__ import annotations

import pytest

from service.api import rate_limit
from service.api.rate_limit import TokenBuckets


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_the_wait_until_the_next_token() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate_per_s=2.0, burst=3, clock=clock)
    assert [buckets.take("acme") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("acme") == pytest.approx(0.5)  # one token regained every 0.5 s
    clock.now += 0.2
    assert buckets.take("acme") == pytest.approx(0.3)  # a refused take takes nothing
    clock.now += 0.3
    assert buckets.take("acme") == 0.0
    assert buckets.take("acme") == pytest.approx(0.5)


def test_keys_have_their_own_buckets() -> None:
    buckets = TokenBuckets(rate_per_s=1.0, burst=1, clock=Clock())
    assert buckets.take("acme") == 0.0
    assert buckets.take("acme") == pytest.approx(1.0)
    assert buckets.take("beta") == 0.0


def test_a_long_pause_refills_only_up_to_the_burst() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate_per_s=10.0, burst=2, clock=clock)
    buckets.take("acme")
    clock.now += 3600
    assert [buckets.take("acme") for _ in range(3)] == [0.0, 0.0, pytest.approx(0.1)]


def test_a_clock_that_steps_back_refills_nothing() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate_per_s=1.0, burst=1, clock=clock)
    buckets.take("acme")
    clock.now -= 50
    assert buckets.take("acme") == pytest.approx(1.0)


def test_full_buckets_are_pruned_so_many_keys_stay_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(rate_limit, "_PRUNE_ABOVE", 4)
    clock = Clock()
    buckets = TokenBuckets(rate_per_s=1.0, burst=1, clock=clock)
    for key in "abcd":
        buckets.take(key)
    assert len(buckets) == 4
    clock.now += 0.5  # half refilled: nothing can go yet
    buckets.take("e")
    assert len(buckets) == 5
    clock.now += 1.0  # a-e are full again: pruned when the next new key arrives
    buckets.take("f")
    assert len(buckets) == 1
    assert buckets.take("f") == pytest.approx(1.0)  # f's own bucket survived the pruning


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-1.0, 1), (1.0, 0)])
def test_nonsense_parameters_are_refused(rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        TokenBuckets(rate_per_s=rate, burst=burst)
