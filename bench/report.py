"""Turns a bench run's figures into docs/benchmarks.md (tables, ratios, targets) and its plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from core.names import ORDER_WORKFLOW

# Hand-written notes on reading the figures; every report carries them from their first section.
NOTES = Path(__file__).resolve().parent.parent / "docs" / "benchmark-notes.md"

START_MODES = ("request", "background", "outbox")
INTAKE_NAMES = {
    "http_floor": "(a) bare FastAPI 202 (HTTP floor)",
    "temporal_floor": "(b) bare start_workflow (Temporal floor)",
    "orderflow_request": "POST /orders, WORKFLOW_START_MODE=request",
    "orderflow_background": "POST /orders, WORKFLOW_START_MODE=background",
    "orderflow_outbox": "POST /orders, WORKFLOW_START_MODE=outbox",
    "inline": "(c) inline follow-ups (SMTP 200 ms, webhook 300 ms)",
    "celery_peer": "Celery peer intake (charge, row, 2 enqueues)",
    "dbos_peer": "DBOS peer intake (charge, row, durable start; its workflows run alongside)",
}
E2E_NAMES = {
    "bare_workflow": "bare workflow (ceiling)",
    "bare_local_first": "bare local-first workflow (ceiling)",
    "orderflow_1w": "orderflow, 1 worker",
    "orderflow_2w": "orderflow, 2 workers",
    "celery_peer": "Celery peer",
    "dbos_peer": "DBOS peer (one process: API and workflows)",
}
# The targets orderflow is held to, as ratios within one run.
E2E_VS_CELERY = 0.5
E2E_VS_LOCAL_FIRST = 0.8
SERVER_CPU_VS_LOCAL_FIRST = 1.15
WORKER_CPU_MS = 20.0


def _find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def _ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return float("nan")
    return a / b


def _f(value: float, digits: int = 1) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _database(results: dict[str, Any]) -> str:
    """Which database the processes used; runs from before `--database` all used SQLite."""
    database = results.get("database") or {}
    return str(database.get("description") or "SQLite file (WAL), a new file per phase")


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**not met**")


def write(results: dict[str, Any], out: Path, *, label: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(results, out)
    lines = _markdown(results, plots, label)
    (out / "benchmarks.md").write_text("\n".join(lines) + "\n")


def _markdown(results: dict[str, Any], plots: dict[str, str], label: str) -> list[str]:
    m = results["machine"]
    quick = results.get("quick", False)
    sizes = results["sizes"]
    lines = ["# Benchmarks", ""]
    if label:
        lines += [f"> {label}", ""]
    if quick:
        lines += [
            "> **Smoke run** (`python -m bench --quick`): small sizes, to show the harness works "
            "end to end. Its absolute figures are not the project's figures; run `make bench` "
            "for those.",
            "",
        ]
    load = ", ".join(str(x) for x in m.get("load_average_at_start", []))
    lines += [
        f"Run {results['started']} in {results['wall_seconds']:.0f} s wall time. "
        f"Machine: {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}, {m['os']}; "
        f"load average at start {load}. Database: {_database(results)}.",
        "",
        "Versions: "
        + ", ".join(f"{k} {v}" for k, v in m["packages"].items())
        + f"; {m['redis_server'].split(' sha=')[0]}.",
        "",
        "Reproduce: `make bench` (full sizes) or `.venv/bin/python -m bench --quick` (smoke); "
        "`--database postgresql+asyncpg://…` runs each phase on a new PostgreSQL database. "
        "Everything runs as real processes on loopback, on free ports, in a temporary directory: "
        "one Temporal dev server (`temporal server start-dev --headless`, SQLite file with "
        "`journal_mode=wal`, `synchronous=normal`, `OrderStatus` registered), "
        "`python worker.py`, the API under uvicorn, the SMTP and warehouse receivers "
        "(`bench/sinks.py`, the project's `devsinks` with a latency per call), its own "
        "`redis-server` (no persistence) and a Celery worker, and the DBOS peer's one process "
        "(`bench/dbos_peer/`: API and workflows, DBOS's tables in the run's database kind). "
        "Load comes from a separate process "
        "(`bench/loadgen.py`, httpx, bounded in count and time). Each figure below is set "
        "against a floor, a ceiling or the peer measured in the same run.",
        "",
        f"Sizes: {sizes['intake_requests']} requests per intake row "
        f"({sizes['inline_requests_c1']} for the inline handler at c=1, which takes 300 ms each), "
        f"bursts of {', '.join(str(n) for n in sizes['bursts'])} orders, "
        f"{sizes['parked']} parked orders. End-to-end and parked runs use "
        f"`WORKFLOW_START_MODE={results['mode_for_e2e']}`.",
        "",
    ]
    lines += _intake_section(results, plots)
    lines += _e2e_section(results, plots)
    lines += _parked_section(results, plots)
    lines += _history_section(results)
    lines += _footprint_section(results)
    lines += _profile_section(results)
    lines += _targets(results)
    if results.get("notes"):
        lines += ["### Run notes", ""] + [f"- {note}" for note in results["notes"]] + [""]
    if NOTES.exists():
        notes = NOTES.read_text()
        # From the first section on: the page's title and preamble are its own.
        lines += [notes[notes.find("\n## ") + 1 :].rstrip(), ""]
    return lines


def _intake_section(results: dict[str, Any], plots: dict[str, str]) -> list[str]:
    rows = results["intake"]
    if not rows:
        return []
    lines = [
        "## 1. Intake latency",
        "",
        "What the customer waits for. No worker polls the API's task queue during these rows "
        "and no Celery worker consumes the peer's queue, so each row is the request path alone. "
        "The DBOS peer has no worker to leave out: its workflows run in its API process, beside "
        "the requests that started them, and its API CPU per request includes theirs.",
        "",
        "| endpoint | c | requests | p50 ms | p95 ms | p99 ms | req/s | API CPU ms/req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cpu = row.get("api_cpu_ms_per_request")
        lines.append(
            f"| {INTAKE_NAMES.get(row['name'], row['name'])} | {row['concurrency']} | "
            f"{row['count']} | {_f(row['p50'])} | {_f(row['p95'])} | {_f(row['p99'])} | "
            f"{_f(row['rps'])} | {_f(cpu) if cpu is not None else ''} |"
        )
    lines += ["", "Ratios (same run):", "", "| ratio | c=1 | c=16 |", "|---|---:|---:|"]
    for mode in START_MODES:
        cells_floor, cells_inline, cells_peer_rps, cells_peer_p99 = [], [], [], []
        cells_dbos_rps, cells_dbos_p99 = [], []
        for c in (1, 16):
            ours = _find(rows, name=f"orderflow_{mode}", concurrency=c)
            http = _find(rows, name="http_floor", concurrency=c)
            temporal = _find(rows, name="temporal_floor", concurrency=c)
            inline = _find(rows, name="inline", concurrency=c)
            peer = _find(rows, name="celery_peer", concurrency=c)
            floor = (http["p50"] + temporal["p50"]) if http and temporal else None
            cells_floor.append(_ratio(ours["p50"] if ours else None, floor))
            cells_inline.append(
                _ratio(inline["p50"] if inline else None, ours["p50"] if ours else None)
            )
            cells_peer_rps.append(
                _ratio(ours["rps"] if ours else None, peer["rps"] if peer else None)
            )
            cells_peer_p99.append(
                _ratio(ours["p99"] if ours else None, peer["p99"] if peer else None)
            )
            dbos = _find(rows, name="dbos_peer", concurrency=c)
            cells_dbos_rps.append(
                _ratio(ours["rps"] if ours else None, dbos["rps"] if dbos else None)
            )
            cells_dbos_p99.append(
                _ratio(ours["p99"] if ours else None, dbos["p99"] if dbos else None)
            )
        lines += [
            f"| {mode}: p50 ÷ (HTTP floor p50 + Temporal floor p50) | "
            + " | ".join(_f(x, 2) for x in cells_floor)
            + " |",
            f"| {mode}: inline p50 ÷ POST /orders p50 (times faster) | "
            + " | ".join(_f(x, 1) for x in cells_inline)
            + " |",
            f"| {mode}: req/s ÷ Celery peer req/s | "
            + " | ".join(_f(x, 2) for x in cells_peer_rps)
            + " |",
            f"| {mode}: p99 ÷ Celery peer p99 (below 1 is better) | "
            + " | ".join(_f(x, 2) for x in cells_peer_p99)
            + " |",
        ]
        if any(_find(rows, name="dbos_peer", concurrency=c) for c in (1, 16)):
            lines += [
                f"| {mode}: req/s ÷ DBOS peer req/s | "
                + " | ".join(_f(x, 2) for x in cells_dbos_rps)
                + " |",
                f"| {mode}: p99 ÷ DBOS peer p99 (below 1 is better) | "
                + " | ".join(_f(x, 2) for x in cells_dbos_p99)
                + " |",
            ]
    lines.append("")
    if "intake" in plots:
        lines += [f"![intake latency]({plots['intake']})", ""]
    return lines


def _e2e_section(results: dict[str, Any], plots: dict[str, str]) -> list[str]:
    rows = results["e2e"]
    if not rows:
        return []
    names = E2E_NAMES
    lines = [
        "## 2. End-to-end throughput",
        "",
        "A burst of N orders sent at concurrency 16, from the first request until every order is "
        "`completed` (the latest step success recorded in the database; for the bare workflow "
        "the latest close time in Temporal's visibility; for the peer the moment both Redis "
        "completion counters reached N). The bare workflow has OrderWorkflow's shape: one local "
        "activity, then two concurrent activities, all with no-op bodies, started with "
        "`start_workflow` at concurrency 16 on the same server. CPU is user+system of each "
        "process tree over the burst (psutil), from the Temporal server at rest before it until "
        "the server is at rest again after it (its visibility writes trail the last close); "
        'the Celery peer\'s "server" is its redis-server. The bare local-first workflow has the '
        "same shape with each step's first attempt a local activity in the first workflow task "
        "(a regular activity only on failure, which no-op bodies never have). The DBOS peer is "
        "one process, its API and its workflow runner (DBOS runs workflows in the process that "
        "starts them), so all of its CPU is in the API column; on SQLite that includes its "
        "database, and its RSS is in the worker RSS column. Its end is the latest `completed_at` "
        "of its SUCCESS workflows in DBOS's system database. On PostgreSQL the database "
        "server's own CPU is in no column, for any system: DBOS keeps its durable state there, "
        "while the Temporal server (its own SQLite file, counted) keeps orderflow's.",
        "",
        "| system | N | orders/s | drain s | server CPU ms/order | worker CPU ms/order | "
        "API CPU ms/order | all CPU ms/order | worker RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cpu = row["cpu_ms_per_order"]
        lines.append(
            f"| {names.get(row['name'], row['name'])} | {row['n']} | "
            f"{_f(row['orders_per_second'])} | {_f(row['drain_seconds'])} | "
            f"{_cell(cpu, 'server')} | {_cell(cpu, 'worker')} | {_cell(cpu, 'api')} | "
            f"{_f(sum(cpu.values()))} | {_f(row['worker_rss_mib'], 0)} |"
        )
    lines += [
        "",
        "orderflow (1 worker) against each, within the run:",
        "",
        "| N | ÷ bare, orders/s | server CPU per order ÷ bare | ÷ bare local-first, orders/s | "
        "server CPU per order ÷ bare local-first | ÷ Celery peer, orders/s | "
        "÷ DBOS peer, orders/s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sorted({row["n"] for row in rows}):
        ours = _find(rows, name="orderflow_1w", n=n)
        if not ours:
            continue
        cells = []
        for other in ("bare_workflow", "bare_local_first", "celery_peer", "dbos_peer"):
            theirs = _find(rows, name=other, n=n) or {}
            cells.append(_ratio(ours["orders_per_second"], theirs.get("orders_per_second")))
            if other.startswith("bare"):
                cells.append(_server_ratio(ours, theirs))
        lines.append(f"| {n} | " + " | ".join(_f(x, 2) for x in cells) + " |")
    lines.append("")
    if "e2e" in plots:
        lines += [f"![end-to-end throughput]({plots['e2e']})", ""]
    return lines


def _cell(cpu: dict[str, float], group: str) -> str:
    return _f(cpu[group]) if group in cpu else ""


def _server_ratio(ours: dict[str, Any], theirs: dict[str, Any]) -> float:
    return _ratio(
        ours["cpu_ms_per_order"]["server"], theirs.get("cpu_ms_per_order", {}).get("server")
    )


def _parked_section(results: dict[str, Any], plots: dict[str, str]) -> list[str]:
    rows = results["parked"]
    if not rows:
        return []
    lines = [
        "## 3. Cost growth and parked orders",
        "",
        "Throughput and the worker's memory against N are in the table above. Here the warehouse "
        "answers 400 to every call, so each order's `notify_warehouse` is dead-lettered at once "
        "and its workflow waits for an operator (parked). The worker's RSS is sampled as the "
        "parked count grows, with `WORKER_MAX_CACHED_WORKFLOWS` small and at its default.",
        "",
        "| WORKER_MAX_CACHED_WORKFLOWS | parked | worker RSS before MiB | after MiB | growth MiB "
        "| MiB per 100 parked |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        growth = row["rss_end_mib"] - row["rss_start_mib"]
        slope = 100 * growth / row["parked"] if row["parked"] else float("nan")
        lines.append(
            f"| {row['cache']} | {row['parked']}/{row['n']} | {_f(row['rss_start_mib'], 0)} | "
            f"{_f(row['rss_end_mib'], 0)} | {_f(growth, 0)} | {_f(slope, 1)} |"
        )
    lines.append("")
    if "parked" in plots:
        lines += [f"![worker memory with parked orders]({plots['parked']})", ""]
    return lines


def _history_section(results: dict[str, Any]) -> list[str]:
    history = results.get("history") or {}
    if not history.get("bare") or not history.get("orderflow"):
        return []
    columns = [
        (key, title)
        for key, title in (
            ("bare", "bare workflow"),
            ("bare_local_first", "bare local-first"),
            ("orderflow", ORDER_WORKFLOW),
        )
        if history.get(key)
    ]
    kinds = sorted({kind for key, _ in columns for kind in history[key]["by_type"]})
    lines = [
        "## What the server does per order",
        "",
        "Events in one completed workflow's history (the server's work grows with these, and "
        "with the visibility writes that search attributes cause):",
        "",
        "| event | " + " | ".join(title for _, title in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for kind in kinds:
        name = kind.removesuffix("_event_attributes")
        counts = [str(history[key]["by_type"].get(kind, 0)) for key, _ in columns]
        lines.append(f"| {name} | " + " | ".join(counts) + " |")
    totals = [str(history[key]["events"]) for key, _ in columns]
    lines += ["| **total** | " + " | ".join(totals) + " |", ""]
    return lines


def _footprint_section(results: dict[str, Any]) -> list[str]:
    figures = results.get("footprint") or {}
    if not figures:
        return []
    cpu = figures["cpu_ms_per_order"]
    lines = [
        "## What one order leaves behind",
        "",
        f"A burst of {figures['orders']} orders at concurrency 16, one worker, every order "
        "completed; per order: "
        + ", ".join(f"{name} CPU {_f(value)} ms" for name, value in cpu.items())
        + ". Rows and bytes each orderflow table grew by (bytes on disk with its indexes: "
        "SQLite's pages, PostgreSQL's `pg_total_relation_size`), before any retention cleanup:",
        "",
        "| table | rows per order | bytes per order |",
        "|---|---:|---:|",
    ]
    for table, size in figures["tables"].items():
        lines.append(f"| `{table}` | {_f(size['rows'], 2)} | {_f(size['bytes'], 0)} |")
    total = sum(size["bytes"] for size in figures["tables"].values())
    rows = sum(size["rows"] for size in figures["tables"].values())
    lines += [f"| **all** | {_f(rows, 2)} | {_f(total, 0)} |", ""]
    writes = figures.get("database_writes_per_order")
    if writes:
        lines += [
            "PostgreSQL's counters for the phase's database alone, per order: "
            f"{_f(writes['xact_commit'], 2)} transactions committed (the harness's polling "
            f"taken out), {_f(writes['tup_inserted'], 2)} rows inserted, "
            f"{_f(writes['tup_updated'], 2)} updated, {_f(writes['tup_deleted'], 2)} deleted.",
            "",
        ]
    workflows = figures.get("histories", {}).get("workflows", [])
    if workflows:
        lines += [
            f"History of {len(workflows)} of its completed workflows on the server "
            "(`fetch_history` and `describe`):",
            "",
            "| figure | median | min | max |",
            "|---|---:|---:|---:|",
        ]
        for key, title in (
            ("events", "events"),
            ("event_bytes", "bytes of its events (protobuf)"),
            ("history_size_bytes", "history size bytes (the server's count)"),
            ("state_transitions", "state transitions"),
        ):
            values = sorted(row[key] for row in workflows)
            lines.append(f"| {title} | {values[len(values) // 2]} | {values[0]} | {values[-1]} |")
        lines.append("")
    return lines


def _profile_section(results: dict[str, Any]) -> list[str]:
    profiles = results.get("profiles") or {}
    if not profiles:
        return []
    lines = [
        "## Profile (py-spy, largest one-worker burst)",
        "",
        "Share of the samples of active threads in which each of our functions was on the stack "
        "(`python -m bench --profile`; full summaries in `.data/bench/profiles/`).",
        "",
    ]
    for name, summary in profiles.items():
        lines += [
            f"**{name}** ({summary['samples']} samples)",
            "",
            "| function | % |",
            "|---|---:|",
        ]
        for frame, pct in summary["ours"][:12]:
            lines.append(f"| `{frame}` | {pct:.1f} |")
        lines += ["", "Top self time:", "", "| function | % |", "|---|---:|"]
        for frame, pct in summary["self"][:6]:
            lines.append(f"| `{frame}` | {pct:.1f} |")
        lines.append("")
    return lines


def _targets(results: dict[str, Any]) -> list[str]:
    intake, e2e, parked = results["intake"], results["e2e"], results["parked"]
    lines = ["## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
    peer = _find(intake, name="celery_peer", concurrency=16)
    for mode in START_MODES:
        ours = _find(intake, name=f"orderflow_{mode}", concurrency=16)
        if ours and peer:
            ok = ours["rps"] >= peer["rps"] and ours["p99"] <= peer["p99"]
            lines.append(
                f"| intake ≥ Celery peer at c=16 ({mode} mode) | {_f(ours['rps'])} vs "
                f"{_f(peer['rps'])} req/s ({_f(_ratio(ours['rps'], peer['rps']), 2)}x); "
                f"p99 {_f(ours['p99'])} vs {_f(peer['p99'])} ms "
                f"({_f(_ratio(ours['p99'], peer['p99']), 2)}x) | {_verdict(ok)} |"
            )
        ours1 = _find(intake, name=f"orderflow_{mode}", concurrency=1)
        inline = _find(intake, name="inline", concurrency=1)
        if ours1 and inline:
            speedup = _ratio(inline["p50"], ours1["p50"])
            lines.append(
                f"| ≥10x faster than inline at p50, c=1 ({mode} mode) | {_f(speedup)}x | "
                f"{_verdict(speedup >= 10)} |"
            )
    lines += _e2e_targets(e2e)
    for row in e2e:
        if row["name"] != "orderflow_1w":
            continue
        bare = _find(e2e, name="bare_workflow", n=row["n"])
        if not bare:
            continue
        ratio = _ratio(row["orders_per_second"], bare["orders_per_second"])
        cpu = _ratio(row["cpu_ms_per_order"]["server"], bare["cpu_ms_per_order"]["server"])
        lines.append(
            f"| end-to-end ≥ 0.85 of bare, 1 worker, N={row['n']} | {_f(ratio, 2)} | "
            f"{_verdict(None if math.isnan(ratio) else ratio >= 0.85)} |"
        )
        lines.append(
            f"| server CPU per order ≤ 1.15x bare, N={row['n']} | {_f(cpu, 2)}x | "
            f"{_verdict(None if math.isnan(cpu) else cpu <= 1.15)} |"
        )
    small = [row for row in parked if row["cache"] < 1000]
    if small:
        row = small[0]
        growth = row["rss_end_mib"] - row["rss_start_mib"]
        default = _find(parked, cache=1000)
        other = (
            f" (cache 1000: {_f(default['rss_end_mib'] - default['rss_start_mib'], 0)} MiB)"
            if default
            else ""
        )
        # Bounded means the growth stops once the cache is full: compare the last half of the
        # samples, taken after the cache filled, against the first sample after it filled.
        samples = [s for s in row["samples"] if s[0] >= row["cache"]]
        flat = samples[-1][1] - samples[0][1] if len(samples) > 1 else float("nan")
        lines.append(
            f"| no memory growth with parked orders beyond the cache bound "
            f"(cache {row['cache']}) | "
            f"{growth:+.0f} MiB over {row['parked']} parked{other}; "
            f"{flat:+.0f} MiB after the cache filled | "
            f"{_verdict(None if math.isnan(flat) else flat <= 0.05 * row['rss_start_mib'] + 5)} |"
        )
    lines.append("")
    return lines


def _e2e_targets(e2e: list[dict[str, Any]]) -> list[str]:
    """The end-to-end targets, per burst size: against the Celery peer, the bare local-first
    ceiling (throughput and server CPU), the worker's own CPU, and the DBOS peer (reported)."""
    lines = []
    for row in e2e:
        if row["name"] != "orderflow_1w":
            continue
        n, rate = row["n"], row["orders_per_second"]
        celery = _find(e2e, name="celery_peer", n=n)
        if celery:
            ratio = _ratio(rate, celery["orders_per_second"])
            lines.append(
                f"| end-to-end ≥ {E2E_VS_CELERY} of the Celery peer, 1 worker, N={n} | "
                f"{_f(ratio, 2)} ({_f(rate)} vs {_f(celery['orders_per_second'])} orders/s) | "
                f"{_at_least(ratio, E2E_VS_CELERY)} |"
            )
        local_first = _find(e2e, name="bare_local_first", n=n)
        if local_first:
            ratio = _ratio(rate, local_first["orders_per_second"])
            lines.append(
                f"| end-to-end ≥ {E2E_VS_LOCAL_FIRST} of bare local-first, 1 worker, N={n} | "
                f"{_f(ratio, 2)} ({_f(rate)} vs {_f(local_first['orders_per_second'])} "
                f"orders/s) | {_at_least(ratio, E2E_VS_LOCAL_FIRST)} |"
            )
            cpu = _server_ratio(row, local_first)
            lines.append(
                f"| server CPU per order ≤ {SERVER_CPU_VS_LOCAL_FIRST}x bare local-first, "
                f"N={n} | {_f(cpu, 2)}x ({_f(row['cpu_ms_per_order']['server'])} vs "
                f"{_f(local_first['cpu_ms_per_order']['server'])} ms) | "
                f"{_at_most(cpu, SERVER_CPU_VS_LOCAL_FIRST)} |"
            )
        worker = row["cpu_ms_per_order"].get("worker", float("nan"))
        lines.append(
            f"| worker CPU per order ≤ {WORKER_CPU_MS:.0f} ms, N={n} | {_f(worker)} ms | "
            f"{_at_most(worker, WORKER_CPU_MS)} |"
        )
        dbos = _find(e2e, name="dbos_peer", n=n)
        if dbos:
            ratio = _ratio(rate, dbos["orders_per_second"])
            lines.append(
                f"| end-to-end ÷ DBOS peer, 1 worker, N={n} (reported) | {_f(ratio, 2)} "
                f"({_f(rate)} vs {_f(dbos['orders_per_second'])} orders/s) | reported |"
            )
    return lines


