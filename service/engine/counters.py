"""The engine's one counting system: every event is counted once, here. `snapshot()` feeds
`Engine.stats()`, and the Prometheus families of a `ServiceMetrics` (when the engine has
one) move with the same calls, so the two can never disagree.

    counters = EngineCounters(metrics)            # metrics may be None (tests, benchmarks)
    counters.rejected("queue_full")               # admission refused
    counters.dropped("deadline", rows=2)          # admitted rows that ended unanswered
    counters.joined(rows=[...], adapters=3, waits=[...])   # one prefill
    counters.step(rows=12, adapters=5)            # one decode step
    counters.completed("describe", ref, tokens=9)      # one row answered with a caption
    counters.fault("decode")                      # an exception contained at a stage
    counters.non_finite()                         # a row stopped: its logits were NaN/inf

Thread-safe: the event loop counts admissions, the worker thread everything else.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence

from service.metrics import ServiceMetrics
from service.store import AdapterRef


class EngineCounters:
    def __init__(self, metrics: ServiceMetrics | None = None) -> None:
        self.metrics = metrics
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _add(self, **counts: int) -> None:
        with self._lock:
            self._counts.update(counts)

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self._counts)

    def by_prefix(self, prefix: str) -> dict[str, int]:
        """{suffix: count} of the counts named `<prefix><suffix>`, e.g. dropped_deadline."""
        return {k[len(prefix) :]: v for k, v in self.snapshot().items() if k.startswith(prefix)}

    # --- admission (event loop) ----------------------------------------------------------
    def rejected(self, reason: str) -> None:
        """An admission refused (queue_full, tenant_limit, draining)."""
        self._add(**{f"rejected_{reason}": 1})
        if self.metrics is not None:
            self.metrics.reject(reason)

    def queue_depth(self, rows: int) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(rows)

    # --- rows ending ----------------------------------------------------------------------
    def dropped(self, reason: str, rows: int = 1) -> None:
        """Admitted rows that ended without a caption: deadline or cancelled."""
        self._add(**{f"dropped_{reason}": rows, "failed": rows})
        if self.metrics is not None:
            for _ in range(rows):
                self.metrics.reject(reason)

    def failed(self, rows: int = 1) -> None:
        """Admitted rows answered with an error (load failure, contained fault, shutdown)."""
        self._add(failed=rows)

    def completed(self, adapter: str, ref: AdapterRef, tokens: int) -> None:
        self._add(completed=1, tokens=tokens)
        if self.metrics is not None:
            self.metrics.add_generated_tokens(adapter, ref, tokens)

    # --- the worker's steps ------------------------------------------------------------------
    def joined(self, rows: int, adapters: int, waits: Sequence[float]) -> None:
        """Rows that joined the running batch together (one prefill), with their queue waits."""
        self._add(batches=1, rows=rows, adapters=adapters)
        if self.metrics is not None:
            for seconds in waits:
                self.metrics.queue_wait.observe(seconds)

    def step(self, rows: int, adapters: int) -> None:
        """One decode step of `rows` running rows of `adapters` distinct adapters."""
        self._add(steps=1, step_rows=rows, step_adapters=adapters)
        if self.metrics is not None:
            self.metrics.engine_steps.inc()
            self.metrics.observe_batch(rows, adapters)

    def running(self, rows: int) -> None:
        if self.metrics is not None:
            self.metrics.running_rows.set(rows)

    def first_token(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.time_to_first_token.observe(seconds)

    def non_finite(self) -> None:
        """A row stopped because its logits were not finite (numeric containment)."""
        self._add(non_finite=1)
        if self.metrics is not None:
            self.metrics.non_finite_rows.inc()

    def quarantined(self) -> None:
        """An adapter version quarantined for producing non-finite values again and again."""
        self._add(quarantined=1)
        if self.metrics is not None:
            self.metrics.quarantines.inc()

    def fault(self, stage: str) -> None:
        """An exception contained at `stage` (see service.metrics.FAULT_STAGES)."""
        self._add(**{f"fault_{stage}": 1})
        if self.metrics is not None:
            self.metrics.engine_faults.labels(stage=stage).inc()

    def worker_up(self, up: bool) -> None:
        if self.metrics is not None:
            self.metrics.engine_up.set(1 if up else 0)

    # --- the vision encoder ----------------------------------------------------------------
    def encoder(self, hits: int = 0, misses: int = 0) -> None:
        """Encoder-cache look-ups; every miss is one image through the encoder."""
        self._add(encoder_hits=hits, encoder_misses=misses)
        if self.metrics is not None:
            self.metrics.encoder_cache_hits.inc(hits)
            self.metrics.encoder_cache_misses.inc(misses)
            self.metrics.encoder_runs.inc(misses)
