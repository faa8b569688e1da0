"""Metric families, their values after recording, and the bounded adapter label."""

from __future__ import annotations

import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from service import __version__
from service.metrics import (
    LOAD_FAILURE_REASONS,
    REJECTION_REASONS,
    AdapterLabeler,
    ServiceMetrics,
    private_labels_allowed,
)
from service.store import PUBLIC_TENANT, AdapterRef

FAMILIES = {
    "ctxpeft_requests": "counter",
    "ctxpeft_request_duration_seconds": "histogram",
    "ctxpeft_queue_wait_seconds": "histogram",
    "ctxpeft_batch_size": "histogram",
    "ctxpeft_batch_adapters": "histogram",
    "ctxpeft_generated_tokens": "counter",
    "ctxpeft_engine_steps": "counter",
    "ctxpeft_running_rows": "gauge",
    "ctxpeft_time_to_first_token_seconds": "histogram",
    "ctxpeft_engine_faults": "counter",
    "ctxpeft_non_finite_rows": "counter",
    "ctxpeft_adapter_quarantines": "counter",
    "ctxpeft_engine_up": "gauge",
    "ctxpeft_adapter_loads": "counter",
    "ctxpeft_adapter_load_seconds": "histogram",
    "ctxpeft_adapter_load_failures": "counter",
    "ctxpeft_adapters_resident": "gauge",
    "ctxpeft_encoder_cache_hits": "counter",
    "ctxpeft_encoder_cache_misses": "counter",
    "ctxpeft_encoder_runs": "counter",
    "ctxpeft_rejections": "counter",
    "ctxpeft_queue_depth": "gauge",
    "ctxpeft_inflight_requests": "gauge",
    "ctxpeft_samples": "counter",
    "ctxpeft_build_info": "gauge",
}


def samples(metrics: ServiceMetrics) -> list[Sample]:
    body, _ = metrics.render()
    return [s for f in text_string_to_metric_families(body.decode()) for s in f.samples]


def value(metrics: ServiceMetrics, name: str, **labels: str) -> float:
    found = [s.value for s in samples(metrics) if s.name == name and s.labels == labels]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def test_all_families_present_with_types() -> None:
    body, content_type = ServiceMetrics().render()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    families = {f.name: f.type for f in text_string_to_metric_families(body.decode())}
    assert {name: families.get(name) for name in FAMILIES} == FAMILIES
    ours = {name for name in families if not name.endswith("_created")}
    assert ours == set(FAMILIES)  # nothing else, and everything prefixed ctxpeft_
    counters = [s.name for s in samples(ServiceMetrics()) if s.name.startswith("ctxpeft_rej")]
    assert set(counters) == {"ctxpeft_rejections_total", "ctxpeft_rejections_created"}


def test_fixed_label_series_exist_at_zero() -> None:
    m = ServiceMetrics()
    for reason in REJECTION_REASONS:
        assert value(m, "ctxpeft_rejections_total", reason=reason) == 0
    for tier in ("device", "cpu", "disk"):
        assert value(m, "ctxpeft_adapters_resident", tier=tier) == 0
    for tier in ("cpu", "device"):
        assert value(m, "ctxpeft_adapter_loads_total", tier=tier) == 0
        for reason in LOAD_FAILURE_REASONS:
            assert value(m, "ctxpeft_adapter_load_failures_total", tier=tier, reason=reason) == 0
    build = value(
        m, "ctxpeft_build_info", version=__version__, backbone="unknown", device="unknown"
    )
    assert build == 1


def test_recording_helpers_update_the_right_series() -> None:
    m = ServiceMetrics(adapter_labels=5)
    news = AdapterRef(PUBLIC_TENANT, "news", 1)
    m.observe_request("news", news, 200, seconds=0.3)
    m.observe_request("news", news, 200, seconds=0.7)
    m.observe_request("news", news, 504, seconds=30.0)
    m.observe_request(None, None, 401, seconds=0.001)
    m.add_generated_tokens("news", news, 12)
    m.observe_batch(rows=6, adapters=2)
    m.observe_adapter_load("device", 0.02)
    m.set_resident("cpu", 3)
    m.reject("queue_full")
    m.reject("queue_full")
    m.queue_wait.observe(0.004)
    m.queue_depth.set(7)
    m.inflight.inc()
    m.encoder_cache_hits.inc()
    m.encoder_cache_misses.inc(2)
    m.encoder_runs.inc(2)
    m.set_build_info("9.9", "demo", "cpu")

    assert value(m, "ctxpeft_requests_total", adapter="news", status="200") == 2
    assert value(m, "ctxpeft_requests_total", adapter="news", status="504") == 1
    assert value(m, "ctxpeft_requests_total", adapter="none", status="401") == 1
    assert value(m, "ctxpeft_request_duration_seconds_count", adapter="news") == 3
    assert value(m, "ctxpeft_request_duration_seconds_sum", adapter="news") == pytest.approx(31.0)
    assert value(m, "ctxpeft_request_duration_seconds_bucket", adapter="news", le="0.5") == 1
    assert value(m, "ctxpeft_generated_tokens_total", adapter="news") == 12
    assert value(m, "ctxpeft_batch_size_sum") == 6
    assert value(m, "ctxpeft_batch_size_bucket", le="4.0") == 0
    assert value(m, "ctxpeft_batch_size_bucket", le="8.0") == 1
    assert value(m, "ctxpeft_batch_adapters_sum") == 2
    assert value(m, "ctxpeft_adapter_loads_total", tier="device") == 1
    assert value(m, "ctxpeft_adapter_load_seconds_count", tier="device") == 1
    assert value(m, "ctxpeft_adapters_resident", tier="cpu") == 3
    assert value(m, "ctxpeft_rejections_total", reason="queue_full") == 2
    assert value(m, "ctxpeft_rejections_total", reason="draining") == 0
    assert value(m, "ctxpeft_queue_wait_seconds_count") == 1
    assert value(m, "ctxpeft_queue_depth") == 7
    assert value(m, "ctxpeft_inflight_requests") == 1
    assert value(m, "ctxpeft_encoder_cache_hits_total") == 1
    assert value(m, "ctxpeft_encoder_cache_misses_total") == 2
    assert value(m, "ctxpeft_encoder_runs_total") == 2
    builds = [s for s in samples(m) if s.name == "ctxpeft_build_info"]
    assert [(s.labels, s.value) for s in builds] == [
        ({"version": "9.9", "backbone": "demo", "device": "cpu"}, 1)
    ]


