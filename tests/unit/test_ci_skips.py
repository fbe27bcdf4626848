"""With CI set, a skipped test that CI must run (the system suite, the browser, promtool and
docker-compose tests) fails the run; other skips stay skips, and outside CI nothing changes. Run
for real: pytest in a subprocess with the suite's hook (tests/ci.py) as its plugin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

TESTS = """
import pytest

@pytest.mark.ci_must_run
def test_needs_a_binary():
    pytest.skip("the binary is not installed")

@pytest.fixture
def server():
    pytest.skip("the server is unreachable")

@pytest.mark.ci_must_run
def test_needs_a_server(server):
    pass

def test_optional():
    pytest.skip("PostgreSQL only")

@pytest.mark.ci_must_run
@pytest.mark.xfail(reason="known")
def test_expected_to_fail():
    raise AssertionError
"""


def run_pytest(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_skips.py").write_text(TESTS)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(ROOT)
    # The suite's hook as a plugin; the markers it uses are registered in pyproject.toml.
    options = ["-p", "tests.ci", "-p", "no:cacheprovider", "-rA", "-q"]
    unregistered = ["-W", "ignore::pytest.PytestUnknownMarkWarning"]
    return subprocess.run(
        [sys.executable, "-m", "pytest", *options, *unregistered, str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_with_ci_set_a_skip_of_a_test_ci_must_run_fails_the_run(tmp_path: Path) -> None:
    run = run_pytest(tmp_path, "true")

    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 failed" in run.stdout and "1 error" in run.stdout, run.stdout
    assert "1 skipped" in run.stdout and "1 xfailed" in run.stdout, run.stdout
    assert "CI must run this test (ci_must_run): Skipped: the binary is not installed" in run.stdout
    assert "CI must run this test (ci_must_run): Skipped: the server is unreachable" in run.stdout


@pytest.mark.parametrize("ci", [None, "false"])
def test_outside_ci_the_skips_stay_skips(tmp_path: Path, ci: str | None) -> None:
    run = run_pytest(tmp_path, ci)

    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 skipped" in run.stdout and "1 xfailed" in run.stdout, run.stdout
