"""The engine's one event sink: every event is counted once, here, under one name per
outcome. `snapshot()` feeds `Engine.stats()`, the Prometheus families of a `ServiceMetrics`
(when the engine has one) move with the same calls, and the adapter tiers and the encoder
cache report into it too, so no two counts of one event can disagree.

    events = EngineEvents(metrics)                 # metrics may be None (tests, benchmarks)
    events.rejected("queue_full")                  # an admission refused
    events.ended("deadline")                       # a row ended: completed, failed, deadline,
    events.completed("describe", ref, tokens=9)    #   cancelled (completed with its tokens)
    events.joined(rows=4, adapters=3, waits=[...]) # one prefill
    events.step(rows=12, adapters=5)               # one decode step
    events.fault("decode")                         # an exception contained at a stage
    events.non_finite(); events.quarantined()      # numeric containment
    events.loaded("cpu", seconds); events.load_failed("device", "io"); events.resident("cpu", 3)

A *rejection* is an admission refused (nothing was admitted); an *ended* row was admitted,
and its outcome says how it ended. Thread-safe: the event loop counts admissions and
cancellations, the worker thread the steps, the loader thread the loads.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence

from service.metrics import ROW_OUTCOMES, ServiceMetrics
from service.store import AdapterRef


class EngineEvents:
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

    def count(self, name: str) -> int:
        with self._lock:
            return self._counts[name]

    def by_prefix(self, prefix: str) -> dict[str, int]:
        """{suffix: count} of the counts named `<prefix><suffix>`, e.g. ended_deadline."""
        return {k[len(prefix) :]: v for k, v in self.snapshot().items() if k.startswith(prefix)}

    # --- admission -------------------------------------------------------------------------
    def rejected(self, reason: str) -> None:
        """An admission refused (queue_full, tenant_limit, draining)."""
        self._add(**{f"rejected_{reason}": 1})
        if self.metrics is not None:
            self.metrics.reject(reason)

    def queue_depth(self, rows: int) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(rows)

    # --- rows ending ----------------------------------------------------------------------
    def ended(self, outcome: str, rows: int = 1) -> None:
        """Admitted rows ended: `completed` (use `completed()`), `failed` (an error after
        admission: a load failure, a contained fault, non-finite values, shutdown),
        `deadline` or `cancelled`."""
        if outcome not in ROW_OUTCOMES:
            raise ValueError(f"unknown row outcome {outcome!r}; expected {ROW_OUTCOMES}")
        self._add(**{f"ended_{outcome}": rows})
        if self.metrics is not None:
            self.metrics.rows.labels(outcome=outcome).inc(rows)

    def completed(self, adapter: str, ref: AdapterRef, tokens: int) -> None:
        self.ended("completed")
        self._add(tokens=tokens)
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

    def fault(self, stage: str) -> None:
        """An exception contained at `stage` (see service.metrics.FAULT_STAGES)."""
        self._add(**{f"fault_{stage}": 1})
        if self.metrics is not None:
            self.metrics.engine_faults.labels(stage=stage).inc()

    def non_finite(self) -> None:
        """A row stopped because its logits were NaN or infinite (numeric containment)."""
        self._add(non_finite=1)
        if self.metrics is not None:
            self.metrics.non_finite_rows.inc()

    def quarantined(self) -> None:
        """An adapter version quarantined for producing non-finite values again and again."""
        self._add(quarantined=1)
        if self.metrics is not None:
            self.metrics.quarantines.inc()

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

    # --- the adapter tiers -----------------------------------------------------------------
    def loaded(self, tier: str, seconds: float) -> None:
        """An adapter set loaded into a tier (cpu: from disk; device: into a bank slot)."""
        self._add(**{f"loads_{tier}": 1})
        if self.metrics is not None:
            self.metrics.observe_adapter_load(tier, seconds)

    def load_failed(self, tier: str, reason: str) -> None:
        self._add(**{f"load_failures_{tier}": 1})
        if self.metrics is not None:
            self.metrics.count_load_failure(tier, reason)

    def resident(self, tier: str, count: int) -> None:
        if self.metrics is not None:
            self.metrics.set_resident(tier, count)

    # --- scale-out (the Ray ingress and replicas) -----------------------------------------
    def image(self, what: str) -> None:
        """A request image at the ingress (`decoded`, `shared`: put in the object store) or
        at a replica (`read` from the object store)."""
        self._add(**{f"images_{what}": 1})

    def routed(self, result: str) -> None:
        """A row reached a replica that held its adapter (`hit`) or not (`miss`)."""
        self._add(**{f"routed_{result}": 1})
        if self.metrics is not None:
            self.metrics.count_routing(result)

    def upload(self) -> None:
        """An adapter upload this replica took (accepted or refused)."""
        self._add(uploads=1)
