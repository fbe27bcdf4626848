"""The alert rules, checked and unit-tested by promtool on synthetic series
(deploy/prometheus/alerts_test.yml), and the Prometheus configuration that loads them."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.e2e.deploy.test_dashboard import DEPLOY, known, promql_metric_names, promtool

PROMETHEUS = DEPLOY / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
ALERTS_TEST = PROMETHEUS / "alerts_test.yml"
CONFIG = PROMETHEUS / "prometheus.yml"
# promtool's tests: CI must run them (tests/conftest.py).
pytestmark = pytest.mark.ci_must_run
REQUIRED_ALERTS = {
    "OrderflowDeadLettersOpen",
    "OrderflowOutboxStalled",
    "OrderflowNoStepSuccesses",
    "OrderflowHighRetryRate",
}


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120
    )


def alert_names() -> set[str]:
    return set(re.findall(r"^\s*- alert:\s*(\w+)", ALERTS.read_text(), re.MULTILINE))


def test_alert_rules_are_valid() -> None:
    checked = run_promtool("check", "rules", ALERTS.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_alert_rules_fire_and_stay_quiet_on_synthetic_series() -> None:
    tested = run_promtool("test", "rules", ALERTS_TEST.name)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_prometheus_config_is_valid_and_loads_the_rules() -> None:
    checked = run_promtool("check", "config", CONFIG.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "alerts.yml" in checked.stdout
    config = CONFIG.read_text()
    assert "job_name: orderflow-api" in config and "job_name: orderflow-worker" in config


def test_every_alert_is_required_or_tested_and_uses_known_metrics() -> None:
    names = alert_names()
    assert names >= REQUIRED_ALERTS
    tested = set(re.findall(r"alertname:\s*(\w+)", ALERTS_TEST.read_text()))
    assert names <= tested, f"alerts without a promtool test: {sorted(names - tested)}"
    # Each expression (single or folded over lines) names metrics that we or the SDK export.
    expressions = re.findall(
        r"^\s*expr:\s*(?:>-\s*\n)?((?:.+\n)+?)\s*(?:for|labels):", ALERTS.read_text(), re.MULTILINE
    )
    assert len(expressions) == len(names)
    for expr in expressions:
        metrics = promql_metric_names(expr)
        assert metrics, expr
        assert all(known(name) for name in metrics), (expr, metrics)
