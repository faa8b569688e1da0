"""Token buckets keyed by a name (a tenant): a cheap bound on how often something may happen.

    buckets = TokenBuckets(rate_per_s=2.0, burst=10)
    wait_s = buckets.take("acme")    # 0.0: allowed (a token was taken); else seconds to wait

Each key has `burst` tokens to start with and regains `rate_per_s` a second, up to `burst`. The
clock is injectable so that tests count tokens instead of sleeping.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

# Buckets are dropped once full again (a full bucket is the same as a missing one); pruning
# starts when this many keys are held, so memory stays bounded whatever the keys are.
_PRUNE_ABOVE = 1024


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """One token bucket per key. Thread-safe."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0:
            raise ValueError(f"rate_per_s must be > 0, got {rate_per_s}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def _refill(self, bucket: _Bucket, now: float) -> None:
        elapsed = max(0.0, now - bucket.updated)
        bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self.rate_per_s)
        bucket.updated = now

    def take(self, key: str) -> float:
        """Take one token for `key`: 0.0 when there was one, else the seconds until there is
        one (nothing is taken then)."""
        with self._lock:
            now = self._clock()
            bucket = self._buckets.get(key)
            if bucket is None:
                if len(self._buckets) >= _PRUNE_ABOVE:
                    self._prune(now)
                bucket = self._buckets[key] = _Bucket(float(self.burst), now)
            self._refill(bucket, now)
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.rate_per_s

    def _prune(self, now: float) -> None:
        for key, bucket in list(self._buckets.items()):
            self._refill(bucket, now)
            if bucket.tokens >= self.burst:
                del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)
