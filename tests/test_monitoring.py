"""The monitoring files in deploy/: Prometheus alerting rules checked and unit-tested with
promtool, and a Grafana dashboard whose every query is valid PromQL over the metrics the
daemon really exposes."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelwatch.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "deploy" / "prometheus" / "modelwatch-alerts.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "modelwatch-alerts.test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "modelwatch-dashboard.json"
METRIC = re.compile(r"\bmodelwatch_[a-z_]+\b")
# Grafana's variables, as Grafana substitutes them before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed (.ci/run installs Debian's prometheus)")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120)


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_queries() -> list[str]:
    queries = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            query = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                query = query.replace(variable, value)
            queries.append(query)
    return queries


def alert_queries() -> list[str]:
    rules = yaml.safe_load(RULES.read_text())
    return [str(rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exposed() -> dict[str, set[str]]:
    """Every metric family the daemon's /metrics serves, with the sample names a query can
    use (counters as `_total`, histograms as `_bucket`, `_sum`, `_count`); families that have
    no labelled series yet included."""
    families = Metrics(sinks=["stdout"]).registry.collect()
    return {
        family.name: {family.name + suffix for suffix in SUFFIXES[family.type]}
        for family in families
    }


def test_the_alerting_rules_pass_promtool_check() -> None:
    """`promtool check rules` accepts the rules file."""
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 7 rules found" in done.stdout


def test_the_alerting_rules_pass_their_unit_tests() -> None:
    """`promtool test rules`: each alert fires on its series after its `for:`, with its
    labels and annotations, and not on the series beside it."""
    done = promtool("test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_rules_alert_on_what_the_issue_asks() -> None:
    """Dead letters, an old pending delivery, a root unavailable or polled after an inotify
    failure, not_settled rejections, a part without progress and a shared root no node holds
    each have an alert, and each has a unit test."""
    rules = yaml.safe_load(RULES.read_text())
    names = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert names == {
        "ModelwatchDeadLetters",
        "ModelwatchDeliveryBacklog",
        "ModelwatchRootUnavailable",
        "ModelwatchPollingAfterInotifyFailure",
        "ModelwatchModelNotSettled",
        "ModelwatchNoProgress",
        "ModelwatchSharedRootUnheld",
    }
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"]}
    assert tested == names


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """Each panel's query, with Grafana's variables substituted, parses as PromQL (checked by
    promtool as a recording rule)."""
    queries = dashboard_queries()
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:q{i}", "expr": q} for i, q in enumerate(queries)],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_dashboard_and_alerts_use_only_exposed_metrics_and_show_them_all() -> None:
    """No query names a metric the daemon does not serve, and every metric it serves is on
    the dashboard."""
    families = exposed()
    served = set().union(*families.values())
    used_by_dashboard = set(METRIC.findall(" ".join(dashboard_queries())))
    used_by_alerts = set(METRIC.findall(" ".join(alert_queries())))
    assert used_by_dashboard - served == set()
    assert used_by_alerts - served == set()
    assert {f for f, names in families.items() if not names & used_by_dashboard} == set()


def test_the_dashboard_panels_fit_the_grid_without_overlapping() -> None:
    """Panels have unique ids, lie within Grafana's 24 columns and do not overlap."""
    panels = dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = []
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells.append(
            {
                (x, y)
                for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])
            }
        )
    for a, b in itertools.combinations(range(len(cells)), 2):
        assert not cells[a] & cells[b], (panels[a]["title"], panels[b]["title"])
