"""The Grafana dashboards of deploy/grafana/dashboards are valid, read our datasource and query series that
exist: ours, FastStream's and rabbitmq_prometheus's. Whether every query returns data from the running
system is tests/e2e/test_dashboards_have_data.py's business.

`promtool` parses every query (`make tools` installs it; a missing promtool fails, it does not skip).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from esim_common import metrics
from tests.fixtures import dashboards

ROOT = dashboards.ROOT
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
FULFILMENT = dashboards.DASHBOARDS_DIR / "esim-fulfilment.json"
RABBITMQ_OVERVIEW = dashboards.DASHBOARDS_DIR / "RabbitMQ-Overview.json"
RABBITMQ_NOTICE = ROOT / "deploy" / "grafana" / "NOTICE-RabbitMQ-Overview.md"
# What the RabbitMQ dashboard's variables resolve to against our Prometheus: the cluster label the scrape
# job sets, and no Kubernetes namespace.
TEMPLATE_VALUES = {"rabbitmq_cluster": "esim", "namespace": ""}
DASHBOARD_FILES = dashboards.dashboard_files()


def provisioned_datasource() -> dict:
    [datasource] = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    return {"type": datasource["type"], "uid": datasource["uid"]}


def all_queries() -> list[dashboards.Query]:
    return [query for path in DASHBOARD_FILES for query in dashboards.queries(path)]


def panel_titled(dashboard: dict, title: str) -> dict:
    [panel] = [p for p in dashboards.query_panels(dashboard) if p["title"] == title]
    return panel


def threshold_values(panel: dict) -> set[float]:
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    return {step["value"] for step in steps if step["value"] is not None}


def alert_literal(name: str) -> float:
    """The threshold literal of an alert whose expression compares against one number."""
    rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    [expr] = [rule["expr"] for rule in rules if rule.get("alert") == name]
    found = {float(n) for n in re.findall(r"[<>]\s*(\d+(?:\.\d+)?)", expr)}
    found -= {0.0, 1.0, 10.0}  # the "at least N samples" and ==1 guards, not thresholds
    [literal] = found
    return literal


def test_both_dashboards_are_provisioned_from_the_folder():
    assert {path.name for path in DASHBOARD_FILES} == {FULFILMENT.name, RABBITMQ_OVERVIEW.name}


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_a_dashboard_is_valid_json_with_a_uid_a_title_and_unique_panel_ids(path: Path):
    dashboard = dashboards.load(path)
    assert dashboard["uid"] and dashboard["title"]
    ids = [panel["id"] for panel in dashboards.panels(dashboard)]
    assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
    assert "__inputs" not in dashboard, "an export's import placeholders: provisioning does not fill them"


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_every_panel_has_a_query_and_reads_the_provisioned_datasource(path: Path):
    ours = provisioned_datasource()
    dashboard = dashboards.load(path)
    for panel in dashboards.query_panels(dashboard):
        where = f"{path.name} panel {panel['id']} {panel.get('title')!r}"
        assert panel.get("targets"), f"{where}: no query"
        assert panel.get("datasource") == ours, f"{where}: datasource {panel.get('datasource')}"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{where}: empty query"
            assert target.get("datasource", ours) == ours, f"{where}: target datasource"
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"] == ours, f"{path.name} variable {variable['name']}"


def test_every_query_selects_only_series_that_something_exports():
    known = (
        dashboards.our_metric_names()
        | dashboards.faststream_metric_names()
        | dashboards.rabbitmq_metric_names()
    )
    unknown = {
        str(query): missing
        for query in all_queries()
        if (missing := dashboards.metric_names_in(query.expr) - known)
    }
    assert unknown == {}


def test_every_query_is_valid_promql_once_grafanas_variables_are_filled(tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make tools` installs it (Debian's prometheus package)"
    queries = all_queries()
    rules = [
        {"record": f"dashboard:query{i}", "expr": dashboards.substitute(q.expr, TEMPLATE_VALUES)}
        for i, q in enumerate(queries)
    ]
    rules_file = tmp_path / "dashboard-queries.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    checked = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert all("$" not in rule["expr"] for rule in rules), "a variable was left unfilled"


def test_the_fulfilment_dashboard_shows_what_the_issue_asks_for():
    used = set().union(*(dashboards.metric_names_in(q.expr) for q in dashboards.queries(FULFILMENT)))
    assert set(metrics.LEGACY_GAUGES) <= used  # the seed's four names stay on the dashboard
    assert {
        "esim_order_transitions_total",  # orders/min and the success ratio
        "esim_time_to_esim_seconds_bucket",  # time-to-eSIM p50/p99
        "esim_order_step_seconds_bucket",  # per-step durations
        "esim_order_outcome_events_total",  # failures by step
        "esim_refunds_total",  # refunds by step
        "esim_zendit_wallet_available_minor_units",
        "esim_stripe_issuing_available_minor_units",
        "esim_orders_unfinished",  # awaiting funds
        "esim_dlq_depth",
        "rabbitmq_queue_messages_ready",
        "esim_provider_calls_total",  # error ratio by provider/endpoint
        "esim_reconcile_mismatches",
        "faststream_received_processed_messages_total",
    } <= used


@pytest.mark.parametrize(
    ("title", "alert"),
    [
        ("Success ratio", "OrderSuccessRatioLow"),
        ("Time to eSIM (p50, p99)", "TimeToEsimHigh"),
        ("Zendit wallet available", "ZenditWalletLow"),
        ("Stripe Issuing float", "IssuingFloatLow"),
    ],
)
def test_a_threshold_on_the_dashboard_is_the_one_its_alert_fires_at(title: str, alert: str):
    panel = panel_titled(dashboards.load(FULFILMENT), title)
    assert alert_literal(alert) in threshold_values(panel)


def test_the_rabbitmq_dashboard_is_the_official_one_with_its_credits():
    dashboard = dashboards.load(RABBITMQ_OVERVIEW)
    assert (dashboard["uid"], dashboard["title"]) == ("Kn5xm-gZk", "RabbitMQ-Overview")
    notice = RABBITMQ_NOTICE.read_text()
    for credit in ("rabbitmq/rabbitmq-server", "RabbitMQ-Overview.json", "Mozilla Public License", "10991"):
        assert credit in notice


def test_the_rabbitmq_scrape_job_labels_every_series_with_the_cluster_the_dashboard_filters_on():
    """The official dashboard selects `{rabbitmq_cluster="$rabbitmq_cluster"}` on every series, and
    RabbitMQ 3.x only puts that label on rabbitmq_identity_info."""
    [job] = [
        j
        for j in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
        if j["job_name"] == "rabbitmq"
    ]
    relabels = {r["target_label"]: r.get("replacement") for r in job.get("relabel_configs", [])}
    assert relabels.get("rabbitmq_cluster") == TEMPLATE_VALUES["rabbitmq_cluster"]
