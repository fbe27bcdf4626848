"""The system suite's report never shows an earlier run as the current one: it names the run's
date and commit, and a skipped suite, a failed scenario or one the run did not select shows no
figures at all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.system.report import END, SCENARIOS, START, Run, write

OLD_ROW = (
    "| 1 | Duplicate storm | an old run's storm | old | 1 | 1 (0) | 1 (0) | 0 | 0.0 s | then |"
)


def figures(scenario: str, orders: int) -> dict[str, Any]:
    return {
        "scenario": scenario,
        "injected": f"{scenario}-figures",
        "checked": "invariants",
        "orders": orders,
        "receipts": orders,
        "receipt_repeats": 0,
        "webhooks": orders,
        "webhook_repeats": 0,
        "dead_letters": 0,
        "drain_seconds": 1.5,
        "recorded_at": "2026-12-07 10:00:00 UTC",
        "answers": {"202": orders},
        "extra": {},
    }


@pytest.fixture
def doc(tmp_path: Path) -> Path:
    """A reliability page whose table still holds an earlier run."""
    page = tmp_path / "reliability.md"
    page.write_text(f"# Reliability\n\n{START}\n{OLD_ROW}\n{END}\n\nAfter the table.\n")
    return page


def block(doc: Path) -> str:
    return doc.read_text().partition(START)[2].partition(END)[0]


def test_a_skipped_suite_reads_not_run_with_its_date_and_commit(doc: Path) -> None:
    run = Run("2026-12-07 10:00 UTC", "abc1234567", skipped="nothing listens at 127.0.0.1:5432")

    write(doc, {"duplicate_storm": figures("duplicate_storm", 1)}, run)

    shown = block(doc)
    assert shown.startswith("\n**Not run** on 2026-12-07 10:00 UTC at commit `abc1234567`")
    assert "nothing listens at 127.0.0.1:5432" in shown
    assert "old run" not in shown and "-figures" not in shown
    assert shown.count("| not run |") == len(SCENARIOS)
    assert doc.read_text().endswith(f"{END}\n\nAfter the table.\n")


def test_no_run_on_record_reads_not_run(doc: Path) -> None:
    write(doc, {"duplicate_storm": figures("duplicate_storm", 1)}, None)

    shown = block(doc)
    assert shown.startswith("\n**Not run**")
    assert "old run" not in shown and "-figures" not in shown


def test_a_run_names_its_commit_and_shows_only_the_scenarios_that_passed(doc: Path) -> None:
    run = Run(
        "2026-12-07 10:00 UTC",
        "abc1234567+changes",
        outcomes={"duplicate_storm": "passed", "workers_killed": "failed"},
    )
    results = {
        "duplicate_storm": figures("duplicate_storm", 1),
        # A scenario that recorded its figures and then failed an assertion.
        "workers_killed": figures("workers_killed", 300),
        # Left over from some other run: this run did not select it.
        "poison_sku": figures("poison_sku", 100),
    }

    write(doc, results, run)

    shown = block(doc)
    assert shown.startswith(
        "\nRun on 2026-12-07 10:00 UTC at commit `abc1234567+changes`: **1 failed**."
    )
    lines = shown.splitlines()
    assert "| 1 | Duplicate storm | duplicate_storm-figures |" in "\n".join(lines)
    [killed] = [line for line in lines if line.startswith("| 2 |")]
    assert "**failed**" in killed and "workers_killed-figures" not in shown
    [poison] = [line for line in lines if line.startswith("| 6 |")]
    assert "not run" in poison and "poison_sku-figures" not in shown
    assert "old run" not in shown


def test_a_scenario_the_table_does_not_know_yet_is_shown_too(doc: Path) -> None:
    run = Run("2026-12-07 10:00 UTC", "abc1234567", outcomes={"stampede": "passed"})

    write(doc, {"stampede": figures("stampede", 2000)}, run)

    assert "| stampede | Stampede | stampede-figures | invariants | 2000 |" in block(doc)
