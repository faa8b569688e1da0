"""Load generators for the serving benchmark: Zipf-distributed adapters, closed-loop
saturation and open-loop Poisson arrivals, and latency/throughput summaries.

A system under test is one coroutine `submit(adapter_index, image_index) -> tokens`.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

Submit = Callable[[int, int], Awaitable[int]]


def zipf_weights(n: int, alpha: float = 1.0) -> list[float]:
    """P(rank k) proportional to 1 / k^alpha, k = 1..n."""
    raw = [1.0 / (k**alpha) for k in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


@dataclass
class Picker:
    """Draws (adapter index, image index) pairs: adapters by Zipf, images uniformly."""

    adapters: int
    images: int
    alpha: float = 1.0
    seed: int = 0
    _rng: random.Random = field(init=False)
    _weights: list[float] = field(init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._weights = zipf_weights(self.adapters, self.alpha)

    def __call__(self) -> tuple[int, int]:
        adapter = self._rng.choices(range(self.adapters), weights=self._weights)[0]
        return adapter, self._rng.randrange(self.images)


@dataclass
class RunResult:
    """Completions inside the measured window (after warm-up)."""

    seconds: float
    latencies_s: list[float]
    tokens: int
    errors: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def completed(self) -> int:
        return len(self.latencies_s)

    @property
    def throughput(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        if len(self.latencies_s) == 1:
            return self.latencies_s[0] * 1000
        cuts = statistics.quantiles(self.latencies_s, n=100, method="inclusive")
        return cuts[int(q) - 1] * 1000

    def summary(self) -> dict[str, Any]:
        return {
            "completed": self.completed,
            "seconds": round(self.seconds, 3),
            "throughput_rps": round(self.throughput, 3),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "p50_ms": round(self.percentile_ms(50), 1),
            "p99_ms": round(self.percentile_ms(99), 1),
            "errors": self.errors,
            **self.extra,
        }


class _Window:
    """Records completions that finish inside [start, end).

    Throughput is measured from the last completion before the window to the last one in it,
    not over the nominal window: a batched system completes requests in bursts (a whole batch
    at once), and counting bursts in a fixed window would quantise the rate by one batch."""

    def __init__(self, warmup_s: float, duration_s: float) -> None:
        now = time.perf_counter()
        self.start = now + warmup_s
        self.end = self.start + duration_s
        self.latencies: list[float] = []
        self.tokens = 0
        self.errors = 0
        self.last_before: float | None = None  # last completion before the window
        self.last_inside = self.start

    async def call(self, submit: Submit, pick: Picker) -> None:
        adapter, image = pick()
        started = time.perf_counter()
        try:
            tokens = await submit(adapter, image)
        except Exception:
            self.errors += 1
            return
        done = time.perf_counter()
        if done < self.start:
            self.last_before = max(done, self.last_before or done)
        elif done < self.end:
            self.latencies.append(done - started)
            self.tokens += tokens
            self.last_inside = max(self.last_inside, done)

    def result(self) -> RunResult:
        first = self.last_before if self.last_before is not None else self.start
        seconds = self.last_inside - first
        if not self.latencies or seconds <= 0:
            seconds = self.end - self.start
        return RunResult(seconds, self.latencies, self.tokens, self.errors)


async def closed_loop(
    submit: Submit, pick: Picker, clients: int, warmup_s: float, duration_s: float
) -> RunResult:
    """`clients` callers each send a request as soon as their last one is answered: the
    system runs saturated when clients exceed what one batch holds."""
    window = _Window(warmup_s, duration_s)

    async def client() -> None:
        while time.perf_counter() < window.end:
            await window.call(submit, pick)

    await asyncio.gather(*(client() for _ in range(clients)))
    return window.result()


async def open_loop(
    submit: Submit, pick: Picker, rate: float, warmup_s: float, duration_s: float, seed: int = 1
) -> RunResult:
    """Poisson arrivals at `rate` requests/s, independent of how fast answers come."""
    window = _Window(warmup_s, duration_s)
    rng = random.Random(seed)
    tasks: list[asyncio.Task[None]] = []
    next_at = time.perf_counter()
    while next_at < window.end:
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(window.call(submit, pick)))
        next_at += rng.expovariate(rate)
    await asyncio.gather(*tasks)
    return window.result()
