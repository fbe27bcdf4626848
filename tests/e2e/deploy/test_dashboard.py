"""The provisioned Grafana dashboard, checked without a Grafana: the JSON loads, its panels fit
the grid, it uses the provisioned datasource, each query parses as PromQL (through promtool) and
names only metrics that our code or the Temporal SDK exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from core.metrics import ORDERFLOW_METRICS, TEMPORAL_SDK_METRICS
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "orderflow.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "orderflow.yml"
# Series Prometheus itself makes for every target.
PROMETHEUS_METRICS = frozenset({"up"})
KNOWN_METRICS = ORDERFLOW_METRICS | TEMPORAL_SDK_METRICS | PROMETHEUS_METRICS
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
PROMQL_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless"}
    | {"bool", "offset", "inf", "nan"}
)
# What an on-call person looks for first; each must have a panel.
WANTED_PANELS = (
    "Accepted orders/s",
    "POST /orders 202 latency",
    "Step attempts by outcome",
    "Retry ratio by step",
    "Dead letters open by step",
    "Outbox backlog and oldest entry",
    "Temporal schedule-to-start latency (p99)",
)


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (labels, functions and keywords removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        following = text[match.end() :].lstrip()
        word = match.group()
        if following.startswith("(") or word.lower() in PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


def known(name: str) -> bool:
    if name in KNOWN_METRICS:
        return True
    return any(
        name.endswith(s) and name.removesuffix(s) in KNOWN_METRICS for s in HISTOGRAM_SUFFIXES
    )


def promtool() -> str:
    """The promtool binary; a test that calls it is marked ci_must_run, so with CI set a missing
    one fails the run (.ci/run installs the Debian package prometheus)."""
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    return binary


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def test_dashboard_loads_with_the_panels_on_call_wants(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "orderflow"
    assert dashboard["title"] == "orderflow"
    assert isinstance(dashboard["schemaVersion"], int)
    titles = [panel["title"] for panel in query_panels(dashboard)]
    assert len(titles) == len(set(titles)), "duplicate panel titles"
    for wanted in WANTED_PANELS:
        assert wanted in titles, wanted
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"


def test_panels_fit_the_grid_without_overlapping(dashboard: dict[str, Any]) -> None:
    taken: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (row, column)
            for row in range(grid["y"], grid["y"] + grid["h"])
            for column in range(grid["x"], grid["x"] + grid["w"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_every_panel_queries_the_provisioned_prometheus(dashboard: dict[str, Any]) -> None:
    match = re.search(r"^\s*uid:\s*(\S+)", DATASOURCES.read_text(), re.MULTILINE)
    assert match is not None
    uid = match.group(1)
    for panel in query_panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
    # The provider loads the directory the compose file mounts the dashboards into.
    assert "path: /etc/grafana/dashboards" in PROVIDERS.read_text()


def test_every_query_names_only_metrics_we_or_the_sdk_export(dashboard: dict[str, Any]) -> None:
    used: set[str] = set()
    for panel in query_panels(dashboard):
        for target in panel["targets"]:
            names = promql_metric_names(target["expr"])
            assert names, f"{panel['title']}: no metric in {target['expr']}"
            unknown = {name for name in names if not known(name)}
            assert not unknown, f"{panel['title']} queries unknown metrics {sorted(unknown)}"
            used |= names
    # The dashboard shows each of our own metrics somewhere.
    shown = {name.removesuffix("_bucket") for name in used}
    assert ORDERFLOW_METRICS - shown <= {"orderflow_database_up"}, ORDERFLOW_METRICS - shown


def test_the_metric_name_extractor_can_tell() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, step) (rate(orderflow_side_effect_duration_seconds"
        '_bucket{step="a b"}[5m]))) / on (step) group_left sum(up{job=~"x|y"}) or vector(0)'
    )
    assert promql_metric_names(expr) == {"orderflow_side_effect_duration_seconds_bucket", "up"}
    assert not known("orderflow_made_up_total")
    assert known("orderflow_http_request_duration_seconds_count")


@pytest.mark.ci_must_run
def test_every_query_is_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    # promtool parses PromQL only inside rule files: each query becomes a recording rule.
    rules = [
        {"record": f"dashboard:panel_{panel['id']}_{target['refId']}", "expr": target["expr"]}
        for panel in query_panels(dashboard)
        for target in panel["targets"]
    ]
    rule_file = tmp_path / "dashboard_rules.yml"
    # JSON is YAML: no YAML library needed to write it.
    rule_file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run(
        [promtool(), "check", "rules", str(rule_file)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
