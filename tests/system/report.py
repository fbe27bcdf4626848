"""Renders the system suite's last run (test-output/system: run.json, and one <scenario>.json of
figures per scenario that finished) into docs/reliability.md, between its markers. `make
test-system` runs it after the suite, whether the suite passed or not; `python -m
tests.system.report` runs it alone.

The rendered block always says which run it shows: its date and the commit it ran, or that the
suite did not run (skipped, and why). A scenario the run did not select reads "not run", one that
failed reads "failed": no figure of an earlier run is ever shown as this one's."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "test-output" / "system"
RUN = RESULTS / "run.json"
DOC = ROOT / "docs" / "reliability.md"
DOC_PATH = "docs/reliability.md"
START, END = "<!-- system-results:start -->", "<!-- system-results:end -->"
# Numbered from the simplest fault to the compound ones, the order the table reads in.
SCENARIOS = [
    ("1", "duplicate_storm", "Duplicate storm"),
    ("2", "workers_killed", "Workers SIGKILLed mid-stream"),
    ("3", "temporal_killed", "Temporal server SIGKILLed, restarted on its file"),
    ("4", "api_killed_after_commit", "API killed between commit and workflow start"),
    ("5a", "warehouse_outage", "Warehouse outage inside the time budget"),
    ("5b", "warehouse_outage_over_budget", "Warehouse outage longer than the budget, bulk retry"),
    ("6", "poison_sku", "Poison SKU (warehouse answers 400)"),
    ("7", "links_cut", "Database link cut, then Temporal link cut"),
    ("8", "worker_link_cut", "One worker's link to Temporal cut while it holds tasks"),
    ("9", "rush", "A rush onto one worker"),
]
PASSED, FAILED = "passed", "failed"
COLUMNS = 10


@dataclass
class Run:
    """What the suite's session says of itself: when it started, on which commit, whether it was
    skipped (and why), and how each scenario it ran ended."""

    started_at: str
    commit: str
    skipped: str | None = None
    # Why the suite could not set itself up (no scenario ran).
    setup_failed: str | None = None
    outcomes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def begin(cls) -> Run:
        return cls(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), source_commit())

    def save(self, path: Path = RUN) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path = RUN) -> Run | None:
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))


def source_commit() -> str:
    """HEAD's short hash, marked `+changes` when the working tree differs from it (the rendered
    report aside), so a run of uncommitted code never passes for a run of the commit."""
    try:
        head = _git("rev-parse", "--short=10", "HEAD")
        changed = _git("status", "--porcelain", "--", ".", f":(exclude){DOC_PATH}")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head}+changes" if changed else head


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
    )
    return done.stdout.strip()


def headline(run: Run | None) -> str:
    if run is None:
        return (
            "**Not run**: test-output/system holds no run of the system suite on this machine "
            "(`make test-system`)."
        )
    if run.skipped is not None:
        return (
            f"**Not run** on {run.started_at} at commit `{run.commit}`: the system suite was "
            f"skipped ({run.skipped}). No figures are shown: none are of this code."
        )
    if run.setup_failed is not None:
        return (
            f"**Failed** on {run.started_at} at commit `{run.commit}` before its first scenario: "
            f"{run.setup_failed}"
        )
    if not run.outcomes:
        return (
            f"**No scenario ran** on {run.started_at} at commit `{run.commit}` (the suite's "
            "set-up failed, or the run selected none)."
        )
    failed = [name for name, outcome in run.outcomes.items() if outcome == FAILED]
    verdict = f"**{len(failed)} failed**" if failed else "every scenario it ran passed"
    return f"Run on {run.started_at} at commit `{run.commit}`: {verdict}."


def render(results: dict[str, dict[str, Any]], run: Run | None = None) -> str:
    lines = [
        headline(run),
        "",
        "| # | scenario | injected | checked | orders | receipts (repeats) | webhooks "
        "(repeats) | dead letters open | time to drain | recorded |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    if run is None or run.skipped is not None or run.setup_failed is not None:
        results = {}
    outcomes = run.outcomes if run is not None else {}
    numbered = SCENARIOS + [
        (name, name, name.replace("_", " ").capitalize())
        for name in sorted(set(results) | set(outcomes))
        if name not in {scenario for _, scenario, _ in SCENARIOS}
    ]
    shown = []
    for number, name, title in numbered:
        result = results.get(name)
        outcome = outcomes.get(name)
        if outcome == FAILED:
            lines.append(_row(number, title, "**failed** (its figures are not shown)"))
        elif run is not None and outcome != PASSED:
            lines.append(_row(number, title, "not run"))
        elif result is None:
            lines.append(
                _row(number, title, "passed; no figures recorded" if outcome else "not run")
            )
        else:
            shown.append((number, result))
            lines.append(
                _row(
                    number,
                    title,
                    result["injected"],
                    result["checked"],
                    result["orders"],
                    f"{result['receipts']} ({result['receipt_repeats']})",
                    f"{result['webhooks']} ({result['webhook_repeats']})",
                    result["dead_letters"],
                    f"{result['drain_seconds']} s",
                    result["recorded_at"],
                )
            )
    if shown:
        lines += ["", "Details of the same run:", ""]
    for number, result in shown:
        details = {"client saw (HTTP status: count; 0 = no answer)": result["answers"]}
        details.update(result.get("extra", {}))
        histogram = details.pop("attempt_histogram", None)
        rendered = "; ".join(f"{key}: {_plain(value)}" for key, value in details.items())
        lines.append(f"- **{number}** {rendered}")
        if histogram:
            width = details.get("histogram_bucket_seconds", 1)
            lines += ["", f"  Webhook attempts per {width} s from the start of the outage:", ""]
            lines += ["  ```"]
            peak = max(histogram) or 1
            for bucket, attempts in enumerate(histogram):
                bar = "#" * max(1 if attempts else 0, round(40 * attempts / peak))
                lines.append(f"  {bucket * width:>4}s {attempts:>5} {bar}")
            lines += ["  ```", ""]
    return "\n".join(lines)


def _row(*cells: object) -> str:
    padded = [str(cell) for cell in cells] + [""] * (COLUMNS - len(cells))
    return "| " + " | ".join(padded) + " |"


def _plain(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_plain(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_plain(v) for v in value)
    return str(value)


def load_results(results: Path = RESULTS) -> dict[str, dict[str, Any]]:
    loaded = {}
    for path in sorted(results.glob("*.json")):
        if path == results / RUN.name:
            continue
        result = json.loads(path.read_text())
        loaded[result["scenario"]] = result
    return loaded


def write(doc: Path, results: dict[str, dict[str, Any]], run: Run | None) -> None:
    text = doc.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    doc.write_text(f"{head}{START}\n{render(results, run)}\n{END}{tail}")


def main() -> int:
    run = Run.load()
    write(DOC, load_results(), run)
    print(f"{DOC_PATH}: {headline(run)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
