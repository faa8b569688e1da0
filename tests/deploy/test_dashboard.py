"""The Grafana dashboard and its provisioning: every PromQL expression names only metrics the
live service exports, evaluates on a real Prometheus that scraped it, and the panels cover
what an operator watches; datasource and dashboard provisioning agree with the compose file."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import DOCKER, ROOT, LiveService, Scraped

DASHBOARD = DOCKER / "grafana" / "dashboards" / "ctxpeft.json"
PROVISIONING = DOCKER / "grafana" / "provisioning"

# PromQL words that look like identifiers but are not metric names.
PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan",
}  # fmt: skip
# Grafana's variables, as the dashboard's expressions use them, for a real evaluation.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$adapter": ".*"}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def expressions() -> list[str]:
    return [t["expr"] for p in panels() for t in p["targets"]]


def variable_queries() -> list[str]:
    return [v["definition"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]


def metric_names(promql: str) -> set[str]:
    """Metric names in a PromQL expression (or a Grafana label_values() query).

    Label matchers, range selectors, strings and `by (...)` lists are removed first; what is
    left that is an identifier not followed by "(" and not a keyword is a metric name.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', promql)  # strings (label values, legends)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*\w+\s*\)", r" \1 ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])([a-zA-Z_:][\w:]*)\b(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def substitute(promql: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        promql = promql.replace(variable, value)
    return promql


# --- the extractor itself --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("promql", "names"),
    [
        ('sum by (adapter) (rate(ctxpeft_requests_total{adapter=~"$adapter"}[5m]))',
         {"ctxpeft_requests_total"}),
        ("histogram_quantile(0.95, sum by (le) (rate(a_bucket[$__rate_interval])))", {"a_bucket"}),
        ("sum(rate(h_sum[1m])) / sum(rate(h_count[1m])) > bool 0.5", {"h_sum", "h_count"}),
        ('up{job="x"} == 0 and on (instance) b offset 5m', {"up", "b"}),
        ("label_values(ctxpeft_requests_total, adapter)", {"ctxpeft_requests_total"}),
    ],
)  # fmt: skip
def test_metric_names_are_extracted_from_promql(promql: str, names: set[str]) -> None:
    assert metric_names(promql) == names


# --- the dashboard against the live service ------------------------------------------------------
def test_dashboard_references_only_metrics_the_live_service_exports(traffic: LiveService) -> None:
    exported = traffic.exported_names()
    referenced = set().union(*(metric_names(e) for e in expressions() + variable_queries()))
    assert referenced, "no metric found in the dashboard"
    assert referenced - exported == set()
    # Every family of ServiceMetrics the operator needs is on a panel.
    wanted = {
        "ctxpeft_requests_total",  # throughput by adapter, status
        "ctxpeft_request_duration_seconds_bucket",  # latency percentiles
        "ctxpeft_queue_depth",
        "ctxpeft_inflight_requests",
        "ctxpeft_queue_wait_seconds_bucket",
        "ctxpeft_batch_size_sum",
        "ctxpeft_batch_size_count",
        "ctxpeft_batch_adapters_sum",
        "ctxpeft_adapters_resident",
        "ctxpeft_adapter_loads_total",
        "ctxpeft_rejections_total",
        "ctxpeft_encoder_cache_hits_total",
        "ctxpeft_encoder_cache_misses_total",
        "ctxpeft_generated_tokens_total",
        "ctxpeft_build_info",
    }
    assert wanted - referenced == set()


def test_every_dashboard_expression_evaluates_on_prometheus_with_data(scraped: Scraped) -> None:
    """Each panel's query, with Grafana's variables filled in, runs on the real Prometheus
    that scraped the traffic, and returns at least one series."""
    empty = [e for e in expressions() if not scraped.query(substitute(e))]
    assert empty == []
    throughput = scraped.query(substitute(expressions()[0]))
    assert {series["metric"]["adapter"] for series in throughput} == {"x", "y", "none"}


def test_panels_are_grouped_by_what_they_show() -> None:
    by_title = {p["title"]: p for p in panels()}
    required = {
        "Throughput by adapter": ("sum by (adapter)", "ctxpeft_requests_total"),
        "Latency percentiles": ("histogram_quantile(0.99", "ctxpeft_request_duration_seconds"),
        "Queue depth and in flight": ("ctxpeft_queue_depth", "ctxpeft_inflight_requests"),
        "Batch size": ("ctxpeft_batch_size_sum", "ctxpeft_batch_size_bucket"),
        "Adapters resident by tier": ("sum by (tier)", "ctxpeft_adapters_resident"),
        "Refused and unfinished requests": ("sum by (reason)", "ctxpeft_rejections_total"),
        "Encoder cache hit rate": ("ctxpeft_encoder_cache_hits_total", "misses_total"),
        "Generated tokens by adapter": ("sum by (adapter)", "ctxpeft_generated_tokens_total"),
    }
    for title, fragments in required.items():
        text = " ".join(t["expr"] for t in by_title[title]["targets"])
        assert all(fragment in text for fragment in fragments), title
    assert by_title["Latency percentiles"]["fieldConfig"]["defaults"]["unit"] == "s"
    assert by_title["Encoder cache hit rate"]["fieldConfig"]["defaults"]["unit"] == "percentunit"


def test_layout_ids_and_datasources_are_consistent() -> None:
    board = dashboard()
    assert board["uid"] == "ctxpeft"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}  # fmt: skip
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
    uid = datasource()["uid"]
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert all(t["datasource"]["uid"] == uid for t in panel["targets"]), panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
    assert all(v["datasource"]["uid"] == uid for v in board["templating"]["list"])


# --- provisioning ----------------------------------------------------------------------------
def datasource() -> dict[str, Any]:
    files = sorted((PROVISIONING / "datasources").glob("*.yml"))
    assert len(files) == 1
    sources = yaml.safe_load(files[0].read_text())["datasources"]
    assert len(sources) == 1
    source: dict[str, Any] = sources[0]
    return source


def test_datasource_points_at_the_compose_prometheus_at_its_scrape_interval() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    prometheus = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    source = datasource()
    assert source["type"] == "prometheus"
    assert source["isDefault"] is True
    listen = next(
        a.split("=", 1)[1]
        for a in compose["services"]["prometheus"]["command"]
        if a.startswith("--web.listen-address=")
    )
    assert source["url"] == f"http://prometheus:{listen.rsplit(':', 1)[1]}"
    # $__rate_interval is built from timeInterval: it must be the real scrape interval.
    assert source["jsonData"]["timeInterval"] == prometheus["global"]["scrape_interval"]


def test_dashboard_provider_reads_the_folder_compose_mounts() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = dict(
        volume.removesuffix(":ro").split(":", 1)
        for volume in compose["services"]["grafana"]["volumes"]
        if volume.startswith("./")
    )
    files = sorted((PROVISIONING / "dashboards").glob("*.yml"))
    assert len(files) == 1
    (provider,) = yaml.safe_load(files[0].read_text())["providers"]
    assert provider["type"] == "file"
    assert mounts["./docker/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./docker/grafana/provisioning"] == "/etc/grafana/provisioning"
    home = compose["services"]["grafana"]["environment"][
        "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"
    ]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
