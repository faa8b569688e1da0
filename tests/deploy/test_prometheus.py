"""The shipped Prometheus config and alert rules, checked by promtool and run for real: a
Prometheus server on docker/prometheus.yml (targets rewritten to loopback) scrapes the live
service after caption traffic, and its HTTP API returns the service's counts."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from service import __version__
from service.metrics import NO_ADAPTER_LABEL
from tests.deploy.conftest import (
    CAPTIONS,
    DOCKER,
    METRICS_TOKEN_FILE,
    UNKNOWN_ADAPTER,
    Scraped,
)

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package `prometheus`)"
)


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )


def alert_rules() -> dict[str, dict[str, object]]:
    document = yaml.safe_load((DOCKER / "alerts.yml").read_text())
    return {rule["alert"]: rule for group in document["groups"] for rule in group["rules"]}


# --- promtool --------------------------------------------------------------------------------
@needs_promtool
def test_promtool_accepts_the_shipped_config_and_its_rule_file(tmp_path: Path) -> None:
    # Laid out as in the container: the rules and the scrape token beside the config.
    for name in ("prometheus.yml", "alerts.yml"):
        shutil.copy(DOCKER / name, tmp_path / name)
    shutil.copy(METRICS_TOKEN_FILE, tmp_path / "metrics_token")
    result = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in output
    assert f"SUCCESS: {len(alert_rules())} rules found" in output


@needs_promtool
def test_promtool_accepts_the_alert_rules() -> None:
    result = promtool("check", "rules", str(DOCKER / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout


RULE_TESTS = """
rule_files: [alerts.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'up{job="ctxpeft", instance="a:8000"}'
        values: '1 1 0 0 0 0'
      # 100 requests a minute, 10 of them 503: a 10 % error rate for ten minutes.
      - series: 'ctxpeft_requests_total{adapter="x", status="200"}'
        values: '0+90x10'
      - series: 'ctxpeft_requests_total{adapter="x", status="503"}'
        values: '0+10x10'
      # One device load per batch (thrashing) on one instance.
      - series: 'ctxpeft_adapter_loads_total{tier="device"}'
        values: '0+60x30'
      - series: 'ctxpeft_batch_size_count'
        values: '0+60x30'
      - series: 'ctxpeft_rejections_total{reason="unauthorized"}'
        values: '0+30x20'
      # 12 queue_full a minute (0.2/s, above 0.1/s) for half an hour.
      - series: 'ctxpeft_rejections_total{reason="queue_full"}'
        values: '0+12x30'
      # 100 requests a minute, 90 of them slower than 10 s: p95 near 29 s.
      - series: 'ctxpeft_request_duration_seconds_bucket{adapter="x", le="10.0"}'
        values: '0+10x30'
      - series: 'ctxpeft_request_duration_seconds_bucket{adapter="x", le="30.0"}'
        values: '0+100x30'
      - series: 'ctxpeft_request_duration_seconds_bucket{adapter="x", le="+Inf"}'
        values: '0+100x30'
      # One version quarantined at minute 3; nothing after.
      - series: 'ctxpeft_adapter_quarantines_total'
        values: '0 0 0 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1'
    alert_rule_test:
      - eval_time: 2m
        alertname: CtxpeftDown
        exp_alerts: []
      - eval_time: 5m
        alertname: CtxpeftDown
        exp_alerts:
          - exp_labels: {severity: page, job: ctxpeft, instance: "a:8000"}
            exp_annotations:
              summary: "ctxpeft a:8000 does not answer /metrics"
              description: "Prometheus cannot scrape the service: the process is down, restarting or stuck."
      - eval_time: 10m
        alertname: CtxpeftHighErrorRate
        exp_alerts:
          - exp_labels: {severity: page}
            exp_annotations:
              summary: "More than 5% of caption requests fail with 5xx"
              description: "503 (queue full, draining), 504 (deadline) or 500: see ctxpeft_rejections_total by reason."
      - eval_time: 30m
        alertname: CtxpeftAdapterThrashing
        exp_alerts:
          - exp_labels: {severity: warn}
            exp_annotations:
              summary: "Adapters are swapped into bank slots on most batches"
              description: "The working set of adapters exceeds device_slots: raise device_slots (device memory) or cpu_cache_bytes."
      # Not yet: the condition has held for less than its `for: 10m`.
      - eval_time: 8m
        alertname: CtxpeftOverloaded
        exp_alerts: []
      - eval_time: 20m
        alertname: CtxpeftOverloaded
        exp_alerts:
          - exp_labels: {severity: warn}
            exp_annotations:
              summary: "Requests are refused for a full queue or miss their deadline"
              description: "Demand exceeds capacity: add replicas, raise max_batch_size, or use a faster device."
      - eval_time: 20m
        alertname: CtxpeftSlowCaptions
        exp_alerts:
          - exp_labels: {severity: warn}
            exp_annotations:
              summary: "95th percentile caption latency above 10 s"
              description: "Check ctxpeft_queue_wait_seconds (queueing) against batch sizes and adapter loads."
      - eval_time: 2m
        alertname: CtxpeftAdapterQuarantined
        exp_alerts: []
      - eval_time: 6m
        alertname: CtxpeftAdapterQuarantined
        exp_alerts:
          - exp_labels: {severity: warn}
            exp_annotations:
              summary: "An adapter version was quarantined for producing NaN or infinity"
              description: "Its rows kept ending with non-finite values (422 adapter_non_finite, then adapter_quarantined); the log names the version. Its owner must upload a new version."
      # Fifteen minutes later the increase is gone: it stops firing by itself.
      - eval_time: 25m
        alertname: CtxpeftAdapterQuarantined
        exp_alerts: []
      # Half a request a second with a bad key: below the threshold of one.
      - eval_time: 20m
        alertname: CtxpeftAuthFailures
        exp_alerts: []
"""


@needs_promtool
def test_alert_rules_fire_on_synthetic_series(tmp_path: Path) -> None:
    """`promtool test rules`: each alert fires (or stays quiet) as docs/OPERATIONS.md says."""
    shutil.copy(DOCKER / "alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "tests.yml").write_text(RULE_TESTS)
    result = promtool("test", "rules", "tests.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# --- a real Prometheus scraping the live service ------------------------------------------------
def test_prometheus_scrapes_the_service_counts_after_caption_traffic(scraped: Scraped) -> None:
    service = scraped.service
    assert scraped.value('up{job="ctxpeft"}') == 1
    assert scraped.value('ctxpeft_build_info{backbone="tiny", device="cpu"}') == 1
    version = scraped.query("ctxpeft_build_info")[0]["metric"]["version"]
    assert version == __version__

    # Every request the test sent, counted by adapter and status, as Prometheus stored it.
    for adapter, count in CAPTIONS.items():
        assert scraped.value(f'ctxpeft_requests_total{{adapter="{adapter}",status="200"}}') == count
        assert scraped.value(f'ctxpeft_request_duration_seconds_count{{adapter="{adapter}"}}') == (
            count
        )
    # The unknown name never takes one of the bounded adapter label values.
    assert scraped.value(f'ctxpeft_requests_total{{adapter="{NO_ADAPTER_LABEL}"}}') == 1
    assert scraped.query(f'ctxpeft_requests_total{{adapter="{UNKNOWN_ADAPTER}"}}') == []
    assert scraped.value('ctxpeft_rejections_total{reason="not_found"}') == 1
    assert scraped.value("sum(ctxpeft_requests_total)") == len(service.statuses) == 8

    # Generated tokens: the sum the clients were told, per adapter.
    for adapter in CAPTIONS:
        told = sum(r["tokens"] for r in service.responses if r["adapter"] == adapter)
        assert 0 < told <= CAPTIONS[adapter] * 4
        assert scraped.value(f'ctxpeft_generated_tokens_total{{adapter="{adapter}"}}') == told

    # Seven different images, each through the encoder once; every caption joined the running
    # batch once, and decode steps ran.
    assert scraped.value("ctxpeft_encoder_runs_total") == 7
    assert scraped.value("ctxpeft_queue_wait_seconds_count") == 7
    assert scraped.value("ctxpeft_engine_steps_total") == scraped.value("ctxpeft_batch_size_count")
    assert scraped.value("ctxpeft_engine_steps_total") > 0
    assert scraped.value("ctxpeft_queue_depth") == 0
    assert scraped.value("ctxpeft_inflight_requests") == 0
    assert scraped.value('ctxpeft_adapters_resident{tier="device"}') == 2

    # A latency percentile over the stored histogram: a real number of seconds.
    p95 = scraped.value(
        "histogram_quantile(0.95, sum by (le) (ctxpeft_request_duration_seconds_bucket))"
    )
    assert 0 < p95 <= 60


def test_prometheus_holds_exactly_what_the_service_exports(scraped: Scraped) -> None:
    """Every ctxpeft_* sample of the live /metrics, value for value, in Prometheus."""
    samples = {
        key: value
        for key, value in scraped.service.samples().items()
        if key[0].startswith("ctxpeft_") and not key[0].endswith("_created")
    }
    assert len(samples) > 50
    stored = {
        (
            series["metric"]["__name__"],
            tuple(
                sorted(
                    (k, v)
                    for k, v in series["metric"].items()
                    if k not in {"__name__", "job", "instance", "service"}
                )
            ),
        ): float(series["value"][1])
        for series in scraped.query('{__name__=~"ctxpeft_.+", __name__!~".+_created"}')
    }
    assert stored == samples


def test_prometheus_loads_the_shipped_alert_rules_and_evaluates_them(scraped: Scraped) -> None:
    """Every rule of docker/alerts.yml is loaded and evaluated against the live series (1 s
    evaluation) without a PromQL error; with healthy traffic none is pending or firing."""
    deadline = time.monotonic() + 15
    while True:
        reply = httpx.get(f"{scraped.url}/api/v1/rules", timeout=10).json()
        rules = {r["name"]: r for group in reply["data"]["groups"] for r in group["rules"]}
        health = {name: rule["health"] for name, rule in rules.items()}
        if "unknown" not in health.values() or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert set(rules) == set(alert_rules())
    assert health == dict.fromkeys(rules, "ok"), {n: r.get("lastError") for n, r in rules.items()}
    assert {name: rule["state"] for name, rule in rules.items()} == dict.fromkeys(rules, "inactive")


def test_loopback_config_changes_only_targets_and_intervals(scraped: Scraped) -> None:
    """The server under test runs the shipped file, not a look-alike."""
    shipped = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    tested = scraped.config
    assert tested["rule_files"] == shipped["rule_files"]
    assert [j["job_name"] for j in tested["scrape_configs"]] == [
        j["job_name"] for j in shipped["scrape_configs"]
    ]
    for ours, theirs in zip(tested["scrape_configs"], shipped["scrape_configs"], strict=True):
        assert {k: v for k, v in ours.items() if k != "static_configs"} == {
            k: v for k, v in theirs.items() if k != "static_configs"
        }
        assert ours["static_configs"][0].get("labels") == theirs["static_configs"][0].get("labels")
    assert scraped.service.base_url.removeprefix("http://") in str(tested["scrape_configs"])
