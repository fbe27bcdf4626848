"""Renders the system suite's results (test-output/system/*.json, one per scenario) into the
table of docs/reliability.md, between its markers. `make test-system` runs it after the suite;
`python -m tests.system.report` runs it alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "test-output" / "system"
DOC = ROOT / "docs" / "reliability.md"
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


def render(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| # | scenario | injected | checked | orders | receipts (repeats) | webhooks "
        "(repeats) | dead letters open | time to drain | recorded |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for number, name, title in SCENARIOS:
        result = results.get(name)
        if result is None:
            lines.append(f"| {number} | {title} | not run | | | | | | | |")
            continue
        lines.append(
            f"| {number} | {title} | {result['injected']} | {result['checked']} | "
            f"{result['orders']} | {result['receipts']} ({result['receipt_repeats']}) | "
            f"{result['webhooks']} ({result['webhook_repeats']}) | {result['dead_letters']} | "
            f"{result['drain_seconds']} s | {result['recorded_at']} |"
        )
    lines += ["", "Details of the same run:", ""]
    for number, name, _title in SCENARIOS:
        result = results.get(name)
        if result is None:
            continue
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


def _plain(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_plain(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_plain(v) for v in value)
    return str(value)


def main() -> int:
    results = {}
    for path in sorted(RESULTS.glob("*.json")):
        result = json.loads(path.read_text())
        results[result["scenario"]] = result
    if not results:
        # The suite was skipped (no PostgreSQL) or selected nothing: the last table stays.
        print(f"no system suite results in {RESULTS}; docs/reliability.md left as it was")
        return 0
    doc = DOC.read_text()
    head, _, rest = doc.partition(START)
    _, _, tail = rest.partition(END)
    DOC.write_text(f"{head}{START}\n{render(results)}\n{END}{tail}")
    print(f"wrote the results of {len(results)} scenarios into {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
