"""The alert rules (deploy/prometheus/alerts.yml) are valid, loaded, unit-tested and documented.

`promtool` checks the rules and the config that loads them and runs the rules' unit tests
(deploy/prometheus/tests/); `make tools` installs it from Debian's `prometheus` package, and a missing
promtool fails these tests rather than skipping them. The YAML files are also read here, to hold every
alert to the house rules: a `for:`, a severity, a summary, a description, a runbook link to its README
section, a unit test that fires it and one that must stay quiet, and metric names that the code
actually exports.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from esim_common import metrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
CONFIG = PROMETHEUS / "prometheus.yml"
ALERTS = PROMETHEUS / "alerts.yml"
ALERT_TESTS = PROMETHEUS / "tests" / "alerts_test.yml"
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
README = ROOT / "README.md"

RUNBOOK_BASE = "https://github.com/esim-fulfillment/esim-fulfillment"
SEVERITIES = {"page", "ticket"}
# The modules that declare our Prometheus series.
METRIC_MODULES = (
    "esim_common.metrics",
    "webhook.metrics",
    "funding.metrics",
    "provisioning.metrics",
    "notify.metrics",
    "reconcile.metrics",
    "reconcile.dlq_monitor",
)
# Series that come from elsewhere: Prometheus itself and rabbitmq_prometheus (/metrics/per-object).
FOREIGN_METRICS = {"up", "rabbitmq_queue_messages"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless"}
PROMQL_WORDS |= {"bool", "offset", "inf", "nan"}


# --------------------------------------------------------------------------- reading the files


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    assert path, "promtool is missing: `make tools` installs it (Debian's prometheus package)"
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def output_of(run: subprocess.CompletedProcess[str]) -> str:
    return run.stdout + run.stderr


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def alert_test_cases() -> list[dict]:
    """Every `alert_rule_test` entry of the unit-test file: {eval_time, alertname, exp_alerts}."""
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    return [case for test in tests for case in test.get("alert_rule_test", [])]


def kebab(name: str) -> str:
    """`OrderSuccessRatioLow` → `order-success-ratio-low`."""
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def metric_names_in(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels, durations and keywords left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping label lists
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\boffset\s+\d+[smhdwy]\b", "", expr)  # offset modifiers
    expr = re.sub(r"(?<![\w.])\d+(?:\.\d+)?(?:e[+-]?\d+)?\b", "", expr)  # numbers
    return {
        match.group(1)
        for match in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", expr)
        if not match.group(2) and match.group(1).lower() not in PROMQL_WORDS
    }


def exported_metric_names() -> set[str]:
    """Every series name our services export (the seed's gauges included)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = set(metrics.LEGACY_GAUGES)
    for module in METRIC_MODULES:
        for collector in vars(importlib.import_module(module)).values():
            if isinstance(collector, MetricWrapperBase):
                for family in collector.describe():
                    names |= {family.name + suffix for suffix in suffixes[family.type]}
    return names


# --------------------------------------------------------------------------- promtool


def test_promtool_accepts_the_alert_rules():
    checked = promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, output_of(checked)
    assert f"SUCCESS: {len(alert_rules())} rules found" in output_of(checked)


def test_prometheus_loads_the_alert_rules_and_compose_mounts_them_where_it_looks():
    config = yaml.safe_load(CONFIG.read_text())
    # Relative rule paths are read from the config file's folder, here and in the container.
    assert [(CONFIG.parent / path).resolve() for path in config["rule_files"]] == [ALERTS.resolve()]
    checked = promtool("check", "config", str(CONFIG))
    assert checked.returncode == 0, output_of(checked)
    assert "SUCCESS: 1 rule files found" in output_of(checked)
    assert f"SUCCESS: {len(alert_rules())} rules found" in output_of(checked)

    mounts = {}
    for entry in COMPOSE["services"]["prometheus"]["volumes"]:
        source, target = str(entry).split(":")[:2]
        mounts[target] = (ROOT / source).resolve()
    container_config = PurePosixPath("/etc/prometheus/prometheus.yml")
    assert mounts[str(container_config)] == CONFIG.resolve()
    for path in config["rule_files"]:
        assert mounts[str(container_config.parent / path)] == ALERTS.resolve()


def test_the_alert_unit_tests_pass():
    tested = promtool("test", "rules", str(ALERT_TESTS))
    assert tested.returncode == 0, output_of(tested)
    assert "SUCCESS" in output_of(tested)


# --------------------------------------------------------------------------- the house rules


def test_every_alert_has_a_for_a_severity_a_summary_a_description_and_its_runbook():
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names)), "two alerts share a name"
    for rule in alert_rules():
        name = rule["alert"]
        assert re.fullmatch(r"[A-Z][a-z0-9]+(?:[A-Z][a-z0-9]+)*", name), f"{name}: not CamelCase"
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: no `for:`"
        assert rule.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity page|ticket"
        annotations = rule.get("annotations", {})
        assert annotations.get("summary", "").strip(), f"{name}: no summary"
        assert annotations.get("description", "").strip(), f"{name}: no description"
        assert annotations.get("runbook_url") == f"{RUNBOOK_BASE}#alert-{kebab(name)}", name


def test_every_alert_has_a_unit_test_that_fires_it_and_one_that_must_not():
    assert yaml.safe_load(ALERT_TESTS.read_text())["rule_files"] == ["../alerts.yml"]
    alerts = {rule["alert"]: rule for rule in alert_rules()}
    cases = alert_test_cases()
    fired = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if case.get("exp_alerts") == []}
    assert set(alerts) - fired == set(), "alerts no unit test fires"
    assert set(alerts) - quiet == set(), "alerts no unit test keeps quiet"
    assert (fired | quiet) - set(alerts) == set(), "unit tests of alerts that do not exist"
    # promtool compares whole label sets; this says which severity a firing case expects, so a case
    # copied from another alert cannot pass by matching the wrong rule's labels.
    for case in cases:
        for expected in case.get("exp_alerts") or []:
            assert expected["exp_labels"]["severity"] == alerts[case["alertname"]]["labels"]["severity"]


def test_the_alerts_read_only_series_that_exist():
    used = set().union(*(metric_names_in(rule["expr"]) for rule in alert_rules()))
    assert used - exported_metric_names() - FOREIGN_METRICS == set()
    # The extraction finds what it should (a broken regex would pass the check above vacuously).
    assert {"esim_order_transitions_total", "esim_smtp_relay_failing", "up"} <= used


@pytest.mark.parametrize("name", [rule["alert"] for rule in alert_rules()])
def test_the_readme_explains_every_alert_at_its_runbook_anchor(name):
    text = README.read_text()
    headings = [line.lstrip("#") for line in text.splitlines() if re.match(r"#{2,6} ", line)]
    anchors = {github_anchor(heading) for heading in headings}
    assert f"alert-{kebab(name)}" in anchors, f"README.md has no section for {name}"
    assert f"`{name}`" in text, f"README.md does not name the alert {name}"


def test_the_helpers_read_what_they_should():
    assert kebab("TimeToEsimHigh") == "time-to-esim-high"
    assert github_anchor(" Alert: time to eSIM high") == "alert-time-to-esim-high"
    assert metric_names_in('sum by (le) (rate(a_bucket{x="y"}[5m])) unless b offset 1h > 0.9') == {
        "a_bucket",
        "b",
    }
