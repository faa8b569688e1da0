"""Admission: the tenant limit, the queue bound and the drain, counted once each; counts that
last until the rows end; a second release of the same rows is refused, never hidden."""

from __future__ import annotations

import threading

import pytest

from service.admission import Admission
from service.events import EngineEvents
from service.exceptions import Draining, QueueFull, TenantLimit
from service.metrics import ServiceMetrics


def test_admission_bounds_queue_and_tenant_and_counts_rejections() -> None:
    metrics = ServiceMetrics()
    events = EngineEvents(metrics)
    a = Admission(tenant_max_inflight=2, queue_size=3, events=events)
    a.admit("acme", 2)
    with pytest.raises(TenantLimit) as limit:
        a.admit("acme")
    assert limit.value.retry_after_s is not None
    a.admit("other")
    with pytest.raises(QueueFull):
        a.admit("third")
    a.withdraw("other")
    a.admit("third")
    a.drain()
    with pytest.raises(Draining):
        a.admit("fourth")
    assert events.by_prefix("rejected_") == {"tenant_limit": 1, "queue_full": 1, "draining": 1}
    for reason in ("tenant_limit", "queue_full", "draining"):
        value = metrics.registry.get_sample_value("ctxpeft_rejections_total", {"reason": reason})
        assert value == 1.0
    assert metrics.registry.get_sample_value("ctxpeft_queue_depth") == 3.0


def test_tenant_inflight_lasts_until_finished_not_until_dequeued() -> None:
    a = Admission(tenant_max_inflight=1, queue_size=10)
    a.admit("acme")
    a.dequeued(1)
    assert a.waiting == 0 and a.inflight_of("acme") == 1
    with pytest.raises(TenantLimit):
        a.admit("acme")
    a.finished("acme")
    a.admit("acme")


def test_the_ingress_form_bounds_tenants_only() -> None:
    a = Admission(tenant_max_inflight=3)
    a.admit("acme", 3)
    a.admit("beta", 3)
    with pytest.raises(TenantLimit):
        a.admit("acme")
    assert a.inflight == 6


def test_a_second_release_of_the_same_rows_is_a_loud_error() -> None:
    a = Admission(tenant_max_inflight=4, queue_size=4)
    a.admit("acme", 1)
    a.dequeued(1)
    a.finished("acme")
    with pytest.raises(RuntimeError, match="ended twice"):
        a.finished("acme")
    with pytest.raises(RuntimeError, match="counted twice"):
        a.dequeued(1)
    assert a.inflight == 0 and a.waiting == 0


def test_wait_idle_returns_when_the_last_row_finishes() -> None:
    a = Admission(tenant_max_inflight=4)
    a.admit("t")
    assert a.wait_idle(0.01) is False
    finished = threading.Event()

    def finish() -> None:
        a.finished("t")
        finished.set()

    threading.Thread(target=finish).start()
    assert a.wait_idle(30) is True and finished.wait(30)
