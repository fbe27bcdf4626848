"""No silent skip in CI: with `CI` set, a test marked `ci_must_run` (the system suite, the
browser tests, the promtool and docker-compose tests) that is skipped fails the run instead.
tests/conftest.py takes the hook from here; the module stays light, so a test can load it alone
as a plugin."""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

# The marker of a test that CI must run: skipped with CI set, it fails the run instead (the
# system suite, the browser tests, the promtool and docker-compose tests).
CI_MUST_RUN = "ci_must_run"


def in_ci() -> bool:
    """CI is set, as CI services and .ci/run set it (`CI=false` or `CI=0` is not CI)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """In CI a skip of a test CI must run is a failure: a missing binary, an unreachable server or
    a skipping fixture would otherwise leave the run green with whole suites unrun."""
    report = yield
    if (
        report.skipped
        and not hasattr(report, "wasxfail")
        and in_ci()
        and item.get_closest_marker(CI_MUST_RUN) is not None
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped, but CI must run this test ({CI_MUST_RUN}): {reason}"
    return report