def _at_least(value: float, bound: float) -> str:
    return _verdict(None if math.isnan(value) else value >= bound)


def _at_most(value: float, bound: float) -> str:
    return _verdict(None if math.isnan(value) else value <= bound)


def _plots(results: dict[str, Any], out: Path) -> dict[str, str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    made: dict[str, str] = {}

    if results["intake"]:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
        for ax, c in zip(axes, (1, 16), strict=True):
            rows = [r for r in results["intake"] if r["concurrency"] == c]
            labels = [r["name"].replace("orderflow_", "POST /orders\n") for r in rows]
            x = range(len(rows))
            ax.bar([i - 0.2 for i in x], [r["p50"] for r in rows], 0.4, label="p50")
            ax.bar([i + 0.2 for i in x], [r["p99"] for r in rows], 0.4, label="p99")
            ax.set_xticks(list(x), labels, rotation=30, ha="right", fontsize=8)
            ax.set_yscale("log")
            ax.set_title(f"intake latency, concurrency {c}")
            ax.grid(axis="y", alpha=0.3)
        axes[0].set_ylabel("ms (log scale)")
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(out / "bench-intake.png", dpi=110)
        plt.close(fig)
        made["intake"] = "bench-intake.png"

    if results["e2e"]:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
        for name, marker in (
            ("bare_workflow", "o"),
            ("bare_local_first", "P"),
            ("orderflow_1w", "s"),
            ("orderflow_2w", "D"),
            ("celery_peer", "^"),
            ("dbos_peer", "v"),
        ):
            rows = sorted((r for r in results["e2e"] if r["name"] == name), key=lambda r: r["n"])
            if not rows:
                continue
            ns = [r["n"] for r in rows]
            left.plot(ns, [r["orders_per_second"] for r in rows], marker=marker, label=name)
            right.plot(ns, [r["worker_rss_mib"] for r in rows], marker=marker, label=name)
        left.set_xlabel("orders in the burst (N)")
        left.set_ylabel("orders completed per second")
        left.set_title("end-to-end throughput")
        right.set_xlabel("orders in the burst (N)")
        right.set_ylabel("worker RSS after the burst, MiB")
        right.set_title("worker memory")
        for ax in (left, right):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "bench-e2e.png", dpi=110)
        plt.close(fig)
        made["e2e"] = "bench-e2e.png"

    if results["parked"]:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for row in results["parked"]:
            samples = row["samples"]
            ax.plot(
                [s[0] for s in samples],
                [s[1] for s in samples],
                marker=".",
                label=f"WORKER_MAX_CACHED_WORKFLOWS={row['cache']}",
            )
            if row["cache"] < row["n"]:
                ax.axvline(row["cache"], linestyle=":", color="grey")
        ax.set_xlabel("parked orders (open dead letters)")
        ax.set_ylabel("worker RSS, MiB")
        ax.set_title("worker memory with parked orders")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "bench-parked.png", dpi=110)
        plt.close(fig)
        made["parked"] = "bench-parked.png"
    return made
