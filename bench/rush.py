"""The rush: what a burst of customers costs the customers and the effects, with the shipped
settings. One Temporal dev server on a file, one worker, one API under uvicorn, receivers that
take SMTP_MS / HTTP_MS per call and count every call per key before any de-duplication.

Phases, in one run, after a warm-up:
0. sequential: SEQUENTIAL orders from one customer after another, while the worker settles the
   earlier ones: the intake's latency at rest.
1. rush: ORDERS orders from CLIENTS clients while the worker drains them; every tenth is refused
   twice first (SMTP 451, warehouse 503). The 202's latencies, the drain curve (orders settled
   per 10 s window), repeated effects, workflow task timeouts.
2. refused: REFUSED orders whose warehouse answers 400: every one must park, with no call
   after its 400.
3. floor: the same clients and count against the same API with the worker stopped: the intake's
   own latency, with nothing draining beside it.

    python -m bench.rush [--database postgresql+asyncpg://...] [--orders 1200] [--refused 600]
                         [--set NAME=VALUE ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.databases import Databases
from bench.procs import ROOT, Proc, Stack, base_env, compile_project, free_port, python, tool
from bench.procs import wait_port as wait_for_port
from core.metrics import LOOP_LAG_METRIC
from core.settings import Settings

SECRET = "bench-webhook-secret"
WINDOW_SECONDS = 10.0
WARM_UP = 20
POLL_SECONDS = 0.5
# Lines of the worker's log that tell of an overloaded worker (the SDK's own words).
OVERLOAD_SIGNS = {
    "slow_workflow_tasks": "Workflow task duration exceeded",
    "activity_not_found": "not found on completion",
    "untracked_local_activity": "untracked local activity",
    "tracebacks": "Traceback (most recent call last)",
}


@dataclass
class Phase:
    name: str
    orders: int
    latencies_ms: list[float] = field(default_factory=list)
    answers: dict[str, int] = field(default_factory=dict)
    drain_seconds: float | None = None
    windows: list[int] = field(default_factory=list)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    # The worker's gauges sampled meanwhile: slots in use by kind, its loop's lag.
    worker: dict[str, dict[str, float]] = field(default_factory=dict)

    def latency(self) -> dict[str, float]:
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return {}

        def at(q: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

        return {"p50": at(0.5), "p95": at(0.95), "p99": at(0.99), "max": round(ordered[-1], 1)}

    def steadiness(self) -> float | None:
        """The slowest window over the median one, among the windows while work remained (the
        last, partial window left out)."""
        busy = self.windows[:-1]
        if len(busy) < 2:
            return None
        median = statistics.median(busy)
        return round(min(busy) / median, 2) if median else 0.0


class Rush:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        # Each run's logs alone: the worker's is read for the overload signs.
        shutil.rmtree(ROOT / ".data" / "bench-rush" / "logs", ignore_errors=True)
        self.stack = Stack(ROOT / ".data" / "bench-rush", base_env())
        self.databases = Databases(workdir, args.database)
        self.overrides = dict(item.split("=", 1) for item in args.set)
        self.queue = f"rush-{uuid.uuid4().hex[:6]}"
        self.niceness = int(
            self.overrides.get("WORKER_NICENESS", Settings.model_fields["WORKER_NICENESS"].default)
        )

    def run(self) -> dict[str, Any]:
        compile_project()
        self.start_temporal()
        self.start_sinks()
        self.db = self.databases.fresh("rush")
        env = self.env()
        self.worker = self.start_worker(env)
        self.api, self.url = self.serve(env)
        results: dict[str, Any] = {
            "settings": self.overrides,
            "database": self.databases.info["backend"],
            "orders": self.args.orders,
            "clients": self.args.clients,
        }
        # A warm worker: its first workflows import the sandbox's modules.
        self.burst("warm-up", WARM_UP, [], "completed", clients=4)
        # At rest: one customer after another while the worker settles the earlier orders.
        sequential = self.burst("sequential", self.args.sequential, [], "completed", clients=1)
        rush = self.burst("rush", self.args.orders, ["--flaky-every", "10"], "completed")
        refused = self.burst("refused", self.args.refused, ["--poison"], "needs_attention")
        results["task_timeouts"] = self.loadgen(["task-timeouts", "--queue", self.queue])
        log = self.worker.log.read_text(errors="replace")
        results["worker_log"] = {name: log.count(sign) for name, sign in OVERLOAD_SIGNS.items()}
        results["worker_log_lines"] = log.count("\n")
        self.stack.stop(self.worker)
        floor = self.phase("floor", self.args.orders, [])
        results["counts"] = self.counts()
        results["repeats"] = self.repeats(results["counts"].pop("repeated"), log)
        for phase in (sequential, rush, refused, floor):
            results[phase.name] = {
                "latency_ms": phase.latency(),
                "answers": phase.answers,
                "drain_seconds": phase.drain_seconds,
                "windows": phase.windows,
                "slowest_window_over_median": phase.steadiness(),
                "cpu_seconds": phase.cpu_seconds,
                "worker": phase.worker,
            }
        return results

    # ---- processes --------------------------------------------------------------------------

    def start_temporal(self) -> None:
        self.temporal_port = free_port()
        self.temporal = self.stack.start(
            "temporal",
            [
                # As `make run` starts it: below the API, like the worker (WORKER_NICENESS).
                "nice",
                "-n",
                str(self.niceness),
                tool("temporal"),
                "server",
                "start-dev",
                "--headless",
                "--ip",
                "127.0.0.1",
                "--port",
                str(self.temporal_port),
                "--http-port",
                str(free_port()),
                "--metrics-port",
                str(free_port()),
                "--db-filename",
                str(self.workdir / "temporal.db"),
                "--sqlite-pragma",
                "journal_mode=wal",
                "--sqlite-pragma",
                "synchronous=normal",
                "--search-attribute",
                "OrderStatus=Keyword",
                "--log-level",
                "error",
            ],
            port=self.temporal_port,
        )

    def start_sinks(self) -> None:
        self.smtp_port, self.http_port = free_port(), free_port()
        self.stack.start(
            "rush-sinks",
            python(
                "-m",
                "bench.rush_sinks",
                "--smtp-port",
                str(self.smtp_port),
                "--http-port",
                str(self.http_port),
                "--smtp-latency-ms",
                str(self.args.smtp_ms),
                "--http-latency-ms",
                str(self.args.http_ms),
            ),
            port=self.http_port,
        )
        wait_for_port(self.smtp_port)

    def env(self) -> dict[str, str]:
        return {
            "ORDERFLOW_ENV": "dev",
            "API_KEYS": "",
            "ADMIN_API_KEYS": "",
            "DATABASE_URL": self.db,
            "TEMPORAL_ADDRESS": f"127.0.0.1:{self.temporal_port}",
            "TEMPORAL_TASK_QUEUE": self.queue,
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(self.smtp_port),
            "WAREHOUSE_WEBHOOK_URL": f"http://127.0.0.1:{self.http_port}/webhooks/orders",
            "WEBHOOK_SIGNING_SECRET": SECRET,
            **self.overrides,
        }

    def start_worker(self, env: dict[str, str]) -> Proc:
        port = free_port()
        self.worker_metrics = f"http://127.0.0.1:{port}/metrics"
        proc = self.stack.start(
            "worker",
            python("worker.py"),
            env={**env, "WORKER_METRICS_ADDRESS": f"127.0.0.1:{port}"},
        )
        wait_for_port(port, proc=proc.popen)
        return proc

    def worker_gauges(self) -> dict[str, float]:
        """The worker's slots in use by kind and its loop's lag, from its metrics endpoint."""
        gauges: dict[str, float] = {}
        try:
            text = httpx.get(self.worker_metrics, timeout=5).text
        except httpx.HTTPError:
            return gauges
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("temporal_worker_task_slots_used"):
                    kind = sample.labels.get("worker_type", "")
                    gauges[f"used_{kind}"] = gauges.get(f"used_{kind}", 0) + sample.value
                elif sample.name.startswith(LOOP_LAG_METRIC):
                    gauges["loop_lag"] = sample.value
        return gauges

    def serve(self, env: dict[str, str]) -> tuple[Proc, str]:
        port = free_port()
        argv = python(
            "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port),
            "--no-access-log",
        )  # fmt: skip
        return self.stack.start("api", argv, env=env, port=port), f"http://127.0.0.1:{port}/orders"

    def loadgen(self, args: list[str]) -> dict[str, Any]:
        completed = subprocess.run(
            python("-m", "bench.loadgen", *args),
            cwd=ROOT,
            env={**base_env(), **self.env()},
            capture_output=True,
            text=True,
            timeout=1800,
            check=True,
        )
        result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
        return result

    def counts(self) -> dict[str, Any]:
        answer = httpx.get(f"http://127.0.0.1:{self.http_port}/rush/counts", timeout=30)
        raw = answer.json()
        receipts_twice = sum(1 for n in raw["mail_accepted"].values() if n > 1)
        webhooks_twice = sum(1 for n in raw["webhook_taken"].values() if n > 1)
        return {
            "receipts": sum(raw["mail_accepted"].values()),
            "receipts_delivered_more_than_once": receipts_twice,
            "webhooks_taken": sum(raw["webhook_taken"].values()),
            "webhooks_taken_more_than_once": webhooks_twice,
            "webhook_calls": sum(raw["webhook_calls"].values()),
            "refused_for_good": raw["webhook_refused_for_good"],
            "calls_after_a_refusal": sum(raw["webhook_calls_after_refusal"].values()),
            "repeated": raw["repeated"],
        }

    def repeats(self, repeated: dict[str, list[str]], log: str) -> list[dict[str, Any]]:
        """For each effect taken more than once: its claims as the ledger logged them, and the
        worker's log lines about its order."""
        details = []
        for key, tokens in repeated.items():
            order_id = re.search(r"ord_[0-9a-f]{32}", key)
            found = order_id.group(0) if order_id else key
            quoted = ", ".join(f"'{t}'" for t in tokens if t) or "''"
            claims = self.databases.scalar(
                self.db,
                "SELECT count(*) FROM interrupted_claims "
                f"WHERE order_id = '{found}' OR token IN ({quoted})",
            )
            lines = [line[:400] for line in log.splitlines() if found in line]
            details.append({"key": key, "tokens": tokens, "claims": claims, "log": lines[-12:]})
        return details

    # ---- phases -----------------------------------------------------------------------------

    def settled(self, status: str) -> int:
        return int(
            self.databases.scalar(self.db, f"SELECT count(*) FROM orders WHERE status = '{status}'")
        )

    def phase(self, name: str, count: int, body: list[str]) -> Phase:
        """Places `count` orders from the clients; returns the answers' latencies."""
        phase = Phase(name, count)
        load = self.loadgen(
            ["http", self.url, "--count", str(count), "--concurrency", str(self.args.clients),
             "--warmup", "0", "--deadline", "900", *body]
        )  # fmt: skip
        phase.latencies_ms = load["latencies_ms"]
        phase.answers = load["outcomes"]
        return phase

    def burst(
        self, name: str, count: int, body: list[str], status: str, *, clients: int | None = None
    ) -> Phase:
        """A phase whose orders the worker settles meanwhile: polls how many reached `status`
        every POLL_SECONDS until all have, and counts them per WINDOW_SECONDS."""
        groups = {"temporal": [self.temporal], "worker": [self.worker], "api": [self.api]}
        before = {k: sum(p.cpu_seconds() for p in v) for k, v in groups.items()}
        already = self.settled(status)
        started = time.monotonic()
        load = subprocess.Popen(
            python("-m", "bench.loadgen", "http", self.url, "--count", str(count),
                   "--concurrency", str(clients or self.args.clients), "--warmup", "0",
                   "--deadline", "900", *body),
            cwd=ROOT, env={**base_env(), **self.env()}, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        samples: list[tuple[float, int]] = []
        gauges: list[dict[str, float]] = []
        deadline = started + self.args.deadline
        while time.monotonic() < deadline:
            done = self.settled(status) - already
            samples.append((time.monotonic() - started, done))
            gauges.append(self.worker_gauges())
            if done >= count and load.poll() is not None:
                break
            time.sleep(POLL_SECONDS)
        output, _ = load.communicate(timeout=900)
        result = json.loads(output.strip().splitlines()[-1])
        after = {k: sum(p.cpu_seconds() for p in v) for k, v in groups.items()}
        phase = Phase(name, count, result["latencies_ms"], result["outcomes"])
        phase.cpu_seconds = {k: round(after[k] - before[k], 1) for k in groups}
        if samples and samples[-1][1] >= count:
            phase.drain_seconds = round(samples[-1][0], 1)
        phase.windows = windows(samples)
        for gauge in sorted({key for sample in gauges for key in sample}):
            values = [sample[gauge] for sample in gauges if gauge in sample]
            phase.worker[gauge] = {
                "mean": round(statistics.fmean(values), 3),
                "max": round(max(values), 3),
            }
        print(f"{name}: {json.dumps(phase.latency())} drain {phase.drain_seconds} s "
              f"windows {phase.windows}", flush=True)  # fmt: skip
        return phase


def windows(samples: list[tuple[float, int]]) -> list[int]:
    """Orders settled in each WINDOW_SECONDS from the start, up to the last sample."""
    counts: list[int] = []
    last = 0
    edge = WINDOW_SECONDS
    for at, done in samples:
        while at >= edge:
            counts.append(last - sum(counts))
            edge += WINDOW_SECONDS
        last = done
    counts.append(last - sum(counts))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", help="a PostgreSQL URL; default a SQLite file")
    parser.add_argument("--orders", type=int, default=1200)
    parser.add_argument("--refused", type=int, default=600)
    parser.add_argument("--sequential", type=int, default=200)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--smtp-ms", type=int, default=150)
    parser.add_argument("--http-ms", type=int, default=250)
    parser.add_argument("--deadline", type=float, default=600)
    parser.add_argument("--set", action="append", default=[], help="NAME=VALUE for every process")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--keep", type=float, default=0, help="seconds to keep the stack up after the run"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="orderflow-rush-") as tmp:
        rush = Rush(args, Path(tmp))
        try:
            results = rush.run()
            if args.keep:
                print(f"keeping Temporal at 127.0.0.1:{rush.temporal_port}, {rush.db}", flush=True)
                time.sleep(args.keep)
        finally:
            rush.stack.close()
            rush.databases.close()
    out = args.out or ROOT / ".data" / "bench-rush" / f"rush-{results['database']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(summary(results))
    print(f"figures: {out}")


def summary(results: dict[str, Any]) -> str:
    """The run in a few lines: what a customer waited, what the worker did with the backlog."""
    floor = results["floor"]["latency_ms"]
    lines = [
        f"rush on {results['database']}, {results['clients']} customers, settings "
        f"{results['settings'] or 'shipped'}",
        "| phase | orders | 202 p50 ms | p99 ms | p50 / floor p50 | drain s | settled per 10 s "
        "| slowest / median window |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name in ("sequential", "rush", "refused", "floor"):
        phase = results[name]
        latency = phase["latency_ms"]
        ratio = round(latency["p50"] / floor["p50"], 2) if name in ("rush", "refused") else ""
        lines.append(
            f"| {name} | {sum(phase['answers'].values())} | {latency['p50']} | {latency['p99']} "
            f"| {ratio} | {phase['drain_seconds'] or ''} | {phase['windows']} "
            f"| {phase['slowest_window_over_median'] or ''} |"
        )
    counts, timeouts = results["counts"], results["task_timeouts"]
    lines.append(
        f"receipts delivered more than once {counts['receipts_delivered_more_than_once']}, "
        f"webhooks taken more than once {counts['webhooks_taken_more_than_once']}, calls after a "
        f"400 {counts['calls_after_a_refusal']}, workflow task timeouts "
        f"{timeouts.get('workflow_task_timeouts', 0)}; worker log: {results['worker_log']}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