def test_unknown_label_values_are_refused() -> None:
    m = ServiceMetrics()
    with pytest.raises(ValueError, match="unknown rejection reason"):
        m.reject("because")
    with pytest.raises(ValueError, match="load tier"):
        m.observe_adapter_load("disk", 1.0)
    with pytest.raises(ValueError, match="residency tier"):
        m.set_resident("gpu", 1)
    with pytest.raises(ValueError, match="unknown load failure"):
        m.count_load_failure("cpu", "EIO")  # the reason label stays bounded
    m.count_load_failure("cpu", "io")
    assert value(m, "ctxpeft_adapter_load_failures_total", tier="cpu", reason="io") == 1


def test_registries_are_independent() -> None:
    a, b = ServiceMetrics(), ServiceMetrics()
    a.reject("draining")
    assert value(a, "ctxpeft_rejections_total", reason="draining") == 1
    assert value(b, "ctxpeft_rejections_total", reason="draining") == 0


def test_labeler_keeps_first_top_k_then_other() -> None:
    label = AdapterLabeler(top_k=3)
    assert [label(n) for n in ["a", "b", "a", "c", "d", "e", "b"]] == [
        "a",
        "b",
        "a",
        "c",
        "other",
        "other",
        "b",
    ]
    assert label.kept == {"a", "b", "c"}
    assert label(None) == "none"
    assert AdapterLabeler(top_k=0)("a") == "other"


def test_labeler_allow_list() -> None:
    label = AdapterLabeler(top_k=100, allow_list=["news", "shop"])
    assert [label(n) for n in ["x", "news", "shop", "y"]] == ["other", "news", "shop", "other"]


def test_adapter_series_are_capped() -> None:
    m = ServiceMetrics(adapter_labels=4)
    for i in range(50):
        ref = AdapterRef(PUBLIC_TENANT, f"adapter-{i}", 1)
        m.observe_request(f"adapter-{i}", ref, 200, 0.01)
        m.add_generated_tokens(f"adapter-{i}", ref, 1)
    adapters = {s.labels["adapter"] for s in samples(m) if s.name == "ctxpeft_requests_total"}
    assert adapters == {"adapter-0", "adapter-1", "adapter-2", "adapter-3", "other"}
    assert value(m, "ctxpeft_requests_total", adapter="other", status="200") == 46
    assert value(m, "ctxpeft_generated_tokens_total", adapter="other") == 46


def test_labeler_is_thread_safe() -> None:
    label = AdapterLabeler(top_k=10)
    results: list[str] = []
    lock = threading.Lock()

    def work(offset: int) -> None:
        out = [label(f"n{(offset + i) % 40}") for i in range(200)]
        with lock:
            results.extend(out)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(label.kept) == 10
    assert set(results) == set(label.kept) | {"other"}


def test_names_that_did_not_resolve_never_take_a_label_place() -> None:
    """The issue-20 leak: made-up names answered 400/404 took every free place for good."""
    m = ServiceMetrics(adapter_labels=3)
    for i in range(25):
        m.observe_request(f"made-up-{i}", None, 400, 0.01)
    assert m.adapter_label.kept == frozenset()
    real = AdapterRef(PUBLIC_TENANT, "describe", 1)
    m.observe_request("describe", real, 200, 0.01)
    labels = {s.labels["adapter"] for s in samples(m) if s.name == "ctxpeft_requests_total"}
    assert labels == {"none", "describe"}
    assert value(m, "ctxpeft_requests_total", adapter="none", status="400") == 25


@pytest.mark.parametrize("private_labels", [False, True])
def test_a_tenants_own_adapter_names_show_only_when_allowed(private_labels: bool) -> None:
    m = ServiceMetrics(adapter_labels=10, private_labels=private_labels)
    own = AdapterRef("acme", "secret-launch", 2)
    public = AdapterRef(PUBLIC_TENANT, "describe", 1)
    m.observe_request("secret-launch", own, 200, 0.01)
    m.add_generated_tokens("secret-launch", own, 5)
    m.observe_request("describe", public, 200, 0.01)
    body = m.render()[0].decode()
    assert ("secret-launch" in body) is private_labels
    own_label = "secret-launch" if private_labels else "private"
    assert value(m, "ctxpeft_requests_total", adapter=own_label, status="200") == 1
    assert value(m, "ctxpeft_generated_tokens_total", adapter=own_label) == 5
    assert value(m, "ctxpeft_requests_total", adapter="describe", status="200") == 1


@pytest.mark.parametrize(
    ("has_keys", "token", "allowed"),
    [(False, False, True), (False, True, True), (True, False, False), (True, True, True)],
)
def test_private_labels_policy(has_keys: bool, token: bool, allowed: bool) -> None:
    assert private_labels_allowed(has_keys=has_keys, scrape_token=token) is allowed
