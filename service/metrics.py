"""All Prometheus metrics of the service, on one registry owned by `ServiceMetrics`.

Prefix `ctxpeft_`, base units (seconds, bytes), counters end in `_total`. A fresh
`ServiceMetrics()` per app (and per test) keeps registries apart; `/metrics` serves
`metrics.render()`.

    metrics = ServiceMetrics(adapter_labels=settings.metrics_adapter_labels)
    metrics.observe_request("acme-news", 200, seconds=0.42)
    metrics.reject("queue_full")
    body, content_type = metrics.render()

The adapter label is bounded and private by default:
- only a name the request *resolved* (to an adapter version the caller may use) takes a
  label: a name that does not exist is "none" and never takes one of the `top_k` places, so
  strangers cannot fill them with made-up names;
- `AdapterLabeler` keeps the first `top_k` adapter names seen (or an allow-list) and folds
  every other name into "other", so tenants creating adapters cannot grow the number of
  series without limit;
- a tenant's own (non-public) adapter shows as "private" unless private names may be shown
  (`private_labels`: no keys configured, a single tenant; or /metrics protected by a scrape
  token), so a client that reaches /metrics learns no tenant's adapter names.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from service import __version__
from service.store import PUBLIC_TENANT, AdapterRef

# The classic text format generate_latest writes; every Prometheus version reads it (newer
# clients name it CONTENT_TYPE_PLAIN_0_0_4 and make "latest" 1.0.0, which older servers lack).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OTHER_LABEL = "other"
NO_ADAPTER_LABEL = "none"  # a request rejected before its adapter was resolved (401, 404, ...)
PRIVATE_LABEL = "private"  # a tenant's own adapter, when private names are not shown

REJECTION_REASONS = (
    "queue_full",
    "draining",
    "tenant_limit",
    "deadline",
    "cancelled",
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "too_large",
    "unsupported_media_type",
)
# Stages of the engine where an exception is contained (ctxpeft_engine_faults_total).
FAULT_STAGES = ("bind", "encode", "prefill", "decode", "deliver", "loop")
SAMPLE_OUTCOMES = ("served", "rate_limited")  # GET /samples/random
LOAD_TIERS = ("cpu", "device")  # where an adapter load lands
# Why an adapter load failed (a bounded label): invalid = the version fails validation or does
# not fit the bank (final); gone = deleted or replaced while loading (final for that version);
# io = an OSError reading it, resource = out of memory or file descriptors (both retried with
# backoff); other = an unexpected exception (a bug; not retried, reported for a cool-down).
LOAD_FAILURE_REASONS = ("invalid", "gone", "io", "resource", "other")
RESIDENCY_TIERS = ("device", "cpu", "disk")
ROUTING_RESULTS = ("hit", "miss")  # a replica held the row's adapter on arrival, or not
SCALEOUT_FAMILIES = ("ctxpeft_routing_requests",)  # exported by Ray Serve replicas only

# Buckets in seconds, from a cached tiny-model caption (ms) to a cold CPU batch (tens of s).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0)
LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BATCH_ADAPTER_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class AdapterLabeler:
    """Maps adapter names to a bounded set of label values.

    With an allow-list, exactly those names keep their own label. Without one, the first
    `top_k` distinct names seen do (first come, first kept: label values never change
    meaning while the process runs). Everything else is "other". Thread-safe.
    """

    def __init__(self, top_k: int, allow_list: Iterable[str] | None = None) -> None:
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        self.top_k = top_k
        self._fixed = allow_list is not None
        self._kept: set[str] = set(allow_list or ())
        self._lock = threading.Lock()

    def __call__(self, adapter: str | None) -> str:
        if adapter is None:
            return NO_ADAPTER_LABEL
        if adapter in self._kept:  # set membership is safe to read without the lock
            return adapter
        if self._fixed:
            return OTHER_LABEL
        with self._lock:
            if adapter in self._kept:
                return adapter
            if len(self._kept) < self.top_k:
                self._kept.add(adapter)
                return adapter
        return OTHER_LABEL

    @property
    def kept(self) -> frozenset[str]:
        """Adapter names that currently have their own label value."""
        with self._lock:
            return frozenset(self._kept)


class ServiceMetrics:
    """The service's metric families on a dedicated registry."""

    def __init__(
        self,
        adapter_labels: int = 20,
        adapter_allow_list: Iterable[str] | None = None,
        registry: CollectorRegistry | None = None,
        backbone: str = "unknown",
        device: str = "unknown",
        scaleout: bool = False,
        private_labels: bool = True,
    ) -> None:
        """`scaleout=True` (a Ray Serve replica) adds the families only a replica exports
        (SCALEOUT_FAMILIES). `private_labels`: tenants' own adapter names may be label values
        (see the module docstring; `private_labels_allowed` decides it for a service)."""
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.adapter_label = AdapterLabeler(adapter_labels, adapter_allow_list)
        self.private_labels = private_labels
        r = self.registry

        # --- requests ---------------------------------------------------------------------
        self.requests = Counter(
            "ctxpeft_requests",
            "Finished caption requests by adapter and HTTP status code.",
            ["adapter", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "ctxpeft_request_duration_seconds",
            "End-to-end duration of caption requests, admission to response.",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejections = Counter(
            "ctxpeft_rejections",
            "Requests refused or dropped, by reason.",
            ["reason"],
            registry=r,
        )
        self.inflight = Gauge(
            "ctxpeft_inflight_requests",
            "Caption requests admitted and not yet answered.",
            registry=r,
        )

        # --- scheduler --------------------------------------------------------------------
        self.queue_wait = Histogram(
            "ctxpeft_queue_wait_seconds",
            "Time from admission to joining the running batch.",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "ctxpeft_queue_depth", "Requests waiting in the scheduler's queues.", registry=r
        )
        self.batch_size = Histogram(
            "ctxpeft_batch_size",
            "Rows per decode step (the running batch).",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_adapters = Histogram(
            "ctxpeft_batch_adapters",
            "Distinct adapters per decode step (how much adapters mix).",
            buckets=BATCH_ADAPTER_BUCKETS,
            registry=r,
        )
        self.engine_steps = Counter(
            "ctxpeft_engine_steps",
            "Decode steps of the running batch (one forward pass for every running row).",
            registry=r,
        )
        self.running_rows = Gauge(
            "ctxpeft_running_rows",
            "Rows in the running batch (admitted, prefilled and not yet finished).",
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "ctxpeft_time_to_first_token_seconds",
            "Time from admission to a row's first generated token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.engine_faults = Counter(
            "ctxpeft_engine_faults",
            "Exceptions the engine contained, by stage; each failed only the rows it concerned.",
            ["stage"],
            registry=r,
        )
        self.non_finite_rows = Counter(
            "ctxpeft_non_finite_rows",
            "Rows stopped because their adapter's computation gave NaN or infinity (answered "
            "422 adapter_non_finite; the rows beside them were not affected).",
            registry=r,
        )
        self.quarantines = Counter(
            "ctxpeft_adapter_quarantines",
            "Adapter versions quarantined for producing non-finite values quarantine_after "
            "times in a row (refused with 422 adapter_quarantined until replaced).",
            registry=r,
        )
        self.engine_up = Gauge(
            "ctxpeft_engine_up",
            "1 while the engine's worker thread runs; 0 if it stopped (the process needs a "
            "restart).",
            registry=r,
        )
        self.generated_tokens = Counter(
            "ctxpeft_generated_tokens",
            "Caption tokens generated, by adapter.",
            ["adapter"],
            registry=r,
        )

        # --- adapter cache ----------------------------------------------------------------
        self.adapter_loads = Counter(
            "ctxpeft_adapter_loads",
            "Adapter set loads into a tier (cpu: from disk; device: into a bank slot).",
            ["tier"],
            registry=r,
        )
        self.adapter_load_seconds = Histogram(
            "ctxpeft_adapter_load_seconds",
            "Duration of adapter set loads into a tier.",
            ["tier"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.adapter_load_failures = Counter(
            "ctxpeft_adapter_load_failures",
            "Failed adapter set loads (each attempt) by tier and reason.",
            ["tier", "reason"],
            registry=r,
        )
        self.adapters_resident = Gauge(
            "ctxpeft_adapters_resident",
            "Adapter set versions held in each tier.",
            ["tier"],
            registry=r,
        )

        # --- vision encoder cache ---------------------------------------------------------
        self.encoder_cache_hits = Counter(
            "ctxpeft_encoder_cache_hits", "Vision-encoder outputs served from cache.", registry=r
        )
        self.encoder_cache_misses = Counter(
            "ctxpeft_encoder_cache_misses", "Vision-encoder cache look-ups that missed.", registry=r
        )
        self.encoder_runs = Counter(
            "ctxpeft_encoder_runs", "Images passed through the vision encoder.", registry=r
        )

        # --- sample images (GET /samples/random, demo backbone only) ------------------------
        self.samples = Counter(
            "ctxpeft_samples",
            "Sample images asked for at GET /samples/random, by outcome.",
            ["outcome"],
            registry=r,
        )

        self.build_info = Gauge(
            "ctxpeft_build_info",
            "Always 1; labels name the running version, backbone and device.",
            ["version", "backbone", "device"],
            registry=r,
        )

        # Series with a fixed label set exist from the start (at 0), so dashboards and
        # rate() see them before the first event.
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason=reason)
        for stage in FAULT_STAGES:
            self.engine_faults.labels(stage=stage)
        for outcome in SAMPLE_OUTCOMES:
            self.samples.labels(outcome=outcome)
        for tier in LOAD_TIERS:
            self.adapter_loads.labels(tier=tier)
            self.adapter_load_seconds.labels(tier=tier)
            for failure in LOAD_FAILURE_REASONS:
                self.adapter_load_failures.labels(tier=tier, reason=failure)
        for tier in RESIDENCY_TIERS:
            self.adapters_resident.labels(tier=tier).set(0)
        self.set_build_info(__version__, backbone, device)

        # --- scale-out (a Ray Serve replica only) -------------------------------------------
        self.routing: Counter | None = None
        if scaleout:
            self.routing = Counter(
                "ctxpeft_routing_requests",
                "Caption rows by whether this replica already held their adapter's weights "
                "(device slot or CPU tier) when they arrived (hit) or not (miss).",
                ["result"],
                registry=r,
            )
            for result in ROUTING_RESULTS:
                self.routing.labels(result=result)

    # --- recording helpers (the families above may also be used directly) ------------------
    def label(self, name: str | None, ref: AdapterRef | None) -> str:
        """The adapter label of a request's `name` that resolved to `ref` (None: it did not
        resolve, or the request failed before resolving it)."""
        if name is None or ref is None:
            return NO_ADAPTER_LABEL
        if ref.tenant != PUBLIC_TENANT and not self.private_labels:
            return PRIVATE_LABEL
        return self.adapter_label(name)

    def observe_request(
        self, adapter: str | None, ref: AdapterRef | None, status: int, seconds: float
    ) -> None:
        """One finished caption request: count it by status and time it."""
        label = self.label(adapter, ref)
        self.requests.labels(adapter=label, status=str(status)).inc()
        self.request_duration.labels(adapter=label).observe(seconds)

    def add_generated_tokens(self, adapter: str, ref: AdapterRef, tokens: int) -> None:
        self.generated_tokens.labels(adapter=self.label(adapter, ref)).inc(tokens)

    def observe_batch(self, rows: int, adapters: int) -> None:
        self.batch_size.observe(rows)
        self.batch_adapters.observe(adapters)

    def observe_adapter_load(self, tier: str, seconds: float) -> None:
        if tier not in LOAD_TIERS:
            raise ValueError(f"unknown adapter load tier {tier!r}; expected one of {LOAD_TIERS}")
        self.adapter_loads.labels(tier=tier).inc()
        self.adapter_load_seconds.labels(tier=tier).observe(seconds)

    def count_load_failure(self, tier: str, reason: str) -> None:
        if tier not in LOAD_TIERS or reason not in LOAD_FAILURE_REASONS:
            raise ValueError(
                f"unknown load failure {tier!r}/{reason!r}; expected a tier of {LOAD_TIERS} "
                f"and a reason of {LOAD_FAILURE_REASONS}"
            )
        self.adapter_load_failures.labels(tier=tier, reason=reason).inc()

    def set_resident(self, tier: str, count: int) -> None:
        if tier not in RESIDENCY_TIERS:
            raise ValueError(f"unknown residency tier {tier!r}; expected one of {RESIDENCY_TIERS}")
        self.adapters_resident.labels(tier=tier).set(count)

    def count_routing(self, result: str) -> None:
        if self.routing is None or result not in ROUTING_RESULTS:
            raise ValueError(
                f"routing result {result!r}: needs ServiceMetrics(scaleout=True) and one of "
                f"{ROUTING_RESULTS}"
            )
        self.routing.labels(result=result).inc()

    def reject(self, reason: str) -> None:
        if reason not in REJECTION_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}; expected {REJECTION_REASONS}")
        self.rejections.labels(reason=reason).inc()

    def set_build_info(self, version: str, backbone: str, device: str) -> None:
        """Publish what runs; replaces any earlier value so exactly one series is 1."""
        self.build_info.clear()
        self.build_info.labels(version=version, backbone=backbone, device=device).set(1)

    def render(self) -> tuple[bytes, str]:
        """The text exposition of every family and its content type, for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE


def private_labels_allowed(has_keys: bool, scrape_token: bool) -> bool:
    """Whether tenants' own adapter names may appear on /metrics: with no keys there is one
    tenant (everything is its own), and a scrape token keeps strangers from reading them."""
    return scrape_token or not has_keys
